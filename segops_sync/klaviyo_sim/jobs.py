"""Bulk import jobs: creation, the job runner (or lazy application when a request comes), job
reads, and the fates tests give a job (expired, lost, stalled, cancelled).

Choices where Klaviyo's behaviour is unconfirmed (see docs/klaviyo.md#not-confirmed) are marked "choice:".
"""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from segops_sync.klaviyo_sim.lists import ListsMixin
from segops_sync.klaviyo_sim.privacy import PrivacyMixin
from segops_sync.klaviyo_sim.profiles import (
    PHONE_RE,
    import_error,
    profile_rejection,
    profile_resource,
    valid_email,
)
from segops_sync.klaviyo_sim.responses import (
    cursor_int,
    error_item,
    error_response,
    errors_response,
    iso,
    ok_response,
    page_links,
    query_filter,
    self_link,
)
from segops_sync.klaviyo_sim.state import Ctx, JobRecord, ProfileRecord, Reject, SimHttpResponse

MAX_JOB_PROFILES = 10_000
JOB_RETENTION = timedelta(days=7)  # choice: expires_at exists, its duration is undocumented
_JOB_STATES = frozenset({"queued", "processing", "complete", "cancelled"})


class JobsMixin(PrivacyMixin, ListsMixin):
    """A job applies profiles (ProfilesMixin) and adds them to its lists (ListsMixin)."""

    # The job runner applies this many profiles per turn of the lock, then pauses this long.
    RUNNER_SLICE = 500
    RUNNER_PAUSE = 0.002

    def start_job_runner(self) -> None:
        """Apply each bulk job when it is due, in a thread of its own, as Klaviyo's own workers
        do. Without it (the default, and what the tests rely on: a job nobody read can still be
        lost whole) the first request after a job's ``ready_at`` applies it, and the job's cost
        lands on that request: a 1M first sync's poll that followed a quiet second answered after
        1.5 s, having applied thirty 10,000-profile jobs on its way. The runner applies
        ``RUNNER_SLICE`` profiles per turn of the lock and then pauses, so requests are stamped
        and served on time however long the backlog."""
        with self._lock:
            if self._runner is not None:
                return
            self._runner_stop.clear()
            self._runner = threading.Thread(
                target=self._run_jobs, name="klaviyo-sim-jobs", daemon=True
            )
            self._runner.start()

    def stop_job_runner(self) -> None:
        """Stop the job runner; due jobs are applied lazily again."""
        runner = self._runner
        if runner is None:
            return
        self._runner_stop.set()
        self._runner_wake.set()
        runner.join(timeout=10)
        self._runner = None

    def _run_jobs(self) -> None:
        while not self._runner_stop.is_set():
            self._runner_wake.clear()  # before looking: a job created meanwhile wakes the wait
            with self._lock:
                now = self._clock()
                pending = [self._jobs[j] for j in self._pending_jobs]
                due = next((job for job in pending if now >= job.ready_at), None)
                if due is not None:
                    self._process_job(due, now, self.RUNNER_SLICE)
                next_at = min((job.ready_at for job in pending), default=None)
            if due is not None:
                # Let the server's own threads have the interpreter between slices: a thread
                # that applies 10,000 profiles in one go delays when requests are stamped.
                time.sleep(self.RUNNER_PAUSE)
                continue
            idle = 1.0 if next_at is None else min(1.0, max(0.0, next_at - self._clock()))
            self._runner_wake.wait(idle)

    def unapplied_jobs(self) -> int:
        """Jobs not applied yet, due or not. Applies nothing: it tells whether the job runner
        got to a due job before any request did."""
        with self._lock:
            return len(self._pending_jobs)

    def job_status(self, job_id: str) -> str | None:
        with self._lock:
            self._advance(self._clock())
            job = self._jobs.get(job_id)
            return job.status if job else None

    def submitted_counts(self, account_id: str) -> dict[str, int]:
        """How many times each profile (by external_id, else email) was sent in an accepted
        bulk import job of the account."""
        with self._lock:
            return dict(self._submitted.get(account_id, {}))

    def expire_job(self, job_id: str) -> None:
        """The job's results expire: it is applied (if it was not yet), then answers 404."""
        with self._lock:
            job = self._job_record(job_id)
            if job.status in ("queued", "processing"):
                self._process_job(job, self._clock())
            job.fate = "expired"

    def lose_job(self, job_id: str) -> None:
        """Klaviyo loses the job: it answers 404 from now on. Unless it was already seen complete,
        nothing of it is ever applied (jobs run lazily, so a due job nobody read is lost whole)."""
        with self._lock:
            job = self._job_record(job_id)
            job.fate = "lost"
            self._pending_jobs = [j for j in self._pending_jobs if j != job_id]

    def stall_next_jobs(self, count: int) -> None:
        """The next ``count`` bulk import jobs created stay "processing" forever, nothing of
        them applied: a job Klaviyo never finishes (tests of SEGOPS_JOB_GIVE_UP)."""
        with self._lock:
            self._stall_next = count

    def cancel_job(self, job_id: str) -> None:
        """The job is cancelled before it ran: status 'cancelled', nothing applied."""
        with self._lock:
            job = self._job_record(job_id)
            if job.status == "complete":
                raise ValueError("a completed job cannot be cancelled")
            job.status, job.fate = "cancelled", "cancelled"
            self._pending_jobs = [j for j in self._pending_jobs if j != job_id]

    def _advance(self, now: float) -> None:
        """Completes due jobs lazily: every entry point calls this first."""
        self._apply_due_deletions(now)  # and due data-privacy deletions (privacy.py)
        if not self._pending_jobs:
            return
        still: list[str] = []
        for job_id in self._pending_jobs:
            job = self._jobs[job_id]
            if now >= job.ready_at:
                self._process_job(job, now)
            else:
                if now >= job.created_clock + (job.ready_at - job.created_clock) / 2:
                    job.status = "processing"
                    job.started = job.started or datetime.now(UTC)
                still.append(job_id)
        self._pending_jobs = still

    def _process_job(self, job: JobRecord, now: float, slice_size: int | None = None) -> bool:
        """Apply the job's profiles from where it stopped, ``slice_size`` of them at most, and
        complete it once all are; returns whether it is complete."""
        account = self._accounts[job.account_id]
        job.started = job.started or datetime.now(UTC)
        stamp = datetime.now(UTC)
        start = job.applied
        stop = (
            len(job.profiles) if slice_size is None else min(len(job.profiles), start + slice_size)
        )
        for index in range(start, stop):
            item = job.profiles[index]
            job.applied = index + 1
            attrs = dict(item.get("attributes") or {})
            error = profile_rejection(item, attrs, f"/data/attributes/profiles/data/{index}")
            existing: ProfileRecord | None = None
            if error is None:
                existing, conflict = self._resolve(account, attrs)
                if conflict is not None:
                    error = import_error(
                        "duplicate_profile",
                        "Conflict.",
                        "The identifiers belong to two different profiles.",
                        f"/data/attributes/profiles/data/{index}/attributes",
                    )
            if error is not None:
                error["attributes"]["original_payload"] = item
                job.errors.append(error)
                job.failed_count += 1
                continue
            profile, _ = self._upsert(
                account, attrs, now, clear_nulls=False, found=(existing, stamp)
            )
            job.profile_ids.append(profile.id)
            job.completed_count += 1
        if job.applied < len(job.profiles):
            job.status = "processing"
            return False
        for list_id in job.list_ids:
            lst = self._lists.get(list_id)
            if lst is not None and lst.account_id == job.account_id:
                self._add_members(lst, job.profile_ids)
        job.status = "complete"
        job.profiles = []  # applied: errors keep their own original_payload
        # Applied lazily, a job completed when it was due, not when a request came to look: its
        # completed_at - created_at is how long Klaviyo's jobs take (the watcher learns it).
        done = job.ready_at if self._runner is None else max(job.ready_at, self._clock())
        job.completed = job.created + timedelta(seconds=max(0.0, done - job.created_clock))
        self._pending_jobs = [j for j in self._pending_jobs if j != job.id]
        return True

    def _visible_job(self, ctx: Ctx, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        assert ctx.account is not None
        if (
            job is None
            or job.account_id != ctx.account.id
            or job.fate in ("expired", "lost")
            or datetime.now(UTC) >= job.created + JOB_RETENTION
        ):
            raise Reject(error_response(404, detail=f"A job with id {job_id} was not found."))
        return job

    def _h_create_job(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        data = body["data"]
        profiles: list[dict[str, Any]] = data["attributes"]["profiles"]["data"]
        if not profiles:
            raise Reject(
                error_response(
                    400,
                    detail="At least one profile is required.",
                    pointer="/data/attributes/profiles/data",
                )
            )
        if len(profiles) > MAX_JOB_PROFILES:
            raise Reject(
                error_response(
                    400,
                    detail=f"At most {MAX_JOB_PROFILES} profiles may be imported per job.",
                    pointer="/data/attributes/profiles/data",
                )
            )
        # A malformed email or phone anywhere fails the whole job at submission (as Klaviyo).
        bad: list[dict[str, Any]] = []
        for index, item in enumerate(profiles):
            attrs = item.get("attributes") or {}
            where = f"/data/attributes/profiles/data/{index}/attributes"
            email = attrs.get("email")
            if email is not None and not valid_email(email):
                bad.append(
                    error_item(
                        400, detail=f"Invalid email address: {email!r}.", pointer=f"{where}/email"
                    )
                )
            phone = attrs.get("phone_number")
            if phone is not None and not PHONE_RE.match(phone):
                bad.append(
                    error_item(
                        400,
                        detail="Invalid phone number format (expected E.164).",
                        pointer=f"{where}/phone_number",
                    )
                )
        if bad:
            raise Reject(errors_response(400, bad))
        rel = ((data.get("relationships") or {}).get("lists") or {}).get("data") or []
        list_ids = [entry["id"] for entry in rel]
        for index, list_id in enumerate(list_ids):
            lst = self._lists.get(list_id)
            if lst is None or lst.account_id != account.id:
                # choice: an unknown list aborts the whole job (rudder-server PR #7107), as 404
                raise Reject(
                    error_response(
                        404,
                        detail=f"A list with id {list_id} does not exist.",
                        pointer=f"/data/relationships/lists/data/{index}/id",
                    )
                )
        stamp = datetime.now(UTC)
        job = JobRecord(
            id=self._ulid.new(),
            account_id=account.id,
            created=stamp,
            created_clock=ctx.now,
            ready_at=ctx.now + self.job_delay,
            profiles=profiles,
            list_ids=list_ids,
            total_count=len(profiles),
        )
        self._jobs[job.id] = job
        if self._stall_next > 0:  # never due, never applied: it answers "processing" for good
            self._stall_next -= 1
            job.status, job.ready_at = "processing", math.inf
        self._pending_jobs.append(job.id)
        self._runner_wake.set()
        counts = self._submitted.setdefault(account.id, {})
        for item in profiles:
            attrs = item.get("attributes") or {}
            ident = attrs.get("external_id") or attrs.get("email")
            if isinstance(ident, str):
                counts[ident] = counts.get(ident, 0) + 1
        return ok_response(
            {"data": job_resource(ctx, job), "links": {"self": self_link(ctx)}}, status=202
        )

    def _h_list_jobs(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        """The account's jobs, oldest first (choice: the spec names no default order), filtered
        by status only (``any``/``equals``, the spec's only filter field)."""
        account = ctx.account
        assert account is not None
        wanted: set[str] | None = None
        if "filter" in ctx.query:
            filt = query_filter(ctx, {"status"})
            unknown = sorted(set(filt.values) - _JOB_STATES)
            if unknown:
                raise Reject(
                    error_response(
                        400,
                        detail=f"Invalid filter provided: unknown status {unknown[0]!r}.",
                        parameter="filter",
                    )
                )
            wanted = set(filt.values)
        order = ctx.query.get("sort", "created_at")
        if order not in ("created_at", "-created_at"):
            raise Reject(error_response(400, detail="Invalid sort.", parameter="sort"))
        now = datetime.now(UTC)
        jobs = [
            job
            for job in self._jobs.values()
            if job.account_id == account.id
            and job.fate not in ("expired", "lost")
            and now < job.created + JOB_RETENTION
            and (wanted is None or job.status in wanted)
        ]
        jobs.sort(key=lambda j: (j.created_clock, j.id), reverse=order.startswith("-"))
        size, start = self._page_size(ctx), cursor_int(ctx)
        page = [job_resource(ctx, job) for job in jobs[start : start + size]]
        nxt = str(start + size) if start + size < len(jobs) else None
        return ok_response({"data": page, "links": page_links(ctx, nxt)})

    def _h_get_job(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        job = self._visible_job(ctx, params["id"])
        return ok_response({"data": job_resource(ctx, job), "links": {"self": self_link(ctx)}})

    def _h_job_errors(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        job = self._visible_job(ctx, params["id"])
        size, start = self._page_size(ctx), cursor_int(ctx)
        page = job.errors[start : start + size]
        nxt = str(start + size) if start + size < len(job.errors) else None
        return ok_response({"data": page, "links": page_links(ctx, nxt)})

    def _h_job_profiles(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        job = self._visible_job(ctx, params["id"])
        size, start = self._page_size(ctx), cursor_int(ctx)
        ids = job.profile_ids[start : start + size]
        data = [profile_resource(ctx, self._profile_index[pid]) for pid in ids]
        nxt = str(start + size) if start + size < len(job.profile_ids) else None
        return ok_response({"data": data, "links": page_links(ctx, nxt)})


def job_resource(ctx: Ctx, job: JobRecord) -> dict[str, Any]:
    base = f"{ctx.req.base_url}/api/profile-bulk-import-jobs/{job.id}"
    return {
        "type": "profile-bulk-import-job",
        "id": job.id,
        "attributes": {
            "status": job.status,
            "created_at": iso(job.created),
            "total_count": job.total_count,
            "completed_count": job.completed_count,
            "failed_count": job.failed_count,
            "completed_at": iso(job.completed) if job.completed else None,
            "expires_at": iso(job.created + JOB_RETENTION),
            "started_at": iso(job.started) if job.started else None,
        },
        "relationships": {
            "lists": {
                "data": [{"type": "list", "id": lid} for lid in job.list_ids],
                "links": {"self": f"{base}/relationships/lists", "related": f"{base}/lists"},
            },
            "profiles": {
                "links": {
                    "self": f"{base}/relationships/profiles",
                    "related": f"{base}/profiles",
                }
            },
            "import-errors": {
                "links": {
                    "self": f"{base}/relationships/import-errors",
                    "related": f"{base}/import-errors",
                }
            },
        },
        "links": {"self": base},
    }
