"""Benchmark: ``members trace`` at a million members (``trace_member`` and ``GET /v1/members/…``).

Builds, in SQL (``generate_series``), the rows real syncs leave, in the shapes they write them:

- connector A on a segment of N members, and 20 other connectors of 1,000 members each (the
  same users, in segments of their own), each with its ledger and one finished run;
- A's first sync (N adds in bulk batches of 10,000, every batch sent in one job and settled:
  ``whole_job_id`` cleared, each item ``added``; 0.1 % ``rejected`` with Klaviyo's reason and a
  ``member_rejections`` row), then a churn (10 % leave in removal batches of 1,000, as many
  join), then a running run whose first 5 batches of 10,000 are in one bulk job each
  (``whole_job_id`` set, items without an outcome) and whose 15 others are key ranges not yet
  written (``materialized`` false);
- ``--runs`` small runs kept in the retention window (an hourly recompute for 30 days: 720),
  each a listed batch of 10 adds and 10 removals, and 5,000 purged runs (their rows stay);
- ANALYZE, as autovacuum would have by then.

It checks with EXPLAIN that no statement of the trace reads a big table sequentially, then times
``trace_member`` (a session of the pool each, as the CLI and the API use it) and the API's GET
over real HTTP (uvicorn in this process) for ``--samples`` random user ids (members, leavers,
joiners, rejected ones and unknown ids), and prints p50 / p95 / max and one RESULT line.
The target: at most 200 ms. Writes ``bench/results/<name>.json``.

    .venv/bin/python bench/bench_trace.py --members 1000000 \
        --database-url postgresql://postgres@127.0.0.1:5432/postgres --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MS = 200.0
BIG_TABLES = (
    "segment_members",
    "connector_members",
    "sync_batch_items",
    "sync_batches",
    "sync_runs",
    "member_rejections",
)
# Below this many rows PostgreSQL rightly reads a table whole (a few pages beat an index): a
# small run's member_rejections (0.1 % of the members) is one
BIG_ROWS = 1_000
OTHER_CONNECTORS = 20
OTHER_MEMBERS = 1_000

# user id of universe number g: two thirds emails, one third opaque ids (bench_verify's mix)
UID = (
    "CASE WHEN {g} % 3 = 0 THEN 'u' || lpad(({g})::text, 8, '0') "
    "ELSE 'm' || lpad(({g})::text, 8, '0') || '@bench.example' END"
)


def uid(g: int) -> str:
    return f"u{g:08d}" if g % 3 == 0 else f"m{g:08d}@bench.example"


def build(conn: Any, connector_id: str, others: list[str], n: int, kept_runs: int) -> None:
    """Every row, as the syncs write them (see the module's docstring)."""
    from sqlalchemy import text

    def run(sql: str, **params: Any) -> None:
        started = time.perf_counter()
        conn.execute(text(sql), params)
        conn.commit()
        if time.perf_counter() - started > 1:  # the big statements
            print(
                f"bench: {sql.split('(')[0].strip()[:60]:60} {time.perf_counter() - started:6.1f} s"
            )

    joiners = n // 10
    # the universe: R1's members 0..n-1 (every tenth from 5 leaves in R2), R2's joiners after
    run(
        "CREATE TABLE universe AS SELECT g, user_id, "
        "CASE WHEN g % 3 <> 0 THEN user_id END AS email, "
        "CASE WHEN g % 3 = 0 THEN user_id END AS external_id, "
        "g < :n AS first, g < :n AND g % 10 = 5 AS leaver, g >= :n AS joiner, "
        "g < :n AND g % 1000 = 7 AS rejected FROM generate_series(0, :n + :j - 1) g "
        "CROSS JOIN LATERAL (SELECT " + UID.format(g="g") + " AS user_id) k",
        n=n,
        j=joiners,
    )
    run(
        "INSERT INTO segment_members SELECT 'bench', user_id FROM universe "
        "WHERE (first AND NOT leaver) OR joiner ORDER BY user_id"
    )
    run(
        "INSERT INTO connector_members (connector_id, user_id, email, external_id, profile_id, "
        "added_at, confirmed) SELECT :c, user_id, email, external_id, NULL, "
        "now() - interval '2 days', true FROM universe "
        "WHERE ((first AND NOT leaver) OR joiner) AND NOT rejected ORDER BY user_id",
        c=connector_id,
    )
    r1, r2, r3 = (f"{connector_id}-{n}" for n in ("first", "churn", "live"))
    run(
        "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, started_at, "
        "finished_at, planned_adds, planned_removes, added, removed, rejected, list_id) VALUES "
        "(:r1, :c, 'resync', 'failed', 'finished', now() - interval '2 days', "
        " now() - interval '2 days' + interval '40 seconds', :n, 0, :n - :n / 1000, 0, :n / 1000,"
        " 'BenchL'), "
        "(:r2, :c, 'recompute', 'succeeded', 'finished', now() - interval '1 day', "
        " now() - interval '1 day' + interval '30 seconds', :j, :j, :j, :j, 0, 'BenchL'), "
        "(:r3, :c, 'recompute', 'running', 'dispatched', now() - interval '10 seconds', NULL, "
        " 200000, 0, 0, 0, 0, 'BenchL')",
        r1=r1,
        r2=r2,
        r3=r3,
        c=connector_id,
        n=n,
        j=joiners,
    )
    # the first sync: items numbered in key order, 10,000 a batch, all settled
    run(
        "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, outcome, "
        "reason) SELECT :r, user_id, 'add', ((row_number() OVER (ORDER BY user_id)) - 1) / 10000, "
        "email, external_id, CASE WHEN rejected THEN 'rejected' ELSE 'added' END, "
        "CASE WHEN rejected THEN 'Invalid input.: Invalid email address.' END "
        "FROM universe WHERE first",
        r=r1,
    )
    # the churn: leavers in removals of 1,000 (profile ids looked up), joiners in adds of 10,000
    run(
        "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, "
        "profile_id, outcome) SELECT :r, user_id, 'remove', "
        "((row_number() OVER (ORDER BY user_id)) - 1) / 1000, email, external_id, 'P' || g, "
        "'removed' FROM universe WHERE leaver",
        r=r2,
    )
    run(
        "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, outcome) "
        "SELECT :r, user_id, 'add', ((row_number() OVER (ORDER BY user_id)) - 1) / 10000, email, "
        "external_id, 'added' FROM universe WHERE joiner",
        r=r2,
    )
    # the running run: traits of 200,000 members resent; 5 batches in a bulk job each (no
    # outcome yet), 15 key ranges not written yet
    run(
        "CREATE TABLE live_plan AS SELECT user_id, email, external_id, "
        "((row_number() OVER (ORDER BY user_id)) - 1) / 10000 AS seq "
        "FROM connector_members WHERE connector_id = :c ORDER BY user_id LIMIT 200000",
        c=connector_id,
    )
    run(
        "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, refresh) "
        "SELECT :r, user_id, 'add', seq, email, external_id, true FROM live_plan WHERE seq < 5",
        r=r3,
    )
    # batch rows: each run's batches with the key range their members cover
    run(
        "INSERT INTO sync_batches (run_id, kind, seq, status, job_ids, added, removed, rejected, "
        "lo_user_id, hi_user_id, materialized, sent_at) "
        "SELECT run_id, kind, seq, 'done', ARRAY['job-' || run_id || kind || seq], "
        "count(*) FILTER (WHERE outcome = 'added'), count(*) FILTER (WHERE outcome = 'removed'), "
        "count(*) FILTER (WHERE outcome = 'rejected'), min(user_id), max(user_id), true, now() "
        "FROM sync_batch_items WHERE run_id IN (:r1, :r2) GROUP BY run_id, kind, seq",
        r1=r1,
        r2=r2,
    )
    run(
        "INSERT INTO sync_batches (run_id, kind, seq, status, job_ids, whole_job_id, lo_user_id, "
        "hi_user_id, materialized, sent_at, in_doubt) "
        "SELECT :r, 'add', seq, CASE WHEN seq < 5 THEN 'submitted' ELSE 'pending' END, "
        "CASE WHEN seq < 5 THEN ARRAY['job-live-' || seq] ELSE '{}' END, "
        "CASE WHEN seq < 5 THEN 'job-live-' || seq END, min(user_id), max(user_id), seq < 5, "
        "CASE WHEN seq < 5 THEN now() END, seq < 5 FROM live_plan GROUP BY seq",
        r=r3,
    )
    run(
        "INSERT INTO member_rejections (connector_id, user_id, reason, run_id, retry) "
        "SELECT :c, user_id, 'Invalid input.: Invalid email address.', :r, 'waiting' "
        "FROM universe WHERE rejected",
        c=connector_id,
        r=r1,
    )
    # the other connectors: 1,000 of the same users each, synced yesterday
    for k, other in enumerate(others):
        lo = k * OTHER_MEMBERS * 7
        run(
            "INSERT INTO segment_members SELECT 'other-' || :k, user_id FROM universe "
            "WHERE g >= :lo AND g < :lo + :m",
            k=k,
            lo=lo,
            m=OTHER_MEMBERS,
        )
        run(
            "INSERT INTO connector_members (connector_id, user_id, email, external_id) "
            "SELECT :c, user_id, email, external_id FROM universe WHERE g >= :lo AND g < :lo + :m",
            c=other,
            lo=lo,
            m=OTHER_MEMBERS,
        )
        run(
            "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, started_at, "
            "finished_at, planned_adds, added, list_id) VALUES (:c || '-first', :c, 'resync', "
            "'succeeded', 'finished', now() - interval '1 day', now() - interval '1 day', :m, "
            ":m, 'OthrL0')",
            c=other,
            m=OTHER_MEMBERS,
        )
        run(
            "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, "
            "outcome) SELECT :c || '-first', user_id, 'add', 0, email, external_id, 'added' "
            "FROM universe WHERE g >= :lo AND g < :lo + :m",
            c=other,
            lo=lo,
            m=OTHER_MEMBERS,
        )
        run(
            "INSERT INTO sync_batches (run_id, kind, seq, status, lo_user_id, hi_user_id, "
            "materialized) SELECT run_id, 'add', 0, 'done', min(user_id), max(user_id), true "
            "FROM sync_batch_items WHERE run_id = :c || '-first' GROUP BY run_id",
            c=other,
        )
    # small runs of the window (a listed batch of 10 adds and one of 10 removals each), and
    # purged ones from before it
    run(
        "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, started_at, "
        "finished_at, planned_adds, planned_removes, added, removed, list_id) "
        "SELECT :c || '-small-' || i, :c, 'recompute', 'succeeded', 'finished', "
        "now() - (interval '30 days') * i / (:k + 1), "
        "now() - (interval '30 days') * i / (:k + 1) + interval '2 seconds', 10, 10, 10, 10, "
        "'BenchL' FROM generate_series(1, :k) i",
        c=connector_id,
        k=kept_runs,
    )
    run(
        "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, outcome) "
        "SELECT DISTINCT ON (1, 2) :c || '-small-' || i, u.user_id, "
        "CASE WHEN j <= 10 THEN 'add' ELSE 'remove' END, 0, u.email, u.external_id, "
        "CASE WHEN j <= 10 THEN 'added' ELSE 'removed' END "
        "FROM generate_series(1, :k) i CROSS JOIN generate_series(1, 20) j "
        "JOIN universe u ON u.g = (i * 7919 + j * 104729) % (:n + :jn)",
        c=connector_id,
        k=kept_runs,
        n=n,
        jn=joiners,
    )
    run(
        "INSERT INTO sync_batches (run_id, kind, seq, status, user_ids, materialized, added, "
        "removed) SELECT run_id, kind, 0, 'done', array_agg(user_id ORDER BY user_id), true, "
        "count(*) FILTER (WHERE kind = 'add'), count(*) FILTER (WHERE kind = 'remove') "
        "FROM sync_batch_items WHERE run_id LIKE :c || '-small-%' GROUP BY run_id, kind",
        c=connector_id,
    )
    run(
        "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, started_at, "
        "finished_at, purged_at, planned_adds, added, list_id) "
        "SELECT :c || '-purged-' || i, :c, 'recompute', 'succeeded', 'finished', "
        "now() - interval '31 days' - interval '1 hour' * i, "
        "now() - interval '31 days' - interval '1 hour' * i, now(), 10, 10, 'BenchL' "
        "FROM generate_series(1, 5000) i",
        c=connector_id,
    )
    run("DROP TABLE live_plan")


def seq_scans(s: Any, user_id: str) -> list[str]:
    """The big tables (``BIG_ROWS`` rows or more) any statement of the trace reads
    sequentially (EXPLAIN, no execution)."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from segops_sync.sync import member_trace

    params = {"u": user_id, "cutoff": datetime.now(UTC) - timedelta(days=30)}
    rows = dict(
        s.execute(
            text("SELECT relname, reltuples FROM pg_class WHERE relname = ANY(:t)"),
            {"t": list(BIG_TABLES)},
        ).all()
    )
    big = [t for t in BIG_TABLES if rows.get(t, 0) >= BIG_ROWS]
    found = []
    for sql in (member_trace._CONNECTORS_SQL, member_trace._ITEMS_SQL, member_trace._QUEUED_SQL):
        plan = "\n".join(r[0] for r in s.execute(text("EXPLAIN " + sql), params))
        found += [t for t in big if re.search(rf"Seq Scan on {t}\b", plan)]
    return found


def figures(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=720, help="small runs kept in the window")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--database-url", help="a PostgreSQL server (default: embedded)")
    parser.add_argument("--redis-url", help="a Redis server, no db number (default: embedded)")
    parser.add_argument("--name", help="results file name")
    args = parser.parse_args(argv)
    if args.members < 10_000:
        # on smaller tables a sequential read is PostgreSQL's right choice, not a finding
        parser.error("--members must be at least 10,000: the trace is measured on big tables")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import httpx
    from bench_sync import database, services
    from sqlalchemy import text

    from segops_sync.api import serve_in_thread
    from segops_sync.config import get_settings
    from segops_sync.connectors import create_connector
    from segops_sync.db.migrate import upgrade
    from segops_sync.db.session import get_engine, reset_engine, session_scope
    from segops_sync.sync.member_trace import trace_member

    n = args.members
    rng = random.Random(29)
    with (
        tempfile.TemporaryDirectory(prefix="segops-bench-trace-") as tmp,
        services(args, Path(tmp)) as (pg_url, redis_url),
        database(pg_url) as db_url,
    ):
        token = secrets.token_urlsafe(32)
        prefix = f"segops-bench-trace-{uuid.uuid4().hex[:8]}:"
        os.environ.update(
            {
                "SEGOPS_DATABASE_URL": db_url,
                "SEGOPS_LIMITER_REDIS_URL": f"{redis_url}/14",
                "SEGOPS_REDIS_KEY_PREFIX": prefix,
                "SEGOPS_SECRET_KEY": secrets.token_urlsafe(32),
                "SEGOPS_API_TOKEN": token,
            }
        )
        get_settings.cache_clear()
        reset_engine()
        upgrade(db_url)
        settings = get_settings()
        ids = []
        with session_scope() as s:
            for segment in ["bench", *(f"other-{k}" for k in range(OTHER_CONNECTORS))]:
                connector, _ = create_connector(
                    s,
                    settings,
                    segment_id=segment,
                    list_id="BenchL" if segment == "bench" else "OthrL0",
                    api_key="pk_" + "0" * 34,
                    verify=False,
                )
                s.flush()
                ids.append(connector.id)
        started = time.perf_counter()
        with get_engine().connect() as conn:  # a commit per statement
            build(conn, ids[0], ids[1:], n, args.runs)
        with session_scope() as s:
            s.execute(text("DROP TABLE universe"))
        with session_scope() as s:
            s.execute(text("ANALYZE"))
        build_s = time.perf_counter() - started
        print(f"bench: built in {build_s:.0f} s", flush=True)

        universe = n + n // 10
        samples = [uid(rng.randrange(universe)) for _ in range(args.samples - 20)]
        rejected = rng.sample(range(n // 1000), min(10, n // 1000))  # g % 1000 == 7 is rejected
        samples += [uid(g * 1000 + 7) for g in rejected]
        samples += [f"nobody-{i}@bench.example" for i in range(10)]
        rng.shuffle(samples)
        with session_scope() as s:
            scans = sorted({t for u in samples[:20] for t in seq_scans(s, u)})
        for u in samples[:20]:  # warm the pool and the caches
            with session_scope() as s:
                trace_member(s, u)
        trace_ms: list[float] = []
        shown: Counter[str] = Counter()  # connectors and actions the traces showed
        for u in samples:
            t0 = time.perf_counter()
            with session_scope() as s:
                trace = trace_member(s, u)
            trace_ms.append((time.perf_counter() - t0) * 1000)
            shown["connectors"] += len(trace.connectors)
            shown.update(r.action.value for c in trace.connectors for r in c.runs)
        api_ms: list[float] = []
        with (
            serve_in_thread(token, f"{redis_url}/14", prefix) as url,
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as client,
        ):
            for u in samples[:20]:
                client.get(f"/v1/members/{quote(u, safe='')}")
            for u in samples:
                t0 = time.perf_counter()
                answer = client.get(f"/v1/members/{quote(u, safe='')}")
                api_ms.append((time.perf_counter() - t0) * 1000)
                if answer.status_code != 200:
                    raise SystemExit(f"bench: the API answered {answer.status_code}")

    trace_fig, api_fig = figures(trace_ms), figures(api_ms)
    ok = not scans and trace_fig["max_ms"] <= TARGET_MS and api_fig["max_ms"] <= TARGET_MS
    result = {
        "members": n,
        "kept_small_runs": args.runs,
        "samples": len(samples),
        "build_seconds": round(build_s, 1),
        "trace": trace_fig,
        "api": api_fig,
        "seq_scans_of_big_tables": scans,
        "shown": dict(shown),
        "target_ms": TARGET_MS,
        "ok": ok,
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    name = args.name or f"trace-{n}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"RESULT scenario=trace members={n} kept_runs={args.runs} samples={len(samples)} "
        f"trace_p50_ms={trace_fig['p50_ms']} trace_p95_ms={trace_fig['p95_ms']} "
        f"trace_max_ms={trace_fig['max_ms']} api_p50_ms={api_fig['p50_ms']} "
        f"api_p95_ms={api_fig['p95_ms']} api_max_ms={api_fig['max_ms']} "
        f"seq_scans={len(scans)} ok={int(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
