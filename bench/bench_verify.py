"""Benchmark: reading a Klaviyo list back and comparing it with its segment (``connectors verify``).

Seeds the simulator with a list of M profiles and the database with the segment and the ledger
(10 members taken off the list, 10 foreign profiles added), then times ``verify_list``: the
read-back at the L tier under the fleet limiter (real PostgreSQL and Redis), and the comparison
in SQL. Checks the counts. Writes ``bench/results/verify-<M>-ts<S>.json``.

    .venv/bin/python bench/bench_verify.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --redis-url redis://127.0.0.1:6379 --members 100000
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=os.environ.get("SEGOPS_BENCH_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("SEGOPS_BENCH_REDIS_URL"))
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--time-scale", type=float, default=1.0)
    args = parser.parse_args()
    if not args.database_url or not args.redis_url:
        parser.error("--database-url and --redis-url are required")

    from segops_sync.config import normalise_database_url

    server_url = normalise_database_url(args.database_url)
    name = f"segops_benchverify_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        return run(url, args.redis_url.rstrip("/"), args.members, args.time_scale)
    finally:
        from segops_sync.db.session import reset_engine

        reset_engine()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(database_url: str, redis_url: str, members: int, time_scale: float) -> int:
    from segops_sync.db.migrate import upgrade
    from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint
    from segops_sync.klaviyo_sim import Simulator, SimulatorServer

    upgrade(database_url)
    sim = Simulator(time_scale=time_scale)
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    user_ids = [f"m{i:07d}@bench.example" if i % 3 else f"u{i:07d}" for i in range(members)]
    t0 = time.monotonic()
    profile_ids = [
        sim.add_profile(account, email=u) if "@" in u else sim.add_profile(account, external_id=u)
        for u in user_ids
    ]
    sim.add_to_list(list_id, profile_ids)
    sim.remove_from_list(list_id, profile_ids[:10])
    foreign = [sim.add_profile(account, email=f"f{i}@elsewhere.example") for i in range(10)]
    sim.add_to_list(list_id, foreign)
    seed_seconds = time.monotonic() - t0

    with SimulatorServer(sim) as server:
        os.environ.update(
            {
                "SEGOPS_DATABASE_URL": database_url,
                "SEGOPS_LIMITER_REDIS_URL": f"{redis_url}/14",
                "SEGOPS_REDIS_KEY_PREFIX": f"benchverify-{uuid.uuid4().hex[:8]}:",
                "SEGOPS_SECRET_KEY": secrets.token_urlsafe(32),
                "SEGOPS_KLAVIYO_BASE_URL": server.base_url,
                "SEGOPS_KLAVIYO_TIME_SCALE": str(time_scale),
            }
        )
        from segops_sync.config import get_settings
        from segops_sync.connectors import create_connector
        from segops_sync.db.session import session_scope
        from segops_sync.sync.fleet.access import KlaviyoAccess
        from segops_sync.sync.verify import read_list

        get_settings.cache_clear()
        settings = get_settings()
        with session_scope() as s:
            connector, _ = create_connector(
                s, settings, segment_id="bench", list_id=list_id, api_key=key, verify=False
            )
            connector_id = connector.id
            s.execute(
                text("INSERT INTO segment_members SELECT 'bench', unnest(CAST(:u AS text[]))"),
                {"u": user_ids},
            )
            s.execute(
                text(
                    "INSERT INTO connector_members (connector_id, user_id, email, external_id, "
                    "added_at) SELECT :c, u, CASE WHEN u LIKE '%@%' THEN u END, "
                    "CASE WHEN u NOT LIKE '%@%' THEN u END, now() - interval '1 day' "
                    "FROM unnest(CAST(:u AS text[])) u"
                ),
                {"c": connector_id, "u": user_ids},
            )
        access = KlaviyoAccess(settings)
        t1 = time.monotonic()
        verify_id, started = read_list(connector_id, access, settings)
        read_seconds = time.monotonic() - t1
        from segops_sync.sync.verify import compare, discard

        t2 = time.monotonic()
        with session_scope() as s:
            result = compare(s, connector_id, verify_id, started)
        compare_seconds = time.monotonic() - t2
        discard(connector_id, verify_id)
        endpoint = Endpoint.GET_LIST_MEMBERS
        pages = len(sim.requests(endpoint=endpoint))
        limit = ENDPOINT_LIMITS[endpoint]
        doc = {
            "members": members,
            "time_scale": time_scale,
            "seed_seconds": round(seed_seconds, 1),
            "read_seconds": round(read_seconds, 2),
            "read_seconds_at_real_limits": round(read_seconds * time_scale, 1),
            "compare_seconds": round(compare_seconds, 2),
            "pages": pages,
            "count_429": sim.count_429(),
            "max_per_burst_window": sim.max_rate(account, endpoint, sim.burst_window),
            "max_per_steady_window": sim.max_rate(account, endpoint, sim.steady_window),
            "published": {"burst": limit.burst, "steady": limit.steady},
            "found": {
                "in_list": result.in_list,
                "expected": result.expected,
                "missing": result.missing,
                "extra": result.extra,
                "foreign": result.foreign,
                "forgotten": result.forgotten,
            },
        }
    ok = (result.in_list, result.expected, result.missing, result.extra, result.forgotten) == (
        members,
        members,
        10,
        10,
        10,
    )
    doc["ok"] = ok
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"verify-{members}-ts{time_scale:g}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
