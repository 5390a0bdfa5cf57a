"""Binary prognosis metrics, shared by both stages so a probe and a fine-tune are scored identically.

Predictions are positive when ``score >= threshold``. Every value equals scikit-learn's on the same inputs
(``matthews_corrcoef``, ``average_precision_score``, ``roc_auc_score``, ``balanced_accuracy_score``,
``f1_score``, ``recall_score``; ``auc(recall, precision)`` of ``precision_recall_curve`` for
``pr_auc_trapezoid``) except where scikit-learn substitutes an arbitrary number under a warning:

- the area under the precision-recall curve is reported as ``average_precision`` (AP: the sum of precision
  times recall increments, no interpolation), the better estimator; ``pr_auc_trapezoid`` is the trapezoid
  area some papers call PR-AUC (it interpolates linearly between curve points and is optimistic), kept for
  comparison only;
- a single-class test set gives NaN for the AUCs and AP and a ``reason`` saying why;
- ``sensitivity`` is NaN without positives and ``specificity`` NaN without negatives;
- MCC is 0 when a confusion-matrix margin is empty and F1 is 0 when it has no positive term (scikit-learn's
  conventions); balanced accuracy averages the recalls that are defined (scikit-learn's rule).

All counts are computed from (optionally weighted) confusion tables in NumPy, so the patient bootstrap can
score a thousand resamples in a few array operations and no sklearn warning spam reaches the user.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

THRESHOLD_METRICS = ("mcc", "balanced_accuracy", "f1", "sensitivity", "specificity")
RANKING_METRICS = ("roc_auc", "average_precision")
METRICS = THRESHOLD_METRICS + RANKING_METRICS
PATIENT_RULES = ("mean", "max")

MetricFn = Callable[[np.ndarray, np.ndarray], float]


class Summary(NamedTuple):
    """Mean and sample standard deviation (ddof=1) of the finite values, and how many there were."""

    mean: float
    std: float
    n: int


class Interval(NamedTuple):
    """A percentile bootstrap interval; ``n_valid`` counts resamples where the metric was defined."""

    low: float
    high: float
    n_valid: int


def _check(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D and of equal length")
    if y.size == 0:
        raise ValueError("no samples to score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(y)[:5].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y.astype(np.int8), s


def _div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """``num / den`` with ``empty`` where the denominator is zero (no divide warnings)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from (arrays of) confusion counts."""
    tp, fp, tn, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, tn, fn))
    sens = _div(tp, tp + fn, np.nan)
    spec = _div(tn, tn + fp, np.nan)
    both = np.stack([sens, spec])
    n_defined = np.isfinite(both).sum(axis=0)
    balanced = _div(np.nansum(both, axis=0), n_defined, np.nan)
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "mcc": _div(tp * tn - fp * fn, mcc_den, 0.0),
        "balanced_accuracy": balanced,
        "f1": _div(2 * tp, 2 * tp + fp + fn, 0.0),
        "sensitivity": sens,
        "specificity": spec,
    }


def _weighted_counts(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Confusion counts for each row of sample weights ``w`` (B, n)."""
    pos, yp = y.astype(np.float64), pred.astype(np.float64)
    tp = w @ (pos * yp)
    fp = w @ ((1 - pos) * yp)
    fn = w @ (pos * (1 - yp))
    tn = w @ ((1 - pos) * (1 - yp))
    return tp, fp, tn, fn


def _ranking(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """ROC-AUC and average precision for each row of sample weights ``w`` (B, n).

    Same curve as scikit-learn: one point per distinct score (ties move together), ROC area by the trapezoid
    rule from (0, 0), AP as the sum of precision times recall increments.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted, w_sorted = s[order], y[order].astype(np.float64), w[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(w_sorted * y_sorted, axis=1)[:, ends]
    fps = np.cumsum(w_sorted * (1 - y_sorted), axis=1)[:, ends]
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    defined = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
    zeros = np.zeros((w.shape[0], 1))
    tpr = np.hstack([zeros, _div(tps, n_pos, 0.0)])
    fpr = np.hstack([zeros, _div(fps, n_neg, 0.0)])
    roc = (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(axis=1)
    precision = _div(tps, tps + fps, 1.0)  # only multiplies zero recall increments where undefined
    ap = (np.diff(tpr, axis=1) * precision).sum(axis=1)
    return {"roc_auc": np.where(defined, roc, np.nan), "average_precision": np.where(defined, ap, np.nan)}


def pr_auc_trapezoid(y_true, scores) -> float:
    """Trapezoid area under the precision-recall curve, scikit-learn's ``auc(recall, precision)``.

    The curve has one point per distinct score plus (recall 0, precision 1). Linear interpolation between
    points overstates precision (most where scores are coarse), so AP is the metric this toolkit reports;
    this is for comparison with papers that used the trapezoid.
    """
    y, s = _check(y_true, scores)
    if _single_class_reason(y):
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ends = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]
    tps = np.cumsum(y[order])[ends].astype(np.float64)
    fps = (ends + 1) - tps
    recall = np.r_[0.0, tps / tps[-1]]
    precision = np.r_[1.0, tps / (tps + fps)]
    return float((np.diff(recall) * (precision[1:] + precision[:-1]) / 2).sum())


def _single_class_reason(y: np.ndarray) -> str | None:
    n_pos = int(y.sum())
    if n_pos == 0:
        return f"single-class test set: only negatives (n={y.size}); AUCs and sensitivity undefined"
    if n_pos == y.size:
        return f"single-class test set: only positives (n={y.size}); AUCs and specificity undefined"
    return None


def binary_metrics(y_true, scores, threshold: float = 0.5) -> dict[str, float | int | str | None]:
    """All metrics of one test set at one threshold; a single-class set gives NaN AUCs and a ``reason``."""
    y, s = _check(y_true, scores)
    ones = np.ones((1, y.size))
    values = _from_counts(*_weighted_counts(y, s >= threshold, ones))
    values.update(_ranking(y, s, ones))
    out: dict[str, float | int | str | None] = {name: float(values[name][0]) for name in METRICS}
    out.update(pr_auc_trapezoid=pr_auc_trapezoid(y, s), threshold=float(threshold), n=int(y.size),
               n_pos=int(y.sum()), reason=_single_class_reason(y))
    return out


def choose_threshold(y_val, s_val, metric: str = "mcc") -> float:
    """The threshold maximising ``metric`` on the validation part.

    Candidates are the distinct validation scores plus 0.5 (every distinct partition is reachable); among
    equal best values the candidate closest to 0.5 wins (the lower one on an exact tie), so 0.5 itself is
    returned whenever it is optimal. A single-class validation part carries no threshold information: 0.5.
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"unknown threshold metric {metric!r}; choose from {', '.join(THRESHOLD_METRICS)}")
    y, s = _check(y_val, s_val)
    if y.min() == y.max():
        return 0.5
    candidates = np.unique(np.r_[s, 0.5])
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    values = _from_counts(tp, fp, neg.size - fp, pos.size - tp)[metric]
    best = np.nanmax(values)
    tied = np.flatnonzero(np.isclose(values, best, rtol=0.0, atol=1e-12))
    distance = np.abs(candidates[tied] - 0.5)
    return float(candidates[tied[np.argmin(distance)]])  # argmin takes the first, i.e. lower, on exact ties


def patient_scores(y, s, patients, rule: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (label, score) per patient, patients in sorted order: the mean (or max) of its images' scores.

    A patient's images must share one label (``manifest validate`` refuses conflicting labels).
    """
    if rule not in PATIENT_RULES:
        raise ValueError(f"unknown patient rule {rule!r}; choose from {', '.join(PATIENT_RULES)}")
    y, s = _check(y, s)
    patients = np.asarray(patients)
    if patients.shape != y.shape:
        raise ValueError(f"patients {patients.shape} must match labels {y.shape}")
    ids, codes = np.unique(patients, return_inverse=True)
    count = np.bincount(codes, minlength=ids.size)
    positives = np.bincount(codes, weights=y, minlength=ids.size)
    mixed = np.flatnonzero((positives > 0) & (positives < count))
    if mixed.size:
        raise ValueError(f"patients {ids[mixed][:3].tolist()} have images with different labels")
    if rule == "mean":
        score = np.bincount(codes, weights=s, minlength=ids.size) / count
    else:
        score = np.full(ids.size, -np.inf)
        np.maximum.at(score, codes, s)
    return ids, (positives > 0).astype(np.int8), score


def evaluate(y_test, s_test, y_val=None, s_val=None, *, threshold: float | None = None, patients=None,
             patient_rule: str = "mean") -> dict[str, float | int | str | None]:
    """Test metrics at 0.5, plus MCC at a threshold chosen on held-out scores of the tested model
    (``mcc_val_thr``, ``val_threshold``): chosen here from ``y_val``/``s_val``, or given as ``threshold``.

    Without either both are NaN: no threshold was chosen. With ``patients`` (one id per test image) every
    metric is also computed per patient as ``patient_<name>``, a patient's score being ``patient_rule``
    ("mean" or "max") of its images' scores, so a patient with five radiographs counts once; the rule is
    recorded as ``patient_rule``.
    """
    out = binary_metrics(y_test, s_test, threshold=0.5)
    if threshold is None and y_val is not None and s_val is not None:
        threshold = choose_threshold(y_val, s_val, metric="mcc")
    if threshold is None or not math.isfinite(threshold):
        threshold = float("nan")
        out.update(mcc_val_thr=float("nan"), val_threshold=float("nan"))
    else:
        out.update(mcc_val_thr=binary_metrics(y_test, s_test, threshold=threshold)["mcc"],
                   val_threshold=float(threshold))
    if patients is not None:
        _, y_p, s_p = patient_scores(y_test, s_test, patients, patient_rule)
        level = binary_metrics(y_p, s_p, threshold=0.5)
        level["mcc_val_thr"] = (binary_metrics(y_p, s_p, threshold=threshold)["mcc"]
                                if math.isfinite(threshold) else float("nan"))
        out.update({f"patient_{name}": value for name, value in level.items() if name != "threshold"})
        out["patient_rule"] = patient_rule
    return out


def summarize(values: Sequence[float] | np.ndarray) -> Summary:
    """Mean ± sample std over folds or draws; NaN entries (undefined metrics) are left out and not counted."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Summary(float("nan"), float("nan"), 0)
    std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return Summary(float(v.mean()), std, int(v.size))


def _metric_batch(y: np.ndarray, s: np.ndarray, w: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    if metric in RANKING_METRICS:
        return _ranking(y, s, w)[metric]
    return _from_counts(*_weighted_counts(y, s >= threshold, w))[metric]


def bootstrap_ci(
    y,
    s,
    groups,
    metric: str | MetricFn = "mcc",
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
    level: float = 0.95,
) -> Interval:
    """Percentile interval of ``metric`` over resamples of patients (``groups``) drawn with replacement.

    A resampled patient brings all its images, so images of one patient never count as independent evidence.
    Named metrics use integer sample weights (a patient drawn twice weighs 2) and are scored for many
    resamples at once; a callable ``metric(y, s)`` is evaluated per resample. Resamples where the metric is
    undefined (single-class) are dropped and the rest counted in ``n_valid``.
    """
    y, s = _check(y, s)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups {groups.shape} must match labels {y.shape}")
    if isinstance(metric, str) and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    _, codes = np.unique(groups, return_inverse=True)
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    group_counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    chunk = max(1, 4_000_000 // y.size)  # bounds the (resamples x images) weight matrix to ~32 MB
    values = []
    for start in range(0, n_boot, chunk):
        weights = group_counts[start : start + chunk, codes].astype(np.float64)
        if isinstance(metric, str):
            values.append(_metric_batch(y, s, weights, metric, threshold))
        else:
            for w in weights.astype(np.int64):
                idx = np.repeat(np.arange(y.size), w)
                values.append(np.array([metric(y[idx], s[idx])], dtype=np.float64))
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(float("nan"), float("nan"), 0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(v, [tail, 100 - tail])
    return Interval(float(low), float(high), int(v.size))
