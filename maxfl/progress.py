"""Progress of long work (simulating recordings, computing features): a bar with an ETA in a terminal, lines in a log.

Simulating a process plant's months of history or running a backbone over its images takes minutes on first
use; a silent terminal looks hung. In a terminal, rich draws a bar with elapsed time and the time left; anywhere
else (a SuperNode's log file, CI) the `maxfl` logger gets a line at the start, at every tenth and at the end,
so a log shows how far the work got without a line per item.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger("maxfl.progress")  # the CLI shows it at INFO while the rest of maxfl's log stays at WARNING
STEPS = 10  # plain lines: one per tenth of the work


def _eta(done: int, total: int, elapsed: float) -> str:
    if done <= 0 or done >= total:
        return ""
    return f", about {elapsed / done * (total - done):.0f} s left"


@contextmanager
def progress(description: str, total: int, stream: TextIO | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`: call it as each of `total` units of work finishes. `stream`: where a terminal's bar
    is drawn (default stderr); when it is not a terminal, progress goes to the log instead."""
    stream = stream if stream is not None else sys.stderr
    started = time.monotonic()
    if total > 0 and stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                   TimeRemainingColumn())
        with Progress(*columns, console=Console(file=stream)) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    done, shown = 0, 0
    log.info("%s: 0/%d", description, total)

    def advance(n: int = 1) -> None:
        nonlocal done, shown
        done = min(total, done + n)
        step = done * STEPS // total if total else STEPS
        if step > shown and done < total:
            shown = step
            log.info("%s: %d/%d (%d%%%s)", description, done, total, 100 * done // total, _eta(done, total, time.monotonic() - started))

    yield advance
    log.info("%s: %d/%d done in %.1f s", description, done, total, time.monotonic() - started)
