"""The study runner, above both stages: expand a study's grid into entries, plan them against the records, and
run what is missing, here or as submitit job arrays (its LocalExecutor, or SLURM).

An entry is one backbone x task x method (x rank) x regime x k; it stands for every fold (x draw x head LR)
run of that level, each keyed by the existing run key. Stage-1 entries are grouped per backbone: extract the
features once per manifest (a no-op when the store has them), then every probe. Stage-2 entries call the
trainer. Both skip what is recorded, so a killed study restarted runs only the missing keys.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from featcache.backbones import get_spec
from featcache.datasets import get_task
from featcache.errors import FeatcacheError, StudyError, UsageError
from featcache.records import load_records
from featcache.report import variant
from featcache.study import RANKED, Grid, Study

FIELDS = ("stage", "backbone", "task", "method", "rank", "regime", "k")
EXECUTORS = ("inline", "local", "slurm")


@dataclass(frozen=True, order=True)
class Entry:
    """One level of the grid: every fold (x draw x head LR) run of it."""

    backbone: str
    task: str
    method: str
    rank: int | None
    regime: str  # full | fewshot | fewshot-center
    shots: int | None

    @property
    def stage(self) -> int:
        return 1 if self.method == "probe" else 2

    @property
    def variant(self) -> str:
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"

    @property
    def level(self) -> str:
        return self.regime if self.shots is None else f"{self.regime} k={self.shots}"

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.task} · {self.variant} · {self.level}"

    def fields(self) -> dict[str, str]:
        values = (self.stage, self.backbone, self.task, self.variant, self.rank, self.regime, self.shots)
        return {k: "" if v is None else str(v) for k, v in zip(FIELDS, values, strict=True)}


@dataclass(frozen=True)
class Excluded:
    entry: Entry
    reason: str


# ------------------------------------------------------------------------------------------------- expansion


def parse_only(expr: str | None) -> dict[str, str]:
    """``--only`` text, e.g. ``backbone=resnet*,method=lora|bitfit,regime=full`` -> {field: patterns}."""
    if not expr:
        return {}
    terms: dict[str, str] = {}
    for term in expr.split(","):
        name, sep, pattern = term.partition("=")
        name = name.strip()
        if not sep or name not in FIELDS or not pattern.strip():
            raise UsageError(f"--only {expr!r}: each term is FIELD=PATTERN with FIELD one of {', '.join(FIELDS)} "
                             "(patterns: fnmatch globs, alternatives split by |)")
        terms[name] = pattern.strip()
    return terms


def matches(entry: Entry, terms: dict[str, str]) -> bool:
    """Whether ``entry`` meets every term; a method pattern matches the method or its ranked variant."""
    values = entry.fields()
    for name, pattern in terms.items():
        candidates = [values[name]] + ([entry.method] if name == "method" else [])
        if not any(fnmatch(c, alt) for c in candidates for alt in pattern.split("|")):
            return False
    return True


def method_excluded(backbone: str, method: str) -> str | None:
    """Why ``method`` cannot run on ``backbone`` (stage 2's target table), or None."""
    if method == "probe":
        return None
    from adapters.methods import METHODS, target_modules

    spec = get_spec(backbone)
    try:
        target_modules(spec, METHODS[method])
    except FeatcacheError as err:  # its message says what to use instead
        return str(err)
    return None


def _levels(grid: Grid, task: str) -> Iterable[tuple[str, int | None, str | None]]:
    """(regime, k, why not) per level of a task; per-center levels are listed only to be excluded where the
    dataset has no centers."""
    spec = get_task(task)
    if grid.full:
        yield "full", None, None
    for k in grid.shots:
        yield "fewshot", k, None
    for k in grid.center_shots:
        why = None if spec.has_centers else f"{spec.dataset} has no centers: no per-center few-shot"
        yield "fewshot-center", k, why


def expand(study: Study, grid: Grid, only: dict[str, str] | None = None) -> tuple[list[Entry], list[Excluded]]:
    """Every entry of the grid (filtered by ``only``), and those that cannot run, each with its reason."""
    entries: list[Entry] = []
    excluded: list[Excluded] = []
    reasons = {(b, m): method_excluded(b, m) for b in grid.backbones for m in grid.methods}
    for task in study.grid_tasks(grid):
        levels = list(_levels(grid, task))
        for backbone in grid.backbones:
            for method in grid.methods:
                for rank in grid.ranks if method in RANKED else (None,):
                    for regime, k, why_level in levels:
                        entry = Entry(backbone, task, method, rank, regime, k)
                        if only and not matches(entry, only):
                            continue
                        why = reasons[backbone, method] or why_level or _user_exclusion(grid, entry)
                        if why:
                            excluded.append(Excluded(entry, why))
                        else:
                            entries.append(entry)
    return entries, excluded


def _user_exclusion(grid: Grid, entry: Entry) -> str | None:
    for rule in grid.exclude:
        if matches(entry, rule.match):
            return rule.reason
    return None


def expected_runs(entry: Entry, grid: Grid) -> int:
    """Runs (records) of an entry from the task's fold count and the grid; the plan's count before splits
    exist (levels a small cohort cannot draw are fewer in practice)."""
    folds = get_task(entry.task).k
    if entry.stage == 1:
        return folds * (1 if entry.shots is None else grid.draws)
    folds = len(grid.train_folds) if grid.train_folds else folds
    draws = 1 if entry.shots is None else grid.train_draws
    return folds * draws * len(grid.head_lrs)


# ------------------------------------------------------------------------------------------------ arguments


def _manifest(study: Study, task: str) -> Path:
    path = study.manifest_for(task)
    if path is None:
        raise StudyError(f"{study.path}: no manifest for task {task}; set `manifest:` or `manifests: {{{task}: ...}}`")
    return path


def _weights(study: Study, backbone: str) -> dict[str, Any]:
    path, random_init = study.weights_for(backbone)
    return {"weights": path, "random_init": random_init}


def probe_arguments(study: Study, grid: Grid, backbone: str, task: str, regime: str,
                    shots: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `featcache.probe.run_probe` for some levels of one regime."""
    return dict(manifest=_manifest(study, task), task=task, model=backbone, store=study.features,
                full=regime == "full", shots=tuple(shots), draws=None if regime == "full" else grid.draws,
                per_center=regime == "fewshot-center", view=grid.view, out=study.runs, **_weights(study, backbone))


def train_arguments(study: Study, grid: Grid, entry: Entry) -> dict[str, Any]:
    """Keyword arguments of `adapters.train.run_train` (and `planned_keys`) for one entry."""
    from adapters.train import TrainSettings

    pixels = study.pixels if study.pixels is not None and study.pixels.exists() else None
    return dict(manifest=_manifest(study, entry.task), task=entry.task, model=entry.backbone, method=entry.method,
                rank=entry.rank, full=entry.shots is None, shots=(entry.shots,) if entry.shots else (),
                draws=None if entry.shots is None else grid.train_draws,
                per_center=entry.regime == "fewshot-center", folds=grid.train_folds, head_lrs=grid.head_lrs,
                settings=TrainSettings(**grid.train), pixels=pixels, out=study.runs,
                device=study.device or "auto", **_weights(study, entry.backbone))


# ------------------------------------------------------------------------------------------------------ plan


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
    from featcache.probe import run_probe

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
        from adapters.train import planned_keys
    except ImportError:
        return None, "stage 2 (adapters.train) is not installed"
    try:
        return list(planned_keys(**train_arguments(study, grid, entry))), ""
    except FeatcacheError as err:
        return None, _short(err)


def _short(err: Exception) -> str:
    text = str(err)
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass(frozen=True)
class Estimate:
    seconds: float | None
    basis: str  # how the per-run time was found


def estimate(rows: list[PlanRow], records_folder: Path | None) -> dict[Entry, Estimate]:
    """Cost of each entry's missing runs from measured wall times in existing records: the mean per backbone x
    method where there is one, else per method; None where nothing comparable was measured. Probe times are
    their share of a batched solve; extraction is not in records and not in the estimate."""
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_method: dict[str, list[float]] = defaultdict(list)
    if records_folder is not None and records_folder.is_dir():
        for record in load_records(records_folder):
            if record.wall_time_s is None or not math.isfinite(record.wall_time_s):
                continue
            per[record.backbone, variant(record)].append(record.wall_time_s)
            per_method[variant(record)].append(record.wall_time_s)
    out: dict[Entry, Estimate] = {}
    for row in rows:
        entry = row.entry
        if times := per.get((entry.backbone, entry.variant)):
            out[entry] = Estimate(row.missing * sum(times) / len(times), f"{len(times)} runs of {entry.variant} on "
                                                                         f"{entry.backbone}")
        elif times := per_method.get(entry.variant):
            out[entry] = Estimate(row.missing * sum(times) / len(times), f"{len(times)} runs of {entry.variant}")
        else:
            out[entry] = Estimate(0.0 if row.missing == 0 else None, "no measured run")
    return out


# ------------------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Batch:
    """What one worker (an inline step, a submitit array task) runs: one backbone's stage-1 entries, or a few
    stage-2 entries."""

    stage: int
    entries: tuple[Entry, ...]

    @property
    def label(self) -> str:
        if self.stage == 1:
            return f"{self.entries[0].backbone}: extract + {len(self.entries)} probe levels"
        return ", ".join(e.label for e in self.entries)


@dataclass
class BatchResult:
    label: str
    written: int = 0
    existing: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def make_batches(rows: list[PlanRow], runs_per_task: int = 1) -> list[Batch]:
    """Batches of the entries with missing (or not yet countable) runs: stage 1 one per backbone, stage 2
    ``runs_per_task`` entries each."""
    todo = [r.entry for r in rows if r.missing > 0 or not r.exact]
    stage1: dict[str, list[Entry]] = defaultdict(list)
    for entry in todo:
        if entry.stage == 1:
            stage1[entry.backbone].append(entry)
    stage2 = [e for e in todo if e.stage == 2]
    size = max(1, runs_per_task)
    return ([Batch(1, tuple(v)) for v in stage1.values()]
            + [Batch(2, tuple(stage2[i : i + size])) for i in range(0, len(stage2), size)])


def ensure_splits(study: Study, grid: Grid, tasks: Iterable[str]) -> list[str]:
    """Make the persisted splits of tasks that have none (defaults, and enough draws for the grid)."""
    from featcache.splits import CENTER_SHOTS, DRAWS, SHOTS, build_splits, save_splits, splits_path

    made = []
    for task in sorted(set(tasks)):
        manifest = _manifest(study, task)
        if splits_path(manifest, task).is_file():
            continue
        splits = build_splits(manifest, task, shots=sorted(set(SHOTS) | set(grid.shots)),
                              center_shots=sorted(set(CENTER_SHOTS) | set(grid.center_shots)),
                              draws=max(DRAWS, grid.draws, grid.train_draws))
        made.append(f"made the splits of {task}: {save_splits(splits, manifest)}")
    return made


def _run_stage1(batch: Batch, study: Study, grid: Grid, result: BatchResult) -> None:
    from featcache.extract import extract_features
    from featcache.probe import run_probe

    backbone = batch.entries[0].backbone
    for manifest in sorted({_manifest(study, e.task) for e in batch.entries}):
        done = extract_features(manifest, backbone, store=study.features, device=study.device or "auto",
                                **_weights(study, backbone))
        result.notes.append(f"{backbone} features of {manifest.name}: {done.embedded} computed, {done.rows} rows")
    levels: dict[tuple[str, str], list[int | None]] = defaultdict(list)
    for entry in batch.entries:
        levels[entry.task, entry.regime].append(entry.shots)
    for (task, regime), shots in levels.items():
        args = probe_arguments(study, grid, backbone, task, regime, [k for k in shots if k is not None])
        report = run_probe(**args)
        result.written += report.written
        result.existing += report.existing
        result.skipped += [f"{backbone} {task} {regime} {line}" for line in report.skipped]


def _run_stage2(batch: Batch, study: Study, grid: Grid, result: BatchResult) -> None:
    from adapters.train import run_train

    for entry in batch.entries:
        report = run_train(**train_arguments(study, grid, entry))
        result.written += report.written
        result.existing += report.existing
        result.skipped += [f"{entry.label}: {line}" for line in report.skipped]


def run_batch(batch: Batch, study: Study, grid: Grid) -> BatchResult:
    """Run one batch; the function every executor calls (inline, or pickled into a submitit task)."""
    result = BatchResult(batch.label)
    start = time.perf_counter()
    (_run_stage1 if batch.stage == 1 else _run_stage2)(batch, study, grid, result)
    result.seconds = time.perf_counter() - start
    return result


def run_batches(batches: Sequence[Batch], study: Study, grid: Grid) -> list[BatchResult]:
    """Several batches one after another: one submitit task."""
    return [run_batch(batch, study, grid) for batch in batches]


def submitit_executor(kind: str, folder: Path, settings: dict[str, Any]) -> Any:
    """A submitit executor: ``local`` (subprocesses on this machine) or ``slurm``, with the study's resources."""
    import submitit

    time_min = int(settings.get("time_min", 240))
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=time_min)
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as err:  # submitit found no srun/sbatch: not on a SLURM cluster
        raise StudyError(f"--executor slurm: {err} (submit from a SLURM login node, or use --executor local)"
                         ) from None
    params: dict[str, Any] = {"timeout_min": time_min,
                              "slurm_array_parallelism": int(settings.get("array_parallelism", 16))}
    for key, name in (("partition", "slurm_partition"), ("gpus_per_node", "gpus_per_node"),
                      ("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem_gb"), ("account", "slurm_account"),
                      ("qos", "slurm_qos"), ("constraint", "slurm_constraint")):
        if settings.get(key) is not None:
            params[name] = settings[key]
    executor.update_parameters(**params)
    return executor


def execute(batches: list[Batch], study: Study, grid: Grid, *, executor: str = "inline",
            folder: Path | None = None, wait: bool = True,
            progress: Callable[[int, int, BatchResult | None, Batch], None] | None = None
            ) -> tuple[list[BatchResult], list[str]]:
    """Run the batches. ``inline``: here, one after another. ``local``: submitit's LocalExecutor, one
    subprocess running them in turn (one GPU is never oversubscribed). ``slurm``: a job array with one task per
    batch, at most ``executor.array_parallelism`` at once. Returns the results (empty when not waiting) and the
    submitted job ids."""
    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    if not batches:
        return [], []
    if executor == "inline":
        results = []
        for i, batch in enumerate(batches):
            if progress is not None:
                progress(i, len(batches), None, batch)
            results.append(run_batch(batch, study, grid))
            if progress is not None:
                progress(i + 1, len(batches), results[-1], batch)
        return results, []
    folder = folder or study.root / "jobs"
    tasks = [list(batches)] if executor == "local" else [[batch] for batch in batches]
    submitter = submitit_executor(executor, folder, study.executor)
    jobs = submitter.map_array(run_batches, tasks, [study] * len(tasks), [grid] * len(tasks))
    ids = [job.job_id for job in jobs]
    if not wait:
        return [], ids
    results: list[BatchResult] = []
    for job in jobs:
        try:
            results += job.result()
        except Exception as err:  # noqa: BLE001 - a failed task is one line naming its log
            first = next((line for line in reversed(str(err).splitlines()) if line.strip()), type(err).__name__)
            raise StudyError(f"job {job.job_id} failed ({first.strip()}); log: {job.paths.stderr}") from None
    return results, ids

