"""`run_train`: end-to-end training of a backbone + linear head under one adaptation method, on the persisted
folds and few-shot draws of stage 1, one `RunRecord` per run (fold x draw x head LR).

Protocol defaults (the benchmark's, Ruffini et al. 2025; each is in every record's options):

- Class-weighted cross-entropy over two logits, weights ``n / (2 n_c)`` from the run's training images; the
  validation loss uses the same weights, so it is the objective measured on held-out images.
- Adam; head LR from the grid {1e-2, 1e-3, 1e-4} (one run and record each), backbone/adapter LR 1e-5 for FFT
  and 1e-4 for the PEFT methods. Linear warm-up over the first 50 epochs, then LR x0.1 after 25 epochs without a
  lower validation loss (floor 1e-8); early stop after 100 epochs without one; at most 1000 epochs. The weights
  of the epoch with the lowest validation loss are the ones scored on the test part, and the MCC threshold is
  chosen on that same model's validation scores.
- Few-shot: the model trains on the support set of the fold and draw; validation (early stopping, LR plateau,
  threshold, head-LR selection) is the fold's validation part less the support set's patients. The benchmark
  subsampled only the training data; no test image is ever seen before the final scoring.
- Modules whose parameters are all frozen run in eval mode (batch-norm statistics and dropout of a frozen
  backbone stay fixed: LP and LoRA on a CNN do not drift its statistics); the rest trains in train mode.
- A batch is ``batch_size * accumulate`` images; its loss is the class-weighted mean over the whole batch, summed
  exactly over micro-batches and ranks (DDP), so accumulation and ``torchrun`` change nothing but memory and
  speed. A trailing batch of one image joins the previous one (batch norm needs two).
- Each epoch visits the training images in the order ``randperm(seed, epoch)``, so a resumed run sees the same
  batches; checkpoints hold the mutable weights, optimiser, scheduler, early-stopping state and RNG.

Accelerate supplies device placement, DDP (gloo on CPU, NCCL on GPUs), bf16 autocast on CUDA and ``no_sync``;
the images are held in memory (`adapters.images`), so no DataLoader or sampler state is needed.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from adapters.classifier import Classifier
from adapters.images import Images, load_images
from adapters.methods import Method, apply_method, get_method, target_modules
from featcache.backbones import BackboneSpec, build_backbone, count_parameters, get_spec, weights_identity
from featcache.datasets import get_task, task_for
from featcache.errors import SplitError, UsageError
from featcache.extract import resolve_device
from featcache.fileio import atomic_write
from featcache.manifest import Manifest, load_manifest
from featcache.metrics import evaluate
from featcache.records import RunRecord, drawn_patients, record_path, run_key, write_record
from featcache.splits import Splits, load_splits

HEAD_LRS = (1e-2, 1e-3, 1e-4)
RANKS = (4, 8, 16)
# Batch size per task, as the benchmark's configs; any other task gets DEFAULT_BATCH.
TASK_BATCH = {"AFC": 128, "AFC_death": 128, "NY": 128, "NY_icu": 128, "CoCross": 64, "CAR": 32}
DEFAULT_BATCH = 32
FEWSHOT_DRAWS = 10
VALIDATION = {"full": "fold validation part",
              "fewshot": "fold validation part less the support set's patients"}
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"

TrainProgress = Callable[[str, int, int, str], None]  # (run label, epochs done, max epochs, status line)


@dataclass(frozen=True)
class TrainSettings:
    """How every run of a `run_train` call trains. All but ``grad_ckpt`` and ``checkpoint_every_s`` (which
    change memory and I/O, never numbers) enter each run's options and key."""

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

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "accumulate", "plateau_patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or (self.batch_size is not None and self.batch_size < 1):
            raise UsageError("--warmup must be >= 0 and --batch-size >= 1")

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
        return out

    def backbone_lr_for(self, method: Method) -> float | None:
        if method.trains == "none":
            return None
        return self.backbone_lr if self.backbone_lr is not None else method.backbone_lr

    def batch_size_for(self, task: str) -> int:
        return self.batch_size or TASK_BATCH.get(task, DEFAULT_BATCH)


@dataclass
class TrainReport:
    """Every run of a request (new and already recorded), and the levels that could not run, with why."""

    records: list[RunRecord] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    skipped: list[str] = field(default_factory=list)


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


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class _Plan:
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


def _check_rank(method: Method, rank: int | None) -> int | None:
    if method.name in ("lora", "vera"):
        rank = 8 if rank is None else rank
        if rank < 1:
            raise UsageError(f"--rank must be at least 1 (the benchmark used {', '.join(map(str, RANKS))})")
        return rank
    if rank is not None:
        raise UsageError(f"--rank applies to lora and vera only, not to {method.name}")
    return None


def _fewshot_val(splits: Splits, manifest: Manifest, fold, support: Sequence[str]) -> tuple[str, ...]:
    taken = set(manifest.patients(support))
    return tuple(i for i, p in zip(fold.val, manifest.patients(fold.val), strict=True) if p not in taken)


def plan(manifest: str | Path | Manifest, task: str, model: str, *, method: str, rank: int | None = None,
         full: bool = True, shots: Sequence[int] = (), draws: int | None = None, per_center: bool = False,
         folds: Sequence[str] | None = None, head_lrs: Sequence[float] = HEAD_LRS,
         settings: TrainSettings | None = None, weights: str | Path | None = None, random_init: bool = False,
         device: str = "auto", positive: str | None = None) -> _Plan:
    """Every run a request names, with its key; no model is built and no image read. Refuses, in one line, a
    method that does not apply to the backbone, a rank where it has none, and shot levels a fold cannot
    supply."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    spec, the_method = get_spec(model), get_method(method)
    rank = _check_rank(the_method, rank)
    if the_method.config is not None:
        target_modules(spec, the_method)  # VeRA on a CNN is refused here, before any work
    settings = settings or TrainSettings()
    if positive is not None:
        task_for(manifest, task, positive)
    splits = load_splits(manifest.path, task)
    splits.require_validation()  # every run early-stops on a validation part
    identity = weights_identity(spec, weights, random_init)
    precision = "bf16-autocast" if resolve_device(device).type == "cuda" else "float32"
    ids, codes = manifest.labels(get_task(task))
    labels = dict(zip(ids, codes.tolist(), strict=True))
    chosen = [splits.fold(f) for f in folds] if folds else list(splits.folds)
    digest = splits.digest()
    runs: list[Run] = []
    skipped: list[str] = []
    kind = "fewshot_center" if per_center else "fewshot"
    regime = "fewshot-center" if per_center else "fewshot"
    levels: list[int | None] = [None] if full else sorted(set(shots))
    for fold in chosen:
        for k in levels:
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
                sets = [(r, tuple(s), _fewshot_val(splits, manifest, fold, s))
                        for r, s in enumerate(drawn[: draws or FEWSHOT_DRAWS])]
            support = [i for _, train, _ in sets for i in train] if k is not None else []
            drawn_counts = drawn_patients(manifest.patients(support), [labels[i] for i in support]) if support \
                else None
            for draw, train, val in sets:
                if not val:
                    raise SplitError(f"task {task} {fold.name} k={k} draw {draw}: no validation image is left "
                                     "once the support set's patients are removed")
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
    return _Plan(manifest, task, spec, the_method, rank, splits, identity, precision, settings, labels,
                 tuple(runs), tuple(skipped))


def planned_keys(manifest: str | Path, task: str, model: str, **kwargs) -> list[str]:
    """Run keys `run_train` with the same arguments would write (to see what a grid has done)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pixels", "out", "progress")}
    return [run.key for run in plan(manifest, task, model, **kwargs).runs]


# ------------------------------------------------------------------------------------------ the model


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with parameters or buffers, none of them trainable: they run in eval mode (see module doc)."""
    found = []
    for module in model.modules():
        params = list(module.parameters())
        if (params or list(module.buffers())) and not any(p.requires_grad for p in params):
            found.append(module)
    return found


def set_train_mode(model: nn.Module, frozen: list[nn.Module] | None = None) -> None:
    """Train mode, except the frozen modules (found once per run by the trainer, else here)."""
    model.train()
    for module in frozen_modules(model) if frozen is None else frozen:
        module.eval()


def mutable_names(model: nn.Module) -> list[str]:
    """State-dict names that training can change: trainable parameters and the buffers of modules in train
    mode (batch-norm statistics). Checkpoints and the best-epoch copy hold only these."""
    set_train_mode(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix, module in model.named_modules():
        if module.training:
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers(recurse=False)]
    saved = set(model.state_dict())  # non-persistent buffers (position ids) are not state
    return sorted(n for n in set(names) if n in saved)


def _enable_grad_ckpt(model: nn.Module, spec: BackboneSpec) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise UsageError(f"--grad-ckpt: {spec.name} has no gradient checkpointing")


def build_classifier(spec: BackboneSpec, method: str, rank: int | None, *, weights: str | Path | None = None,
                     random_init: bool = False, seed: int = 42, grad_ckpt: bool = False) -> Classifier:
    """Backbone + two-logit head, adapted by ``method``; the head and adapters are initialised from ``seed``
    (the backbone's random weights, where it has them, are the same as stage 1's)."""
    backbone = build_backbone(spec, weights=weights, random_init=random_init)
    if grad_ckpt:
        _enable_grad_ckpt(backbone.model, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = Classifier(backbone, n_out=2)
        return apply_method(classifier, method, r=rank or 8)


def class_weights(y: torch.Tensor) -> torch.Tensor:
    """``n / (2 n_c)`` per class from the training labels."""
    counts = torch.bincount(y, minlength=2).double()
    if (counts == 0).any():
        raise SplitError("a training set holds one class only; class-weighted training needs both")
    return (len(y) / (2 * counts)).float()


def batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random order of ``n`` rows in batches of ``size``; a trailing batch of one joins the previous."""
    order = torch.randperm(n, generator=generator)
    parts = list(order.split(size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2] = torch.cat([parts[-2], parts.pop()])
    return parts


# ------------------------------------------------------------------------------------------ one run


@dataclass
class _State:
    """Everything a checkpoint restores, besides the model, optimiser and scheduler."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    best: dict[str, torch.Tensor] = field(default_factory=dict)


class _Trainer:
    """One run: the model, its optimiser and scheduler, its data, and its checkpoint."""

    def __init__(self, plan: _Plan, run: Run, images: Images, out: Path, accelerator: Accelerator,
                 weights: str | Path | None, random_init: bool):
        self.plan, self.run, self.images, self.acc = plan, run, images, accelerator
        settings = plan.settings
        self.folder = out / run.key
        self.model = build_classifier(plan.spec, plan.method.name, plan.rank, weights=weights,
                                      random_init=random_init, seed=settings.seed, grad_ckpt=settings.grad_ckpt)
        self.trainable, self.total = count_parameters(self.model)
        self.names = mutable_names(self.model)
        head_ids = {id(p) for p in self.model.head_parameters()}
        body = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": self.model.head_parameters(), "lr": run.head_lr}]
        if body:
            groups.append({"params": body, "lr": settings.backbone_lr_for(plan.method)})
        self.base_lrs = [g["lr"] for g in groups]
        optimizer = torch.optim.Adam(groups)
        if accelerator.device.type == "cuda" and plan.spec.family == "cnn":
            self.model = self.model.to(memory_format=torch.channels_last)
            if accelerator.num_processes > 1:  # batch statistics over the global batch, as one process
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ddp, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.frozen = frozen_modules(self.ddp)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer.optimizer, factor=settings.plateau_factor, patience=settings.plateau_patience,
            min_lr=settings.min_lr)
        self.y = {part: torch.tensor([plan.labels[i] for i in ids], dtype=torch.long)
                  for part, ids in (("train", run.train), ("val", run.val), ("test", run.test))}
        self.rows = {part: images.rows(ids) for part, ids in (("train", run.train), ("val", run.val),
                                                              ("test", run.test))}
        self.weight = class_weights(self.y["train"]).to(accelerator.device)
        self.state = _State()

    # ---- checkpoints

    def _mutable(self) -> dict[str, torch.Tensor]:
        full = self.acc.unwrap_model(self.ddp).state_dict()
        return {n: full[n].detach().clone() for n in self.names}

    def _load_mutable(self, state: dict[str, torch.Tensor]) -> None:
        self.acc.unwrap_model(self.ddp).load_state_dict(state, strict=False)

    def save_checkpoint(self) -> None:
        if not self.acc.is_main_process:
            return
        buffer = io.BytesIO()
        torch.save({"model": self._mutable(), "optimizer": self.optimizer.state_dict(),
                    "plateau": self.plateau.state_dict(), "state": asdict(self.state),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, buffer)
        atomic_write(self.folder / CHECKPOINT, buffer.getvalue())

    def resume(self) -> bool:
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self._load_mutable(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.plateau.load_state_dict(saved["plateau"])
        self.state = _State(**saved["state"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        return True

    # ---- passes

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, total_weight: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(logits.float(), y, reduction="none") * self.weight[y]).sum() / total_weight

    def train_epoch(self, epoch: int) -> float:
        settings, acc = self.plan.settings, self.acc
        set_train_mode(self.ddp, self.frozen)
        if epoch < settings.warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * (epoch + 1) / settings.warmup
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
        rows, y = self.rows["train"], self.y["train"].to(acc.device)
        size = settings.batch_size_for(self.plan.task) * settings.accumulate
        total = 0.0
        for batch in batches(len(rows), size, generator):
            total_weight = self.weight[y[batch]].sum()
            micro = [m for m in batch.tensor_split(settings.accumulate) if len(m)]
            for i, part in enumerate(micro):
                mine = part[acc.process_index:: acc.num_processes]
                last = i == len(micro) - 1
                with acc.no_sync(self.ddp) if not last else nullcontext():
                    x = self.images.batch(rows[mine], self.plan.spec.preprocess, acc.device)
                    if self.plan.settings.augment:
                        x = _augment(x, generator)
                    with acc.autocast():
                        loss = self._loss(self.ddp(x), y[mine], total_weight) * acc.num_processes
                    acc.backward(loss)
                total += float(loss.detach()) / acc.num_processes
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1:
            total = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="sum"))
        return total / max(1, math.ceil(len(rows) / size))

    @torch.no_grad()
    def scores(self, part: str) -> tuple[np.ndarray, float]:
        """Positive-class probabilities of a part and its class-weighted loss (same on every rank)."""
        self.ddp.eval()
        model = self.acc.unwrap_model(self.ddp)
        rows, y = self.rows[part], self.y[part].to(self.acc.device)
        size = self.plan.settings.batch_size_for(self.plan.task)
        logits = []
        for batch in rows.split(size):
            with self.acc.autocast():
                logits.append(model(self.images.batch(batch, self.plan.spec.preprocess, self.acc.device)).float())
        out = torch.cat(logits)
        loss = float(self._loss(out, y, self.weight[y].sum()))
        return out.softmax(1)[:, 1].cpu().double().numpy(), loss

    def fit(self, progress: TrainProgress | None) -> None:
        settings, state = self.plan.settings, self.state
        last_save = time.monotonic()
        while state.epoch < settings.max_epochs and state.bad_epochs < settings.patience:
            started = time.perf_counter()
            train_loss = self.train_epoch(state.epoch)
            val_loss = self.scores("val")[1]
            val_loss = broadcast_object_list([val_loss])[0] if self.acc.num_processes > 1 else val_loss
            state.train_loss.append(train_loss)
            state.val_loss.append(val_loss)
            state.lr.append(self.optimizer.param_groups[0]["lr"])
            if val_loss < state.best_loss:
                state.best_loss, state.best_epoch, state.bad_epochs = val_loss, state.epoch, 0
                state.best = self._mutable()
            else:
                state.bad_epochs += 1
            if state.epoch + 1 >= settings.warmup:
                self.plateau.step(val_loss)
            state.epoch += 1
            state.elapsed_s += time.perf_counter() - started
            if time.monotonic() - last_save >= settings.checkpoint_every_s:
                self.save_checkpoint()
                last_save = time.monotonic()
            if progress is not None:
                progress(self.run.label, state.epoch, settings.max_epochs,
                         f"train {train_loss:.4f} · val {val_loss:.4f} · best {state.best_loss:.4f} "
                         f"@ {state.best_epoch + 1}")
        if progress is not None:
            why = "early stop" if state.bad_epochs >= settings.patience else "epoch limit"
            progress(self.run.label, state.epoch, settings.max_epochs,
                     f"done ({why}): best val {state.best_loss:.4f} at epoch {state.best_epoch + 1}")
        self._load_mutable(state.best)

    def record(self, plan: _Plan, weights: str | Path | None) -> RunRecord:
        s_val, _ = self.scores("val")
        s_test, _ = self.scores("test")
        state, run = self.state, self.run
        test = list(run.test)
        return RunRecord(
            task=plan.task, backbone=plan.spec.name, method=plan.method.name, fold=run.fold,
            seed=plan.settings.seed, options=run.options, regime=run.regime, shots=run.shots, draw=run.draw,
            splits_digest=plan.splits.digest(), identity=plan.identity, test_ids=test,
            test_labels=self.y["test"].tolist(), test_scores=s_test.tolist(),
            test_patients=plan.manifest.patients(test),
            metrics=evaluate(self.y["test"].numpy(), s_test, self.y["val"].numpy(), s_val,
                             patients=plan.manifest.patients(test)),
            wall_time_s=state.elapsed_s, trainable_params=self.trainable, total_params=self.total,
            training={"best_epoch": state.best_epoch + 1, "val_loss": state.best_loss,
                      "epochs_run": state.epoch,
                      "stopped": "early" if state.bad_epochs >= plan.settings.patience else "max-epochs",
                      "curves": {"train_loss": state.train_loss, "val_loss": state.val_loss, "lr": state.lr}},
            provenance={"weights": plan.identity, "weights_path": None if weights is None else str(weights),
                        "images": self.images.source, "n_train": len(run.train), "n_val": len(run.val),
                        "trainable_share": self.trainable / self.total, "processes": self.acc.num_processes,
                        "device": self.acc.device.type, "threshold": "validation scores of the tested model",
                        **({"drawn_patients": run.drawn} if run.drawn else {})},
        )


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flips and small affine jitter (±10°, ±5 % shift, 0.9-1.1 scale), drawn from the run's
    seeded generator so augmented runs stay reproducible and resumable."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * math.pi / 18)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.1
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------------ the request


def _check_folder(folder: Path, run: Run, plan: _Plan) -> None:
    """A run folder is this run's or refused: written with the run's defining fields, compared on resume."""
    config = {"key": run.key, "task": plan.task, "backbone": plan.spec.name, "method": plan.method.name,
              "fold": run.fold, "regime": run.regime, "shots": run.shots, "draw": run.draw,
              "options": run.options, "identity": plan.identity, "splits_digest": plan.splits.digest()}
    path = folder / CONFIG
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            found = None
        if found != json.loads(json.dumps(config)):
            raise UsageError(f"{folder}: a run folder of another configuration sits under this run's key; "
                             "move it away or use another --out")
    else:
        atomic_write(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def run_train(manifest: str | Path, task: str, model: str, *, method: str, rank: int | None = None,
              full: bool = True, shots: Sequence[int] = (), draws: int | None = None, per_center: bool = False,
              folds: Sequence[str] | None = None, head_lrs: Sequence[float] = HEAD_LRS,
              settings: TrainSettings | None = None, weights: str | Path | None = None,
              random_init: bool = False, pixels: str | Path | None = None, out: str | Path = "runs",
              device: str = "auto", progress: TrainProgress | None = None,
              load_progress: Callable[[int, int], None] | None = None, positive: str | None = None
              ) -> TrainReport:
    """Train ``model`` adapted by ``method`` on ``task``: every fold (``full``) or fold x draw of each shot
    level, for each head LR; one record per run in ``out`` (artefacts in ``out/<key>/``). Recorded runs are
    read back, not retrained; an interrupted run resumes from its last checkpoint. See the module doc."""
    the_plan = plan(manifest, task, model, method=method, rank=rank, full=full, shots=shots, draws=draws,
                    per_center=per_center, folds=folds, head_lrs=head_lrs, settings=settings, weights=weights,
                    random_init=random_init, device=device, positive=positive)
    out = Path(out)
    report = TrainReport(skipped=list(the_plan.skipped))
    todo = []
    for run in the_plan.runs:
        path = record_path(out, run.key)
        if path.is_file():
            report.records.append(RunRecord.from_dict(json.loads(path.read_text(encoding="utf-8"))))
            report.existing += 1
            (out / run.key / CHECKPOINT).unlink(missing_ok=True)  # a kill between record and cleanup
        else:
            todo.append(run)
    if not todo:
        return report
    ids = sorted({i for run in todo for i in run.train + run.val + run.test})
    images = load_images(the_plan.manifest, ids, the_plan.spec.preprocess, pixels, progress=load_progress)
    accelerator = _accelerator(device)
    for run in todo:
        report.records.append(_train_run(the_plan, run, images, out, accelerator, weights, random_init, progress))
        report.written += 1
    return report


def _accelerator(device: str) -> Accelerator:
    resolved = resolve_device(device)
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision="bf16" if resolved.type == "cuda" else "no")


def _train_run(plan: _Plan, run: Run, images: Images, out: Path, accelerator: Accelerator,
               weights: str | Path | None, random_init: bool, progress: TrainProgress | None) -> RunRecord:
    from adapters.artifacts import save_artifacts

    folder = out / run.key
    if accelerator.is_main_process:
        _check_folder(folder, run, plan)
    accelerator.wait_for_everyone()
    torch.manual_seed(plan.settings.seed)
    trainer = _Trainer(plan, run, images, out, accelerator, weights, random_init)
    trainer.resume()
    trainer.fit(progress)
    record = trainer.record(plan, weights)
    if accelerator.is_main_process:
        save_artifacts(accelerator.unwrap_model(trainer.ddp), plan.method, folder)
        write_record(record, out)
        (folder / CHECKPOINT).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return record
