"""The console every command writes through: one that reads well in a terminal and in a log file, one
progress helper, one-line errors, and plurals.

On a terminal output is rich (colour, tables fitted to the window, live progress bars). Off a terminal (a SLURM
log, ``| tee``, a pipe) every line is written whole at full width with no escape codes, and progress becomes a
plain line every few seconds. ``FEATCACHE_PLAIN=1`` forces the plain mode, ``FEATCACHE_PLAIN=0`` the terminal
one; unset, each stream is tested with ``isatty()``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from featcache.text import clock
from featcache.text import plural as plural  # the CLI modules import it from here

PLAIN_ENV = "FEATCACHE_PLAIN"
PLAIN_WIDTH = 4096  # wide enough that no line or table is ever wrapped in a log; tables keep their own width
PLAIN_EVERY_S = 10.0  # at most one plain progress line per this many seconds (plus the first and the last)


def plain_output(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) gets plain lines: $FEATCACHE_PLAIN if set, else not a terminal."""
    forced = os.environ.get(PLAIN_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or unusual streams are not terminals
        return True


class _PlainConsole(Console):
    """The plain console: tables lose their box rules and outer padding (a log keeps columns of words, not
    hundreds of rule characters) and their lines their trailing blanks."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: D102 - Console.print
        if not any(isinstance(o, Table) for o in objects):
            super().print(*objects, **kwargs)
            return
        for item in objects:
            if isinstance(item, Table):
                item.box, item.show_edge, item.pad_edge = None, False, False
        with self.capture() as captured:
            super().print(*objects, **kwargs)
        text = "\n".join(line.rstrip() for line in captured.get().splitlines())
        super().print(text, markup=False, highlight=False, soft_wrap=True)


def make_console(*, stderr: bool = False, plain: bool | None = None, file: TextIO | None = None) -> Console:
    """A rich console for a terminal, or one that writes plain full-width lines (no wrapping, no escape codes)."""
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if plain is None:
        plain = plain_output(stream)
    if plain:
        return _PlainConsole(file=file, stderr=stderr, width=PLAIN_WIDTH, soft_wrap=True, force_terminal=False,
                             no_color=True, highlight=False, emoji=False)
    return Console(file=file, stderr=stderr, force_terminal=True)


console = make_console()
err_console = make_console(stderr=True)


class Update(Protocol):
    """The callback `progress` yields: ``update(done, total=None, status=None)``."""

    def __call__(self, done: int, total: int | None = None, status: str | None = None) -> None: ...


def _rate(per_second: float | None, unit: str = "item") -> str:
    """Items per second with their unit (``48.7 images/s``), or seconds per item when slower than one a second
    (``2.1 s/epoch``)."""
    if not per_second:
        return f"- {unit}s/s"
    return f"{per_second:.1f} {unit}s/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_rate(task.speed, task.fields.get("unit", "item")))


class _PlainProgress:
    """Plain progress lines for logs: the first update, then at most one per ``every`` seconds, then the end."""

    def __init__(self, out: Console, label: str, total: int | None, every: float, unit: str):
        self.out, self.label, self.total, self.every, self.unit = out, label, total, every, unit
        self.done = 0
        self.status: str | None = None
        self.start = time.monotonic()
        self.last: float | None = None  # when the last line was written

    def update(self, done: int, total: int | None = None, status: str | None = None) -> None:
        self.done = done
        self.total = total if total is not None else self.total
        self.status = status if status is not None else self.status
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every:
            self._line(now, first=self.last is None)
            self.last = now

    def finish(self) -> None:
        if self.last is not None:
            self._line(time.monotonic(), last=True)

    def _line(self, now: float, first: bool = False, last: bool = False) -> None:
        """``label done/total (pct)``, then the rate and ETA (elapsed without a total), then the status; the
        last line says how long it took instead. Kept short: a line of a log read at 80 columns."""
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        head = f"{self.label}: {self.done}/{'?' if self.total is None else self.total}"
        parts = [head + (f" ({100 * self.done / self.total:.0f}%)" if self.total and not self.status else "")]
        if last:
            parts.append(f"took {clock(elapsed)}" + (f", {_rate(rate, self.unit)}" if rate else ""))
        elif not first:
            parts.append(_rate(rate, self.unit))
            if rate and self.total:
                parts.append(f"ETA {clock(max(self.total - self.done, 0) / rate)}")
            else:
                parts.append(f"elapsed {clock(elapsed)}")
        if self.status:
            parts.append(self.status)
        self.out.print(" · ".join(parts), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress(label: str, total: int | None = None, *, enabled: bool = True, plain: bool | None = None,
             every: float = PLAIN_EVERY_S, out: Console | None = None, unit: str = "item") -> Iterator[Update]:
    """Show progress of a long loop; yields ``update(done, total=None, status=None)`` to call as it advances.

    ``label`` names the work ("embedding", "training"); ``total`` may be given here or later through
    ``update``; ``done`` is how many items are finished; ``status`` is free text shown after the numbers and
    kept until replaced, e.g. ``update(12, 1000, status="epoch 12/1000 val loss 0.41")``. On a terminal this
    is a rich bar (count, rate, elapsed, ETA, status) that disappears at the end. Off a terminal
    (``plain``, default from `plain_output`) it writes one plain line at the first update, then at most one
    every ``every`` seconds, and a last line with the total time: label, done/total, rate, elapsed, ETA, status.
    ``unit`` names what is counted in the rate (``48.7 images/s``, ``2.1 s/epoch``). ``enabled=False`` yields a
    no-op (e.g. on ranks other than 0).
    """
    out = console if out is None else out
    if not enabled:
        yield lambda done, total=None, status=None: None
        return
    if plain if plain is not None else not out.is_terminal:
        lines = _PlainProgress(out, label, total, every, unit)
        yield lines.update
        lines.finish()
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(bar_width=16), MofNCompleteColumn(),
               _RateColumn(), TextColumn("ETA"), TimeRemainingColumn(compact=True),
               TextColumn("{task.fields[status]}", markup=False))
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task(label, total=total, status="", unit=unit)

        def update(done: int, total: int | None = None, status: str | None = None) -> None:
            fields: dict[str, Any] = {} if status is None else {"status": status}
            if total is not None:
                fields["total"] = total
            bar.update(task, completed=done, **fields)

        yield update


def error_line(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
