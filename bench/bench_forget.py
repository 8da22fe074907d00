"""Benchmark: the database side of ``members forget`` (sync/forget.py's purge) at scale.

Seeds a scratch database with what a fleet keeps after syncing big segments: S segments of M
members each, their identities, one connector per segment with its ledger (profile ids known),
one finished first-sync run per connector whose batch items the retention purge has not deleted
yet, with batch rows bounded by user id like the planner's, and, with ``--snapshot``, a verify's
list snapshot of the first list in progress. With ``--in-flight`` the first connector's run is
still running, every batch submitted and no answer recorded (a big first sync while its jobs
run at Klaviyo), and ``member_in_flight``, what a ``segops.forget_user`` message asks before its
purge, is timed too. Then times ``purge_member`` (the one transaction that deletes the member's
rows while it holds the connector rows a batch step needs) for K members spread over the key
range, and each of its statements, and checks the rows went. No Klaviyo: asking the lists
happens after the transaction. Writes ``bench/results/forget-<S>x<M>[-snapshot][-in-flight].json``.

    .venv/bin/python bench/bench_forget.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --segments 2 --members 1000000 --snapshot
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 10_000  # members per batch row, as the planner's bulk batches


def user(i: int) -> str:
    return f"u{i:09d}"


def seed(url: str, segments: int, members: int, snapshot: bool, in_flight: bool) -> None:
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as c:
        for g in range(segments):
            seg, cid, run = f"seg{g}", f"c{g}", f"run{g}"
            running = in_flight and g == 0
            p = {"g": seg, "c": cid, "r": run, "n": members}
            q = {  # a settled run, or one whose jobs are all at Klaviyo
                "status": "running" if running else "succeeded",
                "batch": "submitted" if running else "done",
                "outcome": None if running else "added",
            }
            c.execute(
                text(
                    "INSERT INTO segment_members (segment_id, user_id) "
                    "SELECT :g, 'u' || lpad(i::text, 9, '0') FROM generate_series(0, :n - 1) i"
                ),
                p,
            )
            c.execute(
                text(
                    "INSERT INTO connectors (id, type, segment_id, list_id, api_key_encrypted, "
                    "api_key_hint, status) VALUES (:c, 'klaviyo', :g, 'L' || :c, '\\x00', "
                    "'pk_…', 'active')"
                ),
                p,
            )
            c.execute(
                text(
                    "INSERT INTO connector_members (connector_id, user_id, email, profile_id) "
                    "SELECT :c, 'u' || lpad(i::text, 9, '0'), 'm' || i || '@example.com', "
                    "'P' || :c || i FROM generate_series(0, :n - 1) i"
                ),
                p,
            )
            c.execute(
                text(
                    "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, "
                    "finished_at, planned_adds, added) VALUES (:r, :c, 'recompute', :status, "
                    "CASE WHEN :status = 'running' THEN 'dispatched' ELSE 'finished' END, "
                    "CASE WHEN :status = 'running' THEN NULL ELSE now() END, :n, :n)"
                ),
                {**p, **q},
            )
            c.execute(
                text(
                    "INSERT INTO sync_batches (run_id, kind, seq, status, lo_user_id, hi_user_id) "
                    "SELECT :r, 'add', b, :batch, 'u' || lpad((b * :k)::text, 9, '0'), "
                    "'u' || lpad(least(b * :k + :k - 1, :n - 1)::text, 9, '0') "
                    "FROM generate_series(0, (:n - 1) / :k) b"
                ),
                {**p, **q, "k": BATCH},
            )
            c.execute(
                text(
                    "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, profile_id, "
                    "outcome) SELECT :r, 'u' || lpad(i::text, 9, '0'), 'add', i / :k, "
                    "'m' || i || '@example.com', 'P' || :c || i, CAST(:outcome AS text) "
                    "FROM generate_series(0, :n - 1) i"
                ),
                {**p, **q, "k": BATCH},
            )
        c.execute(
            text(
                "INSERT INTO identities (user_id, email) SELECT 'u' || lpad(i::text, 9, '0'), "
                "'m' || i || '@example.com' FROM generate_series(0, :n - 1) i"
            ),
            {"n": members},
        )
        if snapshot:
            c.execute(
                text(
                    "INSERT INTO list_snapshots (verify_id, profile_id, connector_id, email) "
                    "SELECT 'v0', 'Pc0' || i, 'c0', 'm' || i || '@example.com' "
                    "FROM generate_series(0, :n - 1) i"
                ),
                {"n": members},
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE"))
    engine.dispose()


def remaining(url: str, u: str) -> dict[str, int]:
    engine = create_engine(url, poolclass=NullPool)
    queries = {
        "segment_members": "SELECT count(*) FROM segment_members WHERE user_id = :u",
        "identities": "SELECT count(*) FROM identities WHERE user_id = :u",
        "connector_members": "SELECT count(*) FROM connector_members WHERE user_id = :u",
        "sync_batch_items": "SELECT count(*) FROM sync_batch_items WHERE user_id = :u",
    }
    with engine.connect() as c:
        counts = {t: int(c.scalar(text(q), {"u": u}) or 0) for t, q in queries.items()}
    engine.dispose()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL server")
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--members", type=int, default=1_000_000, help="per segment")
    parser.add_argument("--forgets", type=int, default=7, help="members forgotten, one by one")
    parser.add_argument(
        "--snapshot", action="store_true", help="a verify's snapshot of the first list"
    )
    parser.add_argument(
        "--in-flight",
        action="store_true",
        help="the first connector's run still running, its jobs at Klaviyo",
    )
    args = parser.parse_args()

    # bench_sync.database: a scratch database on the server, dropped afterwards
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sync import database

    with database(args.database_url) as url:
        os.environ["SEGOPS_DATABASE_URL"] = url
        from segops_sync.db.migrate import upgrade
        from segops_sync.db.session import get_engine, reset_engine
        from segops_sync.sync.forget import member_in_flight, purge_member

        upgrade(url)
        started = time.perf_counter()
        seed(url, args.segments, args.members, args.snapshot, args.in_flight)
        seeded = time.perf_counter() - started
        extras = (", a snapshot" if args.snapshot else "") + (
            ", the first run in flight" if args.in_flight else ""
        )
        print(
            f"seeded {args.segments} segments x {args.members:,} members "
            f"(ledger, one run's items each{extras}) in {seeded:.1f} s"
        )

        # Each statement's time, by its first words: where a purge spends it.
        per_statement: dict[str, list[float]] = defaultdict(list)
        begun: list[float] = []

        @event.listens_for(get_engine(), "before_cursor_execute")
        def _before(*_: Any) -> None:
            begun.append(time.perf_counter())

        @event.listens_for(get_engine(), "after_cursor_execute")
        def _after(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            key = " ".join(statement.split())[:70]
            per_statement[key].append(time.perf_counter() - begun.pop())

        span = args.members - 1
        totals, checks = [], []
        for k in range(args.forgets):
            u = user(span * (k + 1) // (args.forgets + 1))
            t0 = time.perf_counter()
            in_flight = member_in_flight(u)  # timed whatever python -O does to an assert
            checks.append(time.perf_counter() - t0)
            assert in_flight is args.in_flight
            t0 = time.perf_counter()
            known = purge_member(u)
            totals.append(time.perf_counter() - t0)
            left = remaining(url, u)
            assert not any(left.values()), f"rows of {u} left: {left}"
            assert len(known.lists) == args.segments, known.lists
        reset_engine()

        print(
            f"purge_member of {args.forgets} members: median {statistics.median(totals) * 1e3:.1f} ms, "
            f"max {max(totals) * 1e3:.1f} ms (first {totals[0] * 1e3:.1f} ms); "
            f"member_in_flight before it: median {statistics.median(checks) * 1e3:.2f} ms"
        )
        print(
            "   statement (first 70 characters)                                          median ms"
        )
        for key, times in sorted(per_statement.items(), key=lambda kv: -statistics.median(kv[1])):
            print(f"   {key:74} {statistics.median(times) * 1e3:8.2f}")
        RESULTS.mkdir(exist_ok=True)
        suffix = ("-snapshot" if args.snapshot else "") + ("-in-flight" if args.in_flight else "")
        out = RESULTS / f"forget-{args.segments}x{args.members}{suffix}.json"
        out.write_text(
            json.dumps(
                {
                    "segments": args.segments,
                    "members": args.members,
                    "snapshot": args.snapshot,
                    "in_flight": args.in_flight,
                    "purge_ms": [round(t * 1e3, 2) for t in totals],
                    "in_flight_check_ms": [round(t * 1e3, 3) for t in checks],
                    "statements_median_ms": {
                        k: round(statistics.median(v) * 1e3, 3) for k, v in per_statement.items()
                    },
                },
                indent=2,
            )
            + "\n"
        )
        print(
            f"RESULT scenario=forget segments={args.segments} members={args.members} "
            f"snapshot={int(args.snapshot)} in_flight={int(args.in_flight)} "
            f"purge_median_ms={statistics.median(totals) * 1e3:.1f} "
            f"purge_max_ms={max(totals) * 1e3:.1f} "
            f"in_flight_check_median_ms={statistics.median(checks) * 1e3:.2f}"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
