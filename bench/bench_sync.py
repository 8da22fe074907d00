"""Benchmark: first sync, churn and a small change of big segments, against Klaviyo's floor.

PostgreSQL and Redis (embedded from pip packages, or the servers you name), N ``celery worker``
processes, and the Klaviyo simulator over HTTP at Klaviyo's published limits (``--time-scale 1``)
or compressed, with bulk jobs that take ``--job-delay`` seconds. For each size: a first sync, a
churn sync (``--churn``) and a change of 5 out + 5 in (freshness). Prints each phase against the
floor Klaviyo's limits allow (sync/costs.py), ends with one ``RESULT`` line per phase, and writes
``bench/results/<name>.json``. See bench/README.md.

    .venv/bin/python bench/bench_sync.py --members 10000,100000,1000000 --job-delay 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
from typing import TYPE_CHECKING, Any

import psutil
import redis

if TYPE_CHECKING:
    from segops_sync.sync.costs import RemovalKey

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
    floor_seconds: float = 0.0  # Klaviyo's published limits allow no faster (sync/costs.py)
    load_seconds: float = 0.0  # replace_membership of the segment (what `recompute` does)
    diff_seconds: float = 0.0  # the planner's delta, segment against ledger, after the run
    fresh_seconds: float = 0.0  # message -> every changed member right on Klaviyo's list
    peak_rss_mb: float = 0.0  # the largest worker process during this phase
    # endpoint -> [first, last] request, seconds after the recompute message: where time goes
    timeline: dict[str, list[float]] = field(default_factory=dict)
    # CPU seconds spent during the phase by PostgreSQL, the workers and this process (the
    # simulator): on a small machine the sum over the wall time says who is the bound
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    # endpoint -> requests in each 5 s after the message: the pace, not just the span
    per_5s: dict[str, list[int]] = field(default_factory=dict)
    # the job submissions' arrivals as the simulator stamped them (seconds after the message,
    # ms): what its fixed windows counted, to set beside the limiter's even pace
    submissions: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.wall_seconds / self.floor_seconds if self.floor_seconds else 0.0

    @property
    def members_per_second(self) -> float:
        return (self.adds + self.removes) / self.wall_seconds if self.wall_seconds else 0.0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process while a sync is timed.

    This process hosts the simulator, whose profiles are millions of long-lived objects: each
    full collection walked all of them with the GIL held, 0.2-0.7 s about once a second through
    a 1M first sync (measured with gc.callbacks). Requests that arrived meanwhile were stamped
    together when it ended: job submissions granted 0.12 s apart counted 10 in one second, and
    the 11th met a 429 that Klaviyo's edge, which does not pause for its job workers' memory,
    would not have sent. The pauses were also a third of the simulator's CPU (11.4 -> 7.4 s).
    The garbage a sync leaves in this process is collected before the next one, untimed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cpu_snapshot(worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds used so far by PostgreSQL's processes, the workers (and their children),
    and this process, the simulator's host."""
    totals = {"postgres": 0.0, "workers": 0.0, "simulator": 0.0}

    def used(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "postgres":
                totals["postgres"] += used(proc)
    for pid in worker_pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    totals["workers"] += used(proc)
    totals["simulator"] = used(psutil.Process())
    return totals


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

    def reset(self) -> None:
        self.peak_total = self.peak_process = 0

    def _processes(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
        return found

    def _run(self) -> None:
        # Finding the pool's children walks all of /proc: done every 2 s, not every sample
        # (it was 5 % of a CPU the benchmark took from what it measures).
        processes: list[psutil.Process] = []
        listed = 0.0
        while not self._stop.is_set():
            if time.monotonic() - listed >= 2.0:
                processes, listed = self._processes(), time.monotonic()
            total = 0
            for proc in processes:
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


def identity(user_id: str) -> str:
    """What the simulator knows a member by: the email, or the external_id."""
    return user_id


def removal_key(user_id: str) -> RemovalKey:
    from segops_sync.sync.inputs.identity import is_email

    return "email" if is_email(user_id) else "external_id"


def run_phase(
    phase: Phase,
    *,
    segment: str,
    segment_members: list[str],
    previous: list[str],
    connector_id: str,
    runs: int,
    sim: Any,
    list_id: str,
    workdir: Path,
    timeout: float,
    job_seconds: float,
    time_scale: float,
    rss: RssSampler,
    watch_freshness: bool = False,
) -> None:
    from segops_sync.cli import publish
    from segops_sync.db.models import Connector
    from segops_sync.db.session import session_scope
    from segops_sync.klaviyo import Endpoint
    from segops_sync.sync.costs import Delta, floor_seconds
    from segops_sync.sync.inputs.membership import replace_membership
    from segops_sync.sync.planner import delta_sizes

    now = set(segment_members)
    before_set = set(previous)
    leavers = [m for m in previous if m not in now]
    joiners = [m for m in segment_members if m not in before_set]
    phase.floor_seconds = floor_seconds(
        Delta.of(len(joiners), [(m, removal_key(m)) for m in leavers]),
        job_seconds=job_seconds,
        time_scale=time_scale,
    )
    path = workdir / f"{phase.name}.txt"
    path.write_text("".join(f"{m}\n" for m in segment_members))
    loaded = time.monotonic()
    with session_scope() as s:
        replace_membership(s, segment, str(path))
    phase.load_seconds = time.monotonic() - loaded
    with collector_paused():  # this process is Klaviyo's stand-in
        rss.reset()
        cpu_before = cpu_snapshot(rss.pids)
        before = len(sim.requests())
        started = time.monotonic()
        publish(
            "segops.recompute_finished", {"segment_id": segment, "recompute_id": str(uuid.uuid4())}
        )
        if watch_freshness:
            # Klaviyo's side of "on the list": poll the simulator for the changed members only.
            wanted = {identity(m): True for m in joiners} | {identity(m): False for m in leavers}
            deadline = started + timeout
            while sim.on_list(list_id, wanted) != wanted:
                if time.monotonic() > deadline:
                    raise SystemExit("bench: the small change never reached the list")
                time.sleep(0.01)
            phase.fresh_seconds = time.monotonic() - started
        run = wait_for_run(connector_id, runs, timeout)
        phase.wall_seconds = time.monotonic() - started
        phase.peak_rss_mb = round(rss.peak_process / 2**20, 1)
        phase.cpu_seconds = {
            k: round(v - cpu_before[k], 1) for k, v in cpu_snapshot(rss.pids).items()
        }
    phase.run_seconds = (run.finished_at - run.started_at).total_seconds()
    phase.status = run.status
    phase.added, phase.removed = run.added, run.removed
    phase.rejected, phase.pending = run.rejected, run.pending
    if len(segment_members) <= 200_000 or watch_freshness:
        on_list = {p.external_id or p.email for p in sim.list_members(list_id)}
        phase.list_exact = on_list == now
    else:  # a million snapshots is slow under the simulator's lock: check the changes
        changed = {identity(m): True for m in joiners} | {identity(m): False for m in leavers}
        phase.list_exact = sim.on_list(list_id, changed) == changed and len(
            sim.list_member_ids(list_id)
        ) == len(now)
    mine = sim.requests()[before:]
    for r in mine:
        label = r.endpoint.value if r.endpoint else f"{r.method} {r.path}"
        phase.requests[label] = phase.requests.get(label, 0) + 1
        at = round(r.time - started, 2)  # the simulator stamps with the same monotonic clock
        span = phase.timeline.setdefault(label, [at, at])
        span[0], span[1] = min(span[0], at), max(span[1], at)
        buckets = phase.per_5s.setdefault(label, [])
        slot = max(0, int(at // 5))
        buckets.extend([0] * (slot + 1 - len(buckets)))
        buckets[slot] += 1
        if r.endpoint is Endpoint.CREATE_BULK_IMPORT_JOB:
            phase.submissions.append(round(r.time - started, 3))
    phase.count_429 = sum(1 for r in mine if r.status == 429)
    phase.early_retries = sum(1 for r in mine if r.early_retry)
    diffed = time.monotonic()
    with session_scope() as s:
        delta_sizes(s, s.get_one(Connector, connector_id))
    phase.diff_seconds = time.monotonic() - diffed


def sizes_arg(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("sizes are whole numbers, e.g. 10000,100000") from None
    if not sizes or min(sizes) < 20:
        raise argparse.ArgumentTypeError("each size must be at least 20")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--members",
        type=sizes_arg,
        default=[10_000, 100_000],
        help="segment sizes, comma-separated (10000,100000; add 1000000 for the 1M point)",
    )
    parser.add_argument("--million", action="store_true", help="same as --members 1000000")
    parser.add_argument(
        "--churn", type=float, default=0.1, help="share of the segment that leaves and joins (0.1)"
    )
    parser.add_argument(
        "--phases",
        default="first,churn,small",
        help="which phases to run, in order (first,churn,small); e.g. 'first' for a 5M RSS check",
    )
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each (2)")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="compress Klaviyo's windows (1 = real)"
    )
    parser.add_argument(
        "--job-delay", type=float, default=5.0, help="seconds Klaviyo takes over a bulk job (5)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="SEGOPS_JOB_POLL_INTERVAL (1, the default)"
    )
    parser.add_argument(
        "--headroom", type=float, default=0.9, help="SEGOPS_LIMITER_HEADROOM (0.9, the default)"
    )
    parser.add_argument(
        "--burst-guard",
        type=float,
        default=0.05,
        help="SEGOPS_LIMITER_BURST_GUARD (0.05, the default)",
    )
    parser.add_argument(
        "--official-models",
        action="store_true",
        help="validate bodies with Klaviyo's generated models (0.27 s of simulator CPU per "
        "10,000-profile job, under its lock; the contract tests do this, off by default here)",
    )
    parser.add_argument("--database-url", help="a PostgreSQL server (default: embedded)")
    parser.add_argument("--redis-url", help="a Redis server, no db number (default: embedded)")
    parser.add_argument("--timeout", type=float, default=3600, help="per sync, seconds")
    parser.add_argument("--name", help="results file name (default from the parameters)")
    parser.add_argument("--keep-logs", help="copy the worker logs into this directory")
    parser.add_argument(
        "--worker-log-level",
        default="info",
        help="the workers' -l (info); debug adds each batch step's time and outcome",
    )
    args = parser.parse_args(argv)
    sizes = [1_000_000] if args.million else args.members
    order = ["first", "churn", "small"]
    if [p.strip() for p in args.phases.split(",")] not in (order[:1], order[:2], order):
        parser.error("--phases is first, first,churn or first,churn,small (each needs the last)")
    if not 0 < args.churn <= 0.5 or not 0 < args.headroom <= 1 or not 0 <= args.burst_guard <= 1:
        parser.error(
            "--churn must be within (0, 0.5], --headroom within (0, 1], --burst-guard in [0, 1]"
        )
    name = args.name or (
        f"sync-{'+'.join(str(n) for n in sizes)}-w{args.workers}x{args.concurrency}"
        f"-ts{args.time_scale:g}-job{args.job_delay:g}-h{args.headroom:g}"
    )

    from segops_sync.config import get_settings
    from segops_sync.connectors import create_connector, set_status
    from segops_sync.db.migrate import upgrade
    from segops_sync.db.session import reset_engine, session_scope
    from segops_sync.embedded import EmbeddedWorker
    from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint
    from segops_sync.klaviyo_sim import Simulator, SimulatorServer

    # This process serves the simulator: its event loop gives up the GIL at every socket read
    # and, while a thread applies a 10,000-profile job, waited up to the 5 ms switch interval to
    # get it back after each one. Reading 650 KB job bodies that way delayed when requests were
    # counted by up to a third of a second, bunching submissions sent 9 a second into 12 in one
    # counted second at 5M members. Klaviyo's edge is not starved by its own job workers.
    sys.setswitchinterval(0.0005)
    workdir = Path(tempfile.mkdtemp(prefix="segops-bench-"))
    workers: list[EmbeddedWorker] = []
    saved_env = dict(os.environ)
    load_before = os.getloadavg()
    phases: list[Phase] = []
    try:
        with services(args, workdir) as (pg_url, redis_url), database(pg_url) as db_url:
            sim = Simulator(
                time_scale=args.time_scale,
                job_delay=args.job_delay,
                use_official_models=bool(args.official_models),
            )
            # Klaviyo applies a job in its own workers, not on the request that next arrives.
            sim.start_job_runner()
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
                    "SEGOPS_LIMITER_HEADROOM": str(args.headroom),
                    "SEGOPS_LIMITER_BURST_GUARD": str(args.burst_guard),
                }
                os.environ.update(env)
                get_settings.cache_clear()
                reset_engine()
                upgrade(db_url)
                print(f"bench: starting {args.workers} workers x {args.concurrency}", flush=True)
                for i in range(args.workers):
                    proc = EmbeddedWorker(
                        env,
                        workdir,
                        concurrency=args.concurrency,
                        beat=i == 0,
                        name="bench",
                        extra_args=["-l", args.worker_log_level],
                    )
                    workers.append(proc.start())
                pids = [w.proc.pid for w in workers if w.proc is not None]
                account = sim.create_account()
                api_key = sim.create_key(account)
                with RssSampler(pids) as rss:
                    for size in sizes:
                        phases += bench_size(
                            size,
                            args=args,
                            sim=sim,
                            account=account,
                            api_key=api_key,
                            workdir=workdir,
                            rss=rss,
                            create=lambda seg, lst: _connector(
                                create_connector,
                                set_status,
                                session_scope,
                                get_settings,
                                seg,
                                lst,
                                api_key,
                            ),
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
                    "sizes": sizes,
                    "churn_share": args.churn,
                    "workers": args.workers,
                    "concurrency": args.concurrency,
                    "time_scale": args.time_scale,
                    "job_delay": args.job_delay,
                    "poll_interval": args.poll_interval,
                    "headroom": args.headroom,
                    "burst_guard": args.burst_guard,
                    "official_models": args.official_models,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                        "postgres": postgres_settings(session_scope),
                    },
                    "phases": [
                        {
                            **asdict(p),
                            "members_per_second": round(p.members_per_second, 1),
                            "ratio": round(p.ratio, 3),
                        }
                        for p in phases
                    ],
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
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                shutil.copy(proc.log_path, args.keep_logs)
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(workdir, ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"\nwritten to {out}\n")
    for p in report["phases"]:
        print(result_line(p))
    ok = all(p["list_exact"] and p["status"] == "succeeded" for p in report["phases"])
    return 0 if ok else 1


def _connector(
    create_connector: Any,
    set_status: Any,
    session_scope: Any,
    get_settings: Any,
    segment: str,
    list_id: str,
    api_key: str,
) -> str:
    from segops_sync.states import ConnectorStatus

    with session_scope() as s:
        connector, _ = create_connector(
            s, get_settings(), segment_id=segment, list_id=list_id, api_key=api_key
        )
        set_status(s, connector.id, ConnectorStatus.ACTIVE)
        return str(connector.id)


def bench_size(
    size: int,
    *,
    args: argparse.Namespace,
    sim: Any,
    account: str,
    api_key: str,
    workdir: Path,
    rss: RssSampler,
    create: Any,
) -> list[Phase]:
    """A first sync, a churn and a small change of one segment of `size` members."""
    list_id = sim.create_list(account, f"Bench {size}")
    segment = f"bench-{size}-{uuid.uuid4().hex[:6]}"
    connector_id = create(segment, list_id)
    churn = int(size * args.churn)
    everyone = members(0, size)
    churned = members(churn, size + churn)
    # 5 out (the first 5 of the churned segment), 5 in (new ones)
    small = churned[5:] + members(size + churn, size + churn + 5)
    steps = [
        (Phase("first sync", size, adds=size, removes=0), everyone, [], False),
        (Phase("churn", size, adds=churn, removes=churn), churned, everyone, False),
        (Phase("5 out 5 in", size, adds=5, removes=5), small, churned, True),
    ]
    wanted = [p.strip() for p in args.phases.split(",")]
    steps = [
        step for step, key in zip(steps, ("first", "churn", "small"), strict=True) if key in wanted
    ]
    done: list[Phase] = []
    for runs, (phase, segment_members, previous, fresh) in enumerate(steps, start=1):
        print(f"bench: {size:,} members, {phase.name}…", flush=True)
        run_phase(
            phase,
            segment=segment,
            segment_members=segment_members,
            previous=previous,
            connector_id=connector_id,
            runs=runs,
            sim=sim,
            list_id=list_id,
            workdir=workdir,
            timeout=args.timeout,
            job_seconds=args.job_delay,
            time_scale=args.time_scale,
            rss=rss,
            watch_freshness=fresh,
        )
        print("  " + result_line({**asdict(phase), "ratio": phase.ratio}), flush=True)
        done.append(phase)
    return done


def result_line(p: dict[str, Any]) -> str:
    churn = 0 if p["name"] == "first sync" else p["adds"]
    return (
        f"RESULT members={p['members_in_segment']} churn={churn} "
        f"end_to_end_s={p['wall_seconds']:.2f} floor_s={p['floor_seconds']:.2f} "
        f"ratio={p['ratio']:.3f} diff_s={p['diff_seconds']:.2f} load_s={p['load_seconds']:.2f} "
        f"peak_rss_mb={p['peak_rss_mb']:.0f}"
    )


# What PostgreSQL was given: bulk writes of millions of rows depend on them.
POSTGRES_SETTINGS = ("server_version", "shared_buffers", "max_wal_size", "autovacuum")


def postgres_settings(session_scope: Any) -> dict[str, str]:
    from sqlalchemy import text

    with session_scope() as s:
        return {
            name: str(s.scalar(text(f"SELECT current_setting('{name}')")))
            for name in POSTGRES_SETTINGS
        }


def print_report(report: dict[str, Any]) -> None:
    load = report["machine"]
    print(
        f"\nchurn {report['churn_share']:.0%} out + in; {report['workers']} workers x "
        f"{report['concurrency']}, time scale {report['time_scale']:g}, bulk job "
        f"{report['job_delay']:g} s, poll every {report['poll_interval']:g} s, headroom "
        f"{report['headroom']:g}, burst guard {report.get('burst_guard', 0):g}; load average {load['loadavg_before'][0]:.1f} before, "
        f"{load['loadavg_after'][0]:.1f} after ({load['cpus']} CPUs, shared)"
    )
    if "postgres" in load:
        print("PostgreSQL " + ", ".join(f"{k} {v}" for k, v in load["postgres"].items()))
    print(
        f"{'members':>9} {'phase':11} {'end-to-end s':>12} {'floor s':>8} {'ratio':>6} "
        f"{'fresh s':>7} {'load s':>6} {'diff s':>6} {'429s':>4} {'RSS MB':>6} {'exact':>5}"
    )
    for p in report["phases"]:
        fresh = f"{p['fresh_seconds']:.2f}" if p["fresh_seconds"] else "-"
        print(
            f"{p['members_in_segment']:>9,} {p['name']:11} {p['wall_seconds']:12.2f} "
            f"{p['floor_seconds']:8.2f} {p['ratio']:6.2f} {fresh:>7} {p['load_seconds']:6.2f} "
            f"{p['diff_seconds']:6.2f} {p['count_429']:4d} {p['peak_rss_mb']:6.0f} "
            f"{p['list_exact']!s:>5}"
        )
    for p in report["phases"]:
        cpu = p.get("cpu_seconds") or {}
        busy = sum(cpu.values())
        print(
            f"{p['members_in_segment']:>9,} {p['name']:11} CPU s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
            + f" = {busy:.1f} in {p['wall_seconds']:.1f} s ({busy / max(p['wall_seconds'], 1e-9):.2f} "
            f"of {report['machine']['cpus']} CPUs)"
        )
    print(
        f"largest worker process: {report['peak_rss_one_process_mb']} MB; Klaviyo requests: "
        f"{report['requests_total']}, 429s: {report['count_429']}, early retries: "
        f"{report['early_retries']}"
    )
    endpoints = sorted({e for p in report["phases"] for e in p["requests"]})
    heads = [f"{p['members_in_segment'] // 1000}k {p['name'][:5]}" for p in report["phases"]]
    print(f"{'requests per endpoint':52} " + " ".join(f"{h:>11}" for h in heads))
    for e in endpoints:
        counts = " ".join(f"{p['requests'].get(e, 0):>11}" for p in report["phases"])
        print(f"{e:52} {counts}")
    print(f"{'endpoint':52} {'max/1s':>7} {'limit':>5} {'max/60s':>8} {'limit':>5}")
    for e, rate in sorted(report["rates"].items()):
        print(
            f"{e:52} {rate['max_burst_window']:7d} {rate['burst_limit']:5d} "
            f"{rate['max_steady_window']:8d} {rate['steady_limit']:5d}"
        )


if __name__ == "__main__":
    sys.exit(main())
