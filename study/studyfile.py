"""The study file: one `study.yaml` per study folder gives every command its defaults and names the grid.

Every `featcache` / `adapters` command looks for `study.yaml` in the current folder, then in each parent (or
takes the file named by ``FEATCACHE_STUDY``; ``FEATCACHE_STUDY=none`` turns discovery off, an empty value
counts as unset). Paths in the file
are relative to its folder. Flags always win over the file. The weights of a backbone come from the file only
where it says so per backbone: a path, or ``random-init`` written out; nothing is chosen silently.

The grid a study names is read by `study.grid`; its expansion into runs is `study.expand`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache.backbones import canonical_name
from featcache.backbones.weights import RANDOM_INIT
from featcache.datasets import TaskSpec, get_task, task_for
from featcache.errors import ManifestError, StudyError
from featcache.fileio import atomic_write
from featcache.manifest import load_manifest
from study.grid import Grid, load_grid, read_yaml, shipped_grids, tuple_of, unknown_keys

STUDY_FILE = "study.yaml"
ENV_VAR = "FEATCACHE_STUDY"
_EXECUTOR_KEYS = ("partition", "time_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism",
                  "runs_per_task", "account", "qos", "constraint")


# --------------------------------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Study:
    """A parsed study file; every path absolute."""

    path: Path
    name: str = "study"
    manifest: Path | None = None
    manifests: dict[str, Path | None] = field(default_factory=dict)  # task -> manifest, where tasks differ
    tasks: tuple[str, ...] = ()
    positives: dict[str, str] = field(default_factory=dict)  # own task -> its positive class (`tasks:` mapping)
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

    def task_spec(self, task: str) -> TaskSpec:
        """``task`` as every command of the study sees it (`featcache.datasets.task_for` on its manifest): a
        dataset spec's, one declared here (``tasks: {SURV: {positive: DEATH}}``), or one its split file records."""
        if task not in self.positives:
            try:
                return get_task(task)  # a dataset spec's task needs no manifest to be planned
            except ManifestError:
                pass  # an own task: its split file may say
        path = self.manifest_for(task)
        if path is None:
            raise StudyError(f"{self.path}: no manifest for task {task}; set `manifest:` or "
                             f"`manifests: {{{task}: ...}}`")
        return task_for(load_manifest(path), task, self.positives.get(task))

    def grid(self) -> Grid:
        if self.grid_ref is None:
            raise StudyError(f"{self.path}: no grid; add `grid: smoke` (or benchmark, or a grid file)")
        return load_grid(self.grid_ref, self.path)

    def grid_tasks(self, grid: Grid) -> tuple[str, ...]:
        tasks = grid.tasks or self.tasks
        if not tasks:
            raise StudyError(f"{self.path}: no tasks; name them under `tasks:` (study) or in the grid")
        return tasks


_STUDY_KEYS = {"name", "manifest", "manifests", "tasks", "model", "features", "pixels", "runs", "report", "device",
               "weights", "grid", "executor", "defaults"}


def _mapping(raw: Mapping[str, Any], key: str, file: Path, prefix: str = "") -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise StudyError(f"{file}: {prefix}{key}: expected a mapping, got {value!r}")
    return dict(value)


def load_study(path: str | Path) -> Study:
    """Parse a study file; a wrong key or value is one line naming the file and key."""
    path = Path(path).resolve()
    raw = read_yaml(path, "study file")
    unknown_keys(raw, _STUDY_KEYS, path, "study")
    root = path.parent

    def where(value: Any) -> Path | None:
        return None if value in (None, "") else (root / str(value)).resolve()

    weights = _mapping(raw, "weights", path)
    policy = {canonical_name(str(name)): (RANDOM_INIT if str(value) == RANDOM_INIT else str(where(value)))
              for name, value in weights.items() if value not in (None, "")}
    executor = _mapping(raw, "executor", path)
    unknown_keys(executor, set(_EXECUTOR_KEYS), path, "executor")
    defaults = _mapping(raw, "defaults", path)
    for command in defaults:
        _mapping(defaults, command, path, "defaults.")
    manifests = _mapping(raw, "manifests", path)
    tasks, positives = _tasks(raw.get("tasks"), path)
    return Study(
        path=path, name=str(raw.get("name", root.name)), manifest=where(raw.get("manifest")),
        manifests={str(t): where(m) for t, m in manifests.items()},
        tasks=tasks or tuple(manifests), positives=positives,
        model=canonical_name(str(raw["model"])) if raw.get("model") else None,
        features=where(raw.get("features")), pixels=where(raw.get("pixels")),
        runs=where(raw.get("runs", "runs")), report=where(raw.get("report", "report")),
        device=str(raw["device"]) if raw.get("device") else None, weights=policy, grid_ref=raw.get("grid"),
        executor=dict(executor), defaults={str(c): dict(o) for c, o in defaults.items()},
    )


def _tasks(value: Any, file: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """`tasks:` as a list of keys (dataset spec tasks, or own tasks whose split files exist), or a mapping that
    declares own tasks: ``{SURV: {positive: DEATH}}`` (the key is the manifest's label column; ``column:`` may
    repeat it) beside spec tasks written ``{AFC: {}}``."""
    if not value:
        return (), {}
    if not isinstance(value, Mapping):
        return tuple_of(value, str, "tasks", file), {}
    positives = {}
    for key, spec in value.items():
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise StudyError(f"{file}: tasks.{key}: expected a mapping like {{positive: VALUE}}, got {spec!r}")
        unknown_keys(spec, {"column", "positive"}, file, f"tasks.{key}")
        if spec.get("column") not in (None, key):
            raise StudyError(f"{file}: tasks.{key}: a task is named after its manifest column; write "
                             f"{spec['column']}: {{positive: ...}} (or rename the column)")
        if spec.get("positive") not in (None, ""):
            positives[str(key)] = str(spec["positive"])
        elif spec.get("column") is not None:
            raise StudyError(f"{file}: tasks.{key}: give its positive class, e.g. {{positive: DEATH}}")
    return tuple(str(k) for k in value), positives


def find_study(start: str | Path | None = None) -> Path | None:
    """The study file in force: ``FEATCACHE_STUDY`` (a path, or ``none``), else `study.yaml` in ``start``
    (default: the current folder) or its nearest parent that has one."""
    named = (os.environ.get(ENV_VAR) or "").strip()  # empty counts as unset
    if named:
        if named.lower() in ("none", "0", "off"):
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
tasks: {tasks}   # default --task when one; own columns: {{SURV: {{positive: DEATH}}}}
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
  train: {{}}                     # e.g. {{batch_size: 32}} (epochs, folds, draws, head LRs: the grid's)
"""


def _tasks_text(tasks: tuple[str, ...], positives: Mapping[str, str]) -> str:
    """`tasks:` as YAML flow text: a list of keys, or a mapping where any task declares its positive class
    (quoted as JSON, which YAML reads back as the same string)."""
    if not positives:
        return f"[{', '.join(tasks)}]"
    return "{" + ", ".join(f"{t}: {{positive: {json.dumps(positives[t])}}}" if t in positives else f"{t}: {{}}"
                           for t in tasks) + "}"


def write_study(folder: str | Path, *, manifest: str | None = None, tasks: tuple[str, ...] = (),
                model: str | None = None, grid: str = "smoke", weights: Mapping[str, str] | None = None,
                positives: Mapping[str, str] | None = None, force: bool = False) -> Path:
    """Write a commented `study.yaml` into ``folder``; an existing one is kept unless ``force``. ``positives``
    declares own tasks (label column -> positive class)."""
    path = Path(folder) / STUDY_FILE
    if path.exists() and not force:
        raise StudyError(f"{path}: a study file is already here (pass --force to replace it)")
    lines = [f"  {canonical_name(name)}: {value}" for name, value in (weights or {}).items()]
    text = TEMPLATE.format(
        name=Path(folder).resolve().name, manifest=manifest or "manifest.csv",
        tasks=_tasks_text(tasks, positives or {}),
        model=model or "resnet18", grid=grid, grids=", ".join(shipped_grids()),
        weights="\n".join(lines) or "  # medclip-vit: /models/medclip-vit      # or: random-init",
    )
    atomic_write(path, text.encode("utf-8"))
    load_study(path)  # what was written parses
    return path
