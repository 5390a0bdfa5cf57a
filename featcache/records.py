"""Run records: one JSON file per run, named by a stable hash of what defines the run.

A grid computes :func:`run_key` before it trains, skips keys whose record exists, and writes each result
atomically, so a killed sweep resumes where it stopped and never leaves half a record. :func:`gather` turns a
folder of records into one tidy CSV (one row per run) for a spreadsheet or a plotting script.

Records written by older versions are read through :func:`migrate`: the cached probe's old method name "lp"
becomes "probe" (so it is never mixed up with stage 2's end-to-end LP), ``pr_auc`` is renamed
``average_precision`` (what it always was), stage-2 heads counted with two logits are counted as one, metrics
added since (patient level, trapezoid PR area) are computed from the stored per-image scores, and a few-shot
record that does not say which rule drew its support set says the old one (``support_from`` "train+val": every
record before the rule field was made under it). A migrated record's key is computed from its migrated fields, so
it differs from its file name; :func:`load_records` keeps one record per key.

Summaries and head-LR selection group by ``support_from`` too: runs of different few-shot rules are never pooled.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from featcache.errors import RecordError
from featcache.fileio import atomic_write
from featcache.metrics import METRICS, binary_metrics, bootstrap_ci, evaluate, summarize

REGIMES = ("full", "fewshot", "fewshot-center")
KEY_LENGTH = 16
# Distribution names of the libraries whose versions change results; keys are the import names.
TRACKED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "timm": "timm",
    "open_clip": "open_clip_torch",
    "sklearn": "scikit-learn",
    "numpy": "numpy",
    "zarr": "zarr",
}
_CORE_COLUMNS = tuple(
    "key task backbone method regime shots support_from draw fold seed n_test wall_time_s trainable_params "
    "total_params identity splits_digest created".split()
)
_IMAGE_METRICS = tuple(
    "mcc mcc_val_thr average_precision pr_auc_trapezoid roc_auc balanced_accuracy f1 sensitivity specificity "
    "threshold val_threshold n n_pos reason".split()
)
_METRIC_ORDER = _IMAGE_METRICS + tuple(f"patient_{m}" for m in _IMAGE_METRICS) + ("patient_rule",)
# Selection outcome of a run (from its provenance) as results.csv columns: the C a probe chose, by which rule,
# and whether it sat at an edge of the grid. Stage 2's head LR and best epoch are opt_head_lr, train_best_epoch.
SELECTION = {"C": "selected_C", "C_rule": "C_rule", "C_edge": "C_at_grid_edge"}
GROUP_BY = ("task", "backbone", "method", "options", "regime", "shots", "support_from")
PROBE_METHOD = "probe"  # the cached logistic probe of stage 1; never "lp", the end-to-end trained head of stage 2


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """Versions of the toolkit and the libraries that shape results; a missing one is None."""
    from featcache import __version__

    found: dict[str, str | None] = {"featcache": __version__}
    for name, dist in TRACKED.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null, NumPy scalars and arrays, tuples and paths become natives."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _canonical(value: Any) -> str:
    return json.dumps(
        _jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def run_key(
    *,
    task: str,
    backbone: str,
    method: str,
    fold: str,
    seed: int,
    options: dict[str, Any] | None = None,
    regime: str = "full",
    shots: int | None = None,
    draw: int | None = None,
    splits_digest: str | None = None,
    identity: str | None = None,
) -> str:
    """16 hex chars of sha256 over the canonical JSON of the fields that define a run.

    ``identity`` is what the features or weights were: a feature-store key or a weights identity. Dict key
    order does not matter; any change of a value gives a new key.
    """
    defining = dict(
        task=task,
        backbone=backbone,
        method=method,
        fold=fold,
        seed=seed,
        options=options or {},
        regime=regime,
        shots=shots,
        draw=draw,
        splits_digest=splits_digest,
        identity=identity,
    )
    return hashlib.sha256(_canonical(defining).encode("ascii")).hexdigest()[:KEY_LENGTH]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def method_variant(method: str, rank: int | None) -> str:
    """``lora-r8`` for a ranked run, the method name otherwise: how summaries, plans and figures name it."""
    return method if rank is None else f"{method}-r{rank}"


@dataclass
class RunRecord:
    """Everything one run produced and what it ran on. Per-image test scores make re-scoring possible."""

    task: str
    backbone: str
    method: str
    fold: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    regime: str = "full"
    shots: int | None = None
    draw: int | None = None
    splits_digest: str | None = None
    identity: str | None = None
    test_ids: list[str] = field(default_factory=list)
    test_labels: list[int] = field(default_factory=list)
    test_scores: list[float] = field(default_factory=list)
    test_patients: list[str] = field(default_factory=list)  # for patient-level bootstrap intervals
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # Gradient-trained runs (stage 2): best_epoch, val_loss (at the best epoch), epochs_run, stopped ("early",
    # "max-epochs"), and curves {"train_loss": [...], "val_loss": [...]}, one value per epoch. Empty for probes.
    training: dict[str, Any] = field(default_factory=dict)
    # What few-shot support sets were drawn from (`featcache.splits.SUPPORT_FROM`, from the split file); not in
    # the key, which hashes the split file's digest already. None for full-data runs.
    support_from: str | None = None
    versions: dict[str, str | None] = field(default_factory=lambda: dict(versions()))
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime {self.regime!r} is not one of {', '.join(REGIMES)}")
        if (self.shots is None) != (self.regime == "full"):
            raise ValueError(
                f"regime {self.regime!r} with shots={self.shots}: few-shot regimes need shots, "
                "full data has none"
            )
        if not len(self.test_ids) == len(self.test_labels) == len(self.test_scores):
            raise ValueError(
                f"test ids ({len(self.test_ids)}), labels ({len(self.test_labels)}) and scores "
                f"({len(self.test_scores)}) differ in length"
            )
        if self.test_patients and len(self.test_patients) != len(self.test_ids):
            raise ValueError(f"test patients ({len(self.test_patients)}) and ids ({len(self.test_ids)}) differ")
        self.test_ids = [str(i) for i in self.test_ids]
        self.test_patients = [str(p) for p in self.test_patients]
        self.test_labels = [int(v) for v in self.test_labels]
        self.test_scores = [math.nan if v is None else float(v) for v in self.test_scores]  # JSON null

    def defining(self) -> dict[str, Any]:
        """The fields :func:`run_key` hashes."""
        return dict(
            task=self.task,
            backbone=self.backbone,
            method=self.method,
            fold=self.fold,
            seed=self.seed,
            options=self.options,
            regime=self.regime,
            shots=self.shots,
            draw=self.draw,
            splits_digest=self.splits_digest,
            identity=self.identity,
        )

    @property
    def variant(self) -> str:
        """The method with its rank where it has one (``lora-r8``); the cached probe stays ``probe``."""
        rank = self.options.get("rank")
        return method_variant(self.method, None if rank in (None, "") else int(rank))

    @property
    def key(self) -> str:
        return run_key(**self.defining())

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, **_jsonable(asdict(self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """A record from its JSON form; older layouts are brought up to date by :func:`migrate`."""
        names = {f.name for f in fields(cls)}
        return migrate(cls(**{k: v for k, v in d.items() if k in names}))


def migrate(record: RunRecord) -> RunRecord:
    """Bring a record of an older version up to date in place; what changed is noted in
    ``provenance["migrated"]``. Values are renamed or recomputed from the stored scores, never guessed."""
    notes = []
    if record.regime != "full" and record.support_from is None:
        from featcache.splits import OLD_SUPPORT_FROM  # splits imports the dataset specs: only when needed

        record.support_from = OLD_SUPPORT_FROM
        notes.append(f"support_from {OLD_SUPPORT_FROM} (made before the rule was recorded)")
    if record.method == "lp" and record.options.get("head") == "l2-logreg":  # the cached probe, before 0.x
        record.method = PROBE_METHOD
        notes.append("method lp -> probe")
        if record.options.get("select") == "pr_auc":
            record.options = {**record.options, "select": "average_precision"}
    for old, new in (("pr_auc", "average_precision"), ("patient_pr_auc", "patient_average_precision")):
        if old in record.metrics and new not in record.metrics:
            record.metrics[new] = record.metrics.pop(old)
            notes.append(f"{old} -> {new}")
    if _two_logit_count(record):
        notes.append("head counted as one logit (D + 1), as the probe's")
    missing = _missing_metrics(record)
    if missing:
        threshold = record.metrics.get("val_threshold")
        fresh = evaluate(record.test_labels, record.test_scores, threshold=threshold,
                         patients=record.test_patients or None)
        record.metrics.update({name: fresh[name] for name in missing if name in fresh})
        notes.append(f"computed {', '.join(sorted(n for n in missing if n in fresh))} from the stored scores")
    if notes:
        record.provenance = {**record.provenance, "migrated": "; ".join(notes)}
    return record


HEAD_COUNT = "one logit (D + 1)"  # how stage-2 records count their head; older ones counted both logits


def _two_logit_count(record: RunRecord) -> bool:
    """A stage-2 record from before heads were counted as one logit (its provenance lacks ``head_count``):
    take the second logit's D + 1 off its trainable and total counts, D from its backbone's head view."""
    if record.method == PROBE_METHOD or not record.trainable_params or "head_count" in record.provenance:
        return False
    from featcache.backbones import get_spec

    try:
        spec = get_spec(record.backbone)
    except Exception:  # noqa: BLE001 - a backbone this version cannot name keeps its counts
        return False
    extra = spec.views[spec.head_view] + 1
    if record.trainable_params <= extra:
        return False
    record.trainable_params -= extra
    if record.total_params:
        record.total_params -= extra
    record.provenance = {**record.provenance, "head_count": HEAD_COUNT}
    return True


def _missing_metrics(record: RunRecord) -> list[str]:
    """Metric names the current `evaluate` gives that this record lacks, where its scores allow them."""
    if not record.metrics or not record.test_scores or not all(map(math.isfinite, record.test_scores)):
        return []
    wanted = ["pr_auc_trapezoid", *METRICS]
    if record.test_patients:
        wanted += [f"patient_{m}" for m in ("mcc", "mcc_val_thr", *METRICS, "pr_auc_trapezoid", "n", "n_pos",
                                             "reason", "rule")]
    return [name for name in wanted if name not in record.metrics]


def record_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"{key}.json"


def write_record(record: RunRecord, folder: str | Path) -> Path:
    """Write ``<folder>/<run key>.json`` atomically (NaN metrics as null); returns the path."""
    path = record_path(folder, record.key)
    atomic_write(
        path, (json.dumps(record.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    )
    return path


def record_exists(folder: str | Path, key: str) -> bool:
    """Whether the run with this key is already recorded (so a grid can skip it)."""
    return record_path(folder, key).is_file()


def read_record(path: str | Path) -> RunRecord:
    """One record file (migrated if it is of an older layout); a file that is not one is refused by name."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return RunRecord.from_dict(data)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise RecordError(f"{path}: not a run record ({err})") from err


def load_records(folder: str | Path) -> list[RunRecord]:
    """All records in ``folder`` (not recursive), by file name; temp files of killed writes are skipped.

    One record per run key: a migrated record whose new key is also recorded under its own name is the same
    run, and the file named by the key wins (it was written by the current version).
    """
    by_key: dict[str, tuple[bool, RunRecord]] = {}
    for path in sorted(Path(folder).glob("[!.]*.json")):
        record = read_record(path)
        named = path.stem == record.key
        if record.key not in by_key or (named and not by_key[record.key][0]):
            by_key[record.key] = (named, record)
    return sorted((record for _, record in by_key.values()), key=lambda r: r.key)


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Nested dicts become dotted columns; lists become compact JSON text."""
    out: dict[str, Any] = {}
    for name, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{name}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{name}"] = _canonical(value)
        else:
            out[f"{prefix}{name}"] = value
    return out


def record_row(record: RunRecord) -> dict[str, Any]:
    """One flat CSV row: core fields, ``opt_<name>`` options, metric columns, ``version_<lib>``; no scores."""
    row: dict[str, Any] = {
        name: getattr(record, name) for name in _CORE_COLUMNS if name not in ("key", "n_test")
    }
    row.update(key=record.key, n_test=len(record.test_ids))
    row.update(_flatten(record.options, "opt_"))
    clashing = set(record.metrics) & set(row)
    row.update(_flatten({(f"metric_{k}" if k in clashing else k): v for k, v in record.metrics.items()}, ""))
    row.update({column: record.provenance[name] for name, column in SELECTION.items() if name in record.provenance})
    row.update(_flatten({k: v for k, v in record.training.items() if k != "curves"}, "train_"))
    row.update(_flatten(record.versions, "version_"))
    return row


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen = {name for row in rows for name in row}
    options = sorted(n for n in seen if n.startswith("opt_"))
    training = sorted(n for n in seen if n.startswith("train_"))
    version = sorted(n for n in seen if n.startswith("version_"))
    selection = [c for c in (*SELECTION.values(), "head_lr_selected") if c in seen]
    rest = seen - set(_CORE_COLUMNS) - set(options) - set(training) - set(version) - set(selection)
    metric_cols = [m for m in _METRIC_ORDER if m in rest] + sorted(rest - set(_METRIC_ORDER))
    return list(_CORE_COLUMNS) + options + metric_cols + selection + training + version


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def _sort_key(record: RunRecord) -> tuple:
    return (
        record.task,
        record.backbone,
        record.method,
        _canonical(record.options),
        record.regime,
        record.shots or 0,
        record.support_from or "",
        record.fold,
        record.draw if record.draw is not None else -1,
        record.seed,
        record.key,
    )


def gather(folder: str | Path, out_csv: str | Path) -> Path:
    """All records of ``folder`` as one tidy CSV (a row per run, no per-image scores), written atomically."""
    return write_results(load_records(folder), out_csv)


def write_results(records: list[RunRecord], out_csv: str | Path, selected: set[str] | None = None) -> Path:
    """Records as one tidy CSV, a row per run; with ``selected`` (run keys kept by :func:`select_head_lr`)
    runs with a head LR get a ``head_lr_selected`` column, so the CSV keeps every run and says which count."""
    rows = []
    for record in sorted(records, key=_sort_key):
        row = record_row(record)
        if selected is not None and "head_lr" in record.options:
            row["head_lr_selected"] = record.key in selected
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    out_csv = Path(out_csv)
    atomic_write(out_csv, buffer.getvalue().encode("utf-8"))
    return out_csv


def options_label(options: dict[str, Any]) -> str:
    """Options as short text, e.g. ``lr=0.001,r=8``; distinguishes LoRA r=4 from r=16 in summaries."""
    return ",".join(f"{k}={v}" for k, v in sorted(_flatten(options, "").items()))


def select_head_lr(records: list[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """Model selection for gradient-trained runs, on validation data only: per task x backbone x method x
    options (less ``head_lr``) x regime x shots x few-shot rule, keep the runs of the head LR whose mean validation loss
    (``training.val_loss``) over folds and draws is lowest. Runs without ``options.head_lr`` pass through.
    Returns the kept records and one line per group saying what was chosen."""
    groups: dict[tuple, dict[float, list[RunRecord]]] = {}
    kept: list[RunRecord] = []
    for record in sorted(records, key=_sort_key):
        if "head_lr" not in record.options:
            kept.append(record)
            continue
        rest = {k: v for k, v in record.options.items() if k != "head_lr"}
        label = (record.task, record.backbone, record.method, options_label(rest), record.regime, record.shots,
                 record.support_from)
        groups.setdefault(label, {}).setdefault(float(record.options["head_lr"]), []).append(record)
    notes = []
    for label, by_lr in groups.items():
        losses = {lr: float(np.mean([_val_loss(r) for r in runs])) for lr, runs in by_lr.items()}
        best = min(sorted(losses), key=lambda lr: (not math.isfinite(losses[lr]), losses[lr]))
        kept.extend(by_lr[best])
        task, backbone, method, _, regime, shots, support_from = label
        level = regime if shots is None else f"{regime} k={shots}"
        level += f" (support from {support_from})" if support_from else ""
        tried = ", ".join(f"{lr:g}: {losses[lr]:.4g}" for lr in sorted(losses))
        notes.append(f"{task} {backbone} {method} {level}: head LR {best:g} by mean validation loss ({tried})")
    return sorted(kept, key=_sort_key), notes


def _val_loss(record: RunRecord) -> float:
    value = record.training.get("val_loss")
    return float("nan") if value is None else float(value)


def summarize_records(records: list[RunRecord], metrics: tuple[str, ...] = ("mcc", "average_precision"),
                      pooled: bool = False) -> list[dict]:
    """One row per :data:`GROUP_BY` value: each metric averaged over the draws of each fold first, then mean ±
    std over folds (a ``metrics.Summary`` whose n counts folds), and ``<metric>_draw_std``, the draw-to-draw
    spread (mean over folds of the std over that fold's draws; NaN with one run per fold).

    Draws of one fold share its test set and often most of their patients, so they are not independent
    evidence: pooling folds x draws as n would understate the uncertainty. ``drawn_patients`` is the smallest,
    over folds, number of distinct patients per class that the draws came from (few-shot records only).
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for record in sorted(records, key=_sort_key):
        label = (
            record.task,
            record.backbone,
            record.method,
            options_label(record.options),
            record.regime,
            record.shots,
            record.support_from,
        )
        groups.setdefault(label, []).append(record)
    rows = []
    for label, members in groups.items():
        row: dict[str, Any] = dict(zip(GROUP_BY, label, strict=True))
        by_fold: dict[str, list[RunRecord]] = {}
        for record in members:
            by_fold.setdefault(record.fold, []).append(record)
        row.update(runs=len(members), folds=len(by_fold), drawn_patients=_drawn(members))
        for name in metrics:
            row[name], row[f"{name}_draw_std"] = fold_then_draw(
                [[_value(r, name) for r in runs] for runs in by_fold.values()])
        row["pooled"] = pooled_interval(members) if pooled else None  # bootstraps: only when asked
        rows.append(row)
    return rows


def fold_then_draw(values: list[list[float]]) -> tuple[Any, float]:
    """``values[fold][draw]`` -> (Summary of the per-fold means over folds, mean over folds of the std over
    draws). Undefined (NaN) values are left out of their fold's mean; a fold with none is left out."""
    means = [summarize(v).mean for v in values]
    spreads = [summarize(v).std for v in values]
    finite = [x for x in spreads if math.isfinite(x)]
    return summarize(means), (float(np.mean(finite)) if finite else float("nan"))


def _value(record: RunRecord, name: str) -> float:
    value = record.metrics.get(name)
    return float("nan") if value is None or isinstance(value, str) else float(value)


def _drawn(records: list[RunRecord]) -> dict[str, int] | None:
    counts = [c for r in records if (c := r.provenance.get("drawn_patients")) is not None]
    if not counts or len(counts) < len(records):
        return None
    return {side: min(int(c[side]) for c in counts) for side in ("positive", "negative")}


def drawn_patients(patients: ArrayLike, labels: ArrayLike) -> dict[str, int]:
    """Distinct patients per class over all support sets of one fold and level (their rows concatenated):
    what a few-shot record carries as ``provenance["drawn_patients"]``, so a reader sees k = 4 drawn from 5."""
    patients, labels = np.asarray(patients), np.asarray(labels)
    return {side: int(np.unique(patients[labels == value]).size)
            for side, value in (("positive", 1), ("negative", 0))}


def pooled_interval(records: list[RunRecord], n_boot: int = 1000, seed: int = 0,
                    threshold: Callable[[RunRecord], float] | None = None) -> dict[str, Any] | None:
    """MCC and PR-AUC of the test predictions pooled over runs whose test sets are disjoint (the folds of one
    cross-validation: every image scored once), each with a 95 % bootstrap interval over patients. MCC calls
    each image at ``threshold(its run)`` (default 0.5). None where test sets overlap (few-shot draws share
    their fold's test set) or patients were not recorded."""
    ids = [i for r in records for i in r.test_ids]
    if not ids or len(set(ids)) != len(ids) or not all(r.test_patients for r in records):
        return None
    y = np.array([v for r in records for v in r.test_labels])
    s = np.array([v for r in records for v in r.test_scores], dtype=np.float64)
    cut = threshold or (lambda _record: 0.5)
    calls = np.concatenate([np.asarray(r.test_scores) >= cut(r) for r in records]).astype(np.float64)
    patients = np.array([p for r in records for p in r.test_patients])
    out: dict[str, Any] = {"n": len(ids), "patients": len(set(patients.tolist()))}
    for name, scores in (("mcc", calls), ("average_precision", s)):
        out[name] = binary_metrics(y, scores)[name]
        out[f"{name}_ci"] = tuple(bootstrap_ci(y, scores, patients, name, n_boot=n_boot, seed=seed)[:2])
    return out


def write_summary(rows: list[dict[str, Any]], out_csv: str | Path) -> Path:
    """`summarize_records` rows as a CSV a person can open: per metric the mean, std and number of folds, the
    draw-to-draw std, the distinct patients drawn per class, and the pooled cross-validation estimate with its
    patient-level 95 % interval where there is one."""
    flat = []
    for row in rows:
        cells = {name: row[name] for name in (*GROUP_BY, "runs", "folds")}
        for name, value in row.items():
            if hasattr(value, "mean"):  # a metrics.Summary over folds
                cells.update({f"{name}_mean": value.mean, f"{name}_std": value.std, f"{name}_folds": value.n,
                              f"{name}_draw_std": row.get(f"{name}_draw_std")})
        for side, count in (row.get("drawn_patients") or {}).items():
            cells[f"drawn_patients_{side}"] = count
        for name, value in (row.get("pooled") or {}).items():
            if isinstance(value, tuple):
                cells.update({f"pooled_{name}_low": value[0], f"pooled_{name}_high": value[1]})
            else:
                cells[f"pooled_{name}"] = value
        flat.append(cells)
    columns = list(dict.fromkeys(name for cells in flat for name in cells))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in cells.items()} for cells in flat)
    return atomic_write(out_csv, buffer.getvalue().encode("utf-8"))
