"""The study runner: batches from the plan, inline execution of a tiny grid narrowed by --only, and the
executors' refusals (an unknown executor, a failed job) in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import study.runner as runner
from adapters.train import TrainReport
from featcache.errors import StudyError, UsageError
from study.expand import Entry, expand, parse_only
from study.grid import load_grid
from study.plan import PlanRow, plan
from study.runner import Batch, BatchResult, ensure_splits, execute, make_batches
from study.studyfile import STUDY_FILE, load_study

_STUDY = """\
manifest: cohort/manifest.csv
tasks: [SYN]
grid:
  backbones: [resnet18-tiny]
  methods: [probe]
  regimes: {full: true, shots: [2]}
  draws: 2
"""


def _row(backbone: str, method: str, missing: int, exact: bool = True) -> PlanRow:
    entry = Entry(backbone, "SYN", method, 4 if method == "lora" else None, "full", None)
    return PlanRow(entry, planned=5, recorded=5 - missing, exact=exact)


def test_batches_are_one_backbone_for_stage_one_and_a_few_entries_for_stage_two():
    rows = [_row("a", "probe", 5), _row("b", "probe", 0), _row("a", "probe", 0, exact=False),
            _row("b", "probe", 1), _row("a", "lora", 2), _row("a", "bitfit", 1), _row("b", "lora", 3),
            _row("b", "bitfit", 0)]
    batches = make_batches(rows, runs_per_task=2)
    assert [b.stage for b in batches] == [1, 1, 2, 2]
    assert [len(b.entries) for b in batches] == [2, 1, 2, 1]  # a: missing + not yet countable; b: missing
    assert {e.backbone for e in batches[0].entries} == {"a"} and batches[1].entries == (rows[3].entry,)
    assert batches[2].entries == (rows[4].entry, rows[5].entry) and batches[3].entries == (rows[6].entry,)
    assert batches[0].label == "a: extract + 2 probe levels"
    assert len(make_batches(rows, runs_per_task=0)) == 2 + 3  # at least one entry per stage-2 batch
    assert make_batches([_row("a", "probe", 0), _row("a", "lora", 0)]) == []


@pytest.fixture
def tiny(synth_cohort, tmp_path, monkeypatch):
    """A study folder with a copy of a small cohort, a one-backbone probe grid and its splits."""
    monkeypatch.delenv("FEATCACHE_STUDY", raising=False)
    synth_cohort(patients=24, positive_rate=0.5, size=40, seed=3, images_per_patient=(1, 2), to=tmp_path / "cohort")
    (tmp_path / STUDY_FILE).write_text(_STUDY)
    study = load_study(tmp_path / STUDY_FILE)
    grid = study.grid()
    made = ensure_splits(study, grid, {"SYN"})
    assert len(made) == 1 and "made the splits of SYN" in made[0]
    assert ensure_splits(study, grid, {"SYN"}) == []  # kept once made
    return study, grid


def test_inline_runs_what_only_selects_and_reports_progress(tiny):
    study, grid = tiny
    entries, excluded = expand(study, grid, parse_only("regime=full"))
    assert [e.level for e in entries] == ["full"] and not excluded
    batches = make_batches(plan(study, grid, entries))
    calls: list[tuple[int, int, BatchResult | None]] = []
    results, jobs = execute(batches, study, grid, progress=lambda i, n, result, batch: calls.append((i, n, result)))
    assert jobs == [] and len(results) == 1 and calls == [(0, 1, None), (1, 1, results[0])]
    folds = len(list(study.runs.glob("*.json")))
    assert results[0].written == folds > 1 and results[0].existing == 0
    assert any("features of manifest.csv" in note for note in results[0].notes)
    assert all(r.missing == 0 for r in plan(study, grid, entries))
    fewshot, _ = expand(study, grid, parse_only("regime=fewshot"))
    assert all(r.missing > 0 for r in plan(study, grid, fewshot))  # what --only left out is still to run
    again, _ = execute(batches, study, grid)  # the same batches again: everything is recorded
    assert again[0].written == 0 and again[0].existing == folds


def test_an_unknown_executor_is_one_line_and_no_batches_run_nothing(tiny):
    study, grid = tiny
    with pytest.raises(UsageError, match=r"^--executor 'ray': choose from inline, local, slurm$"):
        execute([Batch(1, ())], study, grid, executor="ray")
    assert execute([], study, grid, executor="slurm") == ([], [])  # nothing to submit: no cluster needed


class _Job:
    def __init__(self, job_id: str, folder: Path, error: str | None = None):
        self.job_id, self.error = job_id, error
        self.paths = SimpleNamespace(stderr=folder / f"{job_id}_0_log.err")

    def result(self) -> list[BatchResult]:
        if self.error:
            raise RuntimeError(self.error)
        return [BatchResult(f"batch of {self.job_id}", written=1)]


def test_submitted_jobs_are_waited_for_and_a_failed_one_names_its_log(tiny, tmp_path, monkeypatch):
    study, grid = tiny
    outcomes: list[str | None] = [None, "Traceback (most recent call last):\n  ...\nValueError: bad pixels\n"]
    seen: dict[str, object] = {}

    def fake_executor(kind, folder, settings):
        seen.update(kind=kind, folder=folder)
        return SimpleNamespace(map_array=lambda fn, tasks, *per_task: [
            _Job(str(40 + i), folder, outcomes[i]) for i in range(len(tasks))])

    monkeypatch.setattr(runner, "submitit_executor", fake_executor)
    batches = [Batch(1, ()), Batch(2, ())]
    assert execute(batches, study, grid, executor="slurm", wait=False) == ([], ["40", "41"])
    assert seen == {"kind": "slurm", "folder": study.root / "jobs"}
    with pytest.raises(StudyError) as failed:
        execute(batches, study, grid, executor="slurm", folder=tmp_path / "j")
    assert str(failed.value) == f"job 41 failed (ValueError: bad pixels); log: {tmp_path / 'j' / '41_0_log.err'}"
    outcomes[1] = None
    results, ids = execute(batches, study, grid, executor="local")  # one task running every batch in turn
    assert ids == ["40"] and [r.label for r in results] == ["batch of 40"]


def test_a_failing_entry_is_one_line_and_the_others_still_run(tiny, monkeypatch):
    study, _ = tiny
    grid = load_grid({"backbones": ["resnet18-tiny"], "methods": ["bitfit", "lora"], "ranks": [4],
                      "train_folds": ["fold0"], "head_lrs": [1e-3]}, study.path)
    entries, _ = expand(study, grid)
    trained: list[str] = []

    def fake_train(**kwargs):
        if kwargs["method"] == "lora":
            raise ValueError("out of memory\nsecond line")
        trained.append(kwargs["method"])
        return TrainReport(written=1)

    monkeypatch.setattr(runner, "run_train", fake_train)
    batches = make_batches(plan(study, grid, entries), runs_per_task=2)
    assert len(batches) == 1
    results, _ = execute(batches, study, grid)
    lora = next(e for e in entries if e.method == "lora")
    assert trained == ["bitfit"] and results[0].written == 1
    assert results[0].failed == [f"{lora.label}: ValueError: out of memory"]
    with pytest.raises(ValueError, match="out of memory"):
        execute(batches, study, grid, keep_going=False)  # `--stop-on-error`: the first failure ends the run
