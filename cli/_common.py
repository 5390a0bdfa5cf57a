"""What every command shares: one-line errors on stderr, a console that reads well in a terminal and in a log
file, one progress helper, and `--version`.

On a terminal output is rich (colour, tables fitted to the window, live progress bars). Off a terminal (a SLURM
log, ``| tee``, a pipe) every line is written whole at full width with no escape codes, and progress becomes a
plain line every few seconds. ``FEATCACHE_PLAIN=1`` forces the plain mode, ``FEATCACHE_PLAIN=0`` the terminal
one; unset, each stream is tested with ``isatty()``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

import typer
import typer.core
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cli._study import use_study
from featcache import __version__
from featcache.errors import FeatcacheError

PLAIN_ENV = "FEATCACHE_PLAIN"
PLAIN_WIDTH = 4096  # wide enough that no line or table is ever wrapped in a log; tables keep their own width
PLAIN_EVERY_S = 10.0  # at most one plain progress line per this many seconds (plus the first and the last)


def rank0() -> bool:
    """Whether this process is rank 0 under torchrun (or alone): only it prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


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


def make_console(*, stderr: bool = False, plain: bool | None = None, file: TextIO | None = None) -> Console:
    """A rich console for a terminal, or one that writes plain full-width lines (no wrapping, no escape codes)."""
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if plain is None:
        plain = plain_output(stream)
    if plain:
        return Console(file=file, stderr=stderr, width=PLAIN_WIDTH, soft_wrap=True, force_terminal=False,
                       no_color=True, highlight=False, emoji=False)
    return Console(file=file, stderr=stderr, force_terminal=True)


console = make_console()
err_console = make_console(stderr=True)


class Update(Protocol):
    """The callback `progress` yields: ``update(done, total=None, status=None)``."""

    def __call__(self, done: int, total: int | None = None, status: str | None = None) -> None: ...


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(per_second: float | None) -> str:
    """Items per second, or seconds per item when slower than one a second (epochs)."""
    if not per_second:
        return "-/s"
    return f"{per_second:.1f}/s" if per_second >= 1 else f"{1 / per_second:.1f} s each"


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_rate(task.speed))


class _PlainProgress:
    """Plain progress lines for logs: the first update, then at most one per ``every`` seconds, then the end."""

    def __init__(self, out: Console, label: str, total: int | None, every: float):
        self.out, self.label, self.total, self.every = out, label, total, every
        self.done, self.status = 0, None
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
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        head = f"{self.label}: {self.done}/{'?' if self.total is None else self.total}"
        parts = [head + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        if last:
            parts.append(f"done in {_duration(elapsed)}" + (f", {_rate(rate)}" if rate else ""))
        elif not first:
            parts.append(f"{_rate(rate)}, elapsed {_duration(elapsed)}")
            if rate and self.total:
                parts.append(f"ETA {_duration(max(self.total - self.done, 0) / rate)}")
        if self.status:
            parts.append(self.status)
        self.out.print(" · ".join(parts), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress(label: str, total: int | None = None, *, enabled: bool = True, plain: bool | None = None,
             every: float = PLAIN_EVERY_S, out: Console | None = None) -> Iterator[Update]:
    """Show progress of a long loop; yields ``update(done, total=None, status=None)`` to call as it advances.

    ``label`` names the work ("embedding", "training"); ``total`` may be given here or later through
    ``update``; ``done`` is how many items are finished; ``status`` is free text shown after the numbers and
    kept until replaced, e.g. ``update(12, 1000, status="epoch 12/1000 val loss 0.41")``. On a terminal this
    is a rich bar (count, rate, elapsed, ETA, status) that disappears at the end. Off a terminal
    (``plain``, default from `plain_output`) it writes one plain line at the first update, then at most one
    every ``every`` seconds, and a last line with the total time: label, done/total, rate, elapsed, ETA, status.
    ``enabled=False`` yields a no-op (e.g. on ranks other than 0).
    """
    out = console if out is None else out
    if not enabled:
        yield lambda done, total=None, status=None: None
        return
    if plain if plain is not None else not out.is_terminal:
        lines = _PlainProgress(out, label, total, every)
        yield lines.update
        lines.finish()
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), _RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}", markup=False))
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task(label, total=total, status="")

        def update(done: int, total: int | None = None, status: str | None = None) -> None:
            fields = {} if status is None else {"status": status}
            bar.update(task, completed=done, **({} if total is None else {"total": total}), **fields)

        yield update


def _flag_type(self: typer.core.TyperOption, ctx) -> str | None:
    """Flags take no value, so their help shows no type (typer would print `<bool>`)."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type


def new_app(help: str, *, name: str | None = None) -> typer.Typer:
    """A command group (kept a group even with one verb, so `APP VERB` always works); its callback installs
    the study file's defaults (`cli._study`); ``name`` adds `--version` (top-level apps only)."""
    app = typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    if name is None:
        app.callback()(use_study)
        return app

    def show_version(value: bool) -> None:
        if value:
            console.print(f"{name} {__version__}", markup=False, highlight=False)
            raise typer.Exit()

    @app.callback()
    def root(ctx: typer.Context,
             version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                          help="Show the version and exit.")) -> None:
        use_study(ctx)

    return app


def run_app(app: typer.Typer) -> None:
    """Run a Typer app; a toolkit error or a usage error (bad option, missing value) becomes one line on stderr
    and its exit code, never a traceback or a boxed message wrapped at 80 columns in a log."""
    try:
        code = app(standalone_mode=False)
    except FeatcacheError as err:
        _error_line(str(err))
        sys.exit(err.exit_code)
    except typer.Abort:
        _error_line("aborted")
        sys.exit(1)
    except typer.TyperException as err:  # click's usage errors
        if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(err, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            _error_line(err.format_message().rstrip(".") + hint)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _error_line(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def check_choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    """``value`` if it is one of ``allowed``, else a usage error naming the user's ``option``."""
    if value not in allowed:
        raise typer.BadParameter(f"{value!r}: choose from {', '.join(allowed)}", param_hint=option)
    return value


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 error', '2 errors' (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def register_all(app: typer.Typer, *registrars: Callable[[typer.Typer], None]) -> None:
    for register in registrars:
        register(app)
