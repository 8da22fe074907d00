"""The small-run lane's rule: counted in batches, the same for the planner and the sweeper."""

from __future__ import annotations

import math

from segops_sync.sync.costs import DIRECT_BATCH_SIZE, direct_add_limit
from segops_sync.sync.lanes import SMALL_RUN_BATCHES, small_run


def test_the_largest_synchronous_change_fits_the_lane() -> None:
    # 337 adds in batches of 100, and one removal batch of 1,000 leavers
    assert math.ceil(direct_add_limit() / DIRECT_BATCH_SIZE) == 4
    assert SMALL_RUN_BATCHES == 5
    assert small_run(4, 1)


def test_a_five_out_five_in_change_is_small() -> None:
    assert small_run(1, 1)
    assert small_run(1, 0) and small_run(0, 1)


def test_a_run_of_more_batches_is_big() -> None:
    assert not small_run(4, 2)
    assert not small_run(100, 0)  # a 1M first sync
    assert not small_run(0, 100)  # 100k leavers


def test_a_run_with_no_batch_takes_no_lane() -> None:
    assert not small_run(0, 0)
