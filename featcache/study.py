"""The study file: one `study.yaml` per study folder gives every command its defaults and names the grid.

Every `featcache` / `adapters` command looks for `study.yaml` in the current folder, then in each parent (or
takes the file named by ``FEATCACHE_STUDY``; ``FEATCACHE_STUDY=none`` turns discovery off). Paths in the file
are relative to its folder. Flags always win over the file. The weights of a backbone come from the file only
where it says so per backbone: a path, or ``random-init`` written out; nothing is chosen silently.

The grid (backbones x methods x tasks x regimes x folds x head LRs) is data here; expanding it into runs needs
to know which methods apply to which backbone, which is stage 2's knowledge, so it lives in `adapters.sweep`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from featcache.backbones import canonical_name
from featcache.backbones.weights import RANDOM_INIT
from featcache.datasets import data_dir
from featcache.errors import StudyError
from featcache.fileio import atomic_write

STUDY_FILE = "study.yaml"
ENV_VAR = "FEATCACHE_STUDY"
GRID_DIR = data_dir() / "grids"  # shipped beside the dataset specs (package data)
STAGE1_METHODS = ("probe",)
STAGE2_METHODS = ("lp", "fft", "lora", "vera", "bitfit", "ia3")
RANKED = ("lora", "vera")
HEAD_LRS = (1e-2, 1e-3, 1e-4)
_EXECUTOR_KEYS = ("partition", "time_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism",
                  "runs_per_task", "account", "qos", "constraint")


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
    ranks: tuple[int, ...] = (4, 8, 16)
    full: bool = True
    shots: tuple[int, ...] = ()
    center_shots: tuple[int, ...] = ()
    draws: int = 100
    train_draws: int = 5
    train_folds: tuple[str, ...] | None = None  # None: every fold of the splits
    head_lrs: tuple[float, ...] = HEAD_LRS
    view: str = "cls"
    train: dict[str, Any] = field(default_factory=dict)  # adapters.train.TrainSettings fields
    exclude: tuple[Exclusion, ...] = ()
    file: Path | None = None


def _tuple(value: Any, kind: type, where: str, file: Path) -> tuple:
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(kind(v) for v in items)
    except (TypeError, ValueError):
        raise StudyError(f"{file}: {where}: expected a list of {kind.__name__}, got {value!r}") from None


def parse_grid(raw: Mapping[str, Any], file: Path) -> Grid:
    """A grid from its YAML mapping; unknown keys, methods or backbones are refused with the file and key."""
    from featcache.backbones import get_spec

    known = {"name", "backbones", "methods", "tasks", "ranks", "regimes", "draws", "train_draws", "train_folds",
             "head_lrs", "view", "train", "exclude"}
    _unknown(raw, known, file, "grid")
    for key in ("backbones", "methods"):
        if not raw.get(key):
            raise StudyError(f"{file}: grid.{key}: give at least one")
    backbones = tuple(canonical_name(b) for b in _tuple(raw["backbones"], str, "grid.backbones", file))
    for name in backbones:
        try:
            get_spec(name)
        except StudyError:
            raise
        except Exception as err:  # noqa: BLE001 - the registry's one-line refusal, with the file in front
            raise StudyError(f"{file}: grid.backbones: {err}") from None
    methods = _tuple(raw["methods"], str, "grid.methods", file)
    unknown = [m for m in methods if m not in STAGE1_METHODS + STAGE2_METHODS]
    if unknown:
        raise StudyError(f"{file}: grid.methods: unknown {unknown}; choose from "
                         f"{', '.join(STAGE1_METHODS + STAGE2_METHODS)}")
    regimes = raw.get("regimes") or {}
    _unknown(regimes, {"full", "shots", "center_shots"}, file, "grid.regimes")
    folds = raw.get("train_folds", "all")
    exclude = tuple(_exclusion(item, file) for item in raw.get("exclude") or [])
    return Grid(
        name=str(raw.get("name", file.stem)), backbones=backbones, methods=methods,
        tasks=_tuple(raw.get("tasks", []), str, "grid.tasks", file),
        ranks=_tuple(raw.get("ranks", [4, 8, 16]), int, "grid.ranks", file),
        full=bool(regimes.get("full", True)),
        shots=_tuple(regimes.get("shots", []), int, "grid.regimes.shots", file),
        center_shots=_tuple(regimes.get("center_shots", []), int, "grid.regimes.center_shots", file),
        draws=int(raw.get("draws", 100)), train_draws=int(raw.get("train_draws", 5)),
        train_folds=None if folds == "all" else _tuple(folds, str, "grid.train_folds", file),
        head_lrs=_tuple(raw.get("head_lrs", list(HEAD_LRS)), float, "grid.head_lrs", file),
        view=str(raw.get("view", "cls")), train=dict(raw.get("train") or {}), exclude=exclude, file=file,
    )


def _exclusion(item: Any, file: Path) -> Exclusion:
    if not isinstance(item, dict) or not item.get("reason"):
        raise StudyError(f"{file}: grid.exclude: each entry is a mapping of fields to match plus a 'reason'")
    match = {k: str(v) for k, v in item.items() if k != "reason"}
    _unknown(match, {"backbone", "method", "task", "regime", "rank"}, file, "grid.exclude")
    return Exclusion(match, str(item["reason"]))


def load_grid(ref: str | Path | Mapping[str, Any], base: Path) -> Grid:
    """A grid named by a study: a shipped name (``benchmark``, ``smoke``), a YAML path relative to the study
    folder, or the mapping itself."""
    if isinstance(ref, Mapping):
        return parse_grid(ref, base / STUDY_FILE)
    shipped = GRID_DIR / f"{ref}.yaml"
    path = shipped if shipped.is_file() and not (base / str(ref)).is_file() else base / str(ref)
    raw = _read_yaml(path, "grid file")
    return parse_grid(raw, path)


def shipped_grids() -> list[str]:
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Study:
    """A parsed study file; every path absolute."""

    path: Path
    name: str = "study"
    manifest: Path | None = None
    manifests: dict[str, Path] = field(default_factory=dict)  # task -> manifest, where tasks differ
    tasks: tuple[str, ...] = ()
    model: str | None = None
    features: Path | None = None
    pixels: Path | None = None
    runs: Path | None = None
    report: Path | None = None
    device: str | None = None
    weights: dict[str, str] = field(default_factory=dict)  # registry name -> absolute path or "random-init"
    grid_ref: Any = None
    executor: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent

    def manifest_for(self, task: str | None) -> Path | None:
        """The manifest holding ``task``'s labels: the per-task one where given, else the study's."""
        return self.manifests.get(task or "", self.manifest)

    def weights_for(self, model: str | None) -> tuple[Path | None, bool]:
        """(weights path, random_init) the study states for a backbone; (None, False) where it says nothing."""
        if not model:
            return None, False
        value = self.weights.get(canonical_name(model))
        if value is None:
            return None, False
        return (None, True) if value == RANDOM_INIT else (Path(value), False)

    def grid(self) -> Grid:
        if self.grid_ref is None:
            raise StudyError(f"{self.path}: no grid; add `grid: smoke` (or benchmark, or a grid file)")
        return load_grid(self.grid_ref, self.root)

    def grid_tasks(self, grid: Grid) -> tuple[str, ...]:
        tasks = grid.tasks or self.tasks
        if not tasks:
            raise StudyError(f"{self.path}: no tasks; name them under `tasks:` (study) or in the grid")
        return tasks


_STUDY_KEYS = {"name", "manifest", "manifests", "tasks", "model", "features", "pixels", "runs", "report", "device",
               "weights", "grid", "executor", "defaults"}


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
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


def _unknown(raw: Mapping[str, Any], known: set[str], file: Path, where: str) -> None:
    if not isinstance(raw, Mapping):
        raise StudyError(f"{file}: {where}: expected a mapping, got {raw!r}")
    extra = sorted(set(map(str, raw)) - known)
    if extra:
        raise StudyError(f"{file}: {where}: unknown key(s) {extra}; known: {', '.join(sorted(known))}")


def _mapping(raw: Mapping[str, Any], key: str, file: Path, prefix: str = "") -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise StudyError(f"{file}: {prefix}{key}: expected a mapping, got {value!r}")
    return dict(value)


def load_study(path: str | Path) -> Study:
    """Parse a study file; a wrong key or value is one line naming the file and key."""
    path = Path(path).resolve()
    raw = _read_yaml(path, "study file")
    _unknown(raw, _STUDY_KEYS, path, "study")
    root = path.parent

    def where(value: Any) -> Path | None:
        return None if value in (None, "") else (root / str(value)).resolve()

    weights = _mapping(raw, "weights", path)
    policy = {canonical_name(str(name)): (RANDOM_INIT if str(value) == RANDOM_INIT else str(where(value)))
              for name, value in weights.items() if value not in (None, "")}
    executor = _mapping(raw, "executor", path)
    _unknown(executor, set(_EXECUTOR_KEYS), path, "executor")
    defaults = _mapping(raw, "defaults", path)
    for command in defaults:
        _mapping(defaults, command, path, "defaults.")
    manifests = _mapping(raw, "manifests", path)
    tasks = raw.get("tasks") or []
    return Study(
        path=path, name=str(raw.get("name", root.name)), manifest=where(raw.get("manifest")),
        manifests={str(t): where(m) for t, m in manifests.items()},
        tasks=_tuple(tasks, str, "tasks", path) if tasks else tuple(manifests),
        model=canonical_name(str(raw["model"])) if raw.get("model") else None,
        features=where(raw.get("features")), pixels=where(raw.get("pixels")),
        runs=where(raw.get("runs", "runs")), report=where(raw.get("report", "report")),
        device=str(raw["device"]) if raw.get("device") else None, weights=policy, grid_ref=raw.get("grid"),
        executor=dict(executor), defaults={str(c): dict(o) for c, o in defaults.items()},
    )


def find_study(start: str | Path | None = None) -> Path | None:
    """The study file in force: ``FEATCACHE_STUDY`` (a path, or ``none``), else `study.yaml` in ``start``
    (default: the current folder) or its nearest parent that has one."""
    named = os.environ.get(ENV_VAR)
    if named is not None:
        if named.strip().lower() in ("", "none", "0", "off"):
            return None
        path = Path(named)
        if not path.is_file():
            raise StudyError(f"{ENV_VAR}={named}: no such study file")
        return path.resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / STUDY_FILE).is_file():
            return folder / STUDY_FILE
    return None


# ------------------------------------------------------------------------------------------------ a new study

TEMPLATE = """\
# Study file of featcache/adapters: every command run in this folder (or below it) takes its defaults from
# here; flags override them, and `--help` shows each default and where it came from. Paths are relative to
# this file's folder.
name: {name}

manifest: {manifest}            # canonical manifest (`featcache manifest build` or `featcache synth`)
# manifests: {{AFC: aiforcovid/manifest.csv, NY: ny-sbu/manifest.csv}}   # per task, for several datasets
tasks: [{tasks}]                 # default --task when there is one; the grid's tasks otherwise
model: {model}                   # default --model of single commands (aliases work: medclip -> medclip-vit)

features: features.zarr         # feature store (stage 1)
pixels: pixels.zarr             # pixel cache read by stage-2 training (`featcache pixels` fills it)
runs: runs                      # one JSON record per run, both stages
report: report                  # where `featcache report` writes report.md and its figures
device: auto                    # auto, cpu, cuda, cuda:1 ...

# Weights per backbone: a file or folder, or random-init written out. A backbone not listed here uses the
# registry's lookup (Hugging Face cache, $FEATCACHE_WEIGHTS/<backbone>/) and fails fast when missing.
weights:
{weights}
grid: {grid}                    # a shipped grid ({grids}), a grid file, or a mapping
executor:                       # `featcache study run --executor slurm` (submitit job arrays)
  partition: gpu
  time_min: 240
  gpus_per_node: 1
  cpus_per_task: 8
  mem_gb: 64
  array_parallelism: 16
  runs_per_task: 1              # grid entries per array task (batch small ones)

defaults:                       # any option of any command, by command name
  probe: {{}}                     # e.g. {{select: pr_auc}}
  train: {{}}                     # e.g. {{max_epochs: 200, batch_size: 32}}
"""


def write_study(folder: str | Path, *, manifest: str | None = None, tasks: tuple[str, ...] = (),
                model: str | None = None, grid: str = "smoke", weights: Mapping[str, str] | None = None,
                force: bool = False) -> Path:
    """Write a commented `study.yaml` into ``folder``; an existing one is kept unless ``force``."""
    path = Path(folder) / STUDY_FILE
    if path.exists() and not force:
        raise StudyError(f"{path}: a study file is already here (pass --force to replace it)")
    lines = [f"  {canonical_name(name)}: {value}" for name, value in (weights or {}).items()]
    text = TEMPLATE.format(
        name=Path(folder).resolve().name, manifest=manifest or "manifest.csv", tasks=", ".join(tasks),
        model=model or "resnet18", grid=grid, grids=", ".join(shipped_grids()),
        weights="\n".join(lines) or "  # medclip-vit: /models/medclip-vit      # or: random-init",
    )
    atomic_write(path, text.encode("utf-8"))
    load_study(path)  # what was written parses
    return path
