"""The study file as click's ``default_map``: per command, the options it fills; flags override them.

Values that depend on another option are callables that click calls while parsing: a task's manifest (where a
study has several) and a backbone's weights (path or random-init, only where the study names that backbone).
Click parses options given on the command line first, so ``--model``/``--task`` are known by then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from cli.console import err_console
from study.studyfile import Study, find_study, load_study

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import get_current_context

_COMMANDLINE = "COMMANDLINE"


def _given(name: str) -> bool:
    source = get_current_context().get_parameter_source(name)
    return source is not None and source.name == _COMMANDLINE


def _param(name: str) -> Any:
    return get_current_context().params.get(name)


def _dynamic(study: Study) -> dict[str, Callable[[], Any]]:
    default_task = study.tasks[0] if len(study.tasks) == 1 else None

    def manifest() -> str | None:
        path = study.manifest_for(_param("task") or default_task)
        return None if path is None else str(path)

    def weights() -> str | None:
        if _given("random_init"):
            return None
        path, _ = study.weights_for(_param("model"))
        return None if path is None else str(path)

    def random_init() -> bool:
        return not _given("weights") and study.weights_for(_param("model"))[1]

    def pixels() -> str | None:  # training reads the cache where `featcache pixels` made one, else decodes
        return str(study.pixels) if study.pixels is not None and study.pixels.exists() else None

    return {"manifest": manifest, "weights": weights, "random_init": random_init, "pixels": pixels}


def command_defaults(study: Study) -> dict[str, dict[str, Any]]:
    """``{command: {parameter: default}}`` for both console scripts; study ``defaults:`` entries win."""
    dynamic = _dynamic(study)
    common = {k: v for k, v in {"model": study.model, "device": study.device}.items() if v is not None}
    if len(study.tasks) == 1:
        common["task"] = study.tasks[0]
    features = {"store": str(study.features)} if study.features else {}
    runs = str(study.runs)
    weights = {"weights": dynamic["weights"], "random_init": dynamic["random_init"]}
    manifest = dynamic["manifest"] if study.manifests else (str(study.manifest) if study.manifest else None)
    data = {**common, **({"manifest": manifest} if manifest else {})}
    table: dict[str, dict[str, Any]] = {
        "extract": {**data, **features, **weights},
        "pixels": {**data, **({"store": str(study.pixels)} if study.pixels else {})},
        "probe": {**data, **features, **weights, "out": runs},
        "splits": dict(data),
        "results": {"folder": runs},
        "export": dict(features),
        "stores": dict(features),
        "report": {"results": runs, "out": str(study.report)},
        "train": {**data, **weights, "out": runs, **({"pixels": dynamic["pixels"]} if study.pixels else {})},
        "methods": {**common, **weights},
        "predict": {k: v for k, v in data.items() if k == "manifest"},
    }
    table["manifest"] = {"validate": {k: v for k, v in data.items() if k == "manifest"}}
    for command, options in study.defaults.items():
        table.setdefault(command, {}).update(options)
    return table


def _annotate(group: Any, defaults: dict[str, Any], study: Study) -> None:
    """Say in each option's help that its default comes from the study file (``--help`` shows the value)."""
    for name, command in getattr(group, "commands", {}).items():
        mine = defaults.get(name)
        if not isinstance(mine, dict):
            continue
        if hasattr(command, "commands"):
            _annotate(command, mine, study)
            continue
        for param in command.params:
            if param.name not in mine:
                continue
            value = mine[param.name]
            if param.name in ("weights", "random_init") and callable(value):
                named = ", ".join(f"{k}={v}" for k, v in study.weights.items()) or "none listed"
                note = f"per backbone from {study.path} ({named})"
            elif param.name == "pixels" and callable(value):
                note = f"from {study.path} where the cache exists"
            elif callable(value):
                note = f"per task from {study.path}"
            else:
                note = f"from {study.path}"
            param.help = f"{param.help or ''} (study default {note})".strip()


def use_study(ctx: typer.Context) -> None:
    """Group callback of both console scripts: find the study file, install its defaults, say which it is."""
    if ctx.parent is not None or ctx.invoked_subcommand == "init":  # sub-groups inherit the root's defaults;
        return  # `init` writes a study file and must work beside a broken one
    path = find_study()
    if path is None:
        return
    study = load_study(path)
    ctx.default_map = command_defaults(study)
    _annotate(ctx.command, ctx.default_map, study)
    err_console.print(f"study: {path}", markup=False, highlight=False, soft_wrap=True)
