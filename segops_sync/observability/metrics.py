"""Prometheus metrics of a worker node, summed over its prefork processes (names: docs/contract.md).

prometheus_client's multiprocess mode: every process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` and the node's main process serves ``/metrics`` by reading them all
(``MultiProcessCollector``). The directory must be set before the first metric exists in any
process, so :func:`prepare_node` runs in the main process before the pool forks, and the metrics
themselves are created lazily, on first use, in the process that records them.

Counts are recorded where a state change is committed once (a run closing under its row lock),
never per attempt, so a retried or redelivered task does not count twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Runs take from a second (a small delta) to an hour (a first sync of millions).
RUN_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.members_synced = Counter(
            "segops_members_synced_total",
            "Members whose outcome Klaviyo confirmed, counted once per member when a run closes",
            ["connector_id", "action"],
        )
        self.sync_runs = Counter(
            "segops_sync_runs_total", "Sync runs by final status", ["connector_id", "status"]
        )
        self.run_seconds = Histogram(
            "segops_sync_run_seconds",
            "Wall time of a sync run, from start to close",
            ["connector_id"],
            buckets=RUN_SECONDS_BUCKETS,
        )
        self.klaviyo_requests = Counter(
            "segops_klaviyo_requests_total",
            "HTTP answers from Klaviyo, by endpoint template and status code",
            ["endpoint", "code"],
        )
        self.klaviyo_throttled = Counter(
            "segops_klaviyo_throttled_total", "429 answers from Klaviyo", ["endpoint"]
        )
        self.limiter_wait = Counter(
            "segops_limiter_wait_seconds_total",
            "Seconds the fleet-wide limiter asked requests to wait before being sent",
            ["endpoint"],
        )


_lock = threading.Lock()
_metrics: _Metrics | None = None


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def forget_metrics() -> None:
    """Drop this process's metric objects; the next record creates them with the current
    value class (files in multiprocess mode)."""
    global _metrics
    with _lock:
        if _metrics is not None:
            from prometheus_client import REGISTRY

            for collector in vars(_metrics).values():
                with contextlib.suppress(KeyError):
                    REGISTRY.unregister(collector)
            _metrics = None


# -- recording (any process) ----------------------------------------------------------------


def count_run(
    connector_id: str,
    status: str,
    *,
    seconds: float | None,
    added: int,
    removed: int,
    rejected: int,
) -> None:
    m = _get()
    m.sync_runs.labels(connector_id, status).inc()
    if seconds is not None and seconds >= 0:
        m.run_seconds.labels(connector_id).observe(seconds)
    for action, n in (("added", added), ("removed", removed), ("rejected", rejected)):
        if n:
            m.members_synced.labels(connector_id, action).inc(n)


def count_klaviyo_answer(endpoint: str, code: int) -> None:
    m = _get()
    m.klaviyo_requests.labels(endpoint, str(code)).inc()
    if code == 429:
        m.klaviyo_throttled.labels(endpoint).inc()


def add_limiter_wait(endpoint: str, seconds: float) -> None:
    if seconds > 0:
        _get().limiter_wait.labels(endpoint).inc(seconds)


# -- serving (the node's main process) -------------------------------------------------------


class MetricsNode:
    """The main process's side: a fresh samples directory and the /metrics server."""

    def __init__(self) -> None:
        self.directory: str | None = None
        self._owned = False
        self._server: Any = None
        self.port: int | None = None

    def prepare(self) -> str:
        """Before the pool forks: children inherit the directory through the environment.

        A directory of our own per node start: samples of a previous run must not be summed in.
        """
        self.directory = tempfile.mkdtemp(prefix="segops-metrics-")
        self._owned = True
        os.environ[MULTIPROC_ENV] = self.directory
        # If anything imported prometheus_client before this, its value class was chosen
        # without the directory: choose again, so metrics created from now on write files.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        forget_metrics()  # any made before (in memory) would hide the children's files
        return self.directory

    def serve(self, port: int, host: str) -> None:
        """Raises OSError when the port is taken; the caller reports it in one line."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        self._server = start_http_server(port, addr=host, registry=registry)
        self.port = port

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else None
        if server is not None:
            with contextlib.suppress(Exception):
                server.shutdown()
        if self._owned and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        self._server, self._owned, self.port = None, False, None


def process_exited(pid: int) -> None:
    """A pool child ends: its live gauges go (counters and histograms stay in the sum)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
