"""Which lane a run's batches wait in: small runs never queue behind a big run's batches.

The Klaviyo queue is FIFO: a 1M first sync queues 100 batches, and a 10-member change of any
other connector would wait until a worker had taken every one of them, though it needs little
of any rate-limit budget. A small run's batches go to a lane of their own, which every worker
consumes alongside the big one, so they are taken within a few fetches of being queued. On
Redis kombu rotates the queues it polls: a fetch or two. On RabbitMQ (one consumer per queue)
a freed prefetch slot goes to the waiting queues in a random order (rabbit_limiter), so a
small batch is taken at the next fetch with odds of one in the number of queues waiting: a few
fetches on average, a run of bad draws now and then, never the big run's whole queue.

The rule counts batches, not members: the planner, a repeated ``plan_run`` and the sweeper's
re-dispatch all know a run's open batch ids, and the count is what the lane costs whoever waits
in it: the lane holds at most this many messages per small run, so a small run in it is never
behind more than a few steps of work.
"""

from __future__ import annotations

import math

from segops_sync.sync.costs import DIRECT_BATCH_SIZE, direct_add_limit

# The most batches the largest change of the synchronous path makes: its adds in batches of
# DIRECT_BATCH_SIZE (337 -> 4) and one removal batch (1,000 leavers): 5 at the default headroom.
SMALL_RUN_BATCHES = math.ceil(direct_add_limit() / DIRECT_BATCH_SIZE) + 1


def small_run(add_batches: int, remove_batches: int) -> bool:
    """Whether a run's (open) batches go to the small-run lane."""
    return 0 < add_batches + remove_batches <= SMALL_RUN_BATCHES


__all__ = ["SMALL_RUN_BATCHES", "small_run"]
