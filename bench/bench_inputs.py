"""Benchmark: what SegOps' side costs at scale, without Klaviyo: a recompute and the delta.

1. ``segops-sync recompute`` of N member ids, as the recompute service runs it (the real
   command, in its own process: the file read, COPY and the swap of the segment's rows).
2. The ledger then holds all N members (set up in SQL, untimed: a synced segment).
3. A second recompute, in which ``--changes`` members leave and as many join.
4. The delta of that segment against the ledger: ``start_run`` + ``plan_run``, as the worker
   plans a run (the full join of N against N, cut into batches stored as key ranges).

Prints one ``RESULT`` line and writes ``bench/results/<name>.json``.

    .venv/bin/python bench/bench_inputs.py --members 10000000 \
        --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEGMENT = "bench-inputs"


def write_members(path: Path, start: int, stop: int, skip: int = 0) -> None:
    """Member ids u<start+skip>..u<stop>, one a line; zero-padded so their order is numeric."""
    with path.open("w") as out:
        block = 100_000
        for lo in range(start + skip, stop, block):
            hi = min(lo + block, stop)
            out.write("".join(f"u{i:09d}\n" for i in range(lo, hi)))


def recompute(env: dict[str, str], path: Path) -> float:
    """The real command, timed from outside as a recompute service would see it."""
    started = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "segops-sync"),
            "recompute",
            SEGMENT,
            "--members",
            str(path),
        ],
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=10_000_000)
    parser.add_argument("--changes", type=int, default=10, help="leave and join (10 each)")
    parser.add_argument("--database-url", help="a PostgreSQL server (default: embedded)")
    parser.add_argument("--redis-url", help="a Redis server, no db number (default: embedded)")
    parser.add_argument("--name", help="results file name")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sync import database, services

    from segops_sync.config import get_settings
    from segops_sync.db.migrate import upgrade
    from segops_sync.db.models import Connector
    from segops_sync.db.session import reset_engine, session_scope
    from segops_sync.secrets import encrypt_api_key
    from segops_sync.states import ConnectorStatus, Trigger
    from segops_sync.sync.planner import plan_run, start_run

    n, changes = args.members, args.changes
    with tempfile.TemporaryDirectory(prefix="segops-bench-inputs-") as tmp:
        workdir = Path(tmp)
        with services(args, workdir) as (pg_url, redis_url), database(pg_url) as db_url:
            secret = secrets.token_urlsafe(32)
            env = {
                "SEGOPS_DATABASE_URL": db_url,
                "SEGOPS_BROKER_URL": f"{redis_url}/0",
                "SEGOPS_RESULT_BACKEND": f"{redis_url}/1",
                "SEGOPS_REDIS_KEY_PREFIX": f"segops-bench-inputs-{uuid.uuid4().hex[:8]}:",
                "SEGOPS_SECRET_KEY": secret,
            }
            os.environ.update(env)
            get_settings.cache_clear()
            reset_engine()
            upgrade(db_url)
            first, second = workdir / "first.txt", workdir / "second.txt"
            write_members(first, 0, n)
            write_members(second, 0, n + changes, skip=changes)  # the first `changes` leave

            print(f"bench: recompute of {n:,} ids", flush=True)
            first_s = recompute(env, first)

            connector_id = str(uuid.uuid4())
            with session_scope() as s:
                s.add(
                    Connector(
                        id=connector_id,
                        segment_id=SEGMENT,
                        list_id="BenchLst",
                        api_key_encrypted=encrypt_api_key("pk_" + "0" * 34, secret),
                        api_key_hint="pk_…0000",
                        status=ConnectorStatus.ACTIVE,
                    )
                )
            from sqlalchemy import text

            with session_scope() as s:  # a synced segment: every member in the ledger
                s.execute(
                    text(
                        "INSERT INTO connector_members (connector_id, user_id, confirmed) "
                        "SELECT :c, user_id, true FROM segment_members WHERE segment_id = :seg"
                    ),
                    {"c": connector_id, "seg": SEGMENT},
                )
            from sqlalchemy import create_engine

            admin = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE connector_members"))
            admin.dispose()

            print(f"bench: recompute with {changes} out and {changes} in", flush=True)
            second_s = recompute(env, second)

            started = time.perf_counter()
            with session_scope() as s:
                run_id = start_run(s, connector_id, trigger=Trigger.RECOMPUTE).run_id
            assert run_id is not None
            with session_scope() as s:
                plan = plan_run(s, run_id, get_settings())
            delta_s = time.perf_counter() - started
            if (plan.adds, plan.removes) != (changes, changes):
                raise SystemExit(f"bench: the delta is {plan.adds}/{plan.removes}, not {changes}")

    result = {
        "members": n,
        "changes": changes,
        "recompute_seconds": round(first_s, 2),
        "recompute_again_seconds": round(second_s, 2),
        "delta_seconds": round(delta_s, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    name = args.name or f"inputs-{n}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"RESULT scenario=inputs members={n} recompute_s={first_s:.2f} "
        f"recompute_again_s={second_s:.2f} delta_s={delta_s:.2f} adds={plan.adds} "
        f"removes={plan.removes}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
