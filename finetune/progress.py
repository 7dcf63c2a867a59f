"""What a run shows while it works: a rich progress bar with the time left for every phase that counts
something (images, epochs), or, with ``enabled=False`` (``--no-progress``), one log line per phase when it
ends. Phases call ``advance(n)``; they never know which of the two is showing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("finetune")


class Phases:
    """``with phases.run("features of 1,000 training images", total=1000, unit="images") as advance: ...``"""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)

    @contextmanager
    def run(self, description: str, total: int, unit: str = "images") -> Iterator[Callable[[int], None]]:
        started = time.perf_counter()
        done = 0
        if not self.enabled:
            def count(n: int = 1) -> None:
                nonlocal done
                done += n

            yield count
            log.info("%s: %d %s in %.1f s", description, done, unit, time.perf_counter() - started)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
