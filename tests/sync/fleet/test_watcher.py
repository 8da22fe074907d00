"""The bulk-job watcher: one poll per account answers for many jobs (fakeredis + the simulator).

The watcher, the simulator and fakeredis's expiry (the gate's PX) all read one FakeClock the
tests advance by hand: gates and waits are asserted to the millisecond, nothing sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from segops_sync.klaviyo import Endpoint, KlaviyoClient, ProfileInput
from segops_sync.klaviyo.models import BulkImportJob
from segops_sync.klaviyo_sim import Simulator, SimulatorServer
from segops_sync.sync.fleet.access import LimitedSession, Throttled, poll_patience
from segops_sync.sync.fleet.limiter import AccountLimiter
from segops_sync.sync.fleet.watcher import AccountJobs, JobWatcher
from tests.fake_clock import FakeClock, expire_fakeredis_keys_by

JOB_DELAY = 0.4
# A poll looks for the jobs registered before it began: this much time passes in between.
TICK = 0.001


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    expire_fakeredis_keys_by(clock, monkeypatch)  # the gate's PX runs on this clock
    return clock


@pytest.fixture
def fake(clock: FakeClock) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def env(clock: FakeClock) -> Iterator[tuple[Simulator, KlaviyoClient, str, str]]:
    # Submissions in bulk; jobs finish JOB_DELAY after they were created, by the test's clock.
    sim = Simulator(job_delay=JOB_DELAY, enforce_rate_limits=False, clock=clock.seconds)
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    with SimulatorServer(sim) as server, KlaviyoClient(key, server.base_url) as client:
        yield sim, client, account, list_id


def submit_jobs(
    client: KlaviyoClient, list_id: str, n: int, *, failing: int = 0
) -> list[BulkImportJob]:
    """n one-profile jobs; the first ``failing`` of them carry a profile Klaviyo rejects."""
    return [
        client.create_bulk_import_job(
            [ProfileInput(email=f"w{i}@example.com")]
            + ([ProfileInput(external_id="e" * 300)] if i < failing else []),
            list_id,
        )
        for i in range(n)
    ]


def submit(client: KlaviyoClient, list_id: str, n: int) -> list[str]:
    return [job.id for job in submit_jobs(client, list_id, n)]


def watch(watcher: JobWatcher, account: str, jobs: list[BulkImportJob]) -> list[str]:
    watcher.register(account, [j.id for j in jobs], {j.id: j.created_at for j in jobs})
    return [j.id for j in jobs]


def list_calls(sim: Simulator) -> int:
    return len(sim.requests(endpoint=Endpoint.LIST_BULK_IMPORT_JOBS))


def test_one_poll_answers_for_every_job_and_notices_within_one_interval(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=0.5, time_scale=2, clock=clock)
    jobs = submit(client, list_id, 30)
    watcher.register(account, jobs)
    clock.advance(TICK)

    first = watcher.view(account, jobs, client)
    assert first.polled and first.finished == [] and len(first.running) == 30
    # everyone else inside the interval reads the poll's answer: no request
    again = watcher.view(account, jobs[:5], client)
    assert not again.polled and again.wait == pytest.approx(0.5 + 0.01)  # just after the gate
    assert list_calls(sim) == 1

    clock.advance(again.wait)  # past JOB_DELAY: every job is now done at Klaviyo
    done = watcher.view(account, jobs, client)
    assert done.polled and sorted(done.finished) == sorted(jobs) and done.running == []
    assert list_calls(sim) == 2
    # the watcher never reads a job on its own; that is the owning batch's single GET
    assert sim.requests(endpoint=Endpoint.GET_BULK_IMPORT_JOB) == []
    watcher.forget(account, jobs)
    assert watcher.view(account, jobs[:1], client).running == jobs[:1]  # forgotten = re-watched


def test_a_job_registered_during_a_poll_waits_for_the_next(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    _sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=0.05, time_scale=20, clock=clock)
    [job] = submit(client, list_id, 1)
    clock.advance(JOB_DELAY)  # finished at Klaviyo
    # registered (as far as the watcher can tell) after the poll began: not in the answer proves
    # nothing about it yet
    fake.zadd(watcher._key(account, "watch"), {job: watcher._now_us() + 5_000_000})
    view = watcher.view(account, [job], client)
    assert view.polled and view.running == [job]
    fake.zadd(watcher._key(account, "watch"), {job: watcher._now_us()})
    assert view.wait == pytest.approx(0.05 + 0.01)
    clock.advance(view.wait)
    assert watcher.view(account, [job], client).finished == [job]


def test_polling_stays_within_its_share_however_many_pages(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    sim, client, account, list_id = env
    sim.job_delay = 30.0
    watcher = JobWatcher(fake, interval=0.01, time_scale=1.0, clock=clock)
    jobs = submit(client, list_id, 150)  # two pages of unfinished jobs
    watcher.register(account, jobs)
    clock.advance(TICK)
    view = watcher.view(account, jobs, client)
    assert view.polled and len(view.running) == 150
    assert list_calls(sim) == 2  # both pages, one poll
    # two pages at 40 % of 150/min: the next poll may come 2 x 1 s later, not after 0.01 s
    assert fake.pttl(watcher._key(account, "gate")) == 2000
    assert watcher.spacing == pytest.approx(1.0)


def test_a_429_holds_the_gate_for_its_retry_after(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=0.05, time_scale=20, clock=clock)
    jobs = submit(client, list_id, 1)
    watcher.register(account, jobs)
    clock.advance(TICK)
    sim.force_429(1, 0.5)
    from segops_sync.klaviyo import RateLimited

    with pytest.raises(RateLimited):
        watcher.view(account, jobs, client)
    # nobody else polls before Klaviyo's Retry-After, even before the fleet backs off
    assert fake.pttl(watcher._key(account, "gate")) == 500
    assert not watcher.view(account, jobs, client).polled
    assert list_calls(sim) == 1


def test_a_failed_poll_lets_the_next_batch_poll_at_once(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=5.0, clock=clock)
    jobs = submit(client, list_id, 2)
    watcher.register(account, jobs)
    clock.advance(TICK)
    sim.set_faults(error_rate=1.0)  # a 5xx: nothing to wait for
    from segops_sync.klaviyo import TransientError

    with pytest.raises(TransientError):
        watcher.view(account, jobs, client)
    assert fake.get(watcher._key(account, "gate")) is None
    sim.set_faults()
    assert watcher.view(account, jobs, client).polled


def test_a_finished_job_read_once_is_remembered_until_forgotten(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    """A job the poll could not find is read by its batch; that read is kept, so a batch
    deferred by the limiter before its import errors does not read the job again."""
    sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=0.05, clock=clock)
    jobs = watch(watcher, account, submit_jobs(client, list_id, 2))
    sim.lose_job(jobs[0])
    clock.advance(JOB_DELAY)
    assert sorted(watcher.view(account, jobs, client).finished) == sorted(jobs)
    assert watcher.final(account, jobs[0]) is None  # finished, not yet read by its batch
    watcher.remember_final(account, jobs[0], 3)
    assert (watcher.final(account, jobs[0]), watcher.final(account, jobs[1])) == (3, 0)
    assert watcher.view(account, jobs, client).finished == jobs  # still finished
    watcher.forget(account, jobs[:1])
    assert watcher.final(account, jobs[0]) is None


def test_the_poll_reads_each_finished_jobs_failed_count_off_the_list(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    """A complete job's failed_count comes with the poll: its batch settles it without a read of
    its own (and skips the import errors when the count is 0)."""
    sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=0.05, clock=clock)
    jobs = watch(watcher, account, submit_jobs(client, list_id, 3, failing=1))
    clock.advance(JOB_DELAY)
    view = watcher.view(account, jobs, client)
    assert view.polled and sorted(view.finished) == sorted(jobs)
    assert [watcher.final(account, j) for j in jobs] == [1, 0, 0]
    assert sim.requests(endpoint=Endpoint.GET_BULK_IMPORT_JOB) == []
    assert list_calls(sim) == 1


def test_paging_stops_once_past_the_oldest_watched_job(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    """250 older jobs of the account (history, another integration) cost no page: the newest
    page holds every job watched. A watched job Klaviyo lost is reported finished without a
    count (its batch reads it and resends), once the poll has paged past where it was."""
    sim, client, account, list_id = env
    submit(client, list_id, 250)
    time.sleep(0.01)  # the simulator stamps created_at by the wall clock: distinct stamps
    mine = submit_jobs(client, list_id, 3)
    time.sleep(0.01)
    submit(client, list_id, 5)  # newer than ours: listed first
    watcher = JobWatcher(fake, interval=0.05, clock=clock)
    jobs = watch(watcher, account, mine)
    sim.lose_job(jobs[0])
    clock.advance(JOB_DELAY)
    view = watcher.view(account, jobs, client)
    assert sorted(view.finished) == sorted(jobs)
    assert [watcher.final(account, j) for j in jobs] == [None, 0, 0]
    assert list_calls(sim) == 1

    # Without Klaviyo's created_at (a batch resumed after a Redis restart) the poll cannot
    # tell where to stop before meeting the job: the lost one makes it read every page once
    # (up to MAX_POLL_PAGES: test_a_poll_reads_at_most_its_pages_and_keeps_deeper_running_jobs).
    again = JobWatcher(fakeredis.FakeRedis(), interval=0.05, clock=clock)
    again.register(account, [jobs[0]])
    clock.advance(TICK)
    assert again.view(account, [jobs[0]], client).finished == [jobs[0]]
    assert list_calls(sim) == 1 + 3  # 258 jobs listed, 100 a page


def test_a_poll_reads_at_most_its_pages_and_keeps_deeper_running_jobs(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    """After a Redis restart a poll knows no created_at to stop at; with a job Klaviyo lost it
    paged through the account's whole history. Now a listing reads ``max_pages`` pages at most
    (here 1). The watched jobs deeper than that are looked for among the account's unfinished
    jobs: one still running stays watched (no read of its own, poll after poll), the others
    (finished, lost) go to their batches. Each watched job met keeps its created_at, so the
    next poll knows where to stop."""
    sim, client, account, list_id = env
    sim.job_delay = 60.0
    deep_running = submit(client, list_id, 1)[0]  # older than the history, still running
    sim.job_delay = JOB_DELAY
    history = submit(client, list_id, 150)  # two pages of the account's finished jobs
    time.sleep(0.01)  # the simulator stamps created_at by the wall clock: distinct stamps
    sim.job_delay = 60.0  # ours keep running
    mine = submit(client, list_id, 3)
    time.sleep(0.01)
    submit(client, list_id, 5)  # newer than ours: listed first
    sim.lose_job(mine[0])
    clock.advance(JOB_DELAY)  # the history is complete
    watched = [*mine, history[0], deep_running]
    watcher = JobWatcher(fake, interval=0.05, clock=clock, max_pages=1)
    watcher.register(account, watched)  # re-registered after a restart: no created_at
    clock.advance(TICK)
    view = watcher.view(account, watched, client)
    # one page of every job, one of the unfinished ones: not the three pages of the history
    assert view.polled and list_calls(sim) == 2
    assert sorted(view.finished) == sorted([mine[0], history[0]])  # read by their batches
    assert sorted(view.running) == sorted([*mine[1:], deep_running])
    created = [fake.hget(watcher._key(account, "created"), j) is not None for j in watched]
    assert created == [False, True, True, False, True]  # learnt off the pages

    # The next poll stops at the oldest watched job it can reach, and finds the deep one
    # among the unfinished again: no job is handed over to be read on its own.
    clock.advance(2.1)  # past the gate: two pages' worth of the poll's share
    view = watcher.view(account, [*mine[1:], deep_running], client)
    assert view.polled and list_calls(sim) == 4
    assert view.finished == [] and sorted(view.running) == sorted([*mine[1:], deep_running])
    assert sim.requests(endpoint=Endpoint.GET_BULK_IMPORT_JOB) == []

    # A job the poll handed over is read by its batch; if it still runs, its created_at
    # (as that read answered) tells the next poll where to stop.
    watcher.still_running(account, history[1], client.get_bulk_import_job(history[1]).created_at)
    assert fake.hget(watcher._key(account, "created"), history[1]) is not None
    with pytest.raises(ValueError, match="max_pages"):
        JobWatcher(fake, interval=1.0, max_pages=0)


def test_a_poll_keeps_the_created_at_it_meets_so_the_next_stops_where_it_should(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    """Jobs re-registered after a Redis restart have no created_at; the poll that meets them
    keeps it. So when a job of a later batch is lost, the next poll stops past the oldest job
    watched (one page), instead of reading the account's whole history."""
    sim, client, account, list_id = env
    submit(client, list_id, 250)  # the account's history
    time.sleep(0.01)  # the simulator stamps created_at by the wall clock: distinct stamps
    sim.job_delay = 60.0
    mine = submit(client, list_id, 2)
    time.sleep(0.01)
    submit(client, list_id, 5)
    watcher = JobWatcher(fake, interval=0.05, clock=clock)
    watcher.register(account, mine)  # after the restart: no created_at
    clock.advance(TICK)
    assert watcher.view(account, mine, client).running == mine
    assert list_calls(sim) == 1  # both met on the first page

    later = watch(watcher, account, submit_jobs(client, list_id, 1))  # with its created_at
    sim.lose_job(later[0])
    clock.advance(1.1)  # past the gate
    view = watcher.view(account, [*mine, *later], client)
    assert view.polled and view.finished == later and view.running == mine
    assert list_calls(sim) == 2  # one page: past the oldest of ours, the lost one is gone


def test_pages_are_counted_by_request_and_a_refused_page_holds_the_gate(
    env: tuple[Simulator, KlaviyoClient, str, str],
    clock: FakeClock,
    fake: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Klaviyo may serve fewer jobs a page than asked: the bound and the gate's hold count
    requests. A page the limiter refuses even after waiting holds the gate until the slot it
    names, so the next batch does not spend the same pages again at once."""
    sim, client, account, list_id = env
    sim.page_size_cap = 20
    sim.job_delay = 60.0
    jobs = submit(client, list_id, 150)
    watcher = JobWatcher(fake, interval=0.05, clock=clock, max_pages=2)
    watcher.register(account, [jobs[0]])  # the oldest, and no created_at: deep
    clock.advance(TICK)
    view = watcher.view(account, [jobs[0]], client)
    # two requests of every job, then two of the unfinished ones: 40 jobs each, not 200
    assert view.polled and list_calls(sim) == 4
    assert view.finished == [jobs[0]]  # not met: its batch reads it
    assert fake.pttl(watcher._key(account, "gate")) == 4000  # 4 pages at 1 s each

    listing = client.iter_bulk_import_jobs

    def refused_at_the_second_page(*args: Any, **kwargs: Any) -> Iterator[BulkImportJob]:
        for n, job in enumerate(listing(*args, **kwargs)):
            if n == 20:
                raise Throttled(0.7, "GET /api/profile-bulk-import-jobs")
            yield job

    monkeypatch.setattr(client, "iter_bulk_import_jobs", refused_at_the_second_page)
    watcher.register(account, jobs[1:])
    clock.advance(4.1)  # past the gate
    with pytest.raises(Throttled):
        watcher.view(account, jobs[1:], client)
    gate = watcher._key(account, "gate")
    assert (fake.get(gate), fake.pttl(gate)) == (b"polled", 700)
    assert not watcher.view(account, jobs[1:], client).polled


def test_a_long_poll_renews_its_lease_and_waiters_come_back_later_the_further_it_got(
    env: tuple[Simulator, KlaviyoClient, str, str],
    clock: FakeClock,
    fake: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poll may now read many pages, waiting for the limiter between them: its lease is
    renewed at each page (a second poller does not start while it reads), the gate says how far
    it got, and a batch that finds it polling comes back later the further it got (not every
    50 ms while the poll reads for seconds). A poll writes the gate unless another poll holds
    it."""
    sim, client, account, list_id = env
    sim.job_delay = 60.0
    jobs = submit(client, list_id, 250)  # three pages
    watcher = JobWatcher(fake, interval=0.05, clock=clock)
    watcher.register(account, jobs)
    gate = watcher._key(account, "gate")
    seen: list[tuple[str, int, float]] = []  # (gate value, its lease, a waiter's wait) per page
    listing = client.iter_bulk_import_jobs

    def slow_listing(*args: object, **kwargs: object) -> Iterator[BulkImportJob]:
        for n, job in enumerate(listing(*args, **kwargs)):  # type: ignore[arg-type]
            if n % 100 == 1:  # its page was read (and counted) a job ago
                clock.advance(4.0)  # a long wait for the limiter: most of the 5 s lease
                waiter = watcher.view(account, jobs[:1], client)
                assert not waiter.polled
                value = fake.get(gate)
                assert isinstance(value, bytes)
                seen.append((value.decode(), int(fake.pttl(gate)), waiter.wait))
            yield job

    monkeypatch.setattr(client, "iter_bulk_import_jobs", slow_listing)
    clock.advance(TICK)
    assert watcher.view(account, jobs, client).polled
    assert [value.rsplit(":", 1)[1] for value, _, _ in seen] == ["1", "2", "3"]
    assert all(lease == 5000 - 4000 for _, lease, _ in seen)  # renewed at the page, 4 s ago
    assert [wait for _, _, wait in seen] == pytest.approx([0.1, 0.15, 0.2])
    assert list_calls(sim) == 3

    # A poll whose lease lapsed while another took the gate leaves that one's gate alone.
    fake.set(gate, "polling:someone-else:2", px=5000)
    assert watcher._own_gate(keys=[gate], args=["polling:mine:", "", 0]) == 0
    assert fake.get(gate) == b"polling:someone-else:2"
    assert watcher._own_gate(keys=[gate], args=["polling:someone-else:", "", 0]) == 1
    assert fake.get(gate) is None
    # A lease that lapsed with nobody else polling: the poll's hold is still written.
    assert watcher._own_gate(keys=[gate], args=["polling:mine:", "polled", 3000]) == 1
    assert (fake.get(gate), fake.pttl(gate)) == (b"polled", 3000)


def test_a_poll_longer_than_a_burst_waits_for_its_pages_in_the_limiter() -> None:
    """A poll is one read: refused by the limiter at its eleventh page (the list endpoint's
    burst is 10 a second), it had learnt nothing, and the next poll started again from the
    newest page, to be refused at the same place. So a poll of more than ten pages (here: a
    restart's, with no created_at to stop at, and a lost job) never ended. Its pages now wait
    in-process for the limiter; real time and a real limiter (on fakeredis), since this is
    about when the limiter's slots free."""
    sim = Simulator(job_delay=0.0, enforce_rate_limits=False)  # our limiter is under test
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    with SimulatorServer(sim) as server:
        with KlaviyoClient(key, server.base_url) as plain:
            for i in range(1_150):  # the account's history: 12 pages with the lost job
                plain.create_bulk_import_job([ProfileInput(email=f"h{i}@example.com")], list_id)
            time.sleep(0.01)
            lost = plain.create_bulk_import_job([ProfileInput(email="l@example.com")], list_id)
        sim.lose_job(lost.id)
        r = fakeredis.FakeRedis()
        session = LimitedSession(AccountLimiter(r), account=account, claimant="poll")
        with KlaviyoClient(
            key,
            server.base_url,
            before_request=session.before_request,
            after_response=session.after_response,
        ) as client:
            patient = poll_patience(session)
            jobs = AccountJobs(JobWatcher(r, interval=1.0), account, client, patient)
            jobs.register([lost.id])  # re-registered after a restart: no created_at
            time.sleep(0.01)  # a poll looks for the jobs registered before it began
            view = jobs.view([lost.id])  # was: Throttled at the 11th page, every poll
    assert view.polled and view.finished == [lost.id]
    assert list_calls(sim) == 12  # each page once


def test_the_next_poll_comes_at_the_newest_jobs_expected_end(
    env: tuple[Simulator, KlaviyoClient, str, str], clock: FakeClock, fake: fakeredis.FakeRedis
) -> None:
    """Once Klaviyo's created_at/completed_at tell how long jobs take, a poll whose interval
    would outlast the newest job comes right after its expected end (no sooner than 60 % of the
    list budget allows); the gap never grows, so a finished job is still noticed in time."""
    _sim, client, account, list_id = env
    watcher = JobWatcher(fake, interval=1.0, clock=clock)
    gate = watcher._key(account, "gate")
    took = watcher._key(account, "took")
    first = watch(watcher, account, submit_jobs(client, list_id, 1))
    clock.advance(TICK)
    view = watcher.view(account, first, client)
    assert view.running == first
    assert fake.pttl(gate) == 1000  # nothing known of durations: the interval
    clock.advance(view.wait)  # its batch comes back just after the gate opens
    assert watcher.view(account, first, client).finished == first
    assert fake.get(took) is not None  # learnt from Klaviyo's created_at and completed_at
    watcher.forget(account, first)
    # (The simulator stamps those by the wall clock, not the test's: say what Klaviyo would.)
    fake.set(took, round(JOB_DELAY * 1_000_000))

    fake.delete(gate)
    second = watch(watcher, account, submit_jobs(client, list_id, 1))
    clock.advance(TICK)
    assert watcher.view(account, second, client).running == second
    # due in 0.4 s; 0.67 s is as soon as polls may come at 60 % of 150/min (then the margin)
    assert watcher.early_spacing == pytest.approx(60 / 90)
    assert fake.pttl(gate) == 667 + 50

    fake.delete(gate)
    fake.set(took, 800_000)  # jobs of 0.8 s: the poll comes just after the newest one's end
    assert watcher.view(account, second, client).polled
    assert fake.pttl(gate) == 800 - 1 + 50  # due 0.8 s after it was registered, a tick ago

    fake.delete(gate)
    fake.set(took, 5_000_000)  # jobs of 5 s: the end is past the interval
    assert watcher.view(account, second, client).polled
    assert fake.pttl(gate) == 1000
