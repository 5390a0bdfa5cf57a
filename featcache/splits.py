"""Patient-level splits and few-shot support sets, computed once and persisted next to the manifest.

Both stages read the same file, so a probe and a fine-tune on a task see the same folds, validation parts
and few-shot draws. Few-shot support sets are drawn from each fold's training part only (``SUPPORT_FROM``, the
benchmark's rule: it subsampled the training data), so every draw of a fold validates on the same, whole
validation part. A fold whose validation part holds fewer than ``MIN_VAL_PATIENTS`` patients of a class cannot
set a threshold: its few-shot levels are skipped with that reason, so neither stage trains on them.

A split is a pure function of (image ids, labels, patients, centers, options, seed):
inputs are sorted by image id first, and every random choice comes from a NumPy generator seeded from
(seed, stream, fold, k, draw), never from global state, so the same seed gives a byte-identical file and any
one draw can be reproduced on its own.

Layout: ``<manifest dir>/<manifest stem>.splits/<TASK>.json``; see :meth:`Splits.to_dict` for the fields.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache import datasets
from featcache.errors import ManifestError, SplitError
from featcache.fileio import atomic_write
from featcache.manifest import load_manifest
from featcache.tasks import splits_path

SHOTS = (2, 4, 8, 16, 32)
CENTER_SHOTS = (2, 4, 8, 16)
DRAWS = 100
SEED = 42
SCHEMES = ("kfold", "loco")
VAL_FRACTION = {"kfold": 0.15, "loco": 0.10}  # LoCo: ~10 % of the remaining centers, as in the benchmark
FORMAT = 2  # 1: support sets drawn from train + val (refused: see `read_splits`)
SUPPORT_FROM = "train"  # what support sets are drawn from; records carry it and summaries group by it
OLD_SUPPORT_FROM = "train+val"  # the rule of format-1 files, and of the records made from them
# Patients of each class a validation part needs to validate a few-shot run: with one, any threshold between
# the two patients' scores scores perfectly, so the choice (and early stop on it) says nothing.
MIN_VAL_PATIENTS = 2

# Independent random streams: a change to one never shifts the draws of another.
_VAL, _FEWSHOT, _FEWSHOT_CENTER = 0, 1, 2
_CLASS_NAMES = ("negative", "positive")
_SHOWN = 5  # ids quoted in one message
_KINDS = ("fewshot", "fewshot_center")


@dataclass(frozen=True)
class Fold:
    """One fold: disjoint train / val / test image ids and the few-shot draws from its train patients.

    ``fewshot[k][r]`` is draw ``r`` of a support set with ``k`` images per class, one image per patient;
    ``fewshot_center[k][r]`` has ``k`` per class per center. ``skipped`` maps ``"fewshot"`` /
    ``"fewshot_center"`` to ``{k: reason}`` for shot levels that could not be drawn.
    """

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    fewshot: dict[int, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    fewshot_center: dict[int, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    skipped: dict[str, dict[int, str]] = field(default_factory=lambda: {"fewshot": {}, "fewshot_center": {}})

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "fewshot": {str(k): [list(d) for d in draws] for k, draws in self.fewshot.items()},
            "fewshot_center": {str(k): [list(d) for d in draws] for k, draws in self.fewshot_center.items()},
            "skipped": {
                kind: {str(k): why for k, why in levels.items()} for kind, levels in self.skipped.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> Fold:
        def draws(levels: dict) -> dict[int, tuple[tuple[str, ...], ...]]:
            return {int(k): tuple(tuple(ids) for ids in sets) for k, sets in levels.items()}

        return cls(
            name=d["name"],
            train=tuple(d["train"]),
            val=tuple(d["val"]),
            test=tuple(d["test"]),
            fewshot=draws(d["fewshot"]),
            fewshot_center=draws(d["fewshot_center"]),
            skipped={kind: {int(k): str(why) for k, why in d["skipped"].get(kind, {}).items()} for kind in _KINDS},
        )


@dataclass(frozen=True)
class Splits:
    """All folds of one task, with the options and manifest digest they were made from."""

    task: str
    scheme: str
    k: int | None
    seed: int
    val_fraction: float
    shots: tuple[int, ...]
    center_shots: tuple[int, ...]
    draws: int
    manifest_digest: str
    folds: tuple[Fold, ...]
    classes: tuple[str, ...] = ()  # (negative, positive) of an ad-hoc task; its labels are defined here
    support_from: str = SUPPORT_FROM

    def fold(self, which: Fold | str | int) -> Fold:
        """A fold by object, name ("fold0", "center-A") or position."""
        if isinstance(which, Fold):
            return which
        if isinstance(which, int):
            return self.folds[which]
        for fold in self.folds:
            if fold.name == which:
                return fold
        raise SplitError(f"task {self.task}: no fold named {which!r} (have {', '.join(self.fold_names)})")

    def require_validation(self) -> None:
        """Full-data runs choose C (or epochs) on the validation part: refuse splits made without one."""
        if empty := [fold.name for fold in self.folds if not fold.val]:
            raise SplitError(f"task {self.task}: {', '.join(empty)} have no validation part (made with --val-fraction "
                             f"0); full-data runs need one: recompute the splits with a validation share")

    @property
    def fold_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.folds)

    def fewshot(self, fold: Fold | str | int, k: int) -> list[list[str]]:
        """The R support sets of ``k`` images per class drawn from ``fold``'s train patients."""
        return self._draws(self.fold(fold), k, "fewshot")

    def fewshot_per_center(self, fold: Fold | str | int, k: int) -> list[list[str]]:
        """The R support sets of ``k`` images per class per center drawn from ``fold``'s train patients."""
        return self._draws(self.fold(fold), k, "fewshot_center")

    def _draws(self, fold: Fold, k: int, kind: str) -> list[list[str]]:
        if k in fold.skipped[kind]:
            raise SplitError(
                f"task {self.task} {fold.name}: {kind} k={k} was skipped: {fold.skipped[kind][k]}"
            )
        draws = getattr(fold, kind)
        if k not in draws:
            drawn = ", ".join(map(str, sorted(draws))) or "none"
            raise SplitError(f"task {self.task} {fold.name}: no {kind} draws for k={k} (drawn: {drawn})")
        return [list(ids) for ids in draws[k]]

    def to_dict(self) -> dict:
        """The persisted form: options, ``manifest_digest``, and per fold its parts, draws and skipped k."""
        return {
            "format": FORMAT,
            "support_from": self.support_from,
            "task": self.task,
            "scheme": self.scheme,
            "k": self.k,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "shots": list(self.shots),
            "center_shots": list(self.center_shots),
            "draws": self.draws,
            "manifest_digest": self.manifest_digest,
            "folds": [fold.to_dict() for fold in self.folds],
        } | ({"classes": list(self.classes)} if self.classes else {})  # spec tasks' files keep their bytes

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, fixed separators): equal splits give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"

    def digest(self) -> str:
        """sha256 of the canonical JSON (= of the persisted file); run keys include it."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> Splits:
        if d.get("format") != FORMAT or d.get("support_from") != SUPPORT_FROM:
            raise SplitError(f"split format {d.get('format')!r} (support sets from {d.get('support_from')!r}) is "
                             f"not the supported format {FORMAT} (support sets from {SUPPORT_FROM!r})")
        return cls(
            task=d["task"],
            scheme=d["scheme"],
            k=d["k"],
            seed=d["seed"],
            val_fraction=d["val_fraction"],
            shots=tuple(d["shots"]),
            center_shots=tuple(d["center_shots"]),
            draws=d["draws"],
            manifest_digest=d["manifest_digest"],
            folds=tuple(Fold.from_dict(f) for f in d["folds"]),
            classes=tuple(d.get("classes", ())),
            support_from=d["support_from"],
        )


@dataclass(frozen=True)
class _Cohort:
    """Images sorted by id, with per-patient label and center (patients indexed 0..P-1 in sorted order)."""

    ids: np.ndarray
    y: np.ndarray
    patient: np.ndarray  # image -> patient index
    patient_names: np.ndarray
    patient_label: np.ndarray
    patient_center: np.ndarray
    centers: np.ndarray  # image -> center name

    @classmethod
    def build(cls, ids, y, groups, centers) -> _Cohort:
        ids = np.asarray([str(i) for i in ids])
        y = np.asarray(y)
        groups = np.asarray([str(g) for g in groups])
        centers = np.asarray([""] * ids.size if centers is None else [str(c) for c in centers])
        if not ids.size == y.size == groups.size == centers.size:
            raise SplitError(
                f"ids ({ids.size}), labels ({y.size}), patients ({groups.size}) and centers "
                f"({centers.size}) differ in length"
            )
        if ids.size == 0:
            raise SplitError("no labelled images to split")
        if (no_patient := ids[groups == ""]).size:
            raise SplitError(f"{no_patient.size} images have no patient id (e.g. {no_patient[:3].tolist()}); "
                             "patient-level splits need one for every image")
        if not np.isin(y, (0, 1)).all():
            raise SplitError(f"labels must be 0/1, got {np.unique(y)[:5].tolist()}")
        order = np.argsort(ids, kind="stable")
        ids, y, groups, centers = ids[order], y[order].astype(np.int8), groups[order], centers[order]
        dup = ids[1:][ids[1:] == ids[:-1]]
        if dup.size:
            raise SplitError(f"duplicate image ids: {', '.join(np.unique(dup)[:5])}")
        names, patient = np.unique(groups, return_inverse=True)
        label = _per_patient(patient, y, names, "labels")
        center = _per_patient(patient, centers, names, "centers")
        return cls(ids, y, patient, names, label, center, centers)


def _per_patient(patient: np.ndarray, values: np.ndarray, names: np.ndarray, what: str) -> np.ndarray:
    """The one value each patient has; a patient with two is an error naming the first few such patients."""
    _, first = np.unique(patient, return_index=True)
    per_patient = values[first]
    conflicting = np.unique(patient[values != per_patient[patient]])
    if conflicting.size:
        shown = ", ".join(names[conflicting[:5]])
        raise SplitError(
            f"{conflicting.size} patients have conflicting {what} ({shown}); "
            "run `featcache manifest validate` on the manifest"
        )
    return per_patient


def _rng(seed: int, stream: int, fold: int, k: int = 0, draw: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, fold, k, draw])


def _kfold(cohort: _Cohort, k: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Stratified k-fold grouped by patient: (name, pool image indices, test image indices)."""
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2 folds, got k={k}")
    per_class = np.bincount(cohort.patient_label, minlength=2)
    if per_class.min() < k:
        c = int(per_class.argmin())
        raise SplitError(
            f"class {c} ({_CLASS_NAMES[c]}) has {per_class[c]} patients, fewer than k={k} folds; lower --k (this "
            f"cohort allows --k {folds_allowed(per_class, validation=False)}, with a validation part "
            f"{folds_allowed(per_class, validation=True)})"
        )
    from sklearn.model_selection import StratifiedGroupKFold  # scikit-learn only where folds are made

    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [
        (f"fold{i}", pool, test)
        for i, (pool, test) in enumerate(cv.split(np.zeros(cohort.ids.size), cohort.y, groups=cohort.patient))
    ]


def _loco(cohort: _Cohort) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Leave one center out: each center is once the test part, the others form the pool."""
    names = np.unique(cohort.centers)
    if names.size < 2:
        raise SplitError(
            f"leave-one-center-out needs at least 2 centers, found {names.size} ({', '.join(names)})"
        )
    return [
        (f"center-{c}", np.flatnonzero(cohort.centers != c), np.flatnonzero(cohort.centers == c))
        for c in names
    ]


def _n_val(n: int, fraction: float) -> int:
    """Patients of one class for validation: rounded share, at least ``MIN_VAL_PATIENTS`` (the fewest that can
    set a threshold) while one stays for training; one where the class has only two."""
    if fraction == 0 or n < 2:
        return 0
    return int(min(max(np.floor(fraction * n + 0.5), MIN_VAL_PATIENTS), n - 1))


def validation_shortfall(fold: str, labels: Sequence[int], patients: Sequence[str]) -> str | None:
    """Why a fold's validation part (its images' labels and patients) cannot validate a few-shot run, or None:
    no part at all, or fewer than ``MIN_VAL_PATIENTS`` patients of a class (a single-class part among them)."""
    if not len(labels):
        return f"{fold} has no validation part (made with --val-fraction 0), and few-shot runs validate on it"
    y, who = np.asarray(labels), np.asarray(patients)
    counts = [np.unique(who[y == c]).size for c in (0, 1)]
    if min(counts) >= MIN_VAL_PATIENTS:
        return None
    held = " and ".join(f"{n} {_CLASS_NAMES[c]}" for c, n in enumerate(counts) if n < MIN_VAL_PATIENTS)
    return (f"{fold}'s validation part holds {held} patient(s), fewer than the {MIN_VAL_PATIENTS} of each class "
            "a validation threshold needs")


def _carve_val(cohort: _Cohort, pool: np.ndarray, fraction: float, rng: np.random.Generator):
    """Split a pool into (train, val) image indices: whole patients, the same share of each class."""
    patients = np.unique(cohort.patient[pool])
    chosen = [
        rng.choice(p, _n_val(p.size, fraction), replace=False)
        for p in (patients[cohort.patient_label[patients] == c] for c in (0, 1))
    ]
    in_val = np.isin(cohort.patient[pool], np.concatenate(chosen))
    return pool[~in_val], pool[in_val]


class _Pool:
    """Images of a pool grouped by patient (contiguous runs) so whole draws vectorise."""

    def __init__(self, cohort: _Cohort, pool: np.ndarray):
        pool = pool[np.lexsort((cohort.ids[pool], cohort.patient[pool]))]
        self.cohort, self.images = cohort, pool
        self.patients, self.start, self.count = np.unique(
            cohort.patient[pool], return_index=True, return_counts=True
        )

    def patients_of(self, label: int, center: str | None = None) -> np.ndarray:
        """Positions (into ``self.patients``) of the pool's patients of one class (and center)."""
        mask = self.cohort.patient_label[self.patients] == label
        if center is not None:
            mask &= self.cohort.patient_center[self.patients] == center
        return np.flatnonzero(mask)

    def draw(self, rng: np.random.Generator, strata: Sequence[np.ndarray], k: int) -> tuple[str, ...]:
        """k distinct patients from each stratum, one random image of each; ids sorted."""
        picked = np.concatenate([rng.choice(s, k, replace=False) for s in strata])
        image = self.start[picked] + rng.integers(0, self.count[picked])
        return tuple(sorted(self.cohort.ids[self.images[image]].tolist()))


def _fewshot(pool: _Pool, fold_name: str, fold_no: int, shots: Iterable[int], draws: int, seed: int):
    """Draws of k per class, or the reason a level was skipped."""
    strata = [pool.patients_of(c) for c in (0, 1)]
    out, skipped = {}, {}
    for k in shots:
        short = [f"class {c} ({_CLASS_NAMES[c]}) has {s.size}" for c, s in enumerate(strata) if s.size < k]
        if short:
            skipped[k] = f"{' and '.join(short)} patients in {fold_name}'s train part, fewer than k={k}"
            continue
        out[k] = tuple(pool.draw(_rng(seed, _FEWSHOT, fold_no, k, r), strata, k) for r in range(draws))
    return out, skipped


def _fewshot_center(pool: _Pool, fold_name: str, fold_no: int, shots: Iterable[int], draws: int, seed: int):
    """Draws of k per class per center of the pool, or the reason a level was skipped."""
    centers = np.unique(pool.cohort.patient_center[pool.patients])
    strata = {(str(c), lab): pool.patients_of(lab, c) for c in centers for lab in (0, 1)}
    out, skipped = {}, {}
    for k in shots:
        short = [f"{c}/{_CLASS_NAMES[lab]} {s.size}" for (c, lab), s in strata.items() if s.size < k]
        if short:
            skipped[k] = (
                f"fewer than k={k} patients per class per center in {fold_name}'s train part "
                f"(center/class patients: {', '.join(short)})"
            )
            continue
        out[k] = tuple(
            pool.draw(_rng(seed, _FEWSHOT_CENTER, fold_no, k, r), list(strata.values()), k)
            for r in range(draws)
        )
    return out, skipped


def support_digest(ids: Iterable[str]) -> str:
    """16 hex chars naming a support set (its sorted ids): records of both stages carry it, so a reader can
    check that a probe and a fine-tune of one fold, level and draw trained on the same images."""
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode("utf-8")).hexdigest()[:16]


def _ids(cohort: _Cohort, idx: np.ndarray) -> tuple[str, ...]:
    return tuple(sorted(cohort.ids[idx].tolist()))


def make_splits(
    ids: Sequence[str],
    y: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    centers: Sequence[str] | None = None,
    *,
    task: str = "",
    scheme: str = "kfold",
    k: int = 5,
    val_fraction: float | None = None,
    shots: Iterable[int] = SHOTS,
    center_shots: Iterable[int] = CENTER_SHOTS,
    draws: int = DRAWS,
    seed: int = SEED,
    per_center: bool | None = None,
    manifest_digest: str = "",
) -> Splits:
    """Folds, validation parts and few-shot draws from plain arrays (one entry per image).

    ``groups`` are patient ids: a patient's images always land in one part. ``scheme`` is "kfold"
    (StratifiedGroupKFold, shuffled with ``seed``) or "loco" (one fold per center). ``val_fraction`` of each
    class's training patients form the validation part (default 0.15 for k-fold, 0.10 for LoCo; at least
    ``MIN_VAL_PATIENTS`` per class where the class allows). Few-shot sets are drawn from the train part only;
    ``per_center`` (default: when there are several centers) adds the draws with ``center_shots`` per class per
    center. A shot level some class cannot fill is skipped and recorded, and so is every level of a fold whose
    validation part cannot validate (:func:`validation_shortfall`); a cohort too small for a validation part
    with both classes, or for any requested shot level at all, is refused with what it does allow
    (:func:`folds_allowed`). The result passes :func:`check_splits`.
    """
    if scheme not in SCHEMES:
        raise SplitError(f"unknown cv scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    fraction = VAL_FRACTION[scheme] if val_fraction is None else float(val_fraction)
    if not 0 <= fraction < 1:
        raise SplitError(f"val fraction must be in [0, 1), got {fraction}")
    shots, center_shots = tuple(sorted(set(shots))), tuple(sorted(set(center_shots)))
    if any(s < 1 for s in shots + center_shots) or draws < 0 or seed < 0:
        raise SplitError(
            f"shots must be >= 1, draws and seed >= 0 (shots {shots}, center shots {center_shots}, "
            f"draws {draws}, seed {seed})"
        )
    cohort = _Cohort.build(ids, y, groups, centers)
    explicit_center = bool(per_center)
    if per_center is None:
        per_center = np.unique(cohort.centers).size > 1
    parts = _kfold(cohort, k, seed) if scheme == "kfold" else _loco(cohort)
    folds, pools, supports, shortfalls = [], [], [], []
    for no, (name, pool_idx, test_idx) in enumerate(parts):
        train_idx, val_idx = _carve_val(cohort, pool_idx, fraction, _rng(seed, _VAL, no))
        pools.append(_Pool(cohort, pool_idx))
        support = _Pool(cohort, train_idx)
        supports.append(support)
        shortfall = validation_shortfall(name, cohort.y[val_idx], cohort.patient[val_idx])
        shortfalls.append(shortfall)
        fewshot, skipped = _fewshot(support, name, no, shots, draws, seed)
        center_draws, center_skipped = (
            _fewshot_center(support, name, no, center_shots, draws, seed) if per_center else ({}, {})
        )
        if shortfall:  # drawn, then dropped: the other folds' draws do not depend on this one
            fewshot, skipped = {}, dict.fromkeys(shots, shortfall)
            center_draws, center_skipped = {}, dict.fromkeys(center_shots if per_center else (), shortfall)
        folds.append(
            Fold(
                name,
                _ids(cohort, train_idx),
                _ids(cohort, val_idx),
                _ids(cohort, test_idx),
                fewshot,
                center_draws,
                {"fewshot": skipped, "fewshot_center": center_skipped},
            )
        )
    made = Splits(
        task=task,
        scheme=scheme,
        k=k if scheme == "kfold" else None,
        seed=seed,
        val_fraction=fraction,
        shots=shots,
        center_shots=center_shots if per_center else (),
        draws=draws,
        manifest_digest=manifest_digest,
        folds=tuple(folds),
    )
    _check_capacity(made, cohort, pools, supports, explicit_center, shortfalls)
    check_splits(made, f"task {task}" if task else "splits", TaskLabels.of(ids, y, groups, centers))
    return made


def folds_allowed(per_class: Sequence[int] | np.ndarray, validation: bool) -> str:
    """The k-fold k a cohort with these patients per class allows, as text ("2..9", "3", "none"): each fold
    tests at least one patient of each class and, with validation, leaves two in its pool (one validates, one
    trains); more folds leave bigger pools, so the smallest k is the one validation limits."""
    n = int(min(per_class))
    fits = [k for k in range(2, n + 1) if not validation or n - -(-n // k) >= 2]
    if not fits:
        return "none"
    return str(fits[0]) if fits[0] == fits[-1] else f"{fits[0]}..{fits[-1]}"


def _check_capacity(splits: Splits, cohort: _Cohort, pools: list[_Pool], supports: list[_Pool],
                    explicit_center: bool, shortfalls: list[str | None]) -> None:
    """Refuse, with what the cohort does allow, splits a small cohort cannot fill: a validation part without
    both classes, few-shot levels no fold can validate, or few-shot levels of which not one could be drawn in
    any fold."""
    where = f"task {splits.task}" if splits.task else "splits"
    per_class = np.bincount(cohort.patient_label, minlength=2)
    size = f"{per_class[0]} negative / {per_class[1]} positive patients"
    if splits.val_fraction > 0:
        _check_validation_room(splits, pools, per_class, where, size)
    if (splits.shots or splits.center_shots) and all(shortfalls):
        hint = "pass a validation share" if splits.val_fraction == 0 else "pass a larger --val-fraction"
        raise SplitError(f"{where}: no fold can validate a few-shot run ({shortfalls[0]}); {hint}, or --shots '' "
                         "--no-per-center for no few-shot draws")
    if splits.shots and not any(fold.fewshot for fold in splits.folds):
        best = max(min(pool.patients_of(c).size for c in (0, 1)) for pool in supports)
        raise SplitError(f"{where}: no few-shot level k={','.join(map(str, splits.shots))} can be drawn in any fold: "
                         f"the folds' train parts hold at most {best} patient(s) of the smaller class ({size}); "
                         + (f"pass --shots with k <= {best}, or --shots '' for none" if best else "pass --shots ''"))
    if explicit_center and splits.center_shots and not any(fold.fewshot_center for fold in splits.folds):
        best = max(min((pool.patients_of(c, site).size for site in np.unique(cohort.patient_center[pool.patients])
                        for c in (0, 1)), default=0) for pool in supports)
        levels = ",".join(map(str, splits.center_shots))
        raise SplitError(f"{where}: no per-center few-shot level k={levels} can be drawn in any fold: the folds' "
                         f"train parts hold at most {best} patient(s) per class per center; "
                         + (f"pass --center-shots with k <= {best}" if best else "pass --no-per-center"))


def _check_validation_room(splits: Splits, pools: list[_Pool], per_class: np.ndarray, where: str, size: str) -> None:
    """Each fold's pool must keep one patient of each class for validation and one for training."""
    for fold, pool in zip(splits.folds, pools, strict=True):
        counts = [pool.patients_of(c).size for c in (0, 1)]
        if min(counts) >= 2:
            continue
        c = int(np.argmin(counts))
        fits = folds_allowed(per_class, validation=True)
        if splits.scheme != "kfold":
            hint = "leave-one-center-out leaves too few of them in this pool; try --scheme kfold"
        else:
            hint = f"with a validation part it allows --k {fits}" if fits != "none" else "too few for a validation part"
        raise SplitError(f"{where}: {fold.name}'s train+val holds {counts[c]} {_CLASS_NAMES[c]} patient(s), too few "
                         f"to keep one for validation and one for training; the cohort has {size}, {hint} (every "
                         "run, full-data or few-shot, validates on its fold's validation part)")


def describe(splits: Splits, ids: Sequence[str], y: Sequence[int] | np.ndarray, groups: Sequence[str]) -> list[dict]:
    """Per fold and part: images, patients and positives; for reports and the CLI table."""
    label = dict(zip(map(str, ids), (int(v) for v in y), strict=True))
    patient = dict(zip(map(str, ids), map(str, groups), strict=True))
    rows = []
    for fold in splits.folds:
        for part in ("train", "val", "test"):
            members = getattr(fold, part)
            rows.append(
                {
                    "fold": fold.name,
                    "part": part,
                    "images": len(members),
                    "patients": len({patient[i] for i in members}),
                    "positives": sum(label[i] for i in members),
                }
            )
    return rows


# --- checking a split file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskLabels:
    """What a split file is checked against: label, patient and center of every image labelled for its task."""

    label: dict[str, int]
    patient: dict[str, str]
    center: dict[str, str]

    @classmethod
    def of(cls, ids: Sequence[str], y: Sequence[int] | np.ndarray, groups: Sequence[str],
           centers: Sequence[str] | None):
        ids = [str(i) for i in ids]
        sites = [""] * len(ids) if centers is None else [str(c) for c in centers]
        return cls(dict(zip(ids, (int(v) for v in y), strict=True)), dict(zip(ids, map(str, groups), strict=True)),
                   dict(zip(ids, sites, strict=True)))


def _shown(items: Iterable[object]) -> str:
    items = sorted({str(i) for i in items})
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def check_splits(splits: Splits, where: str, cohort: TaskLabels | None = None) -> None:
    """Refuse, in one line naming ``where``, the fold and the ids, a split file that could leak or mislead.

    Without a cohort: parts share no image, few-shot draws lie inside their fold's train part, train and
    test are non-empty (val too when a validation share was asked for). With one (the manifest's task
    labels): every id is labelled for the task, parts share no patient, train and test hold both classes (val
    too), each draw has k patients of each class (per center for per-center draws), one image each, and a fold
    with draws has a validation part that can validate them (:func:`validation_shortfall`).
    """
    names = [fold.name for fold in splits.folds]
    if not names or len(set(names)) != len(names):
        raise SplitError(f"{where}: fold names must be present and distinct, got {names}")
    for fold in splits.folds:
        _check_fold(fold, splits.val_fraction > 0, f"{where}: {fold.name}", cohort)


def _check_fold(fold: Fold, has_val: bool, where: str, cohort: TaskLabels | None) -> None:
    parts = {"train": fold.train, "val": fold.val, "test": fold.test}
    for part, members in parts.items():
        if not all(isinstance(i, str) for i in members):
            raise SplitError(f"{where}: {part} holds ids that are not strings")
        if not members and (part != "val" or has_val):
            raise SplitError(f"{where}: the {part} part is empty")
        if len(set(members)) != len(members):
            raise SplitError(f"{where}: {part} repeats ids {_shown(i for i, n in Counter(members).items() if n > 1)}")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if both := set(parts[a]) & set(parts[b]):
            raise SplitError(f"{where}: ids in both {a} and {b}: {_shown(both)}")
    pool = set(fold.train)
    for kind in _KINDS:
        for k, draws in getattr(fold, kind).items():
            for r, ids in enumerate(draws):
                if not all(isinstance(i, str) for i in ids):
                    raise SplitError(f"{where}: {kind} k={k} draw {r} holds ids that are not strings")
                if outside := set(ids) - pool:
                    raise SplitError(f"{where}: {kind} k={k} draw {r} holds ids outside the train part: "
                                     f"{_shown(outside)}")
    if cohort is not None:
        _check_fold_labels(fold, parts, has_val, where, cohort)


def _check_fold_labels(fold: Fold, parts: dict, has_val: bool, where: str, cohort: TaskLabels) -> None:
    for part, members in parts.items():
        if unknown := [i for i in members if i not in cohort.label]:
            raise SplitError(f"{where}: {part} holds ids the manifest does not label for this task: {_shown(unknown)}")
    patients = {part: {cohort.patient[i] for i in members} for part, members in parts.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if both := patients[a] & patients[b]:
            raise SplitError(f"{where}: patients in both {a} and {b}: {_shown(both)}")
    for part, members in parts.items():
        if part == "val" and not has_val:
            continue
        if lacking := {0, 1} - {cohort.label[i] for i in members}:
            c = lacking.pop()
            raise SplitError(f"{where}: the {part} part has no {_CLASS_NAMES[c]} (class {c}) patients")
    if fold.fewshot or fold.fewshot_center:
        shortfall = validation_shortfall(fold.name, [cohort.label[i] for i in fold.val],
                                         [cohort.patient[i] for i in fold.val])
        if shortfall:
            raise SplitError(f"{where}: holds few-shot draws, but {shortfall}")
    for kind in _KINDS:
        for k, draws in getattr(fold, kind).items():
            for r, ids in enumerate(draws):
                _check_draw(ids, k, kind == "fewshot_center", f"{where}: {kind} k={k} draw {r}", cohort)


def _check_draw(ids: Sequence[str], k: int, per_center: bool, where: str, cohort: TaskLabels) -> None:
    if len({cohort.patient[i] for i in ids}) != len(ids):
        raise SplitError(f"{where}: two images of one patient ({_shown(ids)})")
    strata = Counter((cohort.center[i] if per_center else "", cohort.label[i]) for i in ids)
    sites = {site for site, _ in strata}
    if any(strata[(site, c)] != k for site in sites for c in (0, 1)):
        got = ", ".join(f"{site + '/' if site else ''}{_CLASS_NAMES[c]} {strata[(site, c)]}"
                        for site in sorted(sites) for c in (0, 1))
        raise SplitError(f"{where}: not {k} patients per class{' per center' if per_center else ''} ({got})")


# --- persistence next to the manifest -------------------------------------------------------------------


def save_splits(splits: Splits, manifest_path: str | Path) -> Path:
    """Write the split file atomically (temp file in the same folder, then rename); returns its path."""
    path = splits_path(manifest_path, splits.task)
    atomic_write(path, splits.to_json().encode("utf-8"))
    return path


def read_splits(path: str | Path, manifest: str | Path | None = None) -> Splits:
    """A split file, checked on its own (:func:`check_splits` without a cohort), not against a manifest; a
    file made under the old few-shot rule is refused with the command that remakes it (for ``manifest``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("format") == 1:
            raise SplitError(f"{path}: made under the old few-shot rule (support sets drawn from train + "
                             f"validation patients); remake it with {_remake(path, data, manifest)}")
        splits = Splits.from_dict(data)
    except OSError as err:
        raise SplitError(f"{path}: cannot read split file ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise SplitError(f"{path}: not a valid split file ({type(err).__name__}: {err})") from None
    check_splits(splits, str(path))
    return splits


def _command(manifest_path: str | Path, task: str) -> str:
    return f"`featcache splits --manifest {manifest_path} --task {task}`"


def _remake(path: Path, old: dict, manifest: str | Path | None) -> str:
    """The `featcache splits` command that remakes an old file with its own options (folds, seed, validation
    share, levels, draws): the same folds and validation parts, new support sets."""
    if manifest is None:  # `<dir>/<stem>.splits/<task>.json` sits beside `<dir>/<stem>.<ext>`
        stem = path.parent.name.removesuffix(".splits")
        found = sorted(p for p in path.parent.parent.glob(f"{stem}.*") if p.is_file())
        manifest = found[0] if len(found) == 1 else path.parent.parent / f"{stem}.csv"
    words = [f"--task {old.get('task') or path.stem}"]
    if len(old.get("classes") or ()) == 2:
        words.append(f"--positive {old['classes'][1]}")
    for flag, name in (("--scheme", "scheme"), ("--k", "k"), ("--val-fraction", "val_fraction")):
        if old.get(name) is not None:
            words.append(f"{flag} {old[name]}")
    if isinstance(old.get("shots"), list):
        words.append(f"--shots '{','.join(map(str, old['shots']))}'")
    if isinstance(old.get("center_shots"), list):
        centers = ",".join(map(str, old["center_shots"]))
        words.append(f"--center-shots {centers}" if centers else "--no-per-center")
    words += [f"{flag} {old[name]}" for flag, name in (("--draws", "draws"), ("--seed", "seed"))
              if old.get(name) is not None]
    return f"`featcache splits --manifest {manifest} {' '.join(words)}`"


def _how_to_make(manifest_path: str | Path, task: str) -> str:
    """The `featcache splits` command that would make the missing splits (one that itself succeeds), or why no
    command would: a task that is neither a dataset spec's nor a two-class column of the manifest."""
    try:
        datasets.get_task(task)
        return f"make them with {_command(manifest_path, task)}"
    except ManifestError:
        pass
    manifest = load_manifest(manifest_path)
    if task in manifest.columns:
        values = sorted({v for v in manifest.column(task) if v})
        if len(values) == 2:
            return (f"make them with `featcache splits --manifest {manifest_path} --task {task} --positive VALUE`, "
                    f"VALUE its positive class ({values[0]} or {values[1]})")
        return f"column {task} holds {len(values)} distinct values; a task needs exactly two"
    return (f"{task} is neither a dataset task ({', '.join(datasets.list_tasks())}) nor a column of "
            f"{manifest_path}; check --task")


def build_splits(
    manifest_path: str | Path,
    task: str,
    *,
    scheme: str = "auto",
    k: int | None = None,
    val_fraction: float | None = None,
    shots: Iterable[int] = SHOTS,
    center_shots: Iterable[int] = CENTER_SHOTS,
    draws: int = DRAWS,
    seed: int = SEED,
    per_center: bool | None = None,
) -> Splits:
    """:func:`make_splits` on a manifest task; "auto" scheme and k come from its task spec, per-center draws
    by default when its dataset has centers and the manifest more than one."""
    spec = datasets.get_task(task)
    manifest = load_manifest(manifest_path)
    ids, y = manifest.labels(spec)
    centers = manifest.centers(ids)
    known = datasets.get_dataset(spec.dataset).centers if spec.dataset else ()
    if known and (unknown := sorted(set(centers) - set(known))):
        raise SplitError(f"{manifest.path}: centers {unknown} are not among {spec.dataset}'s {list(known)}; "
                         "leave-one-center-out would make a fold of each")
    made = make_splits(
        ids,
        y,
        manifest.patients(ids),
        centers,
        task=task,
        scheme=spec.cv if scheme == "auto" else scheme,
        k=k if k is not None else spec.k,
        val_fraction=val_fraction,
        shots=shots,
        center_shots=center_shots,
        draws=draws,
        seed=seed,
        per_center=per_center if per_center is not None or spec.has_centers else False,
        manifest_digest=manifest.digest(),
    )
    return made if spec.dataset else replace(made, classes=(spec.negative, spec.positive))


@functools.lru_cache(maxsize=8)
def _read_unchanged(path: Path, size: int, mtime_ns: int, manifest: str) -> Splits:
    """`read_splits` memoised on the file's size and mtime: a study plan reads one file thousands of times."""
    return read_splits(path, manifest)


def load_splits(manifest_path: str | Path, task: str) -> Splits:
    """The persisted splits of ``task``, refused when the manifest changed since they were made or when the
    file fails :func:`check_splits` against the manifest (a hand edit that would leak test patients)."""
    path = splits_path(manifest_path, task)
    if not path.is_file():
        raise SplitError(f"{path}: no splits for task {task}; {_how_to_make(manifest_path, task)}")
    stat = path.stat()
    splits = _read_unchanged(path.resolve(), stat.st_size, stat.st_mtime_ns, str(manifest_path))
    if splits.task != task:
        raise SplitError(f"{path}: holds splits of task {splits.task!r}, not {task!r}")
    manifest = load_manifest(manifest_path)
    current = manifest.digest()
    if splits.manifest_digest != current:
        raise SplitError(
            f"{path}: made for manifest digest {splits.manifest_digest[:12]}, but {manifest_path} is now "
            f"{current[:12]}; recompute with {_command(manifest_path, task)}"
        )
    _check_classes(splits, manifest, path)
    ids, y = manifest.labels(datasets.get_task(task))
    check_splits(splits, str(path), TaskLabels.of(ids, y, manifest.patients(ids), manifest.centers(ids)))
    return splits


def _check_classes(splits: Splits, manifest, path: Path) -> None:
    """An ad-hoc task's file says which class is positive: it defines the task when this process has not
    (`probe --task died` after `splits --task died --positive 1`), and refuses another positive class."""
    task = splits.task
    if not splits.classes:
        return
    if len(splits.classes) != 2:
        raise SplitError(f"{path}: 'classes' must be [negative, positive], got {list(splits.classes)}")
    try:
        spec = datasets.get_task(task)
    except ManifestError:
        spec = datasets.task_for(manifest, task, positive=splits.classes[1])
    if (spec.negative, spec.positive) != splits.classes:
        raise SplitError(f"{path}: made with {task} positive class {splits.classes[1]!r}, not {spec.positive!r}; "
                         f"recompute with `featcache splits --manifest {manifest.path} --task {task} --positive "
                         f"{spec.positive}`")
