"""``connectors verify``: read a connector's list back and, on request, repair it.

The repair is no special path: a run with trigger ``verify`` carries what the read-back found,
the normal planning adds the missing members and removes the extra profiles entered in the
ledger for removal (with the mass-removal guard), and a second read-back says whether the
list now matches the segment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from segops_sync.config import Settings
from segops_sync.db.queries import get_connector
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError
from segops_sync.klaviyo import KlaviyoError
from segops_sync.states import ConnectorStatus, RunStatus, StartReason
from segops_sync.sync.fleet.access import KlaviyoAccess
from segops_sync.sync.outcomes import describe_for_person
from segops_sync.sync.planner import StartOutcome
from segops_sync.sync.runs import finished_runs, wait_until_idle
from segops_sync.sync.verify import (
    Comparison,
    VerifyError,
    is_running,
    release_foreign,
    verify_list,
)

# Opens the ``verify`` run and hands it to the workers (tasks.trigger_verified_sync): the
# domain does not import the task layer, so the caller passes it in.
StartRepair = Callable[[str, Comparison], StartOutcome]
Sleep = Callable[[float], None]


class RepairFailed(Exception):
    """The list could not be read back, or the repair did not finish; the message is for a
    person (no API key, no stack)."""


@dataclass(frozen=True)
class ListCheck:
    list_id: str
    first: Comparison  # what the first read-back found
    final: Comparison  # after the repair; the first read-back when nothing was repaired
    added: int = 0  # by the repair run
    removed: int = 0

    @property
    def matches(self) -> bool:
        return self.final.matches


def verify_and_repair(
    connector_id: str,
    settings: Settings,
    *,
    repair: bool,
    remove_extra: bool,
    start_repair: StartRepair,
    timeout: float,
    on_run_problem: Callable[[str], None] | None = None,
    sleep: Sleep = time.sleep,
) -> ListCheck:
    """Read the list back after any running sync; with ``repair``, let a ``verify`` run fix
    what differs and read the list back again.

    ``repair`` adopts the extra profiles our run history shows this connector added (they are
    ours to remove); ``remove_extra`` adopts the foreign ones too. ``on_run_problem`` hears
    "repair sync <run id>: <status>: <error>" when the repair run did not succeed and said why,
    before the second read-back (which may fail in turn). Raises InputError for an
    unknown connector or a repair of an inactive or paused one, RepairFailed when Klaviyo or
    the run fails us."""
    with session_scope() as s:
        connector = get_connector(s, connector_id)
        status, list_id = connector.status, connector.list_id
    if repair and status == ConnectorStatus.INACTIVE:
        raise InputError(f"connector {connector_id} is inactive: activate it before --repair")
    if repair and status == ConnectorStatus.PAUSED:
        raise InputError(f"connector {connector_id} is paused: resume it before --repair")
    settings.require_secret_key()
    _wait_for_no_run(connector_id, timeout=timeout, sleep=sleep)
    access = KlaviyoAccess(settings)
    try:
        first = verify_list(
            connector_id,
            access,
            settings,
            adopt_extra=remove_extra and repair,
            adopt_ours=repair,
            sleep=sleep,
        )
        if not repair or first.matches:
            return ListCheck(list_id, first, first)
        with session_scope() as s:
            done_before = finished_runs(s, connector_id)
        outcome = start_repair(connector_id, first)
        # a coalesced start runs after the one going now: wait for both
        expected = done_before + (2 if outcome.reason == StartReason.COALESCED else 1)
        run = wait_until_idle(connector_id, finished_at_least=expected, timeout=timeout)
        if run is None:
            raise RepairFailed(f"the repair did not finish within {timeout:.0f}s")
        if run.status == RunStatus.HELD:
            with session_scope() as s:
                release_foreign(s, connector_id)
        if run.status != RunStatus.SUCCEEDED and run.error and on_run_problem is not None:
            on_run_problem(f"repair sync {run.id}: {run.status}: {run.error}")
        final = verify_list(connector_id, access, settings, sleep=sleep)
        return ListCheck(list_id, first, final, run.added, run.removed)
    except VerifyError as exc:
        raise RepairFailed(str(exc)) from None
    except KlaviyoError as exc:
        raise RepairFailed(describe_for_person(exc, list_id)) from None


def _wait_for_no_run(connector_id: str, *, timeout: float, sleep: Sleep) -> None:
    """A list read while a run writes to it would count that run's members as missing."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            if not is_running(s, connector_id):
                return
        if time.monotonic() > deadline:
            raise RepairFailed("a sync has been running too long; verify after it")
        sleep(0.5)
