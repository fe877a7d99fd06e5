"""Progress display for long commands: bars with M/N, rate and ETA, and a one-line status, on stderr.

Core code reports progress through plain callbacks and never draws anything itself; the CLI passes the
callables made here. Both are drawn only on a terminal: in a pipe or a log they stay silent, so that
stdout carries only the result and a log gets no half-drawn bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

stderr = Console(stderr=True)


class _Rate(ProgressColumn):
    """Units per second of this run: progress a task started with (resumed work) does not count."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


class Task:
    """One bar. Call it with n to advance by n; `update` sets the position, total, label or trailing info."""

    def __init__(self, bars: Progress | None, task_id=None):
        self._bars, self._id = bars, task_id

    def __call__(self, n: int = 1) -> None:
        if self._bars is not None:
            self._bars.advance(self._id, n)

    def update(
        self,
        completed: int | None = None,
        *,
        total: int | None = None,
        description: str | None = None,
        info: str | None = None,
    ) -> None:
        if self._bars is None:
            return
        fields = {} if info is None else {"info": info}
        self._bars.update(self._id, completed=completed, total=total, description=description, **fields)


StartTask = Callable[..., Task]


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[StartTask]:
    """Yield start(description, total, completed=0, unit="rows") -> Task; the bars are drawn while the
    block runs and removed after it. Disabled (or off a terminal), the Tasks do nothing."""
    if not (enabled and stderr.is_terminal):
        yield lambda *args, **kwargs: Task(None)
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr,
        transient=True,
    )

    def start(description: str, total: int | None, completed: int = 0, unit: str = "rows") -> Task:
        return Task(bars, bars.add_task(description, total=total, completed=completed, unit=unit, info=""))

    with bars:
        yield start


@contextlib.contextmanager
def status(message: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield say(message): a spinner line showing the step that runs now, for work without a count."""
    if not (enabled and stderr.is_terminal):
        yield lambda msg: None
        return
    with stderr.status(message) as spinner:
        yield lambda msg: spinner.update(msg)
