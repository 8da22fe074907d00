"""The demo of ``docker compose --profile demo up``: a segment synced into the Klaviyo simulator.

``python -m segops_sync.stack_demo --klaviyo-url http://klaviyo-sim:8080`` uses the stack's own
PostgreSQL and Redis, but a database (``segops_demo``, recreated each run), a Redis key prefix
and a worker of its own, pointed at the simulator: the stack's workers, beat and API (pointed
at the real Klaviyo) never see a simulated connector. Unlike ``segops-sync demo`` it needs no demo
extra: the production image runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

SEGMENT = "demo-vip-customers"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def demo_database(server_url: str, name: str) -> str:
    """A fresh database ``name`` beside the stack's own: each demo run starts empty (and a
    changed SEGOPS_SECRET_KEY never meets a previous run's connectors)."""
    if name == make_url(server_url).database:
        raise ValueError(f"the demo's database must not be the stack's own ({name!r})")
    admin = create_engine(
        server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool, hide_parameters=True
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def clear_prefix(redis_urls: list[str], prefix: str) -> None:
    """Forget a previous demo run's messages and limiter state: the prefix is the demo's own."""
    import redis

    for url in dict.fromkeys(u for u in redis_urls if u.startswith(("redis://", "rediss://"))):
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
        finally:
            client.close()


def _cli(*args: str) -> str:
    """``segops-sync …`` in this process; its stdout, or an error naming the command."""
    from segops_sync.cli import main

    out = StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    if code != 0:
        raise RuntimeError(f"segops-sync {' '.join(args[:2])} exited {code}")
    return out.getvalue()


def _members(count: int, start: int = 0) -> list[str]:
    return [f"user{i:05d}@example.com" for i in range(start, start + count)]


def run(klaviyo_url: str, *, database: str, redis_prefix: str, members: int) -> int:
    from segops_sync.config import get_settings
    from segops_sync.db.migrate import upgrade
    from segops_sync.db.session import reset_engine
    from segops_sync.embedded import EmbeddedWorker
    from segops_sync.klaviyo_sim import RemoteSimulator
    from segops_sync.sync.runs import wait_until_idle

    settings = get_settings()
    if not redis_prefix:
        raise ValueError("the demo needs a Redis key prefix of its own")
    url = demo_database(settings.require_database_url(), database)
    upgrade(url)
    clear_prefix([settings.broker_url, settings.result_backend, settings.limiter_url], redis_prefix)
    os.environ.update(
        {
            "SEGOPS_DATABASE_URL": url,
            "SEGOPS_REDIS_KEY_PREFIX": redis_prefix,
            "SEGOPS_KLAVIYO_BASE_URL": klaviyo_url,
            "SEGOPS_JOB_POLL_INTERVAL": "0.5",
        }
    )
    get_settings.cache_clear()
    reset_engine()
    workdir = Path(tempfile.mkdtemp(prefix="segops-stack-demo-"))
    sim = RemoteSimulator(klaviyo_url)
    try:
        account = sim.create_account()
        list_id = sim.create_list(account, "VIP customers (demo)")
        key_file = workdir / "klaviyo.key"
        key_file.touch(mode=0o600)
        key_file.write_text(sim.create_key(account))  # handed over in a file, never in argv
        _say(f"Klaviyo simulator at {klaviyo_url}: account {account}, list {list_id}")
        worker = EmbeddedWorker(dict(os.environ), workdir, concurrency=2, beat=False, name="demo")
        worker.start()
        try:
            _say("demo worker ready")
            doc: dict[str, Any] = json.loads(
                _cli(
                    "connectors", "create", "--type", "klaviyo", "--segment", SEGMENT,
                    "--list-id", list_id, "--api-key-file", str(key_file), "--json",
                )
            )  # fmt: skip
            cid = str(doc["id"])
            _say(f"connector {cid} created (key {doc['api_key']})")
            _cli("connectors", "activate", cid)
            ok = True
            first = _members(members)
            second = first[members // 5 :] + _members(members // 3, start=members)
            for nth, (label, segment) in enumerate((("first", first), ("second", second)), 1):
                path = workdir / f"{label}.txt"
                path.write_text("\n".join(segment) + "\n")
                _say(f"recompute '{label}': {len(segment)} members")
                _cli("recompute", SEGMENT, "--members", str(path))
                if wait_until_idle(cid, finished_at_least=nth, timeout=180) is None:
                    raise RuntimeError("the sync did not finish in time")
                on_list = {p["email"] for p in sim.list_members(list_id)}
                exact = on_list == set(segment)
                ok = ok and exact
                _say(
                    f"Klaviyo list {list_id} holds {len(on_list)} profiles; segment has "
                    f"{len(segment)}: {'exact match' if exact else 'MISMATCH'}"
                )
            print(_cli("connectors", "show", cid), end="", flush=True)
            print(_cli("connectors", "history", cid), end="", flush=True)
            return 0 if ok else 1
        finally:
            worker.stop()
    finally:
        sim.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segops_sync.stack_demo")
    parser.add_argument("--klaviyo-url", required=True, help="the simulator's base URL")
    parser.add_argument("--database", default="segops_demo", help="the demo's own database")
    parser.add_argument("--redis-prefix", default="segops-demo:", help="the demo's Redis keys")
    parser.add_argument("--members", type=int, default=300)
    args = parser.parse_args(argv)
    try:
        return run(
            args.klaviyo_url.rstrip("/"),
            database=args.database,
            redis_prefix=args.redis_prefix,
            members=args.members,
        )
    except Exception as exc:  # one line for a person, whatever broke
        print(f"[demo] failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
