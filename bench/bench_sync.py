"""Benchmark: a first sync and a churn sync of one big segment, on the real stack.

PostgreSQL and Redis (embedded from pip packages, or the servers you name), N ``celery worker``
processes, and the Klaviyo simulator over HTTP at Klaviyo's published limits (``--time-scale 1``)
or compressed. Prints a table and writes ``bench/results/<name>.json``. See bench/README.md.

    .venv/bin/python bench/bench_sync.py                      # 100,000 members, real limits
    .venv/bin/python bench/bench_sync.py --million            # 1,000,000 members
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Phase:
    name: str
    members_in_segment: int
    adds: int
    removes: int
    wall_seconds: float = 0.0  # from the recompute message to the run's end
    run_seconds: float = 0.0  # the run's own started_at -> finished_at
    status: str = ""
    added: int = 0
    removed: int = 0
    rejected: int = 0
    pending: int = 0
    list_exact: bool = False
    requests: dict[str, int] = field(default_factory=dict)
    count_429: int = 0
    early_retries: int = 0

    @property
    def members_per_second(self) -> float:
        return (self.adds + self.removes) / self.wall_seconds if self.wall_seconds else 0.0


class RssSampler:
    """Peak resident memory of the worker processes (main, pool children, beat)."""

    def __init__(self, pids: list[int], every: float = 0.25) -> None:
        self.pids = pids
        self.every = every
        self.peak_total = 0
        self.peak_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self.pids:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for proc in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            rss = proc.memory_info().rss
                            total += rss
                            self.peak_process = max(self.peak_process, rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.every)


def members(start: int, stop: int) -> list[str]:
    """Two thirds email user_ids, one third opaque ids (synced as external_id)."""
    return [f"b{i:07d}@example.com" if i % 3 else f"cust-{i:07d}" for i in range(start, stop)]


@contextlib.contextmanager
def services(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy server URL, Redis URL): the ones given, or embedded throwaway servers."""
    pg_url = args.database_url or os.environ.get("SEGOPS_BENCH_DATABASE_URL")
    redis_url = args.redis_url or os.environ.get("SEGOPS_BENCH_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not pg_url:
            from segops_sync.embedded import EmbeddedPostgres

            pg = EmbeddedPostgres(str(workdir / "pg")).start()
            stack.callback(pg.stop)
            pg_url = pg.url
        if not redis_url:
            from segops_sync.embedded import EmbeddedRedis

            rd = EmbeddedRedis(str(workdir / "redis")).start()
            stack.callback(rd.stop)
            redis_url = rd.url
        yield pg_url, redis_url.rstrip("/")


@contextlib.contextmanager
def database(server_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from segops_sync.config import normalise_database_url

    server_url = normalise_database_url(server_url)
    name = f"segops_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from segops_sync.db.session import reset_engine

        reset_engine()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wait_for_run(connector_id: str, runs: int, timeout: float) -> Any:
    from segops_sync.sync.runs import wait_until_idle

    run = wait_until_idle(connector_id, finished_at_least=runs, timeout=timeout)
    if run is None:
        raise SystemExit(f"bench: the sync did not finish within {timeout:.0f} s")
    return run


def run_phase(
    phase: Phase,
    *,
    segment: str,
    segment_members: list[str],
    connector_id: str,
    runs: int,
    sim: Any,
    list_id: str,
    workdir: Path,
    timeout: float,
) -> None:
    from segops_sync.cli import publish
    from segops_sync.db.session import session_scope
    from segops_sync.sync.membership import replace_membership

    path = workdir / f"{phase.name}.txt"
    path.write_text("".join(f"{m}\n" for m in segment_members))
    with session_scope() as s:
        replace_membership(s, segment, str(path))
    before = len(sim.requests())
    started = time.monotonic()
    publish("segops.recompute_finished", {"segment_id": segment, "recompute_id": str(uuid.uuid4())})
    run = wait_for_run(connector_id, runs, timeout)
    phase.wall_seconds = time.monotonic() - started
    phase.run_seconds = (run.finished_at - run.started_at).total_seconds()
    phase.status = run.status
    phase.added, phase.removed = run.added, run.removed
    phase.rejected, phase.pending = run.rejected, run.pending
    on_list = {p.external_id or p.email for p in sim.list_members(list_id)}
    phase.list_exact = on_list == set(segment_members)
    mine = sim.requests()[before:]
    for r in mine:
        label = r.endpoint.value if r.endpoint else f"{r.method} {r.path}"
        phase.requests[label] = phase.requests.get(label, 0) + 1
    phase.count_429 = sum(1 for r in mine if r.status == 429)
    phase.early_retries = sum(1 for r in mine if r.early_retry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000, help="segment size (100,000)")
    parser.add_argument("--million", action="store_true", help="a segment of 1,000,000")
    parser.add_argument(
        "--churn", type=float, default=0.1, help="share of the segment that leaves and joins (0.1)"
    )
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each (2)")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="compress Klaviyo's windows (1 = real)"
    )
    parser.add_argument(
        "--job-delay", type=float, default=2.0, help="seconds Klaviyo takes over a bulk job (2)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=2.0, help="SEGOPS_JOB_POLL_INTERVAL (2, the default)"
    )
    parser.add_argument("--database-url", help="a PostgreSQL server (default: embedded)")
    parser.add_argument("--redis-url", help="a Redis server, no db number (default: embedded)")
    parser.add_argument("--timeout", type=float, default=3600, help="per sync, seconds")
    parser.add_argument("--name", help="results file name (default from the parameters)")
    args = parser.parse_args(argv)
    size = 1_000_000 if args.million else args.members
    churn = int(size * args.churn)
    if size < 1 or not 0 <= args.churn <= 0.5:
        parser.error("--members must be positive and --churn within [0, 0.5]")
    name = args.name or f"sync-{size}-w{args.workers}x{args.concurrency}-ts{args.time_scale:g}"

    from segops_sync.config import get_settings
    from segops_sync.connectors import create_connector, set_status
    from segops_sync.db.migrate import upgrade
    from segops_sync.db.session import reset_engine, session_scope
    from segops_sync.embedded import EmbeddedWorker
    from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint
    from segops_sync.klaviyo.simulator import Simulator, SimulatorServer
    from segops_sync.states import ConnectorStatus

    workdir = Path(tempfile.mkdtemp(prefix="segops-bench-"))
    workers: list[EmbeddedWorker] = []
    saved_env = dict(os.environ)
    try:
        with services(args, workdir) as (pg_url, redis_url), database(pg_url) as db_url:
            sim = Simulator(time_scale=args.time_scale, job_delay=args.job_delay)
            with SimulatorServer(sim) as server:
                prefix = f"segops-bench-{uuid.uuid4().hex[:8]}:"
                env = {
                    "SEGOPS_DATABASE_URL": db_url,
                    "SEGOPS_BROKER_URL": f"{redis_url}/0",
                    "SEGOPS_RESULT_BACKEND": f"{redis_url}/1",
                    "SEGOPS_LIMITER_REDIS_URL": f"{redis_url}/2",
                    "SEGOPS_REDIS_KEY_PREFIX": prefix,
                    "SEGOPS_SECRET_KEY": secrets.token_urlsafe(32),
                    "SEGOPS_KLAVIYO_BASE_URL": server.base_url,
                    "SEGOPS_KLAVIYO_TIME_SCALE": str(args.time_scale),
                    "SEGOPS_JOB_POLL_INTERVAL": str(args.poll_interval),
                }
                os.environ.update(env)
                get_settings.cache_clear()
                reset_engine()
                upgrade(db_url)
                print(f"bench: starting {args.workers} workers x {args.concurrency}", flush=True)
                for i in range(args.workers):
                    proc = EmbeddedWorker(
                        env, workdir, concurrency=args.concurrency, beat=i == 0, name="bench"
                    )
                    workers.append(proc.start())

                account = sim.create_account()
                api_key = sim.create_key(account)
                list_id = sim.create_list(account, "Bench")
                segment = f"bench-{uuid.uuid4().hex[:8]}"
                with session_scope() as s:
                    connector, _ = create_connector(
                        s, get_settings(), segment_id=segment, list_id=list_id, api_key=api_key
                    )
                    set_status(s, connector.id, ConnectorStatus.ACTIVE)
                    connector_id = connector.id

                everyone = members(0, size)
                churned = members(churn, size + churn)
                first = Phase("first sync", size, adds=size, removes=0)
                second = Phase("churn sync", size, adds=churn, removes=churn)
                pids = [w.proc.pid for w in workers if w.proc is not None]
                with RssSampler(pids) as rss:
                    for runs, phase, segment_members in (
                        (1, first, everyone),
                        (2, second, churned),
                    ):
                        print(f"bench: {phase.name} of {size:,} members…", flush=True)
                        run_phase(
                            phase,
                            segment=segment,
                            segment_members=segment_members,
                            connector_id=connector_id,
                            runs=runs,
                            sim=sim,
                            list_id=list_id,
                            workdir=workdir,
                            timeout=args.timeout,
                        )
                rates = {
                    e.value: {
                        "max_burst_window": sim.max_rate(account, e, sim.burst_window),
                        "burst_limit": ENDPOINT_LIMITS[e].burst,
                        "max_steady_window": sim.max_rate(account, e, sim.steady_window),
                        "steady_limit": ENDPOINT_LIMITS[e].steady,
                    }
                    for e in Endpoint
                    if sim.requests(endpoint=e)
                }
                report = {
                    "name": name,
                    "members": size,
                    "churn": churn,
                    "workers": args.workers,
                    "concurrency": args.concurrency,
                    "time_scale": args.time_scale,
                    "job_delay": args.job_delay,
                    "poll_interval": args.poll_interval,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                    "phases": [
                        {**asdict(p), "members_per_second": round(p.members_per_second, 1)}
                        for p in (first, second)
                    ],
                    "peak_rss_workers_total_mb": round(rss.peak_total / 2**20, 1),
                    "peak_rss_one_process_mb": round(rss.peak_process / 2**20, 1),
                    "rates": rates,
                    "requests_total": len(sim.requests()),
                    "count_429": sim.count_429(),
                    "early_retries": sim.early_retries(),
                }
            for db in (0, 1, 2):  # a Redis that was given stays clean
                client = redis.Redis.from_url(f"{redis_url}/{db}")
                for key in client.scan_iter(match=f"{prefix}*", count=1000):
                    client.delete(key)
    finally:
        for proc in workers:
            proc.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(workdir, ignore_errors=True)

    print_report(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")
    ok = all(p["list_exact"] and p["status"] == "succeeded" for p in report["phases"])
    return 0 if ok else 1


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\n{report['members']:,} members, churn {report['churn']:,} out + {report['churn']:,} in; "
        f"{report['workers']} workers x {report['concurrency']}, time scale "
        f"{report['time_scale']:g}, job delay {report['job_delay']:g} s, "
        f"poll every {report['poll_interval']:g} s"
    )
    print(f"{'phase':12} {'wall s':>8} {'run s':>8} {'members/s':>10} {'status':>10} {'exact':>6}")
    for p in report["phases"]:
        print(
            f"{p['name']:12} {p['wall_seconds']:8.1f} {p['run_seconds']:8.1f} "
            f"{p['members_per_second']:10.0f} {p['status']:>10} {p['list_exact']!s:>6}"
        )
    print(
        f"peak RSS: workers total {report['peak_rss_workers_total_mb']} MB, "
        f"largest process {report['peak_rss_one_process_mb']} MB"
    )
    print(
        f"Klaviyo requests: {report['requests_total']}, 429s: {report['count_429']}, "
        f"early retries: {report['early_retries']}"
    )
    endpoints = sorted({e for p in report["phases"] for e in p["requests"]})
    print(
        f"{'endpoint':52} {'first':>6} {'churn':>6} {'max/1s':>7} {'limit':>5} "
        f"{'max/60s':>8} {'limit':>5}"
    )
    for e in endpoints:
        first, churn = (p["requests"].get(e, 0) for p in report["phases"])
        rate = report["rates"].get(e, {})
        print(
            f"{e:52} {first:6d} {churn:6d} {rate.get('max_burst_window', 0):7d} "
            f"{rate.get('burst_limit', 0):5d} {rate.get('max_steady_window', 0):8d} "
            f"{rate.get('steady_limit', 0):5d}"
        )


if __name__ == "__main__":
    sys.exit(main())
