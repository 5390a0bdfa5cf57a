"""What every command group shares: the app factory (study defaults, `--version`), one-line errors and exit
codes, option checks, and the rank that prints under torchrun. Output itself goes through `cli.console`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import typer
import typer.core

from cli._study import use_study
from cli.console import console, err_console, error_line
from featcache import __version__
from featcache.errors import FeatcacheError


def rank0() -> bool:
    """Whether this process is rank 0 under torchrun (or alone): only it prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def _flag_type(self: typer.core.TyperOption, ctx) -> str | None:
    """Flags take no value, so their help shows no type (typer would print `<bool>`)."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


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


def quiet_library_warnings() -> None:
    """Keep libraries' deprecation notices (transformers' FutureWarnings) out of a command's output: they
    speak to the toolkit's developers, not to its users. ``-W`` or ``PYTHONWARNINGS`` still choose."""
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def run_app(app: typer.Typer) -> None:
    """Run a Typer app; a toolkit error or a usage error (bad option, missing value) becomes one line on stderr
    and its exit code, never a traceback or a boxed message wrapped at 80 columns in a log."""
    quiet_library_warnings()
    try:
        code = app(standalone_mode=False)
    except FeatcacheError as err:
        error_line(str(err))
        sys.exit(err.exit_code)
    except typer.Abort:
        error_line("aborted")
        sys.exit(1)
    except typer.TyperException as err:  # click's usage errors
        if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(err, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            error_line(err.format_message().rstrip(".") + hint)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def check_choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    """``value`` if it is one of ``allowed``, else a usage error naming the user's ``option``."""
    if value not in allowed:
        raise typer.BadParameter(f"{value!r}: choose from {', '.join(allowed)}", param_hint=option)
    return value


def register_all(app: typer.Typer, *registrars: Callable[[typer.Typer], None]) -> None:
    for register in registrars:
        register(app)
