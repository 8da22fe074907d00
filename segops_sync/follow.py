"""Following a run from the command line: ``connectors resync --wait`` shows its progress.

On a terminal, a rich progress bar (members decided out of planned, rate, ETA); off a terminal
(a CI log, a pipe), one plain line every ``SEGOPS_PROGRESS_INTERVAL`` seconds, so a long sync
is never silent. Progress is read from PostgreSQL (``sync.progress``), never from the workers.
"""

from __future__ import annotations

import time
from typing import IO, Any

from segops_sync.db.session import session_scope
from segops_sync.sync.progress import Progress, running_progress

# A terminal refreshes often, but the count is a query: at most once a second.
TTY_REFRESH = 1.0


class Follower:
    def __init__(self, connector_id: str, stream: IO[str], *, interval: float) -> None:
        self.connector_id = connector_id
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = TTY_REFRESH if self.tty else interval
        self._next = 0.0
        self._run: str | None = None
        self._first: tuple[float, int] | None = None
        self._bar: Any = None
        self._task: Any = None

    def tick(self) -> None:
        """Called by the wait loop; reads and shows progress when it is time."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        with session_scope() as s:
            progress = running_progress(s, self.connector_id)
        if progress is not None:
            self._show(progress, now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _show(self, p: Progress, now: float) -> None:
        if p.run_id != self._run:  # a new run (a coalesced trigger follows the first one)
            self._run, self._first = p.run_id, (now, p.done)
            self.close()
        if self.tty:
            self._draw(p)
        else:
            self.stream.write(line(p, self._rate(now, p.done)) + "\n")
            self.stream.flush()

    def _rate(self, now: float, done: int) -> float | None:
        if self._first is None or now - self._first[0] < 0.5:
            return None
        return (done - self._first[1]) / (now - self._first[0])

    def _draw(self, p: Progress) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self._bar = Bar(
                TextColumn(f"sync {p.run_id[:8]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("members"),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("sync", total=p.total or None, rate="")
        speed = self._bar.tasks[0].speed if self._bar.tasks else None
        self._bar.update(
            self._task,
            completed=p.done,
            total=p.total or None,
            rate=f"{speed:,.0f}/s" if speed else "-/s",
        )


def line(p: Progress, rate: float | None) -> str:
    """``sync 1c2f…: 1,200/5,000 members (24%), 310/s, ETA 12s``"""
    share = f" ({p.done / p.total:.0%})" if p.total else ""
    text = f"sync {p.run_id}: {p.done:,}/{p.total:,} members{share}"
    if p.total == 0:
        return text + ", planning"
    if rate is None:
        return text
    text += f", {rate:,.0f}/s"
    if rate > 0:
        text += f", ETA {max(0.0, (p.total - p.done) / rate):.0f}s"
    return text
