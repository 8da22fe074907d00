"""The batch state machine without PostgreSQL: an in-memory store, a stand-in for the work.

``run_batch`` decides transitions (pending/submitted -> done | failed, or "again later");
these tests drive every branch of it with no database, broker or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from segops_sync.config import Settings
from segops_sync.klaviyo import CredentialsRejected, InvalidRequest, RateLimited, TransientError
from segops_sync.secrets import encrypt_api_key
from segops_sync.states import BatchKind, BatchStatus
from segops_sync.sync.batch_step import BatchContext, BatchStep, Finished, Later
from segops_sync.sync.batches import run_batch
from segops_sync.sync.fleet.access import Throttled

SECRET = "a secret key for the unit tests"
API_KEY = "pk_unit0123456789abcdef"


@dataclass
class MemoryStore:
    batches: dict[int, BatchContext]
    errors: dict[int, tuple[str, bool]] = field(default_factory=dict)
    aborted_runs: dict[str, str] = field(default_factory=dict)

    def load(self, batch_id: int) -> BatchContext | None:
        ctx = self.batches.get(batch_id)
        if ctx is not None and ctx.run_id in self.aborted_runs and not ctx.abort_reason:
            ctx = replace(ctx, abort_reason=self.aborted_runs[ctx.run_id])
        return ctx

    def fail(self, ctx: BatchContext, error: str, *, permanent: bool) -> None:
        current = self.batches[ctx.batch_id]
        if current.status in (BatchStatus.PENDING, BatchStatus.SUBMITTED):
            self.batches[ctx.batch_id] = replace(current, status=BatchStatus.FAILED)
            self.errors[ctx.batch_id] = (error, permanent)
        if permanent:
            self.aborted_runs.setdefault(ctx.run_id, error)

    def count_failure(self, ctx: BatchContext) -> int:
        current = self.batches[ctx.batch_id]
        self.batches[ctx.batch_id] = replace(current, attempts=current.attempts + 1)
        return current.attempts + 1


class NullClient:
    def __enter__(self) -> NullClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class FakeLimited:
    backed_off: list[float] = field(default_factory=list)

    def rate_limited(self, wait: float) -> None:
        self.backed_off.append(wait)


@dataclass
class FakeAccess:
    limited: FakeLimited = field(default_factory=FakeLimited)

    def client(self, api_key: str, claimant: str) -> tuple[Any, FakeLimited]:
        assert api_key == API_KEY  # decrypted with SEGOPS_SECRET_KEY, never stored clear
        return NullClient(), self.limited


def _batch(batch_id: int, run_id: str = "run-1", **changes: Any) -> BatchContext:
    ctx = BatchContext(
        batch_id=batch_id,
        run_id=run_id,
        kind=BatchKind.ADD,
        seq=batch_id,
        status=BatchStatus.PENDING,
        attempts=0,
        first_attempt_at=datetime.now(UTC),
        connector_id="conn-1",
        list_id="AbC123",
        api_key_encrypted=encrypt_api_key(API_KEY, SECRET),
        abort_reason=None,
    )
    return replace(ctx, **changes)


@pytest.fixture
def settings() -> Settings:
    return Settings(secret_key=SECRET, transient_retry_budget=2, retry_base_delay=0.1)


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    yield MemoryStore({1: _batch(1), 2: _batch(2)})


def _raise(error: Exception) -> Any:
    def work(ctx: BatchContext, client: Any, settings: Settings) -> BatchStep:
        raise error

    return work


def _step_seen(
    store: MemoryStore, settings: Settings, work: Any, batch_id: int = 1
) -> tuple[BatchStep, FakeAccess]:
    """One step, and the access it used (what it told the fleet's limiter)."""
    access = FakeAccess()
    step = run_batch(batch_id, access, settings, store=store, work=work)  # type: ignore[arg-type]
    return step, access


def _step(store: MemoryStore, settings: Settings, work: Any, batch_id: int = 1) -> BatchStep:
    return _step_seen(store, settings, work, batch_id)[0]


def test_work_that_finishes_finishes(store: MemoryStore, settings: Settings) -> None:
    done = _step(store, settings, lambda ctx, client, s: Finished(ctx.batch_id, True))
    assert done == Finished(1, True)


def test_a_closed_batch_is_not_worked_again(store: MemoryStore, settings: Settings) -> None:
    store.batches[1] = replace(store.batches[1], status=BatchStatus.DONE)
    store.batches[2] = replace(store.batches[2], status=BatchStatus.FAILED)
    boom = _raise(AssertionError("a closed batch must not call Klaviyo"))
    assert _step(store, settings, boom, 1) == Finished(1, True)
    assert _step(store, settings, boom, 2) == Finished(2, False)


def test_an_unknown_batch_is_dropped(store: MemoryStore, settings: Settings) -> None:
    assert _step(store, settings, _raise(AssertionError()), 99) == Finished(99, False)


def test_a_429_waits_its_retry_after_and_backs_off_the_fleet(
    store: MemoryStore, settings: Settings
) -> None:
    step, access = _step_seen(store, settings, _raise(RateLimited("slow", retry_after=4.0)))
    assert isinstance(step, Later) and 4.0 <= step.countdown <= 4.0 * 1.25
    assert access.limited.backed_off == [4.0]
    assert store.batches[1].attempts == 0  # waiting is not failing


def test_our_own_limiter_waits_without_telling_the_fleet(
    store: MemoryStore, settings: Settings
) -> None:
    step, access = _step_seen(store, settings, _raise(Throttled(0.5, "GET /api/profiles")))
    assert isinstance(step, Later) and step.countdown >= 0.5
    assert access.limited.backed_off == []


def test_transient_failures_retry_until_the_budget_then_fail_without_aborting_the_run(
    store: MemoryStore, settings: Settings
) -> None:
    flaky = _raise(TransientError("503", status=503))
    for _ in range(settings.transient_retry_budget):
        assert isinstance(_step(store, settings, flaky), Later)
    assert _step(store, settings, flaky) == Finished(1, False)
    error, permanent = store.errors[1]
    assert "kept failing after 3 attempts" in error and permanent is False
    assert "run-1" not in store.aborted_runs  # the other batches go on


def test_a_revoked_key_fails_the_batch_and_stops_the_rest_of_the_run(
    store: MemoryStore, settings: Settings
) -> None:
    assert _step(store, settings, _raise(CredentialsRejected("no", status=401))) == Finished(
        1, False
    )
    error, permanent = store.errors[1]
    assert "invalid or was revoked" in error and permanent
    # The next batch of the run meets the abort before it calls Klaviyo.
    untouched = _raise(AssertionError("an aborted run must not call Klaviyo"))
    assert _step(store, settings, untouched, 2) == Finished(2, False)
    assert store.batches[2].status == BatchStatus.FAILED


def test_a_refusal_the_work_could_not_absorb_fails_the_run(
    store: MemoryStore, settings: Settings
) -> None:
    refused = InvalidRequest("malformed body", status=400)
    assert _step(store, settings, _raise(refused)) == Finished(1, False)
    assert store.errors[1] == ("Klaviyo refused the request: malformed body", True)


def test_a_changed_secret_key_fails_with_what_to_do(store: MemoryStore) -> None:
    other = Settings(secret_key="not the key that encrypted it", transient_retry_budget=2)
    assert _step(store, other, _raise(AssertionError())) == Finished(1, False)
    error, permanent = store.errors[1]
    assert "SEGOPS_SECRET_KEY" in error and "connectors update" in error and permanent
    assert API_KEY not in error
