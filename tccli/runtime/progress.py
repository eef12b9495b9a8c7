"""Progress on stderr: a rich progress bar when stderr is a terminal, nothing at all otherwise.

One callback shape for every long command: ``update(stage, done, total)``, ``total`` None while it is
not known yet (the bar then shows a count without a fraction). ``bar(quiet, unit)`` is a context
manager yielding that callback, or a no-op callback with ``--quiet`` or when stderr is a pipe or a file,
so logs and CI output never fill with control characters. Under torchrun only rank 0 draws (the other
ranks' callers pass ``quiet=True``). What a command reports besides the bar (tc train's metric lines)
is its own to print, as plain lines when there is no bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

Update = Callable[[str, int, Optional[int]], None]


def stderr_console():
    """A rich console on stderr (progress and logs never touch stdout)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def no_progress(stage: str, done: int, total: Optional[int] = None) -> None:
    pass


def _count_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CountColumn(ProgressColumn):
        """`1,234/5,000 tokens  812 tokens/s`; `1,234 tokens` while the total is unknown."""

        def render(self, task) -> Text:
            done = f"{task.completed:,.0f}"
            count = f"{done}/{task.total:,.0f}" if task.total is not None else done
            speed = f"  {task.speed:,.0f} {unit}/s" if task.speed else ""
            return Text(f"{count} {unit}{speed}".strip())

    return CountColumn()


@contextlib.contextmanager
def bar(quiet: bool = False, unit: str = "") -> Iterator[Update]:
    """Yield ``update(stage, done, total)`` drawing one bar per stage on stderr (a no-op when ``quiet`` or
    when stderr is not a terminal). The bars disappear when the block ends."""
    console = stderr_console()
    if quiet or not console.is_terminal:
        yield no_progress
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _count_column(unit),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: Optional[int] = None) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update
