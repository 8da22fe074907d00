"""The bulk-job watcher: one poll per account answers for many jobs (fakeredis + the simulator)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import fakeredis
import pytest

from segops_sync.klaviyo import Endpoint, KlaviyoClient, ProfileInput
from segops_sync.klaviyo.simulator import Simulator, SimulatorServer
from segops_sync.sync.watcher import JobWatcher

JOB_DELAY = 0.4


@pytest.fixture
def env() -> Iterator[tuple[Simulator, KlaviyoClient, str, str]]:
    sim = Simulator(job_delay=JOB_DELAY, enforce_rate_limits=False)  # submissions in bulk
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    with SimulatorServer(sim) as server, KlaviyoClient(key, server.base_url) as client:
        yield sim, client, account, list_id


def submit(client: KlaviyoClient, list_id: str, n: int) -> list[str]:
    return [
        client.create_bulk_import_job([ProfileInput(email=f"w{i}@example.com")], list_id)
        for i in range(n)
    ]


def list_calls(sim: Simulator) -> int:
    return len(sim.requests(endpoint=Endpoint.LIST_BULK_IMPORT_JOBS))


def test_one_poll_answers_for_every_job_and_notices_within_one_interval(
    env: tuple[Simulator, KlaviyoClient, str, str],
) -> None:
    sim, client, account, list_id = env
    watcher = JobWatcher(fakeredis.FakeRedis(), interval=0.5, time_scale=2)
    jobs = submit(client, list_id, 30)
    watcher.register(account, jobs)

    first = watcher.view(account, jobs, client)
    assert first.polled and first.finished == [] and len(first.running) == 30
    # everyone else inside the interval reads the poll's answer: no request
    again = watcher.view(account, jobs[:5], client)
    assert not again.polled and 0 < again.wait <= 0.51
    assert list_calls(sim) == 1

    time.sleep(JOB_DELAY)  # every job is now due at Klaviyo
    time.sleep(again.wait)
    done = watcher.view(account, jobs, client)
    assert done.polled and sorted(done.finished) == sorted(jobs) and done.running == []
    assert list_calls(sim) == 2
    # the watcher never reads a job on its own; that is the owning batch's single GET
    assert sim.requests(endpoint=Endpoint.GET_BULK_IMPORT_JOB) == []
    watcher.forget(account, jobs)
    assert watcher.view(account, jobs[:1], client).running == jobs[:1]  # forgotten = re-watched


def test_a_job_registered_during_a_poll_waits_for_the_next(
    env: tuple[Simulator, KlaviyoClient, str, str],
) -> None:
    _sim, client, account, list_id = env
    fake = fakeredis.FakeRedis()
    watcher = JobWatcher(fake, interval=0.05, time_scale=20)
    [job] = submit(client, list_id, 1)
    time.sleep(JOB_DELAY)  # finished at Klaviyo
    # registered (as far as the watcher can tell) after the poll began: not in the answer proves
    # nothing about it yet
    fake.zadd(watcher._key(account, "watch"), {job: watcher._now_us() + 5_000_000})
    view = watcher.view(account, [job], client)
    assert view.polled and view.running == [job]
    fake.zadd(watcher._key(account, "watch"), {job: watcher._now_us()})
    time.sleep(view.wait)
    assert watcher.view(account, [job], client).finished == [job]


def test_polling_stays_within_its_share_however_many_pages(
    env: tuple[Simulator, KlaviyoClient, str, str],
) -> None:
    sim, client, account, list_id = env
    sim.job_delay = 30.0
    fake = fakeredis.FakeRedis()
    watcher = JobWatcher(fake, interval=0.01, time_scale=1.0)
    jobs = submit(client, list_id, 150)  # two pages of unfinished jobs
    watcher.register(account, jobs)
    view = watcher.view(account, jobs, client)
    assert view.polled and len(view.running) == 150
    assert list_calls(sim) == 2  # both pages, one poll
    # two pages at 40 % of 150/min: the next poll may come 2 x 1 s later, not after 0.01 s
    assert 1.9 <= fake.pttl(watcher._key(account, "gate")) / 1000 <= 2.0
    assert watcher.spacing == pytest.approx(1.0)


def test_a_429_holds_the_gate_for_its_retry_after(
    env: tuple[Simulator, KlaviyoClient, str, str],
) -> None:
    sim, client, account, list_id = env
    fake = fakeredis.FakeRedis()
    watcher = JobWatcher(fake, interval=0.05, time_scale=20)
    jobs = submit(client, list_id, 1)
    sim.force_429(1, 0.5)
    from segops_sync.klaviyo import RateLimited

    with pytest.raises(RateLimited):
        watcher.view(account, jobs, client)
    # nobody else polls before Klaviyo's Retry-After, even before the fleet backs off
    assert 400 <= fake.pttl(watcher._key(account, "gate")) <= 500
    assert not watcher.view(account, jobs, client).polled
    assert list_calls(sim) == 1


def test_a_failed_poll_lets_the_next_batch_poll_at_once(
    env: tuple[Simulator, KlaviyoClient, str, str],
) -> None:
    sim, client, account, list_id = env
    fake = fakeredis.FakeRedis()
    watcher = JobWatcher(fake, interval=5.0)
    jobs = submit(client, list_id, 2)
    sim.set_faults(error_rate=1.0)  # a 5xx: nothing to wait for
    from segops_sync.klaviyo import TransientError

    with pytest.raises(TransientError):
        watcher.view(account, jobs, client)
    assert fake.get(watcher._key(account, "gate")) is None
    sim.set_faults()
    assert watcher.view(account, jobs, client).polled


def test_a_finished_job_read_once_is_remembered_until_forgotten(
    env: tuple[Simulator, KlaviyoClient, str, str],
) -> None:
    """When ten jobs finish in one poll, their batches' import-error reads can be deferred by
    the limiter: the job's final read is kept, so a deferred batch does not read it again."""
    _, client, account, list_id = env
    watcher = JobWatcher(fakeredis.FakeRedis(), interval=0.05)
    jobs = submit(client, list_id, 2)
    watcher.register(account, jobs)
    time.sleep(JOB_DELAY + 0.1)
    assert sorted(watcher.view(account, jobs, client).finished) == sorted(jobs)
    assert watcher.final(account, jobs[0]) is None  # finished, not yet read by its batch
    watcher.remember_final(account, jobs[0], 3)
    assert (watcher.final(account, jobs[0]), watcher.final(account, jobs[1])) == (3, None)
    assert watcher.view(account, jobs, client).finished == jobs  # still finished
    watcher.forget(account, jobs[:1])
    assert watcher.final(account, jobs[0]) is None
