"""Planning a training request: its settings, and every run it names with its key, before any model is built.

Protocol defaults are the benchmark's (Ruffini et al. 2025); `adapters.train` documents them whole. Every
setting that changes numbers enters each run's options, so it is in the record and in the run key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.methods import HEAD_LRS, Method, get_method, target_modules
from featcache.backbones import BackboneSpec, get_spec, weights_identity
from featcache.datasets import get_task, task_for
from featcache.device import precision_for, resolve_device
from featcache.errors import SplitError, UsageError
from featcache.manifest import Manifest, load_manifest
from featcache.records import drawn_patients, run_key
from featcache.splits import Splits, load_splits

# Batch size per task, as the benchmark's configs; any other task gets DEFAULT_BATCH.
TASK_BATCH = {"AFC": 128, "AFC_death": 128, "NY": 128, "NY_icu": 128, "CoCross": 64, "CAR": 32}
DEFAULT_BATCH = 32
FEWSHOT_DRAWS = 10
# Few-shot support sets come from the fold's train part (`featcache.splits`): every draw validates on the whole
# validation part, as full data does; a fold whose part cannot validate has its levels skipped in the split file.
VALIDATION = {"full": "fold validation part", "fewshot": "fold validation part, whole (support from train part)"}


@dataclass(frozen=True)
class TrainSettings:
    """How every run of a `run_train` call trains. All but ``grad_ckpt``, ``checkpoint_every_s`` and ``pack``
    (which change memory, I/O and speed, never numbers) enter each run's options and key; ``adapter_dropout``
    enters them only when set (None: the benchmark's 0.1 for LoRA and VeRA), so default keys stay as they were.
    ``pack``: runs trained together in one batched pass (`adapters.packed`); 1 trains one at a time."""

    max_epochs: int = 1000
    patience: int = 100
    warmup: int = 50
    plateau_patience: int = 25
    plateau_factor: float = 0.1
    min_lr: float = 1e-8
    batch_size: int | None = None  # None: the task's (TASK_BATCH)
    accumulate: int = 1
    seed: int = 42
    backbone_lr: float | None = None  # None: the method's
    augment: bool = False
    grad_ckpt: bool = False
    checkpoint_every_s: float = 60.0
    adapter_dropout: float | None = None
    pack: int = 1

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "accumulate", "plateau_patience", "pack"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or (self.batch_size is not None and self.batch_size < 1):
            raise UsageError("--warmup must be >= 0 and --batch-size >= 1")
        if self.adapter_dropout is not None and not 0 <= self.adapter_dropout < 1:
            raise UsageError(f"--adapter-dropout must be in [0, 1), got {self.adapter_dropout}")

    def options(self, method: Method, task: str, head_lr: float, rank: int | None, precision: str,
                regime: str) -> dict[str, Any]:
        """The options a run record carries and its key hashes."""
        out = {
            "head": "linear", "head_lr": head_lr, "backbone_lr": self.backbone_lr_for(method),
            "loss": "class-weighted-ce", "optimizer": "adam", "max_epochs": self.max_epochs,
            "patience": self.patience, "warmup": self.warmup, "plateau_patience": self.plateau_patience,
            "plateau_factor": self.plateau_factor, "min_lr": self.min_lr,
            "batch_size": self.batch_size_for(task), "accumulate": self.accumulate, "augment": self.augment,
            "validation": VALIDATION["full" if regime == "full" else "fewshot"], "select": "min-val-loss",
            "frozen_modules": "eval", "precision": precision, "images": "uint8",
        }
        if rank is not None:
            out["rank"] = rank
        if method.dropout and self.adapter_dropout is not None:
            out["adapter_dropout"] = self.adapter_dropout
        return out

    def backbone_lr_for(self, method: Method) -> float | None:
        if method.trains == "none":
            return None
        return self.backbone_lr if self.backbone_lr is not None else method.backbone_lr

    def batch_size_for(self, task: str) -> int:
        return self.batch_size or TASK_BATCH.get(task, DEFAULT_BATCH)


@dataclass(frozen=True)
class Run:
    """One training run: which images train, validate and test it, and its key."""

    fold: str
    regime: str
    shots: int | None
    draw: int | None
    head_lr: float
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    key: str
    options: dict[str, Any]
    drawn: dict[str, int] | None = None  # few-shot: distinct patients per class over the level's draws

    @property
    def label(self) -> str:
        level = "full" if self.shots is None else f"k={self.shots} draw {self.draw}"
        return f"{self.fold} {level} head LR {self.head_lr:g}"


@dataclass(frozen=True)
class TrainPlan:
    """What every run of one request shares."""

    manifest: Manifest
    task: str
    spec: BackboneSpec
    method: Method
    rank: int | None
    splits: Splits
    identity: str
    precision: str
    settings: TrainSettings
    labels: dict[str, int]
    runs: tuple[Run, ...]
    skipped: tuple[str, ...]


def plan(manifest: str | Path | Manifest, task: str, model: str, *, method: str | Method, rank: int | None = None,
         full: bool = True, shots: Sequence[int] = (), draws: int | None = None, per_center: bool = False,
         folds: Sequence[str] | None = None, head_lrs: Sequence[float] = HEAD_LRS,
         settings: TrainSettings | None = None, weights: str | Path | None = None, random_init: bool = False,
         device: str = "auto", positive: str | None = None) -> TrainPlan:
    """Every run a request names, with its key; no model is built and no image read. Refuses, in one line, a
    method that does not apply to the backbone, a rank where it has none, and shot levels a fold cannot
    supply; levels the split file skipped (too few patients, or a validation part that cannot validate) are
    listed in ``skipped`` with the split file's reason."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    spec, the_method = get_spec(model), get_method(method)
    rank = the_method.rank_for(rank)
    if the_method.peft:
        target_modules(spec, the_method)  # VeRA on a CNN is refused here, before any work
    settings = settings or TrainSettings()
    if positive is not None:
        task_for(manifest, task, positive)
    splits = load_splits(manifest.path, task)
    splits.require_validation()  # every run early-stops on a validation part
    identity = weights_identity(spec, weights, random_init)
    precision = precision_for(resolve_device(device))
    ids, codes = manifest.labels(get_task(task))
    labels = dict(zip(ids, codes.tolist(), strict=True))
    chosen = [splits.fold(f) for f in folds] if folds else list(splits.folds)
    digest = splits.digest()
    runs: list[Run] = []
    skipped: list[str] = []
    kind = "fewshot_center" if per_center else "fewshot"
    regime = "fewshot-center" if per_center else "fewshot"
    levels: list[int | None] = [None] if full else [*sorted(set(shots))]
    for fold in chosen:
        for k in levels:
            sets: list[tuple[int | None, tuple[str, ...], tuple[str, ...]]]
            if k is None:
                sets = [(None, fold.train, fold.val)]
            elif k in fold.skipped[kind]:
                skipped.append(f"{fold.name} k={k}: {fold.skipped[kind][k]}")
                continue
            else:
                drawn = splits.fewshot_per_center(fold, k) if per_center else splits.fewshot(fold, k)
                if draws is not None and draws > len(drawn):
                    raise SplitError(f"task {task} {fold.name}: {draws} draws asked, the split file has "
                                     f"{len(drawn)}")
                sets = [(r, tuple(s), fold.val) for r, s in enumerate(drawn[: draws or FEWSHOT_DRAWS])]
            support = [i for _, train, _ in sets for i in train] if k is not None else []
            drawn_counts = drawn_patients(manifest.patients(support), [labels[i] for i in support]) if support \
                else None
            for draw, train, val in sets:
                for lr in head_lrs:
                    the_regime = "full" if k is None else regime
                    options = settings.options(the_method, task, float(lr), rank, precision, the_regime)
                    key = run_key(task=task, backbone=spec.name, method=the_method.name, fold=fold.name,
                                  seed=settings.seed, options=options, regime=the_regime, shots=k, draw=draw,
                                  splits_digest=digest, identity=identity)
                    runs.append(Run(fold.name, the_regime, k, draw, float(lr), tuple(train), tuple(val),
                                    tuple(fold.test), key, options, drawn_counts))
    if not runs and skipped:
        raise SplitError(f"task {task}: no run can be made: {'; '.join(skipped)}")
    return TrainPlan(manifest, task, spec, the_method, rank, splits, identity, precision, settings, labels,
                 tuple(runs), tuple(skipped))


def planned_keys(manifest: str | Path, task: str, model: str, **kwargs: Any) -> list[str]:
    """Run keys `run_train` with the same arguments would write (to see what a grid has done)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pixels", "out", "progress", "inputs", "features")}
    return [run.key for run in plan(manifest, task, model, **kwargs).runs]
