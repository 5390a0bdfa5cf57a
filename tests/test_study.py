"""The study as one folder: study-file discovery and flag precedence, aliases, the shipped grids' expansion, a
killed study restarted, the submitit LocalExecutor path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.adapters_app import app as adapters_app
from cli.featcache_app import app as featcache_app
from featcache.backbones import ALIASES, get_spec
from featcache.datasets import get_task
from featcache.errors import StudyError, WeightsError
from featcache.records import load_records
from study.expand import expand, expected_runs, parse_only
from study.grid import load_grid
from study.plan import plan, train_arguments
from study.runner import ensure_splits, execute, make_batches, submitit_executor
from study.studyfile import STUDY_FILE, find_study, load_study

CNNS = ("resnet18", "resnet50", "densenet121", "medclip-resnet")


@pytest.fixture(autouse=True)
def _no_outer_study(monkeypatch):
    monkeypatch.delenv("FEATCACHE_STUDY", raising=False)


def _study_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STUDY_FILE).write_text(text)
    return folder / STUDY_FILE


# ------------------------------------------------------------------------------------------ file and defaults


def test_discovery_walks_up_and_env_overrides(tmp_path, monkeypatch):
    path = _study_file(tmp_path / "s", "name: s\n")
    (tmp_path / "s" / "a" / "b").mkdir(parents=True)
    assert find_study(tmp_path / "s" / "a" / "b") == path
    assert find_study(tmp_path) is None
    monkeypatch.setenv("FEATCACHE_STUDY", "none")
    assert find_study(tmp_path / "s") is None
    monkeypatch.setenv("FEATCACHE_STUDY", str(tmp_path / "nope.yaml"))
    with pytest.raises(StudyError, match="nope.yaml"):
        find_study()


def test_bad_study_file_is_one_line_naming_file_and_key(tmp_path):
    path = _study_file(tmp_path, "manifest: m.csv\nmanifets: x\n")
    with pytest.raises(StudyError, match=r"study.yaml: study: unknown key\(s\) \['manifets'\]"):
        load_study(path)
    path.write_text("grid:\n  backbones: [resnet18]\n  methods: [lora, dora]\n")
    with pytest.raises(StudyError, match=r"grid.methods: unknown \['dora'\]"):
        load_study(path).grid()
    path.write_text("a: [1\n")
    with pytest.raises(StudyError, match="not valid YAML at line"):
        load_study(path)


def test_init_writes_a_commented_study_that_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(featcache_app, ["init", "--manifest", "cohort/manifest.csv", "--task", "SYN",
                                                "--model", "medclip"])
    assert result.exit_code == 0, result.output
    study = load_study(tmp_path / STUDY_FILE)
    assert study.manifest == tmp_path / "cohort" / "manifest.csv" and study.tasks == ("SYN",)
    assert study.model == "medclip-vit" and study.grid().name == "smoke"
    assert "# Weights per backbone" in (tmp_path / STUDY_FILE).read_text()
    again = CliRunner().invoke(featcache_app, ["init"])
    assert isinstance(again.exception, StudyError) and "--force" in str(again.exception)


def test_flags_override_study_defaults_and_help_says_where_from(tmp_path, monkeypatch):
    _study_file(tmp_path, "manifest: data/m.csv\ntasks: [SYN]\n")
    monkeypatch.chdir(tmp_path / ".")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # found from below
    runner = CliRunner()
    from_study = runner.invoke(featcache_app, ["splits"])
    assert str(tmp_path / "data" / "m.csv") in str(from_study.exception)
    assert f"study: {tmp_path / STUDY_FILE}" in from_study.output
    flagged = runner.invoke(featcache_app, ["splits", "--manifest", "other.csv"])
    assert "other.csv" in str(flagged.exception) and "data/m.csv" not in str(flagged.exception)
    shown = runner.invoke(featcache_app, ["splits", "--help"], env={"COLUMNS": "600"})
    line = next(x for x in shown.output.splitlines() if "--manifest" in x)
    assert f"study default from {tmp_path / STUDY_FILE}" in line and "data/m.csv" in line


def test_weights_policy_per_backbone_through_an_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    _study_file(tmp_path, "manifest: m.csv\nweights:\n  medclip: /no/such/medclip.bin\n  dinov2-s: random-init\n")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    named = runner.invoke(featcache_app, ["extract", "--model", "medclip"])
    assert isinstance(named.exception, WeightsError) and "/no/such/medclip.bin" in str(named.exception)
    flag = runner.invoke(featcache_app, ["extract", "--model", "medclip", "--weights", str(tmp_path / "mine.bin")])
    assert "mine.bin" in str(flag.exception)
    # random-init stated for dinov2-s: no weights lookup, the run goes on to read the (missing) manifest
    stated = runner.invoke(featcache_app, ["extract", "--model", "dinov2-s"])
    assert "random-init" in stated.output and "m.csv: cannot read manifest" in str(stated.exception)
    # a backbone the study does not name is never given random weights silently
    unnamed = runner.invoke(featcache_app, ["extract", "--model", "resnet18"])
    assert isinstance(unnamed.exception, WeightsError)


def test_aliases_resolve_and_are_listed():
    assert get_spec("medclip").name == "medclip-vit" and get_spec("medclip-tiny").name == "medclip-vit-tiny"
    lines = CliRunner().invoke(featcache_app, ["models"]).output.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("medclip-vit "))
    assert "(alias: medclip)" in lines[row + 1]


# ------------------------------------------------------------------------------------------------- the grid


def _levels(task: str, shots: int, center_shots: int) -> int:
    return 1 + shots + (center_shots if get_task(task).has_centers else 0)


def test_benchmark_grid_expansion_counts_and_exclusions(tmp_path):
    study = load_study(_study_file(tmp_path, "grid: benchmark\n"))
    grid = study.grid()
    entries, excluded = expand(study, grid)
    tasks = grid.tasks
    assert set(tasks) == {"AFC", "AFC_death", "CAR", "CoCross", "NY", "NY_icu"} and len(grid.backbones) == 11
    variants = 1 + 1 + 1 + 3 + 3 + 1 + 1  # probe, lp, fft, lora r4/8/16, vera r4/8/16, bitfit, ia3
    levels = {t: _levels(t, 5, 4) for t in tasks}  # full, k = 2..32, per-center k = 2..16 where centers
    refused = [e for e in excluded if e.entry.method == "vera" and "does not apply" in e.reason]
    assert {e.entry.backbone for e in refused} == set(CNNS)
    assert all("instead" in e.reason for e in refused)  # says what to use
    listed = 1 + 5 + 4  # every level is listed for every task; per-center ones excluded where no centers
    assert len(refused) == len(CNNS) * 3 * len(tasks) * listed  # every rank, task and level of them
    assert not [e for e in entries if e.method == "vera" and e.backbone in CNNS]
    no_centers = [e for e in excluded if "has no centers" in e.reason]
    assert {e.entry.task for e in no_centers} == {"CAR", "CoCross", "NY", "NY_icu"}
    assert not [e for e in entries if e.regime == "fewshot-center" and not get_task(e.task).has_centers]
    # every combination is either an entry or excluded with its reason, never dropped
    assert len(entries) + len(excluded) == 11 * variants * len(tasks) * listed
    runnable_pairs = 11 * variants - len(CNNS) * 3
    assert len(entries) == runnable_pairs * sum(levels.values())
    per_task_probe = {t: get_task(t).k * (1 + 5 * 100 + (4 * 100 if get_task(t).has_centers else 0)) for t in tasks}
    per_task_train = {t: 3 * get_task(t).k * (1 + 5 * 5 + (4 * 5 if get_task(t).has_centers else 0)) for t in tasks}
    stage1 = sum(expected_runs(e, grid) for e in entries if e.stage == 1)
    stage2 = sum(expected_runs(e, grid) for e in entries if e.stage == 2)
    assert stage1 == 11 * sum(per_task_probe.values()) == 229_152
    assert stage2 == (runnable_pairs - 11) * sum(per_task_train.values()) == 315_168


def test_only_filters_by_field_globs(tmp_path):
    study = load_study(_study_file(tmp_path, "grid: benchmark\n"))
    entries, _ = expand(study, study.grid(), parse_only("backbone=dinov2-*,method=lora|probe,"
                                                                     "regime=full,task=CAR"))
    assert {(e.backbone, e.variant) for e in entries} == {(b, m) for b in ("dinov2-s", "dinov2-b", "dinov2-l")
                                                          for m in ("probe", "lora-r4", "lora-r8", "lora-r16")}
    with pytest.raises(Exception, match="FIELD=PATTERN"):
        parse_only("colour=red")


def test_smoke_grid_is_shipped_and_small(tmp_path):
    grid = load_grid("smoke", tmp_path / STUDY_FILE)
    assert grid.backbones == ("resnet18-tiny", "dinov2-s-tiny") and grid.train_folds == ("fold0",)


# --------------------------------------------------------------------------------------------- running it

_STUDY = """\
manifest: cohort/manifest.csv
tasks: [SYN]
grid:
  backbones: [resnet18-tiny]
  methods: [probe]
  regimes: {full: true, shots: [2, 4]}
  draws: 3
executor: {time_min: 10}
"""


@pytest.fixture(scope="module")
def cohort(synth_cohort) -> Path:
    return synth_cohort(patients=24, positive_rate=0.5, size=40, seed=3, images_per_patient=(1, 2))


def _fresh(cohort: Path, tmp_path: Path) -> tuple:
    import shutil

    shutil.copytree(cohort.parent, tmp_path / "cohort")
    study = load_study(_study_file(tmp_path, _STUDY))
    grid = study.grid()
    entries, _ = expand(study, grid)
    ensure_splits(study, grid, {"SYN"})
    return study, grid, entries


def _keys(folder: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def test_killed_study_restarted_runs_only_missing_keys(cohort, tmp_path, monkeypatch):
    study, grid, entries = _fresh(cohort, tmp_path)
    import study.runner as runner_module

    real, calls = runner_module.run_probe, []

    def dies_on_second_level(*args, **kwargs):
        if not kwargs.get("plan_only"):
            calls.append(kwargs["full"])
            if len(calls) == 2:
                raise KeyboardInterrupt  # the kill, after one regime was recorded
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "run_probe", dies_on_second_level)
    with pytest.raises(KeyboardInterrupt):
        execute(make_batches(plan(study, grid, entries)), study, grid)
    monkeypatch.setattr(runner_module, "run_probe", real)
    before = _keys(study.runs)
    rows = plan(study, grid, entries)
    assert all(r.exact for r in rows) and 0 < sum(r.recorded for r in rows) == len(before)
    missing = sum(r.missing for r in rows)
    assert missing > 0
    results, _ = execute(make_batches(rows), study, grid)
    after = _keys(study.runs)
    assert sum(r.written for r in results) == missing == len(after) - len(before)
    assert all(after[k] == t for k, t in before.items())  # recorded runs untouched
    assert all(r.missing == 0 for r in plan(study, grid, entries))
    assert make_batches(plan(study, grid, entries)) == []


def test_submitit_local_executor_runs_the_same_batches(cohort, tmp_path):
    study, grid, entries = _fresh(cohort, tmp_path)
    entries = [e for e in entries if e.regime == "full"]  # keep it short: a subprocess imports torch
    rows = plan(study, grid, entries)
    results, jobs = execute(make_batches(rows), study, grid, executor="local")
    after = plan(study, grid, entries)
    assert len(jobs) == 1 and results[0].written == sum(r.planned for r in after) > 0
    assert all(r.exact and r.missing == 0 for r in after)
    record = json.loads(next(study.runs.glob("*.json")).read_text())
    assert record["method"] == "probe" and record["backbone"] == "resnet18-tiny"
    assert any((tmp_path / "jobs").glob("*_log.out"))


def test_slurm_executor_takes_resources_from_the_study(tmp_path, monkeypatch):
    settings = {"partition": "gpu", "time_min": 30, "gpus_per_node": 1, "cpus_per_task": 8, "array_parallelism": 4}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(StudyError, match="--executor slurm: .*srun"):
        submitit_executor("slurm", tmp_path, settings)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    params = submitit_executor("slurm", tmp_path, settings)._executor.parameters
    assert params["partition"] == "gpu" and params["time"] == 30 and params["gpus_per_node"] == 1
    assert params["cpus_per_task"] == 8 and params["array_parallelism"] == 4


def test_study_plan_and_run_commands(cohort, tmp_path, monkeypatch):
    study, grid, entries = _fresh(cohort, tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    planned = runner.invoke(featcache_app, ["study", "plan"], env={"COLUMNS": "200"})
    assert planned.exit_code == 0, planned.output
    assert "counted from the task specs" in planned.output  # no features yet: not exact
    ran = runner.invoke(featcache_app, ["study", "run", "--only", "regime=full"], env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    assert len(list(study.runs.glob("*.json"))) == 5 and "wrote 5 run records" in ran.output
    again = runner.invoke(featcache_app, ["study", "plan"], env={"COLUMNS": "200"})
    line = next(x for x in again.output.splitlines() if x.strip().startswith("1 ") and "probe" in x)
    assert line.split()[3:6] == ["35", "5", "30"]  # runs, recorded, missing: 5 folds x (1 + 2 levels x 3 draws)


def _verbatim(synth_cohort, tmp_path: Path, monkeypatch) -> None:
    synth_cohort(patients=42, positive_rate=0.5, size=32, seed=5, images_per_patient=(1, 1), to=tmp_path / "cohort")
    _study_file(tmp_path, "manifest: cohort/manifest.csv\ntasks: [SYN]\nmodel: medclip\nruns: runs\n"
                          "weights: {medclip: random-init}\n"
                          "defaults: {splits: {draws: 2}, extract: {workers: 0, batch_size: 16},\n"
                          "           train: {fold: fold0, head_lr: '1e-3', max_epochs: 1, warmup: 0}}\n")
    monkeypatch.chdir(tmp_path / "cohort")
    runner = CliRunner()
    assert runner.invoke(featcache_app, ["splits"]).exit_code == 0
    extracted = runner.invoke(featcache_app, ["extract", "--model", "medclip"])
    assert extracted.exit_code == 0, extracted.output
    assert "medclip-vit" in extracted.output and "random-init" in extracted.output
    probed = runner.invoke(featcache_app, ["probe", "--shots", "8"])  # support sets from the train part only
    assert probed.exit_code == 0, probed.output
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    backbone = get_spec("medclip").name
    assert records and {(r["backbone"], r["task"], r["shots"]) for r in records} == {(backbone, "SYN", 8)}
    assert {r["provenance"]["weights"] for r in records} <= {"random-init", "tiny-random"}
    trained = runner.invoke(adapters_app, ["train", "--method", "bitfit"])
    assert trained.exit_code == 0, trained.output
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    bitfit = [r for r in runs if r["method"] == "bitfit"]
    assert [(r["backbone"], r["fold"], r["options"]["head_lr"]) for r in bitfit] == [(backbone, "fold0", 1e-3)]


def test_the_three_commands_work_verbatim_inside_a_study(synth_cohort, tmp_path, monkeypatch):
    """The study mechanism end to end; `medclip` points at the tiny Swin here to keep the suite fast (the alias
    itself is tested above, the real-size run below under -m slow and in `make demo`)."""
    monkeypatch.setitem(ALIASES, "medclip", "medclip-vit-tiny")
    _verbatim(synth_cohort, tmp_path, monkeypatch)


@pytest.mark.slow
def test_the_three_commands_work_verbatim_inside_a_study_real_size(synth_cohort, tmp_path, monkeypatch):
    _verbatim(synth_cohort, tmp_path, monkeypatch)


def test_study_run_trains_stage_two_entries_by_their_keys(cohort, tmp_path):
    study, _, _ = _fresh(cohort, tmp_path)
    grid = load_grid({"backbones": ["resnet18-tiny"], "methods": ["bitfit", "lora", "lp"], "ranks": [4],
                      "train_folds": ["fold0"], "head_lrs": [1e-3], "train": {"max_epochs": 1, "warmup": 0}},
                     tmp_path / STUDY_FILE)
    entries, excluded = expand(study, grid)
    assert sorted(e.variant for e in entries) == ["bitfit", "lora-r4", "lp"] and not excluded
    rows = plan(study, grid, entries)
    assert all(r.exact and (r.planned, r.recorded) == (1, 0) for r in rows)
    results, _ = execute(make_batches(rows), study, grid)
    assert [r.written for r in results] == [1, 1, 1]
    trained_on = {r.method: r.provenance["trained_on"] for r in load_records(study.runs)}
    assert trained_on == {"bitfit": "images", "lora": "images", "lp": "features"}  # lp on exact stored features
    from adapters.plan import planned_keys

    keys = {k for e in entries for k in planned_keys(**train_arguments(study, grid, e))}
    assert keys == {p.stem for p in study.runs.glob("*.json")}
    assert all(r.missing == 0 for r in plan(study, grid, entries))


def test_a_level_whose_validation_part_cannot_validate_is_excluded_with_the_reason():
    """Issue 17: a fold whose validation part holds one positive patient skips its few-shot levels in the split
    file; a grid that trains on that fold only lists the level as excluded with that reason."""
    from types import SimpleNamespace

    from featcache.splits import make_splits
    from study.expand import Entry
    from study.plan import _undrawable

    ids = [f"i{p:02d}" for p in range(30)]
    splits = make_splits(ids, [int(p < 5) for p in range(30)], ids, task="T", k=2, draws=1, shots=(1,),
                         per_center=False)
    short = next(fold for fold in splits.folds if fold.skipped["fewshot"])
    why = _undrawable(splits, SimpleNamespace(train_folds=(short.name,)), Entry("resnet18-tiny", "T", "lp", None,
                                                                              "fewshot", 1))
    assert why == (f"no fold can draw k=1: {short.name}'s validation part holds 1 positive patient(s), fewer than "
                   "the 2 of each class a validation threshold needs")
    assert _undrawable(splits, SimpleNamespace(train_folds=()), Entry("resnet18-tiny", "T", "lp", None, "fewshot",
                                                                      1)) is None  # the other fold runs it
