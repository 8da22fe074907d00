"""Running the simulator: in a background thread (tests) or in the foreground (the CLI)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

import uvicorn

from segops_sync.klaviyo_sim.app import create_app
from segops_sync.klaviyo_sim.simulator import Simulator

HOST = "127.0.0.1"


def _bind(port: int, host: str = HOST) -> socket.socket:
    # Binding ourselves (rather than letting uvicorn do it) tells us the port when port=0.
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the proto
    # says TCP, and without it every keep-alive answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening now, not when uvicorn gets to it: `klaviyo-sim` prints its ready line before
    # serving, and a client that connects at once must queue, not be refused (a CI failure).
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(sim: Simulator) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(sim),
        http="h11",  # the connection-drop fault relies on h11's transport handling
        loop="asyncio",
        lifespan="off",
        access_log=False,
        log_config=None,  # a library must not reconfigure the host's logging
        log_level="warning",
        timeout_graceful_shutdown=2,
    )


class SimulatorServer:
    """uvicorn in a daemon thread on 127.0.0.1; port 0 picks a free port."""

    def __init__(self, sim: Simulator, port: int = 0) -> None:
        self.sim = sim
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("the server is not started")
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._sock = _bind(self._port)
        self._server = uvicorn.Server(_config(self.sim))
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="klaviyo-simulator",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Klaviyo simulator did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = None

    def __enter__(self) -> SimulatorServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def seed_demo(sim: Simulator) -> tuple[str, str, str]:
    """One demo account with a key (default scopes) and an empty list: (account, key, list)."""
    account_id = sim.create_account()
    key = sim.create_key(account_id)
    list_id = sim.create_list(account_id, "segops-sync demo")
    return account_id, key, list_id


def serve(
    port: int, *, host: str = HOST, time_scale: float = 1.0, out: TextIO | None = None
) -> None:
    """Blocking: seeds a demo account, prints one line (URL, key, list id), serves until ^C.

    The printed key is the simulator's own, not a customer's.
    """
    sim = Simulator(time_scale=time_scale)
    account_id, key, list_id = seed_demo(sim)
    sock = _bind(port, host)  # 0.0.0.0 in a container, so other services reach it
    url = f"http://{host}:{sock.getsockname()[1]}"
    stream = out or sys.stdout
    print(
        f"Klaviyo simulator: base_url={url} api_key={key} list_id={list_id} "
        f"account_id={account_id} time_scale={time_scale:g}",
        file=stream,
        flush=True,
    )
    try:
        uvicorn.Server(_config(sim)).run(sockets=[sock])
    finally:
        sock.close()
