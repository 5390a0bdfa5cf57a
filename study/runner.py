"""Running a study: the entries with missing runs, in batches, here or as submitit job arrays (its
LocalExecutor, or SLURM). Stage-1 batches are one backbone each: extract the features once per manifest (a
no-op when the store has them), then every probe. Stage-2 batches call the trainer. Both skip what is recorded,
so a killed study restarted runs only the missing keys.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.train import run_train
from featcache.errors import FeatcacheError, StudyError, UsageError
from featcache.extract import extract_features
from featcache.probe import run_probe
from featcache.splits import build_splits, save_splits, splits_path
from study.expand import Entry
from study.grid import Grid
from study.plan import PlanRow, probe_arguments, split_options, task_manifest, train_arguments, weights_kwargs
from study.studyfile import Study

EXECUTORS = ("inline", "local", "slurm")


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
    failed: list[str] = field(default_factory=list)  # "<entry>: <one-line error>" of entries that failed


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
    made = []
    for task in sorted(set(tasks)):
        study.task_spec(task)  # an own task declared in the study file is known before its splits exist
        manifest = task_manifest(study, task)
        if splits_path(manifest, task).is_file():
            continue
        splits = build_splits(manifest, task, **split_options(grid))
        made.append(f"made the splits of {task}: {save_splits(splits, manifest)}")
    return made


def _attempt(result: BatchResult, label: str, keep_going: bool, work: Callable[[], object]) -> bool:
    """Run ``work``; with ``keep_going`` a failure becomes one line in ``result.failed`` and the batch goes on
    (Ctrl-C still stops the study). Returns whether it succeeded."""
    if not keep_going:
        work()
        return True
    try:
        work()
    except Exception as err:  # noqa: BLE001 - any failure of one entry is reported; the others still run
        text = str(err) if isinstance(err, FeatcacheError) else f"{type(err).__name__}: {err}"
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        result.failed.append(f"{label}: {first}")
        return False
    return True


def _run_stage1(batch: Batch, study: Study, grid: Grid, result: BatchResult, keep_going: bool) -> None:
    backbone = batch.entries[0].backbone
    extracted: dict[Path, bool] = {}
    for manifest in sorted({task_manifest(study, e.task) for e in batch.entries}):
        def extract(manifest: Path = manifest) -> None:
            done = extract_features(manifest, backbone, store=study.features, device=study.device or "auto",
                                    **weights_kwargs(study, backbone))
            result.notes.append(f"{backbone} features of {manifest.name}: {done.embedded} computed, "
                                f"{done.rows} rows")
        extracted[manifest] = _attempt(result, f"{backbone} features of {manifest}", keep_going, extract)
    levels: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for entry in batch.entries:
        levels[entry.task, entry.regime].append(entry)
    for (task, regime), members in levels.items():
        if not extracted[task_manifest(study, task)]:
            continue  # its failure is already one line
        shots = [e.shots for e in members if e.shots is not None]

        def probe(task: str = task, regime: str = regime, shots: list[int] = shots) -> None:
            report = run_probe(**probe_arguments(study, grid, backbone, task, regime, shots))
            result.written += report.written
            result.existing += report.existing
            result.skipped += [f"{backbone} {task} {regime} {line}" for line in report.skipped]
        levels_text = ", ".join(e.level for e in members)
        _attempt(result, f"{backbone} · {task} · probe · {levels_text}", keep_going, probe)


def _run_stage2(batch: Batch, study: Study, grid: Grid, result: BatchResult, keep_going: bool) -> None:
    for entry in batch.entries:
        def train(entry: Entry = entry) -> None:
            report = run_train(**train_arguments(study, grid, entry))
            result.written += report.written
            result.existing += report.existing
            result.skipped += [f"{entry.label}: {line}" for line in report.skipped]
            result.notes += report.notes
        _attempt(result, entry.label, keep_going, train)


def run_batch(batch: Batch, study: Study, grid: Grid, keep_going: bool = True) -> BatchResult:
    """Run one batch; the function every executor calls (inline, or pickled into a submitit task). With
    ``keep_going`` (a study's default) an entry that fails is listed in ``result.failed`` and the rest run."""
    result = BatchResult(batch.label)
    start = time.perf_counter()
    for task in sorted({e.task for e in batch.entries}):  # a fresh worker process learns the study's own tasks
        _attempt(result, f"task {task}", keep_going, functools.partial(study.task_spec, task))
    if not result.failed:
        (_run_stage1 if batch.stage == 1 else _run_stage2)(batch, study, grid, result, keep_going)
    result.seconds = time.perf_counter() - start
    return result


def run_batches(batches: Sequence[Batch], study: Study, grid: Grid, keep_going: bool = True) -> list[BatchResult]:
    """Several batches one after another: one submitit task."""
    return [run_batch(batch, study, grid, keep_going) for batch in batches]


def submitit_executor(kind: str, folder: Path, settings: dict[str, Any]) -> Any:
    """A submitit executor: ``local`` (subprocesses on this machine) or ``slurm``, with the study's resources."""
    import submitit

    time_min = int(settings.get("time_min", 240))
    if kind == "local":
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=time_min)
        return local
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
            folder: Path | None = None, wait: bool = True, keep_going: bool = True,
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
    results: list[BatchResult] = []
    if executor == "inline":
        for i, batch in enumerate(batches):
            if progress is not None:
                progress(i, len(batches), None, batch)
            results.append(run_batch(batch, study, grid, keep_going))
            if progress is not None:
                progress(i + 1, len(batches), results[-1], batch)
        return results, []
    folder = folder or study.root / "jobs"
    tasks = [list(batches)] if executor == "local" else [[batch] for batch in batches]
    submitter = submitit_executor(executor, folder, study.executor)
    jobs = submitter.map_array(run_batches, tasks, [study] * len(tasks), [grid] * len(tasks),
                               [keep_going] * len(tasks))
    ids = [job.job_id for job in jobs]
    if not wait:
        return [], ids
    for job in jobs:
        try:
            results += job.result()
        except Exception as err:  # noqa: BLE001 - a failed task is one line naming its log
            first = next((line for line in reversed(str(err).splitlines()) if line.strip()), type(err).__name__)
            raise StudyError(f"job {job.job_id} failed ({first.strip()}); log: {job.paths.stderr}") from None
    return results, ids
