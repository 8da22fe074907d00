"""Benchmark: first sync, churn and a small change of big segments, against Klaviyo's floor.

PostgreSQL and Redis (embedded from pip packages, or the servers you name), N ``celery worker``
processes, and the Klaviyo simulator over HTTP at Klaviyo's published limits (``--time-scale 1``)
or compressed, with bulk jobs that take ``--job-delay`` seconds. For each size, ``--scenario
single``: a first sync, a churn sync (``--churn``), a change of 5 out + 5 in (freshness), a
read-back of the list and a churn after it (``--phases``); ``head-of-line``: small changes of two
other connectors while a first sync runs; ``one-account``: five connectors of one account
started together against one connector's first sync. Prints each phase against the floors
Klaviyo's limits and the limiter's headroom allow (sync/costs.py) and the CPU-seconds per million
members of each process group, ends with one ``RESULT`` line per phase (and one line per
scenario), and writes ``bench/results/<name>.json``. See bench/README.md.

    .venv/bin/python bench/bench_sync.py --members 10000,100000,1000000 --job-delay 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import redis

if TYPE_CHECKING:
    from segops_sync.sync.costs import RemovalKey

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("first", "churn", "small", "readback", "churn-known")
SCENARIOS = ("single", "head-of-line", "one-account")
CPU_GROUPS = ("workers", "postgres", "redis", "simulator")


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
    key: str = ""  # the --phases name, or "together" for the five connectors of one-account
    scenario: str = "single"
    connector: str = ""  # which connector of the scenario (A, B, C; single; 1-5)
    # the floor at the limiter's admitted share of each steady limit (--headroom), burst whole
    floor_headroom_seconds: float = 0.0
    # message -> the run's finished_at (the workers' clock): comparable across connectors that
    # run together, where waiting for one run delays noticing the next
    end_seconds: float = 0.0
    # False for a connector inside a group: the group's phase holds the requests and the CPU
    measured: bool = True
    cpu_per_million: dict[str, float] = field(default_factory=dict)

    @property
    def ratio_headroom(self) -> float:
        return (
            self.wall_seconds / self.floor_headroom_seconds if self.floor_headroom_seconds else 0.0
        )

    @property
    def moved(self) -> int:
        """Members the phase handled: added plus removed, or read back."""
        return self.adds + self.removes if self.key != "readback" else self.members_in_segment

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


def cpu_snapshot(worker_pids: list[int], redis_pids: list[int]) -> dict[str, dict[int, float]]:
    """CPU seconds used so far, per process, by the workers (and their children), PostgreSQL's
    processes (every one on the machine: the figure is ours only on an otherwise idle machine),
    Redis and this process, the simulator's host."""
    totals: dict[str, dict[int, float]] = {k: {} for k in CPU_GROUPS}

    def used(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "postgres":
                totals["postgres"][proc.pid] = used(proc)
    for pid in worker_pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    totals["workers"][proc.pid] = used(proc)
    for pid in redis_pids:
        with contextlib.suppress(psutil.Error):
            totals["redis"][pid] = used(psutil.Process(pid))
    totals["simulator"][os.getpid()] = used(psutil.Process())
    return totals


def redis_processes(redis_url: str) -> list[int]:
    """The redis-server serving ``redis_url``: the one listening on its port (an embedded
    server is a child of this process, a given one anywhere on the machine)."""
    from urllib.parse import urlsplit

    port = urlsplit(redis_url).port or 6379
    found: list[int] = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if not (proc.info["name"] or "").startswith("redis-server"):
                continue
            listening = {
                c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            }
            if port in listening or f":{port}" in " ".join(proc.info["cmdline"] or []):
                found.append(proc.pid)
    if not found:
        print(f"bench: no redis-server found on port {port}: Redis CPU is not counted", flush=True)
    return found


def cpu_used(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds of each group between two snapshots, process by process: one that started
    meanwhile counts whole, one that ended (a PostgreSQL backend whose connection closed) takes
    what it used since ``before`` with it, so the figure is a slight undercount, never less
    than 0."""
    return {
        k: round(sum(max(0.0, t - before[k].get(pid, 0.0)) for pid, t in after[k].items()), 2)
        for k in CPU_GROUPS
    }


def per_million(cpu: dict[str, float], members: int) -> dict[str, float]:
    """CPU-seconds per million members handled: the figure that does not depend on the machine."""
    return {k: round(v * 1e6 / members, 1) for k, v in cpu.items()} if members else {}


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


@dataclass
class Sync:
    """One connector's run within a group of runs timed together."""

    phase: Phase
    connector_id: str
    segment: str
    list_id: str
    now: list[str]  # the segment after the recompute
    previous: list[str]  # what the list holds before it
    runs: int  # the connector's finished runs once this one ends
    fresh: bool = False  # poll the simulator until the changed members are right
    start_after: float = 0.0  # seconds after the group's first message
    published: float = 0.0  # time.monotonic() of its recompute message
    published_wall: float = 0.0  # time.time() of the same


@dataclass
class Bench:
    """What every phase needs: the simulator, the workers' processes, the options."""

    args: argparse.Namespace
    sim: Any
    workdir: Path
    rss: RssSampler
    redis_pids: list[int]
    account: str
    create: Callable[[str, str, str | None], str]  # (segment, list id, api key) -> connector id

    def cpu(self) -> dict[str, dict[int, float]]:
        return cpu_snapshot(self.rss.pids, self.redis_pids)


def floors(phase: Phase, joiners: int, leavers: list[str], bench: Bench) -> None:
    """Both floors of the phase. After a read-back the ledger knows the leavers' profile ids:
    their removals need no lookups, and the floor of a churn-known counts none."""
    from segops_sync.sync.costs import Delta, floor_seconds

    delta = Delta.of(joiners, [(m, removal_key(m)) for m in leavers])
    if phase.key == "churn-known":
        delta = Delta(delta.adds, delta.removes, lookup_calls=0)
    common = {"job_seconds": bench.args.job_delay, "time_scale": bench.args.time_scale}
    phase.floor_seconds = floor_seconds(delta, **common)
    phase.floor_headroom_seconds = floor_seconds(delta, headroom=bench.args.headroom, **common)


def run_group(syncs: list[Sync], summary: Phase, bench: Bench) -> None:
    """Load each segment, send the recompute messages (each ``start_after`` the first), watch
    the small changes reach Klaviyo, wait for every run. ``summary`` (one of the syncs' phases,
    or a phase of its own for the group) gets the requests, the CPU and the RSS of the group."""
    from segops_sync.cli import publish
    from segops_sync.db.models import Connector
    from segops_sync.db.session import session_scope
    from segops_sync.sync.inputs.membership import replace_membership
    from segops_sync.sync.planner import delta_sizes

    sim, timeout = bench.sim, bench.args.timeout
    changes: dict[int, dict[str, bool]] = {}
    for i, sync in enumerate(syncs):
        now, before_set = set(sync.now), set(sync.previous)
        leavers = [m for m in sync.previous if m not in now]
        joiners = [m for m in sync.now if m not in before_set]
        changes[i] = {identity(m): True for m in joiners} | {identity(m): False for m in leavers}
        floors(sync.phase, len(joiners), leavers, bench)
        path = bench.workdir / f"{sync.segment}-{sync.runs}.txt"
        path.write_text("".join(f"{m}\n" for m in sync.now))
        loaded = time.monotonic()
        with session_scope() as s:
            replace_membership(s, sync.segment, str(path))
        sync.phase.load_seconds = time.monotonic() - loaded
    with collector_paused():  # this process is Klaviyo's stand-in
        bench.rss.reset()
        cpu_before = bench.cpu()
        before = len(sim.requests())
        started = time.monotonic()
        for sync in sorted(syncs, key=lambda x: x.start_after):
            time.sleep(max(0.0, started + sync.start_after - time.monotonic()))
            sync.published, sync.published_wall = time.monotonic(), time.time()
            publish(
                "segops.recompute_finished",
                {"segment_id": sync.segment, "recompute_id": str(uuid.uuid4())},
            )
        # Klaviyo's side of "on the list": poll the simulator for the changed members only.
        watched = {i for i, sync in enumerate(syncs) if sync.fresh}
        while watched:
            if time.monotonic() > started + timeout:
                raise SystemExit("bench: a small change never reached its list")
            for i in sorted(watched):
                if sim.on_list(syncs[i].list_id, changes[i]) == changes[i]:
                    syncs[i].phase.fresh_seconds = time.monotonic() - syncs[i].published
                    watched.discard(i)
            time.sleep(0.01)
        finished = []
        for sync in syncs:
            run = wait_for_run(sync.connector_id, sync.runs, timeout)
            sync.phase.wall_seconds = time.monotonic() - sync.published
            assert run.finished_at is not None and run.started_at is not None
            sync.phase.end_seconds = run.finished_at.timestamp() - sync.published_wall
            if len(syncs) > 1:  # noticed only once the runs waited for before it had ended
                sync.phase.wall_seconds = sync.phase.end_seconds
            finished.append(run)
        summary.peak_rss_mb = round(bench.rss.peak_process / 2**20, 1)
        summary.cpu_seconds = cpu_used(cpu_before, bench.cpu())
    grouped = all(summary is not sync.phase for sync in syncs)
    if grouped:
        first_wall = min(sync.published_wall for sync in syncs)
        summary.end_seconds = max(
            r.finished_at.timestamp() - first_wall for r in finished if r.finished_at
        )
        summary.wall_seconds = summary.end_seconds
        summary.status = "succeeded" if all(s.status == "succeeded" for s in finished) else "failed"
        summary.added = sum(r.added for r in finished)
        summary.removed = sum(r.removed for r in finished)
    for i, (sync, run) in enumerate(zip(syncs, finished, strict=True)):
        phase = sync.phase
        phase.measured = phase is summary
        phase.run_seconds = (run.finished_at - run.started_at).total_seconds()
        phase.status = run.status
        phase.added, phase.removed = run.added, run.removed
        phase.rejected, phase.pending = run.rejected, run.pending
        phase.list_exact = list_is(sim, sync.list_id, sync.now, changes[i])
        diffed = time.monotonic()
        with session_scope() as s:
            delta_sizes(s, s.get_one(Connector, sync.connector_id))
        phase.diff_seconds = time.monotonic() - diffed
    if grouped:
        summary.list_exact = all(sync.phase.list_exact for sync in syncs)
    count_requests(summary, sim.requests()[before:], started)
    summary.cpu_per_million = per_million(summary.cpu_seconds, summary.moved)


def list_is(sim: Any, list_id: str, now: list[str], changed: dict[str, bool]) -> bool:
    if len(now) <= 200_000:
        return {p.external_id or p.email for p in sim.list_members(list_id)} == set(now)
    # a million snapshots is slow under the simulator's lock: check the changes
    return sim.on_list(list_id, changed) == changed and len(sim.list_member_ids(list_id)) == len(
        now
    )


def count_requests(phase: Phase, mine: list[Any], started: float) -> None:
    """Requests per endpoint, their timeline and pace after ``started``, the 429s."""
    from segops_sync.klaviyo import Endpoint

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


def run_readback(phase: Phase, connector_id: str, bench: Bench) -> None:
    """``segops-sync connectors verify ID`` in a process of its own, as ops run it: the list read
    back page by page (the ledger learns the profile ids) and compared with the segment. Its CPU
    (a child this process waits for) counts with the workers'."""
    from segops_sync.klaviyo import Endpoint
    from segops_sync.sync.costs import last_request_time

    pages = -(-phase.members_in_segment // 100)
    phase.floor_seconds = (
        last_request_time(pages, Endpoint.GET_LIST_MEMBERS) / bench.args.time_scale
    )
    phase.floor_headroom_seconds = (
        last_request_time(pages, Endpoint.GET_LIST_MEMBERS, bench.args.headroom)
        / bench.args.time_scale
    )
    sim = bench.sim
    with collector_paused():
        bench.rss.reset()
        cpu_before = bench.cpu()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        before = len(sim.requests())
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "segops_sync.cli",
                "connectors",
                "verify",
                connector_id,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=bench.args.timeout,
        )
        phase.wall_seconds = phase.end_seconds = time.monotonic() - started
        cpu = cpu_used(cpu_before, bench.cpu())
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        cpu["workers"] = round(cpu["workers"] + cli_cpu, 1)
        phase.cpu_seconds = cpu
        phase.peak_rss_mb = round(bench.rss.peak_process / 2**20, 1)
    if done.returncode != 0:
        print(f"bench: the read-back failed: {done.stderr.strip()}", flush=True)
        phase.status = "failed"
    else:
        found = json.loads(done.stdout)
        phase.status = "succeeded"
        phase.list_exact = found["missing"] == 0 and found["extra"] == 0
    count_requests(phase, sim.requests()[before:], started)
    phase.cpu_per_million = per_million(phase.cpu_seconds, phase.moved)


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
        help="which phases to run, in order, first first (first,churn,small); also readback "
        "(read the list back: the ledger learns the profile ids) and churn-known (a churn after "
        "it); 'first' alone for a 5M RSS check; --scenario single only",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="single",
        help="single: one connector's phases; head-of-line: two small changes (another account, "
        "the same account) while a first sync runs; one-account: five connectors of one "
        "account with a fifth each, against one connector's first sync (single)",
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
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    if (
        not wanted
        or wanted[0] != "first"
        or len(set(wanted)) != len(wanted)
        or not set(wanted) <= set(PHASES)
    ):
        parser.error(f"--phases: 'first', then any of {', '.join(PHASES[1:])}, each once")
    if "churn-known" in wanted and (
        "readback" not in wanted or wanted.index("churn-known") < wanted.index("readback")
    ):
        parser.error("--phases: churn-known comes after readback (the read-back learns the ids)")
    if args.scenario == "one-account" and any(n % 5 for n in sizes):
        parser.error("--scenario one-account: each size must be a multiple of 5")
    if not 0 < args.churn <= 0.5 or not 0 < args.headroom <= 1 or not 0 <= args.burst_guard <= 1:
        parser.error(
            "--churn must be within (0, 0.5], --headroom within (0, 1], --burst-guard in [0, 1]"
        )
    name = args.name or (
        f"sync-{'' if args.scenario == 'single' else args.scenario + '-'}"
        f"{'+'.join(str(n) for n in sizes)}-w{args.workers}x{args.concurrency}"
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
    scenario_lines: list[str] = []
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
                redis_pids = redis_processes(redis_url)
                with RssSampler(pids) as rss:
                    bench = Bench(
                        args,
                        sim,
                        workdir,
                        rss,
                        redis_pids,
                        account,
                        create=lambda seg, lst, key: _connector(
                            create_connector,
                            set_status,
                            session_scope,
                            get_settings,
                            seg,
                            lst,
                            key or api_key,
                        ),
                    )
                    for size in sizes:
                        done, lines = SCENARIO_RUNS[args.scenario](size, bench)
                        phases += done
                        scenario_lines += lines
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
                    "scenario": args.scenario,
                    "scenario_lines": scenario_lines,
                    "redis_pids": redis_pids,
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
                            "ratio_headroom": round(p.ratio_headroom, 3),
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
        if p["measured"]:
            print(result_line(p))
    for line in report["scenario_lines"]:
        print(line)
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


def show(phase: Phase) -> None:
    print(
        "  "
        + result_line(
            {**asdict(phase), "ratio": phase.ratio, "ratio_headroom": phase.ratio_headroom}
        ),
        flush=True,
    )


def bench_single(size: int, bench: Bench) -> tuple[list[Phase], list[str]]:
    """One connector's phases (--phases) over a segment of `size` members."""
    args, sim = bench.args, bench.sim
    list_id = sim.create_list(bench.account, f"Bench {size}")
    segment = f"bench-{size}-{uuid.uuid4().hex[:6]}"
    connector_id = bench.create(segment, list_id, None)
    churn = int(size * args.churn)
    current: list[str] = []
    fresh_id = size  # the next member never seen
    runs = 0
    done: list[Phase] = []
    for key in [p.strip() for p in args.phases.split(",") if p.strip()]:
        if key == "readback":
            phase = Phase("read-back", len(current), adds=0, removes=0, key=key)
            print(f"bench: {size:,} members, {phase.name}…", flush=True)
            run_readback(phase, connector_id, bench)
            show(phase)
            done.append(phase)
            continue
        if key == "first":
            phase, now = Phase("first sync", size, adds=size, removes=0), members(0, size)
        elif key == "small":  # 5 out (the oldest), 5 in (new ones)
            phase = Phase("5 out 5 in", size, adds=5, removes=5)
            now, fresh_id = current[5:] + members(fresh_id, fresh_id + 5), fresh_id + 5
        else:  # churn, churn-known
            name = "churn" if key == "churn" else "churn known"
            phase = Phase(name, size, adds=churn, removes=churn)
            now, fresh_id = current[churn:] + members(fresh_id, fresh_id + churn), fresh_id + churn
        phase.key, runs = key, runs + 1
        print(f"bench: {size:,} members, {phase.name}…", flush=True)
        sync = Sync(phase, connector_id, segment, list_id, now, current, runs, key == "small")
        run_group([sync], phase, bench)
        current = now
        show(phase)
        done.append(phase)
    return done, []


def bench_head_of_line(size: int, bench: Bench) -> tuple[list[Phase], list[str]]:
    """Connector A starts a first sync of `size`; 2 s later connector B (another account) and
    connector C (A's account, another list) each send a change of 5 out + 5 in. Their freshness
    is what a fleet busy with A's batches gives a small run."""
    sim, scenario = bench.sim, "head-of-line"
    other = sim.create_account()
    other_key = sim.create_key(other)
    tag = uuid.uuid4().hex[:6]
    setups: list[Sync] = []
    for label, account, key in (("B", other, other_key), ("C", bench.account, None)):
        list_id = sim.create_list(account, f"Bench {label} {size}")
        segment = f"bench-{label}-{tag}"
        base = 50_000_000 if label == "B" else 60_000_000  # never one of A's members
        phase = Phase("setup", 100, adds=100, removes=0, key="first", scenario=scenario)
        phase.connector = label
        sync = Sync(
            phase,
            bench.create(segment, list_id, key),
            segment,
            list_id,
            members(base, base + 100),
            [],
            runs=1,
        )
        setups.append(sync)
    print("bench: B and C sync their first 100 members…", flush=True)
    run_group(setups, Phase("setup", 200, adds=200, removes=0, scenario=scenario), bench)
    a_list = sim.create_list(bench.account, f"Bench A {size}")
    a_segment = f"bench-A-{tag}"
    a = Phase("first sync", size, adds=size, removes=0, key="first", scenario=scenario)
    a.connector = "A"
    group = [
        Sync(
            a,
            bench.create(a_segment, a_list, None),
            a_segment,
            a_list,
            members(0, size),
            [],
            runs=1,
        )
    ]
    for setup in setups:
        base = 50_000_000 if setup.phase.connector == "B" else 60_000_000
        phase = Phase("5 out 5 in", 100, adds=5, removes=5, key="small", scenario=scenario)
        phase.connector = setup.phase.connector
        group.append(
            Sync(
                phase,
                setup.connector_id,
                setup.segment,
                setup.list_id,
                setup.now[5:] + members(base + 100, base + 105),
                setup.now,
                runs=2,
                fresh=True,
                start_after=2.0,
            )
        )
    print(f"bench: {size:,} members, A's first sync with B's and C's small changes…", flush=True)
    run_group(group, a, bench)
    b, c = group[1].phase, group[2].phase
    show(a)
    line = (
        f"HEAD-OF-LINE members={size} b_fresh_s={b.fresh_seconds:.2f} "
        f"c_fresh_s={c.fresh_seconds:.2f} a_ratio={a.ratio:.3f} "
        f"a_ratio_headroom={a.ratio_headroom:.3f} count_429={a.count_429}"
    )
    print("  " + line, flush=True)
    return [*(s.phase for s in setups), a, b, c], [line]


def bench_one_account(size: int, bench: Bench) -> tuple[list[Phase], list[str]]:
    """One connector's first sync of `size`, then five connectors of the same account, each with
    a fifth of it (other members), their recompute messages sent together."""
    sim, args, scenario = bench.sim, bench.args, "one-account"
    tag = uuid.uuid4().hex[:6]
    list_id = sim.create_list(bench.account, f"Bench single {size}")
    segment = f"bench-single-{tag}"
    single = Phase("first sync", size, adds=size, removes=0, key="first", scenario=scenario)
    single.connector = "single"
    print(f"bench: {size:,} members, one connector's first sync…", flush=True)
    run_group(
        [
            Sync(
                single,
                bench.create(segment, list_id, None),
                segment,
                list_id,
                members(0, size),
                [],
                runs=1,
            )
        ],
        single,
        bench,
    )
    show(single)
    # The limiter's and the simulator's 60 s windows forget the single run before the five start.
    pause = 61 / args.time_scale
    print(f"bench: {pause:.0f} s for the steady windows to clear…", flush=True)
    time.sleep(pause)
    part = size // 5
    group: list[Sync] = []
    for i in range(5):
        lst = sim.create_list(bench.account, f"Bench five {i + 1} {size}")
        seg = f"bench-five-{i + 1}-{tag}"
        phase = Phase("first sync", part, adds=part, removes=0, key="first", scenario=scenario)
        phase.connector = str(i + 1)
        start = size + i * part
        group.append(
            Sync(
                phase,
                bench.create(seg, lst, None),
                seg,
                lst,
                members(start, start + part),
                [],
                runs=1,
            )
        )
    together = Phase("5 together", size, adds=size, removes=0, key="together", scenario=scenario)
    together.connector = "1-5"
    floors(together, size, [], bench)
    print(f"bench: {size:,} members, five connectors of {part:,} together…", flush=True)
    run_group(group, together, bench)
    show(together)
    ends = [sync.phase.end_seconds for sync in group]
    line = (
        f"ONE-ACCOUNT members={size} five_s={together.end_seconds:.2f} "
        f"single_s={single.end_seconds:.2f} "
        f"vs_single={together.end_seconds / single.end_seconds:.3f} "
        f"worst_vs_first={max(ends) / min(ends):.3f} "
        f"finish_vs_first={','.join(f'{e / min(ends):.2f}' for e in ends)} "
        f"count_429={together.count_429}"
    )
    print("  " + line, flush=True)
    return [single, *(s.phase for s in group), together], [line]


SCENARIO_RUNS: dict[str, Callable[[int, Bench], tuple[list[Phase], list[str]]]] = {
    "single": bench_single,
    "head-of-line": bench_head_of_line,
    "one-account": bench_one_account,
}


def result_line(p: dict[str, Any]) -> str:
    churn = 0 if p["key"] in ("first", "together", "readback") else p["adds"]
    cpu = p.get("cpu_seconds") or {}
    per_m = p.get("cpu_per_million") or {}
    fresh = f"{p['fresh_seconds']:.2f}" if p["fresh_seconds"] else "-"
    return (
        f"RESULT members={p['members_in_segment']} churn={churn} "
        f"end_to_end_s={p['wall_seconds']:.2f} floor_s={p['floor_seconds']:.2f} "
        f"ratio={p['ratio']:.3f} diff_s={p['diff_seconds']:.2f} load_s={p['load_seconds']:.2f} "
        f"peak_rss_mb={p['peak_rss_mb']:.0f} scenario={p['scenario']} "
        f"cpu_s={cpu.get('workers', 0) + cpu.get('postgres', 0):.1f} phase={p['key']} "
        f"connector={p['connector'] or '-'} floor_headroom_s={p['floor_headroom_seconds']:.2f} "
        f"ratio_headroom={p['ratio_headroom']:.3f} fresh_s={fresh} count_429={p['count_429']} "
        + " ".join(f"cpu_per_m_{k}={per_m.get(k, 0):.1f}" for k in CPU_GROUPS)
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


def label(p: dict[str, Any]) -> str:
    return f"{p['connector']} {p['name']}" if p["connector"] else p["name"]


def print_report(report: dict[str, Any]) -> None:
    load = report["machine"]
    print(
        f"\nscenario {report['scenario']}; churn {report['churn_share']:.0%} out + in; "
        f"{report['workers']} workers x "
        f"{report['concurrency']}, time scale {report['time_scale']:g}, bulk job "
        f"{report['job_delay']:g} s, poll every {report['poll_interval']:g} s, headroom "
        f"{report['headroom']:g}, burst guard {report.get('burst_guard', 0):g}; load average "
        f"{load['loadavg_before'][0]:.1f} before, "
        f"{load['loadavg_after'][0]:.1f} after ({load['cpus']} CPUs, shared)"
    )
    if "postgres" in load:
        print("PostgreSQL " + ", ".join(f"{k} {v}" for k, v in load["postgres"].items()))
    print(
        f"{'members':>9} {'phase':18} {'end-to-end s':>12} {'floor s':>8} {'ratio':>6} "
        f"{'floor@h s':>9} {'ratio@h':>7} {'fresh s':>7} {'load s':>6} {'diff s':>6} "
        f"{'429s':>4} {'RSS MB':>6} {'exact':>5}"
    )
    for p in report["phases"]:
        fresh = f"{p['fresh_seconds']:.2f}" if p["fresh_seconds"] else "-"
        print(
            f"{p['members_in_segment']:>9,} {label(p):18} {p['wall_seconds']:12.2f} "
            f"{p['floor_seconds']:8.2f} {p['ratio']:6.2f} {p['floor_headroom_seconds']:9.2f} "
            f"{p['ratio_headroom']:7.2f} {fresh:>7} {p['load_seconds']:6.2f} "
            f"{p['diff_seconds']:6.2f} {p['count_429']:4d} {p['peak_rss_mb']:6.0f} "
            f"{p['list_exact']!s:>5}"
        )
    measured = [p for p in report["phases"] if p["measured"]]
    for p in measured:
        cpu = p.get("cpu_seconds") or {}
        busy = sum(cpu.values())
        print(
            f"{p['members_in_segment']:>9,} {label(p):18} CPU s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
            + f" = {busy:.1f} in {p['wall_seconds']:.1f} s ({busy / max(p['wall_seconds'], 1e-9):.2f} "
            f"of {report['machine']['cpus']} CPUs)"
        )
    print(
        f"CPU-seconds per million members handled (PostgreSQL counts every postgres process on "
        f"the machine):\n{'members':>9} {'phase':18} " + " ".join(f"{k:>9}" for k in CPU_GROUPS)
    )
    for p in measured:
        per_m = p.get("cpu_per_million") or {}
        print(
            f"{p['members_in_segment']:>9,} {label(p):18} "
            + " ".join(f"{per_m.get(k, 0):9.1f}" for k in CPU_GROUPS)
        )
    print(
        f"largest worker process: {report['peak_rss_one_process_mb']} MB; Klaviyo requests: "
        f"{report['requests_total']}, 429s: {report['count_429']}, early retries: "
        f"{report['early_retries']}"
    )
    endpoints = sorted({e for p in measured for e in p["requests"]})
    heads = [f"{p['members_in_segment'] // 1000}k {p['name'][:5]}" for p in measured]
    print(f"{'requests per endpoint':52} " + " ".join(f"{h:>11}" for h in heads))
    for e in endpoints:
        counts = " ".join(f"{p['requests'].get(e, 0):>11}" for p in measured)
        print(f"{e:52} {counts}")
    print(f"{'endpoint':52} {'max/1s':>7} {'limit':>5} {'max/60s':>8} {'limit':>5}")
    for e, rate in sorted(report["rates"].items()):
        print(
            f"{e:52} {rate['max_burst_window']:7d} {rate['burst_limit']:5d} "
            f"{rate['max_steady_window']:8d} {rate['steady_limit']:5d}"
        )


if __name__ == "__main__":
    sys.exit(main())
