"""A rich progress bar for a running suite (the runner's ``SuiteProgress``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class SuiteProgressBar:
    """One bar over the probes; the running probe's current step beside it."""

    def __init__(self, bar: Progress, total: int) -> None:
        self._bar = bar
        self._task = bar.add_task("", total=total, probe="")

    def probe(self, label: str) -> None:
        self._bar.update(self._task, probe=label, description="")

    def note(self, message: str) -> None:
        self._bar.update(self._task, description=message)

    def advance(self) -> None:
        self._bar.advance(self._task)


@contextmanager
def suite_progress(total: int, console: Console | None = None) -> Iterator[SuiteProgressBar]:
    """A transient bar on ``console`` (stderr by default) for a suite of ``total`` probes."""
    bar = Progress(
        TextColumn("[bold]{task.fields[probe]}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        transient=True,
        console=console or Console(stderr=True),
    )
    with bar:
        yield SuiteProgressBar(bar, total)
