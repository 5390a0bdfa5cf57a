"""A study of one's own cohort end to end, as a new user runs it: a label column of their own declared once
(`init --task SURV --positive DEATH`), a tiny grid with a few-shot level the cohort cannot fill, commands typed
inside the study following its grid, and the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.adapters_app import app as adapters_app
from cli.featcache_app import app as featcache_app
from featcache import datasets
from featcache.manifest import write_manifest
from featcache.records import load_records
from featcache.splits import load_splits
from study.studyfile import STUDY_FILE, find_study, load_study

GRID = """\
name: mine
backbones: [resnet18-tiny]
methods: [probe, lp]
regimes: {full: true, shots: [2, 16]}
draws: 2
train_draws: 1
train_folds: [fold0]
head_lrs: [1.0e-3]
train: {max_epochs: 2, warmup: 0, patience: 2, plateau_patience: 1}
exclude:
  - {method: lp, k: 2, reason: "training on full data only"}
"""


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(datasets, "_ADHOC", {})  # each test starts like a new process
    monkeypatch.delenv("FEATCACHE_STUDY", raising=False)


def _cohort(synth_cohort, folder: Path) -> Path:
    """A copy in ``folder`` of 30 synthetic patients, 8 of them dead: no fold can draw k=16 deaths."""
    manifest = synth_cohort(patients=30, positive_rate=0.2, size=32, seed=11, images_per_patient=(1, 2), to=folder)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    dead = sorted({r["patient_id"] for r in rows})[:8]
    for row in rows:
        row["SURV"] = "DEATH" if row["patient_id"] in dead else "ALIVE"
        del row["SYN"]
    return write_manifest(rows, manifest)


def _run(app, *args: str):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result


def test_empty_study_variable_counts_as_unset(tmp_path, monkeypatch):
    (tmp_path / STUDY_FILE).write_text("name: s\n")
    monkeypatch.setenv("FEATCACHE_STUDY", "")
    assert find_study(tmp_path) == tmp_path / STUDY_FILE


def test_study_tasks_mapping_and_its_refusals(tmp_path):
    path = tmp_path / STUDY_FILE
    path.write_text("tasks: {SURV: {column: SURV, positive: DEATH}, AFC: {}}\n")
    study = load_study(path)
    assert study.tasks == ("SURV", "AFC") and study.positives == {"SURV": "DEATH"}
    path.write_text("tasks: {SURV: {column: OTHER, positive: DEATH}}\n")
    with pytest.raises(Exception, match="named after its manifest column"):
        load_study(path)
    path.write_text("tasks: {SURV: {postive: DEATH}}\n")
    with pytest.raises(Exception, match=r"tasks.SURV: unknown key\(s\) \['postive'\]"):
        load_study(path)


def test_own_cohort_study_end_to_end(synth_cohort, tmp_path, monkeypatch):
    manifest = _cohort(synth_cohort, tmp_path / "cohort")
    (tmp_path / "grid.yaml").write_text(GRID)
    monkeypatch.chdir(tmp_path)
    made = _run(featcache_app, "init", "--manifest", "cohort/manifest.csv", "--task", "SURV", "--positive", "DEATH",
                "--model", "resnet18-tiny", "--grid", "grid.yaml")
    assert made.exit_code == 0, made.output
    text = (tmp_path / STUDY_FILE).read_text()
    assert 'tasks: {SURV: {positive: "DEATH"}}' in text
    # the template's example of defaults is accepted as written
    (tmp_path / STUDY_FILE).write_text(text.replace("probe: {}  ", "probe: {select: pr_auc}"))

    planned = _run(featcache_app, "study", "plan")
    assert planned.exit_code == 0, planned.output
    assert "training on full data only" in planned.output
    assert "levels that cannot run" in planned.output and "no fold can draw k=16" in planned.output
    assert "(positive class DEATH)" in planned.output

    datasets._ADHOC.clear()  # `study run` is a new process: the study file declares the task
    ran = _run(featcache_app, "study", "run")
    assert ran.exit_code == 0, ran.output
    assert "not run (cannot run) resnet18-tiny · SURV · probe · fewshot k=16" in ran.output
    assert load_splits(manifest, "SURV").classes == ("ALIVE", "DEATH")
    records = load_records(tmp_path / "runs")
    assert {(r.method, r.shots) for r in records} == {("probe", None), ("probe", 2), ("lp", None)}
    assert all(r.shots != 16 for r in records)
    again = _run(featcache_app, "study", "plan")
    assert "0 to run" in again.output.replace(",", "")

    datasets._ADHOC.clear()  # a command typed in the study: the task from the split file, settings from the grid
    trained = _run(adapters_app, "train", "--method", "lp", "--max-epochs", "1")
    assert trained.exit_code == 0, trained.output
    line = next(x for x in trained.output.splitlines() if x.startswith("settings from"))
    assert "flags: --max-epochs" in line and "grid mine: --fold fold0" in line and "--head-lr 0.001" in line
    lp = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    typed = [r for r in lp if r["method"] == "lp" and r["options"]["max_epochs"] == 1]
    assert [(r["fold"], r["options"]["head_lr"], r["options"]["warmup"]) for r in typed] == [("fold0", 1e-3, 0)]

    probed = _run(featcache_app, "probe", "--full")  # the study's `defaults: {probe: {select: pr_auc}}`
    assert probed.exit_code == 0, probed.output
    selected = {r.options.get("select") for r in load_records(tmp_path / "runs") if r.method == "probe"}
    assert "average_precision" in selected

    reported = _run(featcache_app, "report")
    assert reported.exit_code == 0, reported.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.startswith(f"# {tmp_path.name}")


def test_a_failing_entry_does_not_stop_the_study(synth_cohort, tmp_path, monkeypatch):
    _cohort(synth_cohort, tmp_path / "cohort")
    (tmp_path / "grid.yaml").write_text(GRID.replace("methods: [probe, lp]", "methods: [lp, bitfit]"))
    monkeypatch.chdir(tmp_path)
    assert _run(featcache_app, "init", "--manifest", "cohort/manifest.csv", "--task", "SURV", "--positive",
                "DEATH", "--grid", "grid.yaml").exit_code == 0
    import adapters.train as train_module

    real = train_module.run_train

    def flaky(*args, **kwargs):
        if kwargs["method"] == "lp":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr("study.runner.run_train", flaky)
    ran = _run(featcache_app, "study", "run", "--only", "regime=full")
    assert ran.exit_code == 1, ran.output
    assert "1 entry failed; the others ran:" in ran.output
    assert "failed resnet18-tiny · SURV · lp · full: RuntimeError: CUDA out of memory (simulated)" in ran.output
    assert {r.method for r in load_records(tmp_path / "runs")} == {"bitfit"}
