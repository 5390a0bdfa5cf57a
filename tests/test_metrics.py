from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from featcache.metrics import (
    METRICS,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    evaluate,
    patient_scores,
    summarize,
)


def _sklearn(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (s >= threshold).astype(int)
    return {
        "mcc": skm.matthews_corrcoef(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred, zero_division=0.0),
        "sensitivity": skm.recall_score(y, pred, pos_label=1),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "roc_auc": skm.roc_auc_score(y, s),
        "average_precision": skm.average_precision_score(y, s),
    }


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes present
    decimals = int(rng.integers(1, 4))  # coarse rounding makes many tied scores
    s = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.25), 0, 1), decimals)
    return y, s


@pytest.mark.parametrize("seed", range(15))
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.71])
def test_binary_metrics_equal_sklearn(seed, threshold):
    y, s = _random_case(seed)
    ours = binary_metrics(y, s, threshold=threshold)
    for name, expected in _sklearn(y, s, threshold).items():
        assert ours[name] == pytest.approx(expected, abs=1e-12), name
    assert ours["threshold"] == threshold and ours["n"] == y.size and ours["n_pos"] == y.sum()
    assert ours["reason"] is None


def test_ties_at_threshold_count_as_positive():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.2, 0.9])
    assert binary_metrics(y, s)["sensitivity"] == 1.0
    assert binary_metrics(y, s)["specificity"] == 0.5


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_aucs_with_reason_and_no_warnings(label):
    y = np.full(6, label)
    s = np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = binary_metrics(y, s)
        ev = evaluate(y, s, y_val=np.array([0, 1, 1]), s_val=np.array([0.2, 0.8, 0.4]))
    assert math.isnan(ours["roc_auc"]) and math.isnan(ours["average_precision"]) and math.isnan(ev["average_precision"])
    assert "only " + ("negatives" if label == 0 else "positives") in ours["reason"]
    undefined = "sensitivity" if label == 0 else "specificity"
    assert math.isnan(ours[undefined])
    pred = (s >= 0.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on these inputs; its values remain the reference
        assert ours["mcc"] == skm.matthews_corrcoef(y, pred) == 0.0
        assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0.0))


def _best_mcc_brute_force(y: np.ndarray, s: np.ndarray) -> float:
    grid = np.r_[np.unique(s), np.inf]  # every partition of the scores
    return max(skm.matthews_corrcoef(y, (s >= t).astype(int)) for t in grid)


@pytest.mark.parametrize("seed", range(15))
def test_chosen_threshold_maximises_val_mcc(seed):
    y, s = _random_case(seed)
    thr = choose_threshold(y, s)
    assert skm.matthews_corrcoef(y, (s >= thr).astype(int)) == pytest.approx(_best_mcc_brute_force(y, s))


def test_threshold_ties_go_to_the_one_closest_to_half():
    y = np.array([0, 0, 1, 1])
    assert choose_threshold(y, np.array([0.1, 0.2, 0.8, 0.9])) == 0.5  # 0.5 is inside the optimal interval
    assert choose_threshold(y, np.array([0.6, 0.65, 0.8, 0.9])) == 0.8  # the optimum needs t in (0.65, 0.8]
    assert choose_threshold(y, np.array([0.01, 0.02, 0.1, 0.2])) == 0.1


def test_single_class_validation_uses_half():
    assert choose_threshold(np.zeros(5, int), np.linspace(0, 1, 5)) == 0.5


def test_evaluate_reports_mcc_at_validation_threshold():
    y_val, s_val = _random_case(3)
    y, s = _random_case(4)
    out = evaluate(y, s, y_val, s_val)
    thr = choose_threshold(y_val, s_val)
    assert out["val_threshold"] == thr
    assert out["mcc_val_thr"] == pytest.approx(skm.matthews_corrcoef(y, (s >= thr).astype(int)), abs=1e-12)
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(y, (s >= 0.5).astype(int)), abs=1e-12)
    no_val = evaluate(y, s)
    assert math.isnan(no_val["mcc_val_thr"]) and math.isnan(no_val["val_threshold"])


def test_summarize_skips_undefined_values():
    values = [0.2, float("nan"), 0.4, 0.9, None]
    mean, std, n = summarize(values)
    assert n == 3
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert summarize([float("nan")]).n == 0 and math.isnan(summarize([]).mean)


def _cohort(seed: int = 0, patients: int = 60):
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, patients)
    groups = np.repeat(np.arange(patients), per_patient)
    y = np.repeat(rng.integers(0, 2, patients), per_patient)
    s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2)
    return y, s, groups


@pytest.mark.parametrize("metric", METRICS)
def test_bootstrap_contains_point_estimate_and_is_deterministic(metric):
    y, s, groups = _cohort()
    point = binary_metrics(y, s)[metric]
    ci = bootstrap_ci(y, s, groups, metric, n_boot=400, seed=1)
    assert ci.low <= point <= ci.high
    assert ci.n_valid == 400
    assert bootstrap_ci(y, s, groups, metric, n_boot=400, seed=1) == ci
    assert bootstrap_ci(y, s, groups, metric, n_boot=400, seed=2) != ci


@pytest.mark.parametrize("metric", ["roc_auc", "average_precision", "mcc"])
def test_vectorised_bootstrap_equals_sklearn_on_each_resample(metric):
    """The weighted (vectorised) scores equal sklearn's on the explicitly resampled data."""
    y, s, groups = _cohort(seed=5)
    reference = {
        "roc_auc": skm.roc_auc_score,
        "average_precision": skm.average_precision_score,
        "mcc": lambda yy, ss: skm.matthews_corrcoef(yy, (ss >= 0.5).astype(int)),
    }[metric]
    fast = bootstrap_ci(y, s, groups, metric, n_boot=60, seed=3)
    slow = bootstrap_ci(y, s, groups, reference, n_boot=60, seed=3)
    assert fast.n_valid == slow.n_valid == 60
    assert fast.low == pytest.approx(slow.low, abs=1e-12) and fast.high == pytest.approx(slow.high, abs=1e-12)


def test_bootstrap_resamples_whole_patients():
    """One patient with many identical images: resampling images would shrink the interval to near zero."""
    y = np.r_[np.zeros(50, int), np.ones(50, int), [0, 1]]
    s = np.r_[np.full(50, 0.9), np.full(50, 0.1), [0.2, 0.8]]
    groups = np.r_[np.zeros(50, int), np.ones(50, int), [2, 3]]
    ci = bootstrap_ci(y, s, groups, "mcc", n_boot=300, seed=0)
    assert ci.high - ci.low > 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0/1"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci([0, 1], [0.1, 0.2], [0, 1], "accuracy")


@pytest.mark.parametrize("seed", range(10))
def test_trapezoid_pr_area_equals_sklearn_and_differs_from_ap(seed):
    y, s = _random_case(seed)
    precision, recall, _ = skm.precision_recall_curve(y, s)
    ours = binary_metrics(y, s)
    assert ours["pr_auc_trapezoid"] == pytest.approx(skm.auc(recall, precision), abs=1e-12)
    assert ours["average_precision"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert math.isnan(binary_metrics(np.zeros(4, int), [0.1, 0.2, 0.3, 0.4])["pr_auc_trapezoid"])


def test_trapezoid_and_ap_differ_on_coarse_scores():
    y = np.array([1, 0, 1, 0, 0, 1])
    s = np.array([0.9, 0.9, 0.5, 0.5, 0.1, 0.1])
    out = binary_metrics(y, s)
    assert out["average_precision"] == pytest.approx(0.5)  # three steps of recall 1/3 at precision 1/2
    assert out["pr_auc_trapezoid"] == pytest.approx(0.5 + 1 / 12)  # (0, 1) to (1/3, 1/2) adds a triangle


def test_patient_level_metrics_differ_from_image_level():
    """Five radiographs of one misranked patient weigh five times at image level, once at patient level."""
    y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.2, 0.3, 0.1, 0.2, 0.3, 0.9, 0.6, 0.1, 0.4])
    patients = np.array(["a"] * 5 + ["b", "c", "d", "e"])
    out = evaluate(y, s, patients=patients)
    pid, y_p, s_p = (np.array(["a", "b", "c", "d", "e"]), np.array([1, 1, 0, 0, 0]),
                     np.array([0.22, 0.9, 0.6, 0.1, 0.4]))
    assert out["patient_rule"] == "mean" and out["patient_n"] == 5 and out["patient_n_pos"] == 2
    for name, value in _sklearn(y_p, s_p, 0.5).items():
        assert out[f"patient_{name}"] == pytest.approx(value, abs=1e-12), name
    assert out["patient_average_precision"] != pytest.approx(out["average_precision"])
    assert out["patient_mcc"] != pytest.approx(out["mcc"])
    ids, labels, scores = patient_scores(y, s, patients)
    assert ids.tolist() == pid.tolist() and labels.tolist() == y_p.tolist()
    np.testing.assert_allclose(scores, s_p)
    top = evaluate(y, s, patients=patients, patient_rule="max")
    assert top["patient_rule"] == "max" and top["patient_roc_auc"] == pytest.approx(
        skm.roc_auc_score(y_p, [0.3, 0.9, 0.6, 0.1, 0.4]))


def test_patient_level_refuses_mixed_labels_and_uses_the_given_threshold():
    with pytest.raises(ValueError, match=r"\['a'\] have images with different labels"):
        evaluate([0, 1, 1], [0.1, 0.2, 0.9], patients=["a", "a", "b"])
    with pytest.raises(ValueError, match="unknown patient rule"):
        evaluate([0, 1], [0.1, 0.9], patients=["a", "b"], patient_rule="median")
    y, s = np.array([0, 0, 1, 1]), np.array([0.3, 0.5, 0.6, 0.9])
    out = evaluate(y, s, threshold=0.55, patients=["a", "b", "c", "d"])
    assert out["val_threshold"] == 0.55 and out["mcc_val_thr"] == 1.0 and out["patient_mcc_val_thr"] == 1.0
    assert out["mcc"] < 1.0
