"""A label column of the user's own is a task with `--positive`, no dataset YAML: splits, probe and records
work on it, and the positive class is bound to its split file so runs never mix the two codings."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache import datasets
from featcache.errors import ManifestError, SplitError, UsageError
from featcache.manifest import load_manifest, write_manifest
from featcache.records import load_records
from featcache.splits import load_splits, splits_path


@pytest.fixture(autouse=True)
def _fresh_tasks(monkeypatch):
    monkeypatch.setattr(datasets, "_ADHOC", {})  # each test starts like a new process


@pytest.fixture
def with_died(synth_cohort, tmp_path) -> Path:
    """A synthetic cohort in tmp_path whose manifest gains `died` (0/1) and `grade` (three values)."""
    manifest = synth_cohort(patients=40, positive_rate=0.4, size=32, seed=3, to=tmp_path)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        row["died"] = "1" if row["SYN"] == "DEATH" else "0"
        row["grade"] = "abc"[i % 3]
    return write_manifest(rows, manifest)


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_unknown_task_names_both_ways(with_died):
    manifest = with_died
    result = _run("splits", "--manifest", str(manifest), "--task", "died")
    assert isinstance(result.exception, ManifestError)
    message = str(result.exception)
    assert "unknown task 'died'" in message and "--positive" in message and "$FEATCACHE_DATASETS" in message


def test_task_for_checks_the_column(with_died):
    m = load_manifest(with_died)
    spec = datasets.task_for(m, "died", "1")
    assert spec.classes == {"0": 0, "1": 1} and spec.cv == "kfold" and spec.has_centers and not spec.dataset
    assert datasets.get_task("died") is spec and m.labels(spec)[1].sum() > 0
    assert datasets.task_for(m, "SYN", "DEATH") is datasets.get_task("SYN")
    with pytest.raises(UsageError, match="positive class 'DEATH', not 'ALIVE'"):
        datasets.task_for(m, "SYN", "ALIVE")
    with pytest.raises(ManifestError, match=r"column 'grade' holds 3 value\(s\).*needs exactly two"):
        datasets.task_for(m, "grade", "a")
    with pytest.raises(ManifestError, match="needs the value 'yes'"):
        datasets.task_for(m, "died", "yes")
    with pytest.raises(ManifestError, match="no column 'nope'"):
        datasets.task_for(m, "nope", "1")
    with pytest.raises(UsageError, match="layout column"):
        datasets.task_for(m, "center", "C1")


def test_splits_and_probe_on_a_column_of_ones_own(with_died, tmp_path, monkeypatch):
    from featcache.extract import extract_features

    manifest = with_died
    made = _run("splits", "--manifest", str(manifest), "--task", "died", "--positive", "1", "--k", "3",
                "--shots", "2", "--draws", "2")
    assert made.exit_code == 0, made.output
    assert load_splits(manifest, "died").classes == ("0", "1")
    extract_features(manifest, "resnet18-tiny")
    monkeypatch.setattr(datasets, "_ADHOC", {})  # a later process: the split file defines the task
    runs = tmp_path / "runs"
    probe = ["probe", "--model", "resnet18-tiny", "--task", "died", "--manifest", str(manifest), "--shots", "2",
             "--out", str(runs)]
    assert _run(*probe).exit_code == 0
    records = load_records(runs)
    assert len(records) == 3 * 2 and {r.task for r in records} == {"died"}
    flipped = _run(*probe, "--positive", "0")
    assert isinstance(flipped.exception, SplitError)
    assert "made with died positive class '1', not '0'" in str(flipped.exception)
    assert len(load_records(runs)) == 6  # nothing written under the other coding


def test_a_hand_edited_positive_class_is_refused(with_died, tmp_path):
    manifest = with_died
    made = _run("splits", "--manifest", str(manifest), "--task", "died", "--positive", "1", "--shots", "")
    assert made.exit_code == 0, made.output
    path = splits_path(manifest, "died")
    path.write_text(path.read_text().replace('"classes":["0","1"]', '"classes":["1","2"]'))
    with pytest.raises(SplitError, match=r"made with died positive class '2', not '1'; recompute with `featcache "
                                         r"splits --manifest .* --task died --positive 1`"):
        load_splits(manifest, "died")  # this process made `died` with positive 1
    datasets._ADHOC.clear()  # a fresh process: the file's classes define the task, and must fit the column
    with pytest.raises(ManifestError, match="needs the value '2'"):
        load_splits(manifest, "died")
