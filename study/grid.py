"""The grid of a study: backbones x methods x tasks x regimes x folds x head LRs, as data.

A grid is a YAML mapping (shipped: ``benchmark``, ``smoke`` in ``data_manifests/grids/``; or a file of the
user's, or inline in the study file). Parsing checks names against the backbone registry and the method table
(`adapters.methods`); expanding it into runs is `study.expand`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.methods import HEAD_LRS, METHODS, RANKS
from featcache.backbones import canonical_name
from featcache.datasets import data_dir
from featcache.errors import StudyError
from featcache.records import PROBE_METHOD

GRID_DIR = data_dir() / "grids"  # shipped beside the dataset specs (package data)
GRID_METHODS = (PROBE_METHOD, *METHODS)  # stage 1's cached probe, then the method table's order
FIELDS = ("stage", "backbone", "task", "method", "rank", "regime", "k")  # what `--only` and `exclude` match

# ---------------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Exclusion:
    """Grid entries left out on purpose: fields to match (fnmatch patterns) and why."""

    match: dict[str, str]
    reason: str


@dataclass(frozen=True)
class Grid:
    """What a study runs. ``draws`` bounds few-shot draws of cached probes, ``train_draws`` those of trained
    methods (each draw of each level is a training run). Probes always run every fold (they cost seconds);
    ``train_folds`` is ``all`` (None) or the fold names trained end to end."""

    name: str
    backbones: tuple[str, ...]
    methods: tuple[str, ...]
    tasks: tuple[str, ...] = ()  # empty: the study's tasks
    ranks: tuple[int, ...] = RANKS
    full: bool = True
    shots: tuple[int, ...] = ()
    center_shots: tuple[int, ...] = ()
    draws: int = 100
    train_draws: int = 5
    train_folds: tuple[str, ...] | None = None  # None: every fold of the splits
    head_lrs: tuple[float, ...] = HEAD_LRS
    view: str = "cls"
    train: dict[str, Any] = field(default_factory=dict)  # adapters.plan.TrainSettings fields
    exclude: tuple[Exclusion, ...] = ()
    file: Path | None = None


def tuple_of(value: Any, kind: type, where: str, file: Path) -> tuple[Any, ...]:
    """A YAML scalar or list of scalars as a tuple of ``kind``; a mapping or nested list is refused (``str`` of
    one would pass as a name like "{'a': 1}")."""
    items = value if isinstance(value, list) else [value]
    try:
        if any(isinstance(v, (Mapping, list)) for v in items):
            raise TypeError
        return tuple(kind(v) for v in items)
    except (TypeError, ValueError):
        raise StudyError(f"{file}: {where}: expected a list of {kind.__name__}, got {value!r}") from None


def parse_grid(raw: Mapping[str, Any], file: Path) -> Grid:
    """A grid from its YAML mapping; unknown keys, methods or backbones are refused with the file and key."""
    from featcache.backbones import get_spec

    known = {"name", "backbones", "methods", "tasks", "ranks", "regimes", "draws", "train_draws", "train_folds",
             "head_lrs", "view", "train", "exclude"}
    unknown_keys(raw, known, file, "grid")
    for key in ("backbones", "methods"):
        if not raw.get(key):
            raise StudyError(f"{file}: grid.{key}: give at least one")
    backbones = tuple(canonical_name(b) for b in tuple_of(raw["backbones"], str, "grid.backbones", file))
    for name in backbones:
        try:
            get_spec(name)
        except StudyError:
            raise
        except Exception as err:  # noqa: BLE001 - the registry's one-line refusal, with the file in front
            raise StudyError(f"{file}: grid.backbones: {err}") from None
    methods = tuple_of(raw["methods"], str, "grid.methods", file)
    unknown = [m for m in methods if m not in GRID_METHODS]
    if unknown:
        raise StudyError(f"{file}: grid.methods: unknown {unknown}; choose from "
                         f"{', '.join(GRID_METHODS)}")
    regimes = raw.get("regimes") or {}
    unknown_keys(regimes, {"full", "shots", "center_shots"}, file, "grid.regimes")
    folds = raw.get("train_folds", "all")
    exclude = tuple(_exclusion(item, file) for item in raw.get("exclude") or [])
    return Grid(
        name=str(raw.get("name", file.stem)), backbones=backbones, methods=methods,
        tasks=tuple_of(raw.get("tasks", []), str, "grid.tasks", file),
        ranks=tuple_of(raw.get("ranks", list(RANKS)), int, "grid.ranks", file),
        full=bool(regimes.get("full", True)),
        shots=tuple_of(regimes.get("shots", []), int, "grid.regimes.shots", file),
        center_shots=tuple_of(regimes.get("center_shots", []), int, "grid.regimes.center_shots", file),
        draws=int(raw.get("draws", 100)), train_draws=int(raw.get("train_draws", 5)),
        train_folds=None if folds == "all" else tuple_of(folds, str, "grid.train_folds", file),
        head_lrs=tuple_of(raw.get("head_lrs", list(HEAD_LRS)), float, "grid.head_lrs", file),
        view=str(raw.get("view", "cls")), train=dict(raw.get("train") or {}), exclude=exclude, file=file,
    )


def _exclusion(item: Any, file: Path) -> Exclusion:
    if not isinstance(item, dict) or not item.get("reason"):
        raise StudyError(f"{file}: grid.exclude: each entry is a mapping of fields to match plus a 'reason'")
    match = {k: str(v) for k, v in item.items() if k != "reason"}
    unknown_keys(match, set(FIELDS), file, "grid.exclude")
    return Exclusion(match, str(item["reason"]))


def load_grid(ref: str | Path | Mapping[str, Any], study_file: Path) -> Grid:
    """A grid named by a study file: a shipped name (``benchmark``, ``smoke``), a YAML path relative to the
    study's folder, or the mapping itself (its errors then name the study file)."""
    base = study_file.parent
    if isinstance(ref, Mapping):
        return parse_grid(ref, study_file)
    shipped = GRID_DIR / f"{ref}.yaml"
    path = shipped if shipped.is_file() and not (base / str(ref)).is_file() else base / str(ref)
    raw = read_yaml(path, "grid file")
    return parse_grid(raw, path)


def shipped_grids() -> list[str]:
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise StudyError(f"{path}: cannot read {what} ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise StudyError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a {what} is a YAML mapping, found {type(raw).__name__}")
    return raw


def unknown_keys(raw: Mapping[str, Any], known: set[str], file: Path, where: str) -> None:
    if not isinstance(raw, Mapping):
        raise StudyError(f"{file}: {where}: expected a mapping, got {raw!r}")
    extra = sorted(set(map(str, raw)) - known)
    if extra:
        raise StudyError(f"{file}: {where}: unknown key(s) {extra}; known: {', '.join(sorted(known))}")
