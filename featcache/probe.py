"""Linear probes on cached features: full-data folds and few-shot grids, each level in one batched solve.

Protocol defaults (each is recorded in the run records' options or provenance):

- Features are standardised per probe on its own training rows only; class weights are balanced
  (``n / (2 n_c)`` on those rows), which makes 0.5 the class-balanced decision threshold.
- C comes from ``C_GRID``, 13 log-spaced values 1e-4 ... 1e2, chosen by ``select``: MCC at 0.5 or average
  precision on held-out scores. MCC at 0.5 is a step function of C, so several C often tie: values within
  ``TIE`` of the best are ranked by the class-balanced log-loss of the same held-out scores (smooth: a tiny
  score change moves it by a tiny amount, where a tie list ordered by C alone hinges on which C happen to
  tie), and only then does the smaller C win. A chosen C at
  either end of the grid is flagged (``C_edge`` in provenance, a warning in the report): the optimum may lie
  beyond it.
- Full data: every C is fitted on the training part and scored on the validation part. With ``refit`` (the
  default) the chosen C is refitted on train + validation and scored on test; its MCC threshold
  (``mcc_val_thr``) comes from the same procedure, not from the train-only model: out-of-fold scores of a
  ``INNER_FOLDS``-fold patient-grouped cross-fit on train + validation at the chosen C
  (``metrics.choose_threshold``). Without ``refit`` the train-only model is tested and its own validation
  scores give the threshold. The rule is ``options["threshold"]``.
- Few-shot: the support set (drawn from the fold's train part, `featcache.splits`) is the only training data;
  every C is fitted on it and scored on the fold's whole validation part, the same part every draw of the fold
  and stage 2 validate on; C is chosen there (same metric and tie rule as full data) and the support-only model
  at that C is tested, its own validation scores setting the MCC threshold. Not inner cross-validation on the
  support set: at k <= 8 an inner fold holds one or two images per class, so its choice is noise, and even at
  k = 32 the support set is smaller than a typical validation part, which is also what early stopping, the
  head LR and the threshold of the fine-tuned runs use. No refit on support + validation: the validation
  patients would become training data, which the few-shot rule (subsample the training data) excludes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from featcache.datasets import get_task
from featcache.device import resolve_device
from featcache.errors import FeatcacheError, SplitError, StoreError
from featcache.manifest import Manifest, load_manifest
from featcache.metrics import binary_metrics, evaluate
from featcache.records import PROBE_METHOD, RunRecord, drawn_patients, read_record, record_path, run_key, write_record
from featcache.solver import LogisticFit, fit_indexed, fit_sklearn
from featcache.splits import SHOTS, Splits, load_splits, support_digest
from featcache.store import default_store, find_feature_group, load_features

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))
INNER_FOLDS = 4
SELECT = ("mcc", "average_precision")
SELECT_ALIASES = {"pr_auc": "average_precision", "pr-auc": "average_precision", "ap": "average_precision"}  # the
# benchmark's name for average precision is PR-AUC
SOLVERS = ("torch", "sklearn")
TIE = 1e-9  # metric values this close are a tie (exact ties of MCC at 0.5 are the common case)
THRESHOLD_RULES = {
    True: f"cross-fit: {INNER_FOLDS}-fold patient-grouped out-of-fold scores on train+val at the chosen C",
    False: "validation scores of the tested (train-only) model",
}
FEWSHOT_THRESHOLD = "validation scores of the tested (support-only) model"
TIE_BREAK = f"metric within {TIE:g} of the best, then lowest class-balanced validation log-loss, then smaller C"

Progress = Callable[[str, int, int], None]  # (level label, levels done, levels in all)


@dataclass(frozen=True)
class ProbeOptions:
    """How probes are fitted; ``select`` and ``solver`` define a run (they enter its key), ``device`` not;
    ``refit`` applies to full-data runs only."""

    select: str = "mcc"
    solver: str = "torch"
    grid: tuple[float, ...] = C_GRID
    refit: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        grid = tuple(sorted({float(c) for c in self.grid}))
        if not grid or grid[0] <= 0 or not all(np.isfinite(grid)):
            raise ValueError(f"the C grid needs positive finite values, got {list(self.grid)}")
        object.__setattr__(self, "grid", grid)

    def defining(self, view: str, regime: str = "full") -> dict:
        """The options a run record carries and its key hashes. Few-shot runs say that C and the threshold come
        from the validation part; full-data options are those of earlier versions, word for word, so their keys
        change only where the split file does (the last two entries described the old few-shot rule)."""
        common = {"head": "l2-logreg", "view": view, "solver": self.solver, "select": self.select,
                  "C_grid": [float(f"{c:.6g}") for c in self.grid], "tie_break": TIE_BREAK,
                  "standardize": "train-rows", "class_weight": "balanced"}
        if regime != "full":
            return common | {"C_on": "validation", "refit": "none", "threshold": FEWSHOT_THRESHOLD}
        return common | {"refit": "train+val" if self.refit else "none", "threshold": THRESHOLD_RULES[self.refit],
                         "fixed_C": 1.0, "inner_cv": f"{INNER_FOLDS}-fold when >= 8 patients per class"}



class Part(NamedTuple):
    """One full-data fold as row indices into the feature matrix."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class Fitted:
    """One probe's outcome: positive-class probabilities on its test rows, the C it used and why, and the
    held-out rows (``thr_rows``) and scores the MCC threshold is chosen on (full data only)."""

    scores: np.ndarray
    C: float
    rule: str  # "validation" (records of earlier versions: "inner-cv" or "fixed")
    converged: bool
    edge: str | None = None  # "lower" or "upper" when a selected C sits at that end of the grid
    thr_rows: np.ndarray | None = None
    thr_scores: np.ndarray | None = None


# ------------------------------------------------------------------------------------------ array core


def _fit(X: np.ndarray, y: np.ndarray, rows: Sequence[np.ndarray], Cs: np.ndarray, options: ProbeOptions
         ) -> LogisticFit:
    """One batched fit of many problems (their training rows) over a grid (c,) or per-problem Cs (P, c)."""
    index = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    mask = np.zeros(index.shape, dtype=bool)
    for i, r in enumerate(rows):
        index[i, : len(r)], mask[i, : len(r)] = r, True
    if options.solver == "sklearn":
        return fit_sklearn(X, y, index, Cs, mask=mask)
    return fit_indexed(X, y, index, Cs, mask=mask, device=resolve_device(options.device))


def _proba(fit: LogisticFit, X: np.ndarray) -> np.ndarray:
    """Probabilities (P, c, m) of the rows X (m, D) under every fit."""
    return fit.predict_proba(torch.from_numpy(X).to(fit.coef.device)).cpu().numpy()


def choose_c(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], metric: str) -> np.ndarray:
    """Per problem, the position of the best row of its scores (c, m), one row per C in ascending order.

    Rows are scored by ``metric`` (MCC at 0.5 or average precision, as `metrics.binary_metrics`); rows within
    ``TIE`` of the best go to the lowest class-balanced log-loss, equal ones (relative 1e-12) to the smaller
    C; an undefined value never wins.
    """
    choice = np.zeros(len(scores), dtype=np.int64)
    for i, (s, y) in enumerate(zip(scores, labels, strict=True)):
        values = _row_values(y, s, metric)
        values = np.where(np.isfinite(values), values, -np.inf)
        tied = np.flatnonzero(values >= values.max() - TIE)
        loss = balanced_log_loss(y, s[tied])
        choice[i] = tied[int(np.flatnonzero(loss <= loss.min() * (1 + 1e-12))[0])]
    return choice


def balanced_log_loss(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Mean log-loss of each row of ``s`` (r, m), each class weighing half (the probes' class weights)."""
    p = np.clip(s, 1e-15, 1 - 1e-15)
    loss = -np.where(y == 1, np.log(p), np.log1p(-p))
    return np.mean([loss[:, y == c].mean(axis=1) for c in (0, 1) if (y == c).any()], axis=0)


def grid_edge(C: float, grid: Sequence[float]) -> str | None:
    """"lower" or "upper" when a selected C is the grid's first or last value (with more than one)."""
    if len(grid) < 2:
        return None
    return "lower" if C == grid[0] else "upper" if C == grid[-1] else None


def _row_values(y: np.ndarray, s: np.ndarray, metric: str) -> np.ndarray:
    if metric == "mcc":  # MCC at 0.5 sees only the predictions: score each distinct pattern once
        patterns, inverse = np.unique(s >= 0.5, axis=0, return_inverse=True)
        values = np.array([binary_metrics(y, p.astype(np.float64))["mcc"] for p in patterns])
        return values[inverse.ravel()]
    return np.array([binary_metrics(y, row)[metric] for row in s], dtype=np.float64)


def probe_full(X: np.ndarray, y: np.ndarray, parts: Sequence[Part], options: ProbeOptions,
               groups: np.ndarray | None = None) -> list[Fitted]:
    """Full-data probes of several folds: C on validation, then (``options.refit``) a refit on train +
    validation with its threshold from a cross-fit of train + validation, or the train-only model with its
    threshold from validation. ``groups`` (patient per row; default one per row) keep cross-fit folds
    patient-grouped."""
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    grid = np.asarray(options.grid)
    fit = _fit(X, y, [p.train for p in parts], grid, options)
    val = [_proba(fit[i : i + 1], X[p.val])[0] for i, p in enumerate(parts)]
    choice = choose_c(val, [y[p.val] for p in parts], options.select)
    C = grid[choice]
    edges = [grid_edge(c, options.grid) for c in C]
    if not options.refit:
        return [
            Fitted(_proba(fit[i : i + 1], X[p.test])[0, choice[i]], float(C[i]), "validation",
                   bool(fit.converged[i, choice[i]]), edges[i], p.val, val[i][choice[i]])
            for i, p in enumerate(parts)
        ]
    both = [np.concatenate([p.train, p.val]) for p in parts]
    refit = _fit(X, y, both, C[:, None], options)
    held, oof = _cross_fit(X, y, groups, both, C, options)
    return [
        Fitted(_proba(refit[i : i + 1], X[p.test])[0, 0], float(C[i]), "validation",
               bool(refit.converged[i].all()), edges[i], held[i], oof[i])
        for i, p in enumerate(parts)
    ]


def _cross_fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray, rows: Sequence[np.ndarray], C: np.ndarray,
               options: ProbeOptions) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Out-of-fold scores of each row set at its C: ``INNER_FOLDS`` patient-grouped folds, one batch."""
    train, held, owner = [], [], []
    for j, r in enumerate(rows):
        fold = inner_folds(y[r], groups[r])
        for q in np.unique(fold):
            train.append(r[fold != q])
            held.append(r[fold == q])
            owner.append(j)
    fit = _fit(X, y, train, C[owner][:, None], options)
    scores = [_proba(fit[i : i + 1], X[h])[0, 0] for i, h in enumerate(held)]
    owners = np.asarray(owner)
    return ([np.concatenate([held[i] for i in np.flatnonzero(owners == j)]) for j in range(len(rows))],
            [np.concatenate([scores[i] for i in np.flatnonzero(owners == j)]) for j in range(len(rows))])


def inner_folds(y: np.ndarray, groups: np.ndarray, n_folds: int = INNER_FOLDS) -> np.ndarray:
    """Inner fold of each support image: per class, its patients in sorted order dealt round-robin.

    Stratified and patient-grouped by construction, and deterministic: the support sets are random already.
    """
    fold = np.zeros(len(y), dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero(y == label)
        _, patient = np.unique(groups[members], return_inverse=True)
        fold[members] = patient % n_folds
    return fold


def probe_fewshot(X: np.ndarray, y: np.ndarray, supports: Sequence[np.ndarray], vals: Sequence[np.ndarray],
                  tests: Sequence[np.ndarray], fold_of: Sequence[int], options: ProbeOptions) -> list[Fitted]:
    """Few-shot probes: support set ``supports[i]`` is fitted at every C of the grid (all in one batch), C is
    chosen on its fold's validation rows ``vals[fold_of[i]]`` and the support-only model at that C is scored on
    ``tests[fold_of[i]]``; its validation scores are kept for the MCC threshold."""
    grid = np.asarray(options.grid)
    fit = _fit(X, y, supports, grid, options)
    fold_index = np.asarray(fold_of)
    val_scores: list[np.ndarray] = [np.empty(0)] * len(supports)
    test_scores: list[np.ndarray] = [np.empty(0)] * len(supports)
    for f, (val, test) in enumerate(zip(vals, tests, strict=True)):
        members = np.flatnonzero(fold_index == f)
        if members.size:
            of_fold = fit[torch.from_numpy(members)]
            for i, v, t in zip(members, _proba(of_fold, X[val]), _proba(of_fold, X[test]), strict=True):
                val_scores[i], test_scores[i] = v, t
    choice = choose_c(val_scores, [y[vals[f]] for f in fold_of], options.select)
    return [
        Fitted(test_scores[i][c], float(grid[c]), "validation", bool(fit.converged[i, c]),
               grid_edge(float(grid[c]), options.grid), vals[fold_of[i]], val_scores[i][c])
        for i, c in enumerate(choice)
    ]


# ------------------------------------------------------------------------------------------ tasks and records


@cache
def backbone_parameters(model: str) -> int | None:
    """Parameters of the frozen backbone as built, counted on the meta device (no memory, no weights read);
    None where it cannot be built here (an id whose config is not on this machine)."""
    from featcache.backbones import build_backbone, count_parameters

    try:
        with torch.device("meta"):
            return count_parameters(build_backbone(model, random_init=True))[1]
    except (FeatcacheError, OSError, RuntimeError, ValueError, ImportError):  # unknown is recorded as unknown
        return None


@dataclass(frozen=True)
class TaskData:
    """A task's labelled images, in manifest order, with their cached features and patients."""

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    backbone: str
    identity: str  # the feature group, ``<backbone>/<spec key>``
    weights: str  # the features' weights identity (revision, checksum, or random-init)
    position: dict[str, int] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.position.update((i, r) for r, i in enumerate(self.ids.tolist()))

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each image id."""
        return np.fromiter((self.position[i] for i in ids), dtype=np.int64, count=len(ids))


def load_task_data(manifest: Manifest, task: str, splits: Splits, store: str | Path, model: str,
                   view: str = "cls", **selectors) -> TaskData:
    """Features of every image the task's splits use; refuses a store whose rows do not match the manifest.

    ``store.load_features`` checks each row's path and crop against the manifest (a store built from another
    manifest is refused) and that every manifest image was embedded; images skipped at extraction are caught
    here, by name, before any probe runs. ``selectors`` (weights, random_init, dtype, precision) pick among
    several groups of one backbone, as in ``store.find_feature_group``.
    """
    ids, y = manifest.labels(get_task(task))
    group = find_feature_group(store, model, view, image_ids=manifest.ids, **selectors)
    found, X = load_features(store, model, manifest, view, group=group)
    position = {i: r for r, i in enumerate(found.tolist())}
    needed = sorted({i for fold in splits.folds for i in fold.train + fold.val + fold.test})
    missing = [i for i in needed if i not in position]
    if missing:
        raise StoreError(
            f"{group.where}: {len(missing)} of {len(needed)} images of the {task} splits have no {view!r} "
            f"features (e.g. {missing[:3]}, skipped at extraction); fix them and run `featcache extract "
            f"--model {model} --manifest {manifest.path} --store {store} --retry-skipped`"
        )
    return TaskData(np.asarray(ids), X[[position[i] for i in ids]], np.asarray(y, dtype=np.int64),
                    np.asarray(manifest.patients(ids)), str(group.spec["model"]), group.name,
                    str(group.spec["weights"]))


@dataclass
class ProbeReport:
    """Every run of a request (new and already recorded), the levels that could not run, with why, and
    warnings about the new runs (a chosen C at an edge of the grid)."""

    records: list[RunRecord] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    skipped: list[str] = field(default_factory=list)
    planned: list[tuple[str, int | None, str]] = field(default_factory=list)  # (regime, k, run key) asked for
    warnings: list[str] = field(default_factory=list)

    def warn_edges(self, level: str, fitted: Sequence[Fitted], grid: Sequence[float]) -> None:
        """One line per level and grid end where a selected C landed on it."""
        selected = len(fitted)
        for side, value in (("upper", grid[-1]), ("lower", grid[0])):
            hits = sum(f.edge == side for f in fitted)
            if hits:
                self.warnings.append(
                    f"{level}: C at the grid's {side} edge ({value:g}) in {hits} of {selected} selected runs; "
                    f"the best C may lie beyond it: widen the grid (--c-grid)")


@dataclass(frozen=True)
class _Job:
    """What every run of one `run_probe` call shares, and its bookkeeping of recorded runs."""

    task: str
    manifest: Path
    splits: Splits
    digest: str
    data: TaskData
    options: ProbeOptions
    view: str
    store: Path
    out: Path
    report: ProbeReport
    plan_only: bool = False

    def pending(self, fold: str, regime: str, shots: int | None, draw: int | None) -> bool:
        """Whether a run still has to be fitted; a recorded one is read back into the report instead. Under
        ``plan_only`` every run's key is noted and nothing is fitted or read."""
        key = run_key(task=self.task, backbone=self.data.backbone, method=PROBE_METHOD, fold=fold,
                      seed=self.splits.seed, options=self.options.defining(self.view, regime), regime=regime,
                      shots=shots, draw=draw, splits_digest=self.digest, identity=self.data.identity)
        self.report.planned.append((regime, shots, key))
        if self.plan_only:
            return False
        path = record_path(self.out, key)
        if not path.is_file():
            return True
        self.report.records.append(read_record(path))
        self.report.existing += 1
        return False

    def keep(self, fold: str, regime: str, shots: int | None, draw: int | None, fitted: Fitted,
             test: np.ndarray, seconds: float, drawn: dict[str, int] | None = None,
             support: Sequence[str] | None = None) -> None:
        """Score one fitted probe, write its record and add it to the report."""
        y_test = self.data.y[test]
        held = fitted.thr_rows is not None
        scored = (self.data.y[fitted.thr_rows], fitted.thr_scores) if held else (None, None)
        dim = self.data.X.shape[1]
        backbone = backbone_parameters(self.data.backbone)
        record = RunRecord(
            task=self.task, backbone=self.data.backbone, method=PROBE_METHOD, fold=fold, seed=self.splits.seed,
            options=self.options.defining(self.view, regime), regime=regime, shots=shots, draw=draw,
            splits_digest=self.digest, identity=self.data.identity, test_ids=self.data.ids[test].tolist(),
            test_labels=y_test.tolist(), test_scores=fitted.scores.tolist(),
            test_patients=self.data.groups[test].tolist(),
            metrics=evaluate(y_test, fitted.scores, *scored, patients=self.data.groups[test]),
            wall_time_s=seconds, trainable_params=dim + 1,
            total_params=None if backbone is None else backbone + dim + 1,
            support_from=None if regime == "full" else self.splits.support_from,
            provenance={"store": str(self.store), "weights": self.data.weights, "C": fitted.C,
                        "C_rule": fitted.rule, "C_edge": fitted.edge,
                        "threshold": "cross-fit" if regime == "full" and self.options.refit else "validation",
                        "converged": fitted.converged, "wall_time": "share of the level's batched solve",
                        "params": "trainable: the probe's coefficients and intercept; total: the frozen "
                                  "backbone as built plus the probe" + ("" if backbone is not None else
                                  " (backbone size unknown: total left empty)"),
                        **({"drawn_patients": drawn} if drawn is not None else {}),
                        **({"support": support_digest(support)} if support is not None else {})},
        )
        write_record(record, self.out)
        self.report.records.append(record)
        self.report.written += 1


def _run_full(job: _Job) -> None:
    todo = [(fold.name, Part(*(job.data.rows(getattr(fold, p)) for p in ("train", "val", "test"))))
            for fold in job.splits.folds if job.pending(fold.name, "full", None, None)]
    if not todo:
        return
    start = time.perf_counter()
    fitted = probe_full(job.data.X, job.data.y, [part for _, part in todo], job.options, job.data.groups)
    share = (time.perf_counter() - start) / len(todo)
    job.report.warn_edges("full data", fitted, job.options.grid)
    for (name, part), fit in zip(todo, fitted, strict=True):
        job.keep(name, "full", None, None, fit, part.test, share)


def _draws(job: _Job, fold, k: int, draws: int | None, per_center: bool) -> list[list[str]]:
    sets = job.splits.fewshot_per_center(fold, k) if per_center else job.splits.fewshot(fold, k)
    if draws is not None and draws > len(sets):
        raise SplitError(f"task {job.task} {fold.name}: {draws} draws asked, the split file has {len(sets)}; "
                         f"recompute with `featcache splits --manifest {job.manifest} --task {job.task} "
                         f"--draws {draws}`")
    return sets[:draws]


def _run_fewshot(job: _Job, k: int, draws: int | None, per_center: bool) -> None:
    """Every draw of level k in every fold; the draws of a fold share its validation part (C, threshold)."""
    regime, kind = ("fewshot-center", "fewshot_center") if per_center else ("fewshot", "fewshot")
    todo, vals, tests, drawn = [], [], [], {}
    for fold in job.splits.folds:
        if k in fold.skipped[kind]:
            job.report.skipped.append(f"{fold.name} k={k}: {fold.skipped[kind][k]}")
            continue
        vals.append(job.data.rows(fold.val))
        tests.append(job.data.rows(fold.test))
        sets = _draws(job, fold, k, draws, per_center)
        pool = job.data.rows([i for ids in sets for i in ids])
        drawn[fold.name] = drawn_patients(job.data.groups[pool], job.data.y[pool])
        todo += [(fold.name, draw, ids, len(tests) - 1)
                 for draw, ids in enumerate(sets) if job.pending(fold.name, regime, k, draw)]
    if not todo:
        return
    start = time.perf_counter()
    fitted = probe_fewshot(job.data.X, job.data.y, [job.data.rows(t[2]) for t in todo], vals, tests,
                           [t[3] for t in todo], job.options)
    share = (time.perf_counter() - start) / len(todo)
    job.report.warn_edges(f"{regime} k={k}", fitted, job.options.grid)
    for (name, draw, ids, test), fit in zip(todo, fitted, strict=True):
        job.keep(name, regime, k, draw, fit, tests[test], share, drawn=drawn[name], support=ids)


def run_probe(manifest: str | Path, task: str, model: str, *, store: str | Path | None = None,
              full: bool = False, shots: Sequence[int] = SHOTS, draws: int | None = None,
              per_center: bool = False, view: str = "cls", options: ProbeOptions | None = None,
              out: str | Path = "runs", progress: Progress | None = None, plan_only: bool = False,
              **selectors) -> ProbeReport:
    """Probe ``model``'s cached features on ``task``: every fold (``full``) or every fold x draw of each shot
    level, one run record each in ``out``; runs whose key is already recorded are read back, not refitted.

    ``store`` defaults to ``features.zarr`` beside the manifest, ``draws`` to all persisted draws;
    ``per_center`` takes the draws with k per class per center; ``selectors`` (weights, random_init, dtype,
    precision) choose the feature group where a store holds several. ``plan_only`` lists the run keys of the
    request in ``report.planned`` without fitting anything. The module docstring states the protocol.
    """
    manifest_obj = load_manifest(manifest)
    splits = load_splits(manifest, task)
    if full:
        splits.require_validation()
    store = Path(store) if store is not None else default_store(manifest_obj.path)
    data = load_task_data(manifest_obj, task, splits, store, model, view, **selectors)
    job = _Job(task, Path(manifest), splits, splits.digest(), data, options or ProbeOptions(), view, store,
               Path(out), ProbeReport(), plan_only)
    levels: list[int | None] = [None] if full else [*sorted(set(shots))]
    for done, k in enumerate(levels):
        if progress is not None:
            progress("full data" if k is None else f"k={k}", done, len(levels))
        if k is None:
            _run_full(job)
        else:
            _run_fewshot(job, k, draws, per_center)
    if progress is not None:
        progress("done", len(levels), len(levels))
    return job.report
