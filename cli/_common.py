"""What every command shares: one-line errors on stderr, a rich console."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer
from rich.console import Console

from cli._study import use_study
from featcache.errors import FeatcacheError

console = Console()
err_console = Console(stderr=True)


def new_app(help: str) -> typer.Typer:
    """A command group (kept a group even with one verb, so `APP VERB` always works); its callback installs
    the study file's defaults (`cli._study`)."""
    app = typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.callback()(use_study)
    return app


def run_app(app: typer.Typer) -> None:
    """Run a Typer app; a toolkit error becomes one line on stderr and its exit code, never a traceback."""
    try:
        app()
    except FeatcacheError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


def register_all(app: typer.Typer, *registrars: Callable[[typer.Typer], None]) -> None:
    for register in registrars:
        register(app)
