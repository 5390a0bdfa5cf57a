"""The probe engine: selection rules against scikit-learn, few-shot rules, records, CLI and refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.errors import SplitError, StoreError
from featcache.extract import extract_features
from featcache.manifest import write_manifest
from featcache.metrics import binary_metrics, choose_threshold
from featcache.probe import (
    C_GRID,
    INNER_FOLDS,
    Part,
    ProbeOptions,
    balanced_log_loss,
    choose_c,
    grid_edge,
    inner_folds,
    probe_fewshot,
    probe_full,
    run_probe,
)
from featcache.records import load_records
from featcache.splits import build_splits, load_splits, save_splits, support_digest

MODEL = "dinov2-s-tiny"  # builds instantly offline; 16-dim cls features
TASK = "SYN"


def _gaussian(n: int = 400, D: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    X = rng.normal(size=(n, D)) + 0.8 * np.outer(y, rng.normal(size=D)) + rng.normal(size=D) * 3
    return X.astype(np.float32), y


def _support(y: np.ndarray, k: int, rng: np.random.Generator, pool: int = 300) -> np.ndarray:
    """k images per class from the first ``pool`` rows (the rest is test)."""
    strata = [np.flatnonzero(y[:pool] == label) for label in (1, 0)]
    return np.concatenate([rng.choice(rows, k, replace=False) for rows in strata])


def _cohort(synth_cohort, folder: Path, patients: int, draws: int) -> Path:
    """A private copy of a synthetic cohort with splits (``draws`` draws per level)."""
    return synth_cohort(patients=patients, positive_rate=0.4, size=48, seed=1, draws=draws, to=folder)


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory) -> Path:
    """A synthetic cohort with splits (3 draws per level) and dinov2-s-tiny features in features.zarr."""
    manifest = _cohort(synth_cohort, tmp_path_factory.mktemp("cohort"), patients=100, draws=3)
    extract_features(manifest, MODEL)
    return manifest


def _copy(cohort: Path, to: Path) -> Path:
    shutil.copytree(cohort.parent, to)
    return to / cohort.name


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ rules on arrays


def test_choose_c_breaks_ties_by_log_loss_then_smaller_c():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.6, 0.6, 0.4, 0.4], [0.2, 0.3, 0.7, 0.8], [0.1, 0.2, 0.9, 0.8],
                       [0.9, 0.1, 0.2, 0.3]])
    assert choose_c([scores], [y], "mcc").tolist() == [2]  # rows 1 and 2 are perfect: 2 has the lower log-loss
    assert choose_c([scores[[0, 1, 1, 3]]], [y], "mcc").tolist() == [1]  # identical rows: the smaller C
    flipped = scores[[1, 2]].copy()
    flipped[1, 2] = 0.5 - 7e-9  # one score crosses 0.5 by 7e-9: row 1 loses the MCC tie, not the smooth rank
    assert choose_c([flipped], [y], "mcc").tolist() == [0]
    loss = balanced_log_loss(y, scores[[1, 2]])
    assert loss[1] < loss[0] and loss[0] == pytest.approx(-(np.log(0.8 * 0.7) + np.log(0.7 * 0.8)) / 4)
    assert choose_c([scores[[0, 3]]], [y], "average_precision").tolist() == [1]  # AP 0.5 < 0.58
    assert choose_c([scores[[3, 2, 1]]], [y], "average_precision").tolist() == [1]  # two perfect rankings: the first
    assert choose_c([scores], [np.ones(4, dtype=int)], "average_precision").tolist() == [0]  # undefined everywhere


def test_full_data_choice_equals_sklearn_on_validation():
    """Chosen C, its validation scores and the refit on train + validation, against plain scikit-learn."""
    X, y = _gaussian()
    X64 = X.astype(np.float64)  # scikit-learn would otherwise fit in float32; the values are the same
    rng = np.random.default_rng(1)
    order = rng.permutation(len(y))
    parts = [Part(np.sort(order[:200]), np.sort(order[200:300]), np.sort(order[300:])),
             Part(np.sort(order[100:300]), np.sort(order[300:])[:60], np.sort(order[:100]))]
    for select in ("mcc", "average_precision"):
        fitted = probe_full(X, y, parts, ProbeOptions(select=select))
        for part, fit in zip(parts, fitted, strict=True):
            scaler = StandardScaler().fit(X64[part.train])
            values, losses = [], []
            for C in C_GRID:
                model = LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=10_000)
                model.fit(scaler.transform(X64[part.train]), y[part.train])
                val = model.predict_proba(scaler.transform(X64[part.val]))[:, 1]
                values.append(binary_metrics(y[part.val], val)[select])
                weights = np.where(y[part.val] == 1, 1 / y[part.val].sum(), 1 / (1 - y[part.val]).sum()) / 2
                losses.append(log_loss(y[part.val], val, sample_weight=weights))
            tied = np.flatnonzero(np.asarray(values) >= max(values) - 1e-9)
            assert fit.C == C_GRID[tied[np.argmin(np.asarray(losses)[tied])]]
            both = np.concatenate([part.train, part.val])
            scaler = StandardScaler().fit(X64[both])
            model = LogisticRegression(C=fit.C, class_weight="balanced", tol=1e-10, max_iter=10_000)
            model.fit(scaler.transform(X64[both]), y[both])
            expected = model.predict_proba(scaler.transform(X64[part.test]))[:, 1]
            np.testing.assert_allclose(fit.scores, expected, atol=1e-4)
            assert fit.rule == "validation" and fit.converged and fit.thr_scores.shape == (both.size,)


def _sklearn_scores(X, y, train, rows, C):
    scaler = StandardScaler().fit(X[train])
    model = LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=10_000)
    model.fit(scaler.transform(X[train]), y[train])
    return model.predict_proba(scaler.transform(X[rows]))[:, 1]


def test_threshold_comes_from_the_model_it_is_applied_to():
    """Refit: the threshold is chosen on out-of-fold scores of the same procedure on train + val (patient-
    grouped folds); no refit: the train-only model is tested and its own validation scores set it."""
    X, y = _gaussian()
    X64 = X.astype(np.float64)
    groups = np.array([f"p{i // 2}" for i in range(len(y))])
    groups[y == 1] = [f"q{i}" for i in range(int(y.sum()))]  # patients never mix labels
    part = Part(np.arange(0, 200), np.arange(200, 300), np.arange(300, 400))
    both = np.concatenate([part.train, part.val])
    [refit] = probe_full(X, y, [part], ProbeOptions(), groups)
    fold = inner_folds(y[both], groups[both])
    held = np.concatenate([both[fold == q] for q in range(INNER_FOLDS)])
    oof = np.concatenate([_sklearn_scores(X64, y, both[fold != q], both[fold == q], refit.C)
                          for q in range(INNER_FOLDS)])
    assert refit.thr_rows.tolist() == held.tolist()
    np.testing.assert_allclose(refit.thr_scores, oof, atol=1e-4)
    np.testing.assert_allclose(refit.scores, _sklearn_scores(X64, y, both, part.test, refit.C), atol=1e-4)
    [alone] = probe_full(X, y, [part], ProbeOptions(refit=False), groups)
    assert alone.C == refit.C and alone.thr_rows.tolist() == part.val.tolist()
    np.testing.assert_allclose(alone.thr_scores, _sklearn_scores(X64, y, part.train, part.val, alone.C), atol=1e-4)
    np.testing.assert_allclose(alone.scores, _sklearn_scores(X64, y, part.train, part.test, alone.C), atol=1e-4)
    assert choose_threshold(y[part.val], alone.thr_scores) != choose_threshold(y[held], refit.thr_scores)
    assert ProbeOptions().defining("cls")["threshold"].startswith("cross-fit")
    assert ProbeOptions(refit=False).defining("cls")["threshold"].startswith("validation scores of the tested")


def test_c_at_a_grid_edge_is_flagged():
    X, y = _gaussian()
    part = Part(np.arange(0, 200), np.arange(200, 300), np.arange(300, 400))
    [low] = probe_full(X, y, [part], ProbeOptions(grid=(1e-6, 1e-5)))  # both too strong: still a choice
    assert low.edge in ("lower", "upper") and grid_edge(low.C, (1e-6, 1e-5)) == low.edge
    assert grid_edge(1.0, C_GRID) is None and grid_edge(C_GRID[-1], C_GRID) == "upper"
    assert grid_edge(C_GRID[0], C_GRID) == "lower" and grid_edge(1.0, (1.0,)) is None
    with pytest.raises(ValueError, match="positive finite"):
        ProbeOptions(grid=(0.0, 1.0))


def test_inner_folds_are_stratified_grouped_and_deterministic():
    y = np.array([0] * 10 + [1] * 9)
    groups = np.array([f"p{i // 2}" for i in range(10)] + [f"q{i}" for i in range(9)])  # p*: 2 images
    fold = inner_folds(y, groups)
    assert (fold == inner_folds(y, groups)).all()
    for g in np.unique(groups):
        assert np.unique(fold[groups == g]).size == 1  # a patient never straddles inner folds
    for label in (0, 1):
        per_fold = [np.unique(groups[(y == label) & (fold == q)]).size for q in range(INNER_FOLDS)]
        assert max(per_fold) - min(per_fold) <= 1


VAL, TEST = np.arange(200, 300), np.arange(300, 400)  # few-shot: supports from the first 200 rows


def test_fewshot_chooses_c_on_the_validation_part_like_sklearn():
    """Every C fitted on the support set alone, chosen on the fold's validation part (the full-data tie rule),
    the support-only model tested, its validation scores kept for the threshold."""
    X, y = _gaussian()
    X64 = X.astype(np.float64)
    rng = np.random.default_rng(2)
    supports = [_support(y, k, rng, pool=200) for k in (2, 8)]
    fitted = probe_fewshot(X, y, supports, [VAL], [TEST], [0, 0], ProbeOptions())
    for support, fit in zip(supports, fitted, strict=True):
        val = np.array([_sklearn_scores(X64, y, support, VAL, C) for C in C_GRID])
        assert fit.C == C_GRID[choose_c([val], [y[VAL]], "mcc")[0]] and fit.rule == "validation"
        np.testing.assert_allclose(fit.scores, _sklearn_scores(X64, y, support, TEST, fit.C), atol=1e-4)
        np.testing.assert_allclose(fit.thr_scores, val[C_GRID.index(fit.C)], atol=1e-4)
        assert fit.thr_rows.tolist() == VAL.tolist() and fit.scores.shape == (100,) and fit.converged


def test_fewshot_trains_on_the_support_set_only():
    """Features of every other training image may change: the support-set models and test scores do not."""
    X, y = _gaussian()
    rng = np.random.default_rng(3)
    supports = [_support(y, k, rng, pool=200) for k in (2, 8, 16)]
    before = probe_fewshot(X, y, supports, [VAL], [TEST], [0, 0, 0], ProbeOptions())
    others = np.setdiff1d(np.arange(200), np.concatenate(supports))
    X2 = X.copy()
    X2[others] = rng.normal(size=(others.size, X.shape[1])) * 50
    after = probe_fewshot(X2, y, supports, [VAL], [TEST], [0, 0, 0], ProbeOptions())
    for a, b in zip(before, after, strict=True):
        assert a.C == b.C
        np.testing.assert_array_equal(a.scores, b.scores)


def test_torch_and_sklearn_paths_choose_the_same():
    X, y = _gaussian(D=12)
    rng = np.random.default_rng(4)
    supports = [_support(y, k, rng, pool=200) for k in (4, 8, 8)]
    vals, tests = [VAL, VAL[:60]], [TEST, TEST[:50]]
    runs = {s: probe_fewshot(X, y, supports, vals, tests, [0, 1, 0], ProbeOptions(solver=s))
            for s in ("torch", "sklearn")}
    for a, b in zip(runs["torch"], runs["sklearn"], strict=True):
        assert (a.C, a.rule) == (b.C, b.rule)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert runs["torch"][1].scores.shape == (50,) and runs["torch"][1].thr_rows.tolist() == VAL[:60].tolist()


# ----------------------------------------------------------------------------------------- stores and records


def test_cli_fewshot_16_prints_its_table_and_skips_recorded_runs(cohort, tmp_path):
    runner = CliRunner()
    args = ["probe", "--model", MODEL, "--task", TASK, "--manifest", str(cohort), "--shots", "16",
            "--out", str(tmp_path / "runs")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "fewshot 16 15" in output and "±" in output  # regime, k, runs
    assert "wrote 15 run records (0 already there)" in output  # 5 folds x 3 draws
    records = load_records(tmp_path / "runs")
    assert len(records) == 15 and {(r.regime, r.shots) for r in records} == {("fewshot", 16)}
    first = records[0]
    assert first.provenance["C_rule"] == "validation" and first.provenance["threshold"] == "validation"
    assert first.support_from == "train" and first.options["C_on"] == "validation"
    assert np.isfinite(first.metrics["mcc_val_thr"]) and "inner_cv" not in first.options
    splits = load_splits(cohort, TASK)
    for record in records:  # the record names the support set it trained on: the split file's draw
        assert record.provenance["support"] == support_digest(splits.fewshot(record.fold, 16)[record.draw])
    drawn = first.provenance["drawn_patients"]
    assert drawn["positive"] >= 16 and drawn["negative"] >= 16 and first.method == "probe"
    assert first.options["solver"] == "torch" and first.identity.startswith(MODEL)
    assert len(first.test_scores) == len(first.test_ids) > 0 and first.metrics["average_precision"] is not None
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "wrote 0 run records (15 already there)" in " ".join(again.output.split())


def test_full_data_records_and_determinism(cohort, tmp_path):
    reports = [run_probe(cohort, TASK, MODEL, full=True, out=tmp_path / name) for name in ("a", "b")]
    assert [r.written for r in reports] == [5, 5]
    first, second = (sorted(r.records, key=lambda r: r.fold) for r in reports)
    for a, b in zip(first, second, strict=True):
        assert a.key == b.key and a.test_scores == b.test_scores and a.metrics == b.metrics
        assert a.regime == "full" and a.provenance["threshold"] == "cross-fit" and a.method == "probe"
        assert a.metrics["patient_rule"] == "mean" and a.metrics["patient_n"] < a.metrics["n"]
        assert (a.trainable_params, a.total_params) == (16 + 1, 14_080 + 16 + 1)  # dinov2-s-tiny + probe
        assert "C_edge" in a.provenance and "drawn_patients" not in a.provenance
        assert np.isfinite(a.metrics["mcc_val_thr"]) and a.provenance["C"] in C_GRID
    keys = {r.key for r in first}
    sklearn = run_probe(cohort, TASK, MODEL, full=True, out=tmp_path / "a",
                        options=ProbeOptions(solver="sklearn"))
    assert sklearn.written == 5 and not keys & {r.key for r in sklearn.records}  # the solver defines a run


def test_skipped_levels_are_reported_not_fatal(cohort, tmp_path):
    """Some folds of this cohort hold fewer than 32 positive patients in their train part: k=32 is skipped
    there, run elsewhere."""
    report = run_probe(cohort, TASK, MODEL, shots=(2, 32), draws=1, out=tmp_path)
    assert report.skipped and all("k=32" in line and "fewer than k=32" in line for line in report.skipped)
    runs = [r.shots for r in report.records]
    assert runs.count(2) == 5 and runs.count(32) == 5 - len(report.skipped)


def test_per_center_draws_make_their_own_regime(cohort, tmp_path):
    report = run_probe(cohort, TASK, MODEL, shots=(2,), draws=2, per_center=True, out=tmp_path)
    assert {(r.regime, r.shots) for r in report.records} == {("fewshot-center", 2)}
    assert len(report.records) == 5 * 2 - 2 * len(report.skipped)


def test_more_draws_than_persisted_is_refused(cohort, tmp_path):
    with pytest.raises(SplitError, match="4 draws asked, the split file has 3"):
        run_probe(cohort, TASK, MODEL, shots=(2,), draws=4, out=tmp_path)


def test_images_missing_from_the_store_are_named(cohort, tmp_path):
    manifest = _copy(cohort, tmp_path / "grown")
    rows = _rows(manifest)
    extra = [{**row, "image_id": f"{row['image_id']}_copy"} for row in rows[:2]]
    write_manifest(rows + extra, manifest)
    save_splits(build_splits(manifest, TASK, draws=1), manifest)
    with pytest.raises(StoreError, match=r"2 of \d+ images not embedded.*featcache extract --model"):
        run_probe(manifest, TASK, MODEL, shots=(2,), out=tmp_path / "runs")


def test_images_skipped_at_extraction_are_named(synth_cohort, tmp_path):
    manifest = _cohort(synth_cohort, tmp_path / "small", patients=24, draws=1)
    broken = manifest.parent / _rows(manifest)[0]["path"]
    broken.write_bytes(b"not an image")
    extract_features(manifest, MODEL, on_error="skip")
    with pytest.raises(StoreError, match=r"1 of \d+ images of the SYN splits have no 'cls' features.*"
                                         r"featcache extract --model dinov2-s-tiny"):
        run_probe(manifest, TASK, MODEL, shots=(2,), out=tmp_path / "runs")


def test_a_store_from_another_manifest_is_refused(cohort, tmp_path):
    manifest = _copy(cohort, tmp_path / "moved")
    rows = _rows(manifest)
    moved = Path(rows[0]["path"]).with_name("moved.png")
    (manifest.parent / rows[0]["path"]).rename(manifest.parent / moved)
    rows[0]["path"] = moved.as_posix()
    write_manifest(rows, manifest)
    save_splits(build_splits(manifest, TASK, draws=1), manifest)
    with pytest.raises(StoreError, match="changed path or crop"):
        run_probe(manifest, TASK, MODEL, shots=(2,), out=tmp_path / "runs")


def test_no_features_for_the_model_is_refused(cohort, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["probe", "--model", "resnet18-tiny", "--task", TASK,
                                 "--manifest", str(cohort), "--out", str(tmp_path)])
    assert isinstance(result.exception, StoreError) and "featcache extract" in str(result.exception)


def test_cli_rejects_bad_choices(cohort, tmp_path):
    runner = CliRunner()
    base = ["probe", "--model", MODEL, "--task", TASK, "--manifest", str(cohort), "--out", str(tmp_path)]
    assert runner.invoke(app, [*base, "--select", "auc"]).exit_code == 2
    assert runner.invoke(app, [*base, "--full", "--shots", "2"]).exit_code == 2
    assert not list(tmp_path.glob("*.json"))


def test_probe_options_validate_sort_and_serialise():
    with pytest.raises(ValueError, match="select"):
        ProbeOptions(select="auc")
    options = ProbeOptions(grid=(1.0, 0.01, 0.1))
    assert options.grid == (0.01, 0.1, 1.0)
    defining = options.defining("cls")
    assert json.loads(json.dumps(defining)) == defining and defining["C_grid"] == [0.01, 0.1, 1.0]
    assert len(C_GRID) >= 10 and C_GRID[0] == pytest.approx(1e-4) and C_GRID[-1] == pytest.approx(1e2)


def test_a_store_with_several_groups_is_probed_by_selector(cohort, tmp_path):
    manifest = _copy(cohort, tmp_path / "c")
    extract_features(manifest, MODEL, dtype="float32")  # beside the float16 group
    with pytest.raises(StoreError, match="several"):
        run_probe(manifest, TASK, MODEL, full=True, out=tmp_path / "runs")
    report = run_probe(manifest, TASK, MODEL, full=True, out=tmp_path / "runs", dtype="float32")
    assert report.written == 5 and all(r.provenance["weights"] == "tiny-random" for r in report.records)
    assert all(len(r.test_patients) == len(r.test_ids) for r in report.records)


def test_cli_warns_of_c_at_a_grid_edge_and_refuses_bad_grids(cohort, tmp_path):
    runner = CliRunner()
    base = ["probe", "--model", MODEL, "--task", TASK, "--manifest", str(cohort), "--full", "--out", str(tmp_path)]
    result = runner.invoke(app, [*base, "--c-grid", "1e-6,1e-5", "--no-refit"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning full data: C at the grid's" in text and "widen the grid (--c-grid)" in text
    records = load_records(tmp_path)
    assert len(records) == 5 and all(r.provenance["C_edge"] in ("lower", "upper") for r in records)
    assert all(r.options["refit"] == "none" and r.provenance["threshold"] == "validation" for r in records)
    assert all(r.options["C_grid"] == [1e-6, 1e-5] for r in records)
    for bad in ("0,1", "a,b", ""):
        assert runner.invoke(app, [*base, "--c-grid", bad]).exit_code == 2
    assert len(load_records(tmp_path)) == 5
