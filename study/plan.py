"""A study's entries against its records: the runs each entry plans (exact keys where splits and features
exist, else the expected count and why), how many are recorded, and what the rest will cost from measured wall
times. The arguments each entry passes to the stages are built here, once, for planning and running alike."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.plan import TrainSettings, planned_keys
from featcache.errors import FeatcacheError, StudyError
from featcache.probe import run_probe
from featcache.records import load_records
from featcache.splits import CENTER_SHOTS, DRAWS, SHOTS, Splits, build_splits, load_splits, splits_path
from study.expand import Entry, Excluded, expected_runs
from study.grid import Grid
from study.studyfile import Study


def task_manifest(study: Study, task: str) -> Path:
    path = study.manifest_for(task)
    if path is None:
        raise StudyError(f"{study.path}: no manifest for task {task}; set `manifest:` or `manifests: {{{task}: ...}}`")
    return path


def split_options(grid: Grid) -> dict[str, Any]:
    """How a study makes a task's splits: the default levels and draws, plus whatever its grid asks for."""
    return dict(shots=sorted(set(SHOTS) | set(grid.shots)),
                center_shots=sorted(set(CENTER_SHOTS) | set(grid.center_shots)),
                draws=max(DRAWS, grid.draws, grid.train_draws))


def task_splits(study: Study, grid: Grid, task: str) -> Splits:
    """The task's persisted splits, or (before `study run` saves them) the same splits made in memory."""
    manifest = task_manifest(study, task)
    if splits_path(manifest, task).is_file():
        return load_splits(manifest, task)
    return build_splits(manifest, task, **split_options(grid))


def runnable(study: Study, grid: Grid, entries: list[Entry]) -> tuple[list[Entry], list[Excluded]]:
    """The entries that can run, and the few-shot levels that cannot: no fold the entry uses (every fold for
    probes, the grid's `train_folds` for training) can draw k patients per class (per center). Each excluded
    level's reason names a fold and the class short of patients. Tasks whose splits cannot be made yet are
    left to the plan, which says why."""
    splits: dict[str, Splits | None] = {}
    kept: list[Entry] = []
    excluded: list[Excluded] = []
    for entry in entries:
        if entry.shots is None:
            kept.append(entry)
            continue
        if entry.task not in splits:
            try:
                splits[entry.task] = task_splits(study, grid, entry.task)
            except FeatcacheError:
                splits[entry.task] = None
        made = splits[entry.task]
        why = None if made is None else _undrawable(made, grid, entry)
        if why:
            excluded.append(Excluded(entry, why))
        else:
            kept.append(entry)
    return kept, excluded


def _undrawable(splits: Splits, grid: Grid, entry: Entry) -> str | None:
    """Why no fold of ``entry`` can draw its k, or None where one can."""
    kind = "fewshot_center" if entry.regime == "fewshot-center" else "fewshot"
    names = set(grid.train_folds) if entry.stage == 2 and grid.train_folds else set(splits.fold_names)
    folds = [f for f in splits.folds if f.name in names]
    if entry.shots is None or not folds or not all(entry.shots in f.skipped[kind] for f in folds):
        return None
    first, *others = folds
    why = f"no fold can draw k={entry.shots}: {first.skipped[kind][entry.shots]}"
    if others:
        why += f"; likewise {', '.join(f.name for f in others)}"
    if splits.classes:
        why += f" (positive class {splits.classes[1]})"
    return why


def weights_kwargs(study: Study, backbone: str) -> dict[str, Any]:
    path, random_init = study.weights_for(backbone)
    return {"weights": path, "random_init": random_init}


def probe_arguments(study: Study, grid: Grid, backbone: str, task: str, regime: str,
                    shots: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `featcache.probe.run_probe` for some levels of one regime."""
    return dict(manifest=task_manifest(study, task), task=task, model=backbone, store=study.features,
                full=regime == "full", shots=tuple(shots), draws=None if regime == "full" else grid.draws,
                per_center=regime == "fewshot-center", view=grid.view, out=study.runs,
                **weights_kwargs(study, backbone))


def train_arguments(study: Study, grid: Grid, entry: Entry) -> dict[str, Any]:
    """Keyword arguments of `adapters.train.run_train` (and `planned_keys`) for one entry."""
    pixels = study.pixels if study.pixels is not None and study.pixels.exists() else None
    return dict(manifest=task_manifest(study, entry.task), task=entry.task, model=entry.backbone, method=entry.method,
                rank=entry.rank, full=entry.shots is None, shots=(entry.shots,) if entry.shots else (),
                draws=None if entry.shots is None else grid.train_draws,
                per_center=entry.regime == "fewshot-center", folds=grid.train_folds, head_lrs=grid.head_lrs,
                settings=TrainSettings(**grid.train), pixels=pixels, features=study.features, out=study.runs,
                device=study.device or "auto", **weights_kwargs(study, entry.backbone))


@dataclass
class PlanRow:
    """An entry against the records: its runs, how many are recorded, and whether keys were exact."""

    entry: Entry
    planned: int
    recorded: int
    exact: bool
    note: str = ""

    @property
    def missing(self) -> int:
        return self.planned - self.recorded


def _probe_keys(study: Study, grid: Grid, entries: list[Entry]) -> dict[Entry, list[str]]:
    """Exact run keys of stage-1 entries whose splits and features exist (one plan call per regime)."""
    groups: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[entry.backbone, entry.task, entry.regime].append(entry)
    keys: dict[Entry, list[str]] = {}
    for (backbone, task, regime), members in groups.items():
        shots = [e.shots for e in members if e.shots is not None]
        report = run_probe(**probe_arguments(study, grid, backbone, task, regime, shots), plan_only=True)
        for entry in members:
            keys[entry] = [key for r, k, key in report.planned if (r, k) == (regime, entry.shots)]
    return keys


def plan(study: Study, grid: Grid, entries: list[Entry]) -> list[PlanRow]:
    """Each entry's planned and recorded runs: exact keys where splits (and, for probes, features) exist,
    else the expected count with the reason it is not exact."""
    recorded = {p.stem for p in study.runs.glob("[!.]*.json")} if study.runs and study.runs.is_dir() else set()
    rows: list[PlanRow] = []
    by_source: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for entry in entries:
        by_source[entry.backbone, entry.task].append(entry)
    for members in by_source.values():
        probes = [e for e in members if e.stage == 1]
        try:
            exact = _probe_keys(study, grid, probes) if probes else {}
            note = ""
        except FeatcacheError as err:
            exact, note = {}, _short(err)
        for entry in members:
            keys, why = exact.get(entry), note
            if entry.stage == 2:
                keys, why = _train_keys(study, grid, entry)
            if keys is None:
                rows.append(PlanRow(entry, expected_runs(entry, grid), 0, False, why))
            else:
                rows.append(PlanRow(entry, len(keys), sum(k in recorded for k in keys), True))
    return sorted(rows, key=lambda r: (r.entry.stage, r.entry))


def _train_keys(study: Study, grid: Grid, entry: Entry) -> tuple[list[str] | None, str]:
    try:
        return list(planned_keys(**train_arguments(study, grid, entry))), ""
    except FeatcacheError as err:
        return None, _short(err)


def _short(err: Exception) -> str:
    text = str(err)
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass(frozen=True)
class Estimate:
    """Device time of an entry's missing runs one at a time (``seconds``) and packed (``packed``); None where
    nothing comparable was measured."""

    seconds: float | None
    basis: str  # how the per-run time was found
    packed: float | None = None


def _mean_times(records: list[Any], packed: bool) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """Mean wall time per run by (backbone, variant) and by variant, of packed or of unpacked records."""
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_method: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.wall_time_s is None or not math.isfinite(record.wall_time_s):
            continue
        if bool(record.provenance.get("packed")) != packed:
            continue
        per[record.backbone, record.variant].append(record.wall_time_s)
        per_method[record.variant].append(record.wall_time_s)
    return ({k: sum(v) / len(v) for k, v in per.items()}, {k: sum(v) / len(v) for k, v in per_method.items()})


def packing_gain(records: list[Any]) -> float | None:
    """How much less device time a packed run takes than one alone: the geometric mean over the backbone x
    method pairs measured both ways (a packed record's wall time is its share of its pack's)."""
    alone, _ = _mean_times(records, False)
    packed, _ = _mean_times(records, True)
    ratios = [alone[k] / packed[k] for k in alone.keys() & packed.keys() if packed[k] > 0]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def estimate(rows: list[PlanRow], records_folder: Path | None) -> dict[Entry, Estimate]:
    """Cost of each entry's missing runs from measured wall times in existing records: the mean per backbone x
    method where there is one, else per method; None where nothing comparable was measured. One at a time from
    unpacked records, packed from packed ones; where only one side was measured, the other follows from the
    packing gain measured on other pairs (`packing_gain`). Probe times are their share of a batched solve;
    extraction is not in records and not in the estimate."""
    records = load_records(records_folder) if records_folder is not None and records_folder.is_dir() else []
    gain = packing_gain(records)
    alone, alone_method = _mean_times(records, False)
    packed, packed_method = _mean_times(records, True)
    out: dict[Entry, Estimate] = {}
    for row in rows:
        entry = row.entry
        if row.missing == 0:
            out[entry] = Estimate(0.0, "nothing to run", 0.0)
            continue
        one = alone.get((entry.backbone, entry.variant))
        many = packed.get((entry.backbone, entry.variant))
        basis = f"runs of {entry.variant} on {entry.backbone}"
        if one is None and many is None:
            one, many, basis = alone_method.get(entry.variant), packed_method.get(entry.variant), \
                f"runs of {entry.variant}"
        if one is None and many is None:
            out[entry] = Estimate(None, "no measured run")
            continue
        if one is None and many is not None and gain:
            one, basis = many * gain, basis + f"; one at a time = packed x {gain:.1f} (measured gain)"
        if many is None and one is not None and gain and entry.stage == 2:
            many, basis = one / gain, basis + f"; packed = one at a time / {gain:.1f} (measured gain)"
        if entry.stage == 1:
            many = one  # probes are batched solves already
        out[entry] = Estimate(None if one is None else row.missing * one, basis,
                              None if many is None else row.missing * many)
    return out
