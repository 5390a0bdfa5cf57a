"""One training run: its optimiser, schedule, batches, early stop, checkpoint and record (see `adapters.train`
for the protocol). The model comes built (`adapters.model`); the request loop that makes runs is `adapters.train`.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from adapters.artifacts import CHECKPOINT
from adapters.classifier import Classifier
from adapters.images import Images
from adapters.model import counted_parameters, frozen_modules, mutable_names, set_train_mode
from adapters.plan import Run, TrainPlan, TrainSettings
from featcache.datasets import get_task
from featcache.errors import RecordError, SplitError
from featcache.fileio import atomic_write
from featcache.metrics import evaluate
from featcache.records import HEAD_COUNT, RunRecord
from featcache.splits import support_digest

_CHECKPOINT_PARTS = {"model", "optimizer", "plateau", "state", "rng", "cuda_rng"}

TrainProgress = Callable[[str, int, int, str], None]  # (run label, epochs done, max epochs, status line)


class DamagedCheckpoint(RecordError):
    """A run's checkpoint that cannot be resumed from: the run restarts from scratch (see `adapters.train`)."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        super().__init__(f"{path}: damaged checkpoint, {reason}; this run starts again from scratch")


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
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


def make_plateau(optimizer: torch.optim.Optimizer,
                 settings: TrainSettings) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """PyTorch's ``ReduceLROnPlateau`` with its defaults, as the benchmark's code used it (see `observe`)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=settings.plateau_factor,
                                                      patience=settings.plateau_patience, min_lr=settings.min_lr)


def observe(state: _State, plateau: torch.optim.lr_scheduler.ReduceLROnPlateau, val_loss: float,
            settings: TrainSettings) -> bool:
    """Book one epoch's validation loss; True when it is the new best (the caller keeps those weights).

    Two definitions of "better", each the benchmark's library's, on purpose:
    - best epoch and early stop: a strictly lower validation loss than every epoch before, warm-up included;
      the run stops after ``patience`` consecutive epochs without one (on the ``patience``-th);
    - LR plateau (PyTorch ``ReduceLROnPlateau``, mode min, relative threshold 1e-4): stepped from the last
      warm-up epoch on, a loss is better only below ``best * (1 - 1e-4)`` of its own best (kept since then);
      the LR is cut (x ``plateau_factor``, floor ``min_lr``) on the ``plateau_patience + 1``-th consecutive
      epoch that is not, and its count restarts after a cut. A loss 0.005 % below the best thus resets early
      stopping but not the plateau count.
    """
    improved = val_loss < state.best_loss
    if improved:
        state.best_loss, state.best_epoch, state.bad_epochs = val_loss, state.epoch, 0
    else:
        state.bad_epochs += 1
    if state.epoch + 1 >= settings.warmup:
        plateau.step(val_loss)
    state.epoch += 1
    return improved


def batch_norm_note(model: nn.Module, accumulate: int, processes: int, synced: bool) -> str | None:
    """Why accumulation or several processes change a run's numbers, or None where they do not: a batch-norm
    module in train mode (FFT on a CNN) normalises each micro-batch, and each process's share of a batch, with
    that part's own statistics, unless processes share them (synchronised batch norm, CUDA only)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        return None
    parts = [f"--accumulate {accumulate} (statistics per micro-batch)"] if accumulate > 1 else []
    if processes > 1 and not synced:
        parts.append(f"{processes} processes without synchronised batch norm (CPU/gloo: statistics per process)")
    if not parts:
        return None
    return ("batch norm trains in this run, so its numbers differ slightly from one process without "
            "accumulation: " + "; ".join(parts))


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


class Trainer:
    """One run: the model, its optimiser and scheduler, its data, and its checkpoint."""

    def __init__(self, plan: TrainPlan, run: Run, model: Classifier, images: Images, folder: Path,
                 accelerator: Accelerator):
        self.plan, self.run, self.images, self.acc, self.folder = plan, run, images, accelerator, folder
        settings = plan.settings
        self.trainable, self.total = counted_parameters(model)  # the head as one logit, as the probe's
        self.names = mutable_names(model)
        optimizer, self.base_lrs = _adam(model, run.head_lr, settings.backbone_lr_for(plan.method))
        self.ddp, self.optimizer = accelerator.prepare(_placed(model, plan.spec.family, accelerator), optimizer)
        self.frozen = frozen_modules(self.ddp)
        self.plateau = make_plateau(self.optimizer.optimizer, settings)
        set_train_mode(self.ddp, self.frozen)
        synced = any(isinstance(m, nn.SyncBatchNorm) for m in self.ddp.modules())
        self.note = batch_norm_note(self.ddp, settings.accumulate, accelerator.num_processes, synced)
        parts = (("train", run.train), ("val", run.val), ("test", run.test))
        self.y = {part: torch.tensor([plan.labels[i] for i in ids], dtype=torch.long) for part, ids in parts}
        self.rows = {part: images.rows(ids) for part, ids in parts}
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
        """Continue from the run folder's checkpoint, if there is one. A checkpoint is a cache: one that cannot
        be read or does not fit this run raises `DamagedCheckpoint` before anything is loaded from it."""
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return False
        saved = self._read_checkpoint(path)
        self._load_mutable(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.plateau.load_state_dict(saved["plateau"])
        self.state = _State(**saved["state"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        return True

    def _read_checkpoint(self, path: Path) -> dict:
        """The checkpoint, checked against this run: its parts, the mutable tensors' names and shapes, the
        optimiser's groups and the state's fields."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - zero bytes, truncation, garbage: all the same to a cache
            raise DamagedCheckpoint(path, f"unreadable ({type(err).__name__})") from None
        if not isinstance(saved, dict) or not _CHECKPOINT_PARTS <= set(saved):
            raise DamagedCheckpoint(path, "not a checkpoint of this toolkit")
        current = self.acc.unwrap_model(self.ddp).state_dict()
        model = saved["model"]
        if not isinstance(model, dict) or set(model) != set(self.names) or any(
                getattr(model[n], "shape", None) != current[n].shape for n in self.names):
            raise DamagedCheckpoint(path, "its tensors do not fit this run's model")
        groups = saved["optimizer"].get("param_groups", []) if isinstance(saved["optimizer"], dict) else []
        if [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise DamagedCheckpoint(path, "its optimiser does not fit this run's model")
        if not isinstance(saved["state"], dict) or not set(saved["state"]) <= {f.name for f in fields(_State)}:
            raise DamagedCheckpoint(path, "its training state has unknown fields")
        return saved

    # ---- passes

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, total_weight: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(logits.float(), y, reduction="none") * self.weight[y]).sum() / total_weight

    def warm_up(self, epoch: int) -> None:
        """The linear warm-up's LRs for ``epoch`` (no change after warm-up: the plateau rule owns them)."""
        warmup = self.plan.settings.warmup
        if epoch < warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * (epoch + 1) / warmup

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's seeded generator: its batch order (`batches`), then its augmentation draws."""
        return torch.Generator().manual_seed(self.plan.settings.seed * 1_000_003 + epoch)

    @property
    def step_size(self) -> int:
        """Images per optimiser step."""
        return self.plan.settings.batch_size_for(self.plan.task) * self.plan.settings.accumulate

    def train_epoch(self, epoch: int) -> float:
        settings, acc = self.plan.settings, self.acc
        set_train_mode(self.ddp, self.frozen)
        self.warm_up(epoch)
        generator = self.generator(epoch)
        rows, y = self.rows["train"], self.y["train"].to(acc.device)
        size = self.step_size
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

    @property
    def done(self) -> bool:
        """Stopped early or at the epoch limit."""
        settings = self.plan.settings
        return self.state.epoch >= settings.max_epochs or self.state.bad_epochs >= settings.patience

    def end_epoch(self, train_loss: float, val_loss: float, seconds: float) -> None:
        """Book an epoch's losses: best epoch (and its weights), early-stop count, plateau rule."""
        state = self.state
        state.train_loss.append(train_loss)
        state.val_loss.append(val_loss)
        state.lr.append(self.optimizer.param_groups[0]["lr"])
        if observe(state, self.plateau, val_loss, self.plan.settings):
            state.best = self._mutable()
        state.elapsed_s += seconds

    def report(self, progress: TrainProgress | None) -> None:
        """The progress line of the epoch just booked (after its checkpoint, so a stop there resumes past it)."""
        state = self.state
        if progress is not None:
            progress(self.run.label, state.epoch, self.plan.settings.max_epochs,
                     f"val {state.val_loss[-1]:.4f} · best {state.best_loss:.4f} @ {state.best_epoch + 1}")

    def finish(self, progress: TrainProgress | None) -> None:
        """Report the stop and load the best epoch's weights (the ones the record scores)."""
        settings, state = self.plan.settings, self.state
        if progress is not None:
            why = "early stop" if state.bad_epochs >= settings.patience else "epoch limit"
            progress(self.run.label, state.epoch, settings.max_epochs,
                     f"done ({why}): best val {state.best_loss:.4f} at epoch {state.best_epoch + 1}")
        self._load_mutable(state.best)

    def fit(self, progress: TrainProgress | None) -> None:
        last_save = time.monotonic()
        while not self.done:
            started = time.perf_counter()
            train_loss = self.train_epoch(self.state.epoch)
            val_loss = self.scores("val")[1]
            val_loss = broadcast_object_list([val_loss])[0] if self.acc.num_processes > 1 else val_loss
            self.end_epoch(train_loss, val_loss, time.perf_counter() - started)
            if time.monotonic() - last_save >= self.plan.settings.checkpoint_every_s:
                self.save_checkpoint()
                last_save = time.monotonic()
            self.report(progress)
        self.finish(progress)

    def record(self, plan: TrainPlan, weights: str | Path | None) -> RunRecord:
        s_val, _ = self.scores("val")
        s_test, _ = self.scores("test")
        fingerprint = self.acc.unwrap_model(self.ddp).base_fingerprint
        return run_record(plan, self.run, self.state, s_val, s_test, trainable=self.trainable, total=self.total,
                          weights=weights, processes=self.acc.num_processes, device=self.acc.device.type,
                          inputs={"trained_on": "images", "images": self.images.source,
                                  **({"base_fingerprint": fingerprint} if fingerprint else {}),
                                  **({"batch_norm": self.note} if self.note else {})})


def run_record(plan: TrainPlan, run: Run, state: _State, s_val: np.ndarray, s_test: np.ndarray, *,
               trainable: int, total: int, weights: str | Path | None, processes: int, device: str,
               inputs: dict) -> RunRecord:
    """A finished run's record, whichever path trained it (``inputs``: what it was trained on, for the
    provenance): scores of its best epoch, the threshold from its validation scores, its curves. ``trainable``
    counts the head as one logit (`adapters.model.counted_parameters`), as the probe's records do."""
    test = list(run.test)
    y_test = np.array([plan.labels[i] for i in test])
    y_val = np.array([plan.labels[i] for i in run.val])
    patients = plan.manifest.patients(test)
    return RunRecord(
        task=plan.task, backbone=plan.spec.name, method=plan.method.name, fold=run.fold,
        seed=plan.settings.seed, options=run.options, regime=run.regime, shots=run.shots, draw=run.draw,
        splits_digest=plan.splits.digest(), identity=plan.identity, test_ids=test,
        test_labels=y_test.tolist(), test_scores=s_test.tolist(), test_patients=patients,
        metrics=evaluate(y_test, s_test, y_val, s_val, patients=patients),
        wall_time_s=state.elapsed_s, trainable_params=trainable, total_params=total,
        support_from=None if run.regime == "full" else plan.splits.support_from,
        training={"best_epoch": state.best_epoch + 1, "val_loss": state.best_loss,
                  "epochs_run": state.epoch,
                  "stopped": "early" if state.bad_epochs >= plan.settings.patience else "max-epochs",
                  "curves": {"train_loss": state.train_loss, "val_loss": state.val_loss, "lr": state.lr}},
        provenance={"weights": plan.identity, "weights_path": None if weights is None else str(weights),
                    **inputs, "n_train": len(run.train), "n_val": len(run.val),
                    "trainable_share": trainable / total, "processes": processes,
                    "device": device, "threshold": "validation scores of the tested model",
                    "positive_class": get_task(plan.task).positive, "head_count": HEAD_COUNT,
                    **({"drawn_patients": run.drawn} if run.drawn else {}),
                    **({"support": support_digest(run.train)} if run.regime != "full" else {})},
    )


def _adam(model: Classifier, head_lr: float, backbone_lr: float | None) -> tuple[torch.optim.Adam, list[float]]:
    """Adam over the head (at ``head_lr``) and every other trainable tensor (at ``backbone_lr``), and the
    groups' base LRs (the warm-up scales them)."""
    head_ids = {id(p) for p in model.head_parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups: list[dict[str, Any]] = [{"params": model.head_parameters(), "lr": head_lr}]
    if body:
        groups.append({"params": body, "lr": backbone_lr})
    return torch.optim.Adam(groups), [g["lr"] for g in groups]


def _placed(model: Classifier, family: str, accelerator: Accelerator) -> nn.Module:
    """CNNs on a GPU: channels-last, and batch statistics over the global batch under DDP (as one process)."""
    if accelerator.device.type == "cuda" and family == "cnn":
        model = model.to(memory_format=torch.channels_last)
        if accelerator.num_processes > 1:
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


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
