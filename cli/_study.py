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
    from click import get_current_context  # type: ignore[no-redef]

_COMMANDLINE = "COMMANDLINE"
_EXTRAS = "featcache.grid_train_extras"  # ctx.meta key: grid `train:` settings without a flag
_ORIGINS = "featcache.study_origins"  # ctx.meta key: {command: {parameter: where its default came from}}


def given(name: str) -> bool:
    """Whether option ``name`` of the running command was typed (not a default, nor the study's)."""
    source = get_current_context().get_parameter_source(name)
    return source is not None and source.name == _COMMANDLINE


def grid_train_extras() -> dict[str, Any]:
    """The study grid's `train:` settings that have no flag of `adapters train` (e.g. plateau_factor, min_lr)."""
    extras = get_current_context().find_root().meta.get(_EXTRAS, {})
    return dict(extras)


def _param(name: str) -> Any:
    return get_current_context().params.get(name)


def _dynamic(study: Study) -> dict[str, Callable[[], Any]]:
    default_task = study.tasks[0] if len(study.tasks) == 1 else None

    def manifest() -> str | None:
        path = study.manifest_for(_param("task") or default_task)
        return None if path is None else str(path)

    def weights() -> str | None:
        if given("random_init"):
            return None
        path, _ = study.weights_for(_param("model"))
        return None if path is None else str(path)

    def random_init() -> bool:
        return not given("weights") and study.weights_for(_param("model"))[1]

    def pixels() -> str | None:  # training reads the cache where `featcache pixels` made one, else decodes
        return str(study.pixels) if study.pixels is not None and study.pixels.exists() else None

    def positive() -> str | None:  # an own task declared under `tasks:`
        return study.positives.get(_param("task") or default_task or "")

    return {"manifest": manifest, "weights": weights, "random_init": random_init, "pixels": pixels,
            "positive": positive}


# `adapters train` options filled from the grid's `train:` settings (TrainSettings field -> option name)
_TRAIN_OPTIONS = {"max_epochs": "max_epochs", "patience": "patience", "warmup": "warmup",
                  "plateau_patience": "plateau_patience", "batch_size": "batch_size", "accumulate": "accumulate",
                  "seed": "seed", "backbone_lr": "backbone_lr", "augment": "augment", "grad_ckpt": "grad_ckpt",
                  "checkpoint_every_s": "checkpoint_every", "adapter_dropout": "adapter_dropout", "pack": "pack"}


def _grid_defaults(study: Study) -> tuple[dict[str, dict[str, Any]], str]:
    """What a command typed in the study takes from its grid: `train` its folds, draws, head LRs and `train:`
    settings; `probe` its draws and view. Empty where the study names no grid."""
    if study.grid_ref is None:
        return {}, ""
    grid = study.grid()
    train: dict[str, Any] = {"fold": "all" if grid.train_folds is None else ",".join(grid.train_folds),
                             "draws": grid.train_draws, "head_lr": ",".join(f"{lr:g}" for lr in grid.head_lrs)}
    train |= {_TRAIN_OPTIONS[k]: v for k, v in grid.train.items() if k in _TRAIN_OPTIONS}
    return {"train": train, "probe": {"draws": grid.draws, "view": grid.view}}, f"grid {grid.name}"


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
    if study.positives:
        for command in ("splits", "probe", "train"):
            table[command]["positive"] = dynamic["positive"]
    return table


def study_defaults(study: Study) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """:func:`command_defaults` with the grid's settings and the study's ``defaults:`` on top (in that order),
    and where each of those came from (``{command: {parameter: origin}}``) for :func:`settings_line`."""
    table = command_defaults(study)
    origins: dict[str, dict[str, str]] = {}
    from_grid, grid_name = _grid_defaults(study)
    for command, options in from_grid.items():
        table.setdefault(command, {}).update(options)
        origins.setdefault(command, {}).update(dict.fromkeys(options, grid_name))
    for command, options in study.defaults.items():
        table.setdefault(command, {}).update(options)
        origins.setdefault(command, {}).update(dict.fromkeys(options, "study defaults"))
    return table, origins


def settings_line(names: tuple[str, ...]) -> str | None:
    """One line saying where the command's settings came from: flags, the study's grid or ``defaults:``, or the
    command's own (the benchmark's) defaults; None outside a study."""
    ctx = get_current_context()
    origins = ctx.find_root().meta.get(_ORIGINS)
    if origins is None:
        return None
    mine = origins.get(ctx.info_name or "", {})
    by_origin: dict[str, list[str]] = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        option = "--" + name.replace("_", "-")
        if source is not None and source.name == _COMMANDLINE:
            by_origin.setdefault("flags", []).append(option)
        elif name in mine:
            by_origin.setdefault(mine[name], []).append(f"{option} {_shown(ctx.params.get(name))}")
    parts = [f"{origin}: {', '.join(items)}" for origin, items in by_origin.items()]
    return "settings from " + "; ".join(parts + ["the rest: the command's defaults (the benchmark's)"])


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _annotate(group: Any, defaults: dict[str, Any], study: Study, origins: dict[str, dict[str, str]]) -> None:
    """Say in each option's help that its default comes from the study file (``--help`` shows the value)."""
    for name, command in getattr(group, "commands", {}).items():
        mine = defaults.get(name)
        if not isinstance(mine, dict):
            continue
        if hasattr(command, "commands"):
            _annotate(command, mine, study, {})
            continue
        where = origins.get(name, {})
        for param in command.params:
            if param.name not in mine:
                continue
            value = mine[param.name]
            if param.name in ("weights", "random_init") and callable(value):
                named = ", ".join(f"{k}={v}" for k, v in study.weights.items()) or "none listed"
                note = f"per backbone from {study.path} ({named})"
            elif param.name == "pixels" and callable(value):
                note = f"from {study.path} where the cache exists"
            elif where.get(param.name, "").startswith("grid"):
                note = f"from the {where[param.name]} of {study.path}"
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
    ctx.default_map, ctx.meta[_ORIGINS] = study_defaults(study)
    if study.grid_ref is not None:
        ctx.meta[_EXTRAS] = {k: v for k, v in study.grid().train.items() if k not in _TRAIN_OPTIONS}
    _annotate(ctx.command, ctx.default_map, study, ctx.meta[_ORIGINS])
    err_console.print(f"study: {path}", markup=False, highlight=False, soft_wrap=True)
