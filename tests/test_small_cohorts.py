"""Small cohorts: `splits` refuses what a cohort cannot fill and says what it allows; `probe` says why nothing
ran instead of an empty table or a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.errors import SplitError, UsageError
from featcache.splits import build_splits, folds_allowed, load_splits, make_splits, save_splits


@pytest.fixture(scope="module")
def four(synth_cohort, tmp_path_factory) -> Path:
    """Four patients, two of each class (this module's copy: its tests write splits)."""
    return synth_cohort(patients=4, positive_rate=0.5, size=32, seed=0, to=tmp_path_factory.mktemp("four"))


def _splits(manifest: Path, *options: str):
    return CliRunner().invoke(app, ["splits", "--manifest", str(manifest), "--task", "SYN", *options])


def test_folds_allowed():
    assert folds_allowed([2, 2], validation=False) == "2" and folds_allowed([2, 2], validation=True) == "none"
    assert folds_allowed([3, 30], validation=True) == "3"  # k=2 would leave one patient of the class per pool
    assert folds_allowed([9, 30], validation=True) == "2..9"


def test_four_patients_are_refused_with_what_they_allow(four):
    folds = _splits(four)
    assert folds.exit_code != 0 and "lower --k (this cohort allows --k 2, with a validation part none)" \
        in str(folds.exception)
    val = _splits(four, "--k", "2")
    assert isinstance(val.exception, SplitError) and "too few for a validation part" in str(val.exception)
    assert "0 patient" not in val.output and not (four.parent / "manifest.splits").exists()
    shots = _splits(four, "--k", "2", "--val-fraction", "0", "--no-per-center")
    assert "no fold can validate a few-shot run (fold0 has no validation part" in str(shots.exception)
    none = _splits(four, "--k", "2", "--val-fraction", "0", "--no-per-center", "--shots", "")
    assert none.exit_code == 0 and "no few-shot draws" in " ".join(none.output.split())


def test_what_the_cohort_allows_is_written_and_said(synth_cohort, tmp_path):
    manifest = synth_cohort(patients=12, positive_rate=0.5, size=32, seed=0, to=tmp_path)
    ok = _splits(manifest, "--k", "2", "--no-per-center", "--shots", "1,2", "--draws", "3")
    assert ok.exit_code == 0, ok.output
    said = " ".join(ok.output.split())
    assert "skipped fewshot k=2" in said and "2 folds; few-shot k=1 (3 draws each)" in said
    made = load_splits(manifest, "SYN")
    assert all(fold.val and len(fold.fewshot[1]) == 3 for fold in made.folds)
    shots = _splits(manifest, "--k", "2", "--no-per-center", "--shots", "4")
    assert "no few-shot level k=4 can be drawn in any fold: the folds' train parts hold at most 1 patient(s)" \
        in str(shots.exception) and "--shots with k <= 1" in str(shots.exception)


def test_probe_says_why_nothing_ran(synth_cohort, tmp_path):
    from featcache.extract import extract_features

    manifest = synth_cohort(patients=12, positive_rate=0.5, size=32, seed=2, to=tmp_path / "c")
    save_splits(build_splits(manifest, "SYN", k=2, val_fraction=0, shots=(), per_center=False), manifest)
    extract_features(manifest, "resnet18-tiny")
    base = ["probe", "--model", "resnet18-tiny", "--task", "SYN", "--manifest", str(manifest), "--out",
            str(tmp_path / "runs")]
    full = CliRunner().invoke(app, [*base, "--full"])
    assert isinstance(full.exception, SplitError) and "no validation part" in str(full.exception)
    made = build_splits(manifest, "SYN", k=2, shots=(1, 8), draws=2, per_center=False)
    assert all(8 in fold.skipped["fewshot"] for fold in made.folds)
    save_splits(made, manifest)
    skipped = CliRunner().invoke(app, [*base, "--shots", "8"])
    assert skipped.exit_code != 0 and isinstance(skipped.exception, SplitError)
    assert "no probe ran for SYN: every requested level was skipped" in str(skipped.exception)
    tpu = CliRunner().invoke(app, [*base, "--shots", "1", "--device", "tpu"])
    assert isinstance(tpu.exception, UsageError) and "'tpu' is not supported" in str(tpu.exception)
    assert not list(tmp_path.glob("runs/*.json"))
    assert CliRunner().invoke(app, [*base, "--shots", "1"]).exit_code == 0


def test_a_leave_one_center_out_pool_without_validation_room_is_refused():
    ids = [f"i{p}" for p in range(8)]
    y = [0, 1, 0, 1, 0, 0, 0, 0]  # leaving out A (or B) leaves one positive patient
    centers = ["A", "A", "B", "B", "C", "C", "C", "C"]
    with pytest.raises(SplitError, match="try --scheme kfold"):
        make_splits(ids, y, ids, centers, scheme="loco", shots=())
