"""The start and the end of a run: one log line each, with counts, and the run metrics."""

from __future__ import annotations

import logging

from segops_sync.observability import metrics

log = logging.getLogger("segops_sync.runs")


def run_started(
    *, connector_id: str, run_id: str, trigger: str, to_add: int, to_remove: int
) -> None:
    log.info(
        "run started (%s): %d to add, %d to remove",
        trigger,
        to_add,
        to_remove,
        extra={
            "connector_id": connector_id,
            "run_id": run_id,
            "trigger": trigger,
            "to_add": to_add,
            "to_remove": to_remove,
        },
    )


def run_ended(
    *,
    connector_id: str,
    run_id: str,
    status: str,
    seconds: float | None,
    added: int,
    removed: int,
    rejected: int,
    error: str | None,
) -> None:
    """Once per run (the caller closed it just now), so the counts are counted once."""
    metrics.count_run(
        connector_id, status, seconds=seconds, added=added, removed=removed, rejected=rejected
    )
    # a run cancelled by a pause did what a person asked: no warning
    level = logging.INFO if status in ("succeeded", "cancelled") else logging.WARNING
    log.log(
        level,
        "run %s in %s: added %d, removed %d, rejected %d%s",
        status,
        f"{seconds:.1f}s" if seconds is not None else "?",
        added,
        removed,
        rejected,
        f"; {error}" if error else "",
        extra={
            "connector_id": connector_id,
            "run_id": run_id,
            "status": status,
            "seconds": seconds,
            "added": added,
            "removed": removed,
            "rejected": rejected,
        },
    )
