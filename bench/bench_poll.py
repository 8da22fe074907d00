"""Benchmark: one poll of the bulk-job watcher that cannot stop early, against a long history.

After a Redis restart the watcher knows no job's ``created_at``, so a poll cannot tell where to
stop paging until it has met every watched job; one job Klaviyo lost makes it page on. This
seeds the simulator with ``--history`` jobs of the account, then one lost job, and times the
polls until the lost job is handed to its batch (``view`` reports it finished), through the real
fleet limiter on Redis at Klaviyo's real limits (the list endpoint: 10 a second, 150 a minute).
Throttled polls are retried after the wait the limiter names, as a batch step would. With
``--no-patience`` the poll's pages do not wait in-process for the limiter (the listing's
30-page bound still applies). The code before the change (5ed7cc6) runs this script too: run it
from this checkout with ``PYTHONPATH`` set to a checkout of that commit. Writes
``bench/results/poll-<history>[-no-patience][-<name>].json``.

    .venv/bin/python bench/bench_poll.py --history 14000 --redis-url redis://127.0.0.1:6379/9
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=14_000, help="older jobs of the account")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9", help="the limiter's")
    parser.add_argument("--timeout", type=float, default=200.0, help="seconds of polling")
    parser.add_argument("--no-patience", action="store_true")
    parser.add_argument("--name", default="", help="added to the result file's name")
    args = parser.parse_args()
    prefix = f"bench-poll-{uuid.uuid4().hex[:8]}:"
    os.environ.update(
        SEGOPS_LIMITER_REDIS_URL=args.redis_url,
        SEGOPS_REDIS_KEY_PREFIX=prefix,
        SEGOPS_SECRET_KEY=os.environ.get("SEGOPS_SECRET_KEY", "b" * 44),
    )
    logging.basicConfig(level=logging.WARNING)

    from segops_sync.config import Settings
    from segops_sync.klaviyo import Endpoint, KlaviyoClient, ProfileInput
    from segops_sync.klaviyo_sim import Simulator, SimulatorServer
    from segops_sync.sync.fleet.access import KlaviyoAccess, Throttled
    from segops_sync.sync.fleet.watcher import AccountJobs

    sim = Simulator(job_delay=0.0, indexing_delay=0.0, enforce_rate_limits=False)
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    with SimulatorServer(sim) as server:
        os.environ["SEGOPS_KLAVIYO_BASE_URL"] = server.base_url
        with KlaviyoClient(key, server.base_url) as plain:
            for i in range(args.history):
                plain.create_bulk_import_job([ProfileInput(email=f"h{i}@example.com")], list_id)
            time.sleep(0.01)
            lost = plain.create_bulk_import_job([ProfileInput(email="l@example.com")], list_id).id
        sim.lose_job(lost)
        access = KlaviyoAccess(Settings())
        try:
            client, limited = access.client(key, claimant="bench")
            jobs = access.jobs(client, limited)
            if args.no_patience:
                jobs = AccountJobs(jobs.watcher, jobs.account, jobs.client)
            jobs.register([lost])  # as a batch re-registers it after a restart
            time.sleep(0.01)
            start, polls, throttled, handed_over = time.monotonic(), 0, 0, None
            while time.monotonic() - start < args.timeout:
                try:
                    view = jobs.view([lost])
                except Throttled as exc:
                    throttled += 1
                    time.sleep(exc.wait)
                    continue
                polls += view.polled
                if lost in view.finished:
                    handed_over = time.monotonic() - start
                    break
                time.sleep(view.wait)
            requests = len(sim.requests(endpoint=Endpoint.LIST_BULK_IMPORT_JOBS))
            client.close()
        finally:
            for k in access.redis.scan_iter(f"{prefix}*"):
                access.redis.delete(k)
    import segops_sync

    checkout = Path(segops_sync.__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    result = {
        "commit": commit + (" + changes" if _dirty(checkout) else ""),
        "history": args.history,
        # the code before the change had no patience to ask for
        "patience": not args.no_patience and "patient" in AccountJobs.__dataclass_fields__,
        "handed_over_s": None if handed_over is None else round(handed_over, 2),
        "timeout_s": args.timeout,
        "polls": polls,
        "throttled": throttled,
        "list_requests": requests,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = ("-no-patience" if args.no_patience else "") + (f"-{args.name}" if args.name else "")
    (RESULTS / f"poll-{args.history}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    took = "never" if handed_over is None else f"{handed_over:.2f}s"
    print(
        f"RESULT scenario=poll history={args.history} patience={result['patience']} "
        f"handed_over={took} polls={polls} throttled={throttled} list_requests={requests}"
    )
    return 0 if handed_over is not None else 1


def _dirty(checkout: Path) -> bool:
    status = subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(status.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
