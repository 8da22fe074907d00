"""The state every part of the simulator shares, and the lookups on it.

Everything runs under one lock, so the Starlette app (uvicorn thread) and tests (main thread) can
use it at once. The resource modules (accounts, profiles, lists, jobs, throttling) are mixins over
this state; simulator.py composes them and serves requests.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from segops_sync.klaviyo.endpoints import Endpoint
from segops_sync.klaviyo_sim.ids import UlidFactory
from segops_sync.klaviyo_sim.ratelimit import FixedWindowLimiter
from segops_sync.klaviyo_sim.responses import page_size
from segops_sync.klaviyo_sim.state import (
    AccountRecord,
    Ctx,
    Faults,
    JobRecord,
    KeyRecord,
    ListRecord,
    ProfileRecord,
    SimRequest,
)


class SimState:
    """The simulator's state. Thread-safe only under ``self._lock``, which every public method
    of the resource mixins takes."""

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        job_delay: float = 0.0,
        indexing_delay: float = 0.0,
        enforce_rate_limits: bool = True,
        seed: int | None = None,
        clock: Callable[[], float] | None = None,
        use_official_models: bool | None = None,
        page_size_cap: int | None = None,
    ) -> None:
        self.time_scale = time_scale
        self.job_delay = job_delay
        self.indexing_delay = indexing_delay
        self.enforce_rate_limits = enforce_rate_limits
        self._use_models = use_official_models
        # Serve at most this many items per page whatever page[size] asks: proves that a client
        # follows links.next instead of assuming one page holds everything.
        self.page_size_cap = page_size_cap
        self._clock = clock or time.monotonic
        self._rng: random.Random = (
            random.Random(seed) if seed is not None else random.SystemRandom()
        )
        self._ulid = UlidFactory(self._rng)
        self._lock = threading.RLock()
        self._limiter = FixedWindowLimiter(time_scale)
        self._accounts: dict[str, AccountRecord] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._lists: dict[str, ListRecord] = {}
        self._profile_index: dict[str, ProfileRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._pending_jobs: list[str] = []
        # The job runner (start_job_runner): None while jobs are applied lazily.
        self._runner: threading.Thread | None = None
        self._runner_stop = threading.Event()
        self._runner_wake = threading.Event()
        self._join_seq = 0
        self._requests: list[SimRequest] = []
        self._faults = Faults()
        self._forced_429: list[float] = []
        self._not_before: dict[tuple[str, Endpoint], float] = {}
        self._subscription_calls = 0
        # Jobs still to be created that stay "processing" forever (stall_next_jobs).
        self._stall_next = 0
        # Profiles accepted in bulk import jobs, per account and identifier (external_id, else
        # email): how many times a sync sent each member.
        self._submitted: dict[str, dict[str, int]] = {}
        # Profiles a data-privacy deletion job will delete: (when, profile id) (privacy.py).
        self._pending_deletions: list[tuple[float, str]] = []

    def now(self) -> float:
        return self._clock()

    def _fresh(self, make: Callable[[], str], taken: Mapping[str, Any]) -> str:
        while True:
            candidate = make()
            if candidate not in taken:
                return candidate

    def _account(self, account_id: str) -> AccountRecord:
        account = self._accounts.get(account_id)
        if account is None:
            raise KeyError(f"unknown account {account_id}")
        return account

    def _list(self, list_id: str) -> ListRecord:
        found = self._lists.get(list_id)
        if found is None:
            raise KeyError(f"unknown list {list_id}")
        return found

    def _job_record(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(f"unknown job {job_id}")
        return job

    def _page_size(self, ctx: Ctx) -> int:
        size = page_size(ctx)
        return min(size, self.page_size_cap) if self.page_size_cap else size

    def _advance(self, now: float) -> None:
        """Completes due jobs lazily: every entry point calls this first (JobsMixin does it)."""
        raise NotImplementedError
