"""The benchmark's LP on exact stored features: every run of a request trained as one stacked-heads program.

With method ``lp`` and no augmentation, every backbone module is frozen and in eval mode, so the input of the
classifier's head is the same for an image at every epoch: the image path recomputes a constant. Here it is
computed once per image, into a feature group of its own (`featcache.store`, filled by the row pipeline of
`featcache.extract`): the image quantised to uint8 exactly as stage 2 reads it (`adapters.images`), normalised
for the backbone, passed through the very classifier the image path builds (`adapters.model`), and the head's
input captured, as float32, under the precision the runs record. Stage 1's groups (float16 by default, pixels
never quantised, `cls`/`mean`/`proj` views) are never read for this: the spec keying this group differs.

Every fold x draw x head-LR run of the request then trains together: heads stacked as ``(R, 2, D)``, one
batched forward and backward per step, one batched Adam whose arithmetic is torch's single-tensor Adam step for
step (`StackedAdam`). Each run keeps what the image path gives it (`adapters.trainer`): its batches
``randperm(seed, epoch)`` over its own training images, class weights, warm-up, ReduceLROnPlateau (torch's own,
one per run), early stop and best epoch by validation loss, its validation threshold, record and head file.
A run that stops leaves the program; the others go on.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.artifacts import check_run_folder, save_artifacts, save_seen
from adapters.classifier import Classifier
from adapters.model import build_classifier, counted_parameters, frozen_modules, head_module, set_train_mode
from adapters.plan import Run, TrainPlan
from adapters.trainer import TrainProgress, _State, batches, class_weights, run_record
from featcache.device import resolve_device
from featcache.errors import ImageError, StoreError, UsageError
from featcache.extract import RowJob, run_rows
from featcache.imaging import GrayDecoder, Preprocess, to_model_input
from featcache.records import RunRecord, write_record
from featcache.store import RowGroup, default_store, feature_spec, group_name

INPUTS = ("auto", "features", "images")  # `adapters train --from`
HEAD_VIEW = "head"  # the one array of an exact group: what the classifier's head reads
PIXELS = "uint8, round(255 * gray), as stage 2 reads them (adapters.images)"
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------- when


def not_exact(plan: TrainPlan) -> str | None:
    """Why the head's inputs of this request would change from epoch to epoch (None: they never do)."""
    if plan.method.name != "lp":
        return f"method {plan.method.name} trains the backbone"
    if plan.settings.augment:
        return "augmentation changes the images every epoch"
    return None


def use_features(plan: TrainPlan, inputs: str, processes: int) -> bool:
    """Whether `run_train` takes the features path: ``auto`` whenever it is exact, ``features`` or refused in
    one line, ``images`` never."""
    if inputs not in INPUTS:
        raise UsageError(f"--from {inputs!r}: choose from {', '.join(INPUTS)}")
    if inputs == "images":
        return False
    why = not_exact(plan) or (f"it trains in one process, not {processes}" if processes > 1 else None)
    if why is not None and inputs == "features":
        raise UsageError(f"--from features: {why}; use --from images")
    return why is None


def _train_mode_problem(model: Classifier) -> str | None:
    """The image path trains LP in train mode with the frozen modules in eval mode; what stays in train mode
    is the head, the modules holding it, and modules without tensors under those. Any of them that acts
    differently in training (dropout, drop path, timm's head dropout) would make the trained inputs differ
    from stored ones: name it."""
    set_train_mode(model, frozen_modules(model))
    head = head_module(model)
    for name, module in model.named_modules():
        if module is head or not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"module {name} is a dropout in train mode"
        if any(float(getattr(module, attr, 0.0) or 0.0) > 0 for attr in ("drop_prob", "drop_rate")):
            return f"module {name or 'model'} drops out in train mode"
    return None


# --------------------------------------------------------------------------------------------- features


def head_spec(plan: TrainPlan, weights: str | Path | None, random_init: bool) -> dict:
    """The spec keying an exact group: stage 1's feature spec (model, config, weights, preprocessing, crop,
    precision, version), with the uint8 pixels, the head's input as its one view, and float32."""
    spec = feature_spec(plan.spec, weights=weights, random_init=random_init, views=[plan.spec.head_view],
                        dtype="float32", precision=plan.precision)
    spec["views"] = {HEAD_VIEW: int(plan.spec.views[plan.spec.head_view])}
    spec["pixels"] = PIXELS
    spec["view"] = "input of the classifier's head (adapters.classifier), frozen backbone in eval mode"
    return spec


def head_step(model: Classifier, pre: Preprocess, device: torch.device, family: str
              ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The batch step: uint8 gray -> model input -> the classifier in eval mode, capturing its head's input,
    under the autocast the image path trains with (bf16 on CUDA)."""
    cuda = device.type == "cuda"
    model = model.to(device).eval()
    if cuda and family == "cnn":
        model = model.to(memory_format=torch.channels_last)
    seen: list[torch.Tensor] = []
    head_module(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))

    def step(gray: torch.Tensor) -> dict[str, torch.Tensor]:
        x = to_model_input(gray.to(device, non_blocking=True), pre)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            model(x)
        out = seen.pop().float()
        return {HEAD_VIEW: out.cpu() if cuda else out}

    return step


def exact_features(plan: TrainPlan, ids: Sequence[str], model: Classifier, *, weights: str | Path | None,
                   random_init: bool, store: str | Path | None, device: torch.device,
                   progress: Progress | None = None) -> tuple[torch.Tensor, str]:
    """The head inputs of ``ids`` as float32 ``(N, D)`` (row i of id i) and where they are stored: read from
    the exact group of ``store`` (default ``features.zarr`` beside the manifest), computing the rows it lacks
    first, with progress. The store is verified and repaired as stage 1 does; a damaged row is refused."""
    pre = plan.spec.preprocess
    spec = head_spec(plan, weights, random_init)
    where = Path(store) if store is not None else default_store(plan.manifest.path)
    job = RowJob(store=where, prefix=plan.spec.name, spec=spec,
                 decode=GrayDecoder(pre.size, pre.intensity, quantized=True),
                 placeholder=torch.zeros(pre.size, pre.size, dtype=torch.uint8),
                 make_compute=lambda dev: head_step(model, pre, dev, plan.spec.family),
                 fill={HEAD_VIEW: float("nan")})
    run_rows(job, plan.manifest, on_error="skip", device=device, progress=progress)
    group = RowGroup.open(where, group_name(plan.spec.name, spec))
    rows = group.locate(ids)
    if (rows < 0).any() or not group.read("written")[np.maximum(rows, 0)].all():
        raise StoreError(f"{group.where}: rows of this request are missing after extraction")
    reasons = group.read_checked("skip_reason", rows)
    for image_id, reason in zip(ids, reasons.tolist(), strict=True):
        if reason:
            raise ImageError(plan.manifest.abspath(image_id), reason)
    return torch.from_numpy(group.read_checked(HEAD_VIEW, rows)), group.where


# --------------------------------------------------------------------------------------------- optimiser


class StackedAdam:
    """Adam over stacked per-run tensors ``(R, ...)`` with a learning rate and a step count per run; a step
    updates the runs named, leaving the others untouched. The arithmetic is torch's single-tensor Adam
    (``torch.optim.Adam`` on CPU) operation for operation, bias corrections in Python floats as there, so each
    run's tensors follow exactly the trajectory its own optimiser would give (tested bit for bit)."""

    def __init__(self, params: Sequence[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.betas, self.eps = list(params), betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = np.zeros(len(self.params[0]), dtype=np.int64)
        self.corrections: list[tuple[float, float]] = [(math.nan, math.nan)]  # bias corrections by step

    @torch.no_grad()
    def step(self, runs: torch.Tensor, grads: Sequence[torch.Tensor], lrs: np.ndarray) -> None:
        """One step of the runs ``runs`` (indices), with their gradients ``(len(runs), ...)`` and LRs."""
        beta1, beta2 = self.betas
        picked = runs.cpu().numpy()
        self.steps[picked] += 1
        steps = self.steps[picked]
        while len(self.corrections) <= steps.max():  # Python floats, as torch computes them per tensor
            step = float(len(self.corrections))
            self.corrections.append((1 - beta1**step, (1 - beta2**step) ** 0.5))
        table = np.asarray(self.corrections)[steps]
        step_size = -(np.asarray(lrs, dtype=np.float64) / table[:, 0])
        for param, m, v, grad in zip(self.params, self.exp_avg, self.exp_avg_sq, grads, strict=True):
            shape = (-1,) + (1,) * (param.dim() - 1)
            size = torch.from_numpy(step_size).to(param.dtype).to(param.device).view(shape)
            root = torch.from_numpy(table[:, 1]).to(param.dtype).to(param.device).view(shape)
            m_r = m[runs].lerp_(grad, 1 - beta1)
            v_r = v[runs].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v_r.sqrt() / root).add_(self.eps)
            m[runs], v[runs] = m_r, v_r
            param[runs] = param[runs] + size * m_r / denom


# --------------------------------------------------------------------------------------------- program


@dataclass
class _Data:
    """Every run's rows into the feature matrix, labels and class weights, stacked where runs share sizes."""

    x: torch.Tensor  # (N, D) float32 head inputs
    train: list[torch.Tensor]
    y_train: list[torch.Tensor]
    val: list[torch.Tensor]
    test: list[torch.Tensor]
    labels: torch.Tensor  # (N,) label of each row
    weight: torch.Tensor  # (R, 2) class weights


def _data(plan: TrainPlan, runs: Sequence[Run], x: torch.Tensor, position: dict[str, int]) -> _Data:
    labels = torch.zeros(len(position), dtype=torch.long)
    for image_id, row in position.items():
        labels[row] = plan.labels[image_id]

    def rows(ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([position[i] for i in ids], dtype=torch.long)

    train = [rows(r.train) for r in runs]
    return _Data(x, train, [labels[t] for t in train], [rows(r.val) for r in runs], [rows(r.test) for r in runs],
                 labels, torch.stack([class_weights(labels[t]) for t in train]))


def _padded(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rows of unequal length as ``(R, L)`` with a mask (padding points at row 0)."""
    width = max(len(p) for p in parts)
    index = torch.zeros(len(parts), width, dtype=torch.long)
    mask = torch.zeros(len(parts), width, dtype=torch.bool)
    for i, part in enumerate(parts):
        index[i, : len(part)] = part
        mask[i, : len(part)] = True
    return index, mask


def _losses(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted mean cross-entropy of each run (row), as `Trainer._loss`; ``weights`` 0 on padding."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return (ce.view_as(weights) * weights).sum(1) / weights.sum(1)


class HeadsProgram:
    """The runs of one request as stacked heads on exact features; `fit` trains them all (see module doc)."""

    def __init__(self, plan: TrainPlan, runs: Sequence[Run], data: _Data, head: nn.Linear,
                 device: torch.device):
        self.plan, self.runs, self.data, self.device = plan, list(runs), data, device
        settings = plan.settings
        count = len(runs)
        self.weight = head.weight.detach().to(device).unsqueeze(0).repeat(count, 1, 1).contiguous()
        self.bias = head.bias.detach().to(device).unsqueeze(0).repeat(count, 1).contiguous()
        self.best_weight, self.best_bias = self.weight.clone(), self.bias.clone()
        self.adam = StackedAdam([self.weight, self.bias])
        self.base = [r.head_lr for r in runs]
        holders = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr) for lr in self.base]
        self.plateaus = [torch.optim.lr_scheduler.ReduceLROnPlateau(
            h, factor=settings.plateau_factor, patience=settings.plateau_patience, min_lr=settings.min_lr)
            for h in holders]
        self.holders = holders
        self.states = [_State() for _ in runs]
        self.x = data.x.to(device)
        self.labels = data.labels.to(device)
        self.class_weight = data.weight.to(device)
        self.size = settings.batch_size_for(plan.task) * settings.accumulate
        self.by_size: dict[int, list[int]] = defaultdict(list)
        for i, rows in enumerate(data.train):
            self.by_size[len(rows)].append(i)
        self.train_rows = {n: torch.stack([data.train[i] for i in members]).to(device)
                           for n, members in self.by_size.items()}
        self.val_index, self.val_mask = (t.to(device) for t in _padded(data.val))

    def active(self) -> list[int]:
        settings = self.plan.settings
        return [i for i, s in enumerate(self.states)
                if s.epoch < settings.max_epochs and s.bad_epochs < settings.patience]

    def _lr(self, i: int) -> float:
        return self.holders[i].param_groups[0]["lr"]

    def _epoch(self, epoch: int, active: list[int]) -> list[float]:
        """One epoch of every active run: each its own batches, one stacked step per batch index."""
        settings = self.plan.settings
        if epoch < settings.warmup:
            for i in active:
                self.holders[i].param_groups[0]["lr"] = self.base[i] * (epoch + 1) / settings.warmup
        blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)  # batch index -> runs
        live = set(active)
        for n, members in self.by_size.items():
            keep = [k for k, m in enumerate(members) if m in live]
            if not keep:
                continue
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
            runs = torch.tensor([members[k] for k in keep], dtype=torch.long, device=self.device)
            stacked = self.train_rows[n][keep]
            for j, part in enumerate(batches(n, self.size, generator)):
                blocks[j].append((runs, stacked[:, part.to(self.device)]))
        lrs = np.array([self._lr(i) if i in live else math.nan for i in range(len(self.runs))])
        total = torch.zeros(len(self.runs), dtype=torch.float64)
        for j in sorted(blocks):
            width = max(rows.shape[1] for _, rows in blocks[j])
            runs = torch.cat([r for r, _ in blocks[j]])
            index = torch.cat([F.pad(rows, (0, width - rows.shape[1])) for _, rows in blocks[j]])
            mask = torch.cat([(torch.arange(width, device=self.device) < rows.shape[1]).expand(len(rows), width)
                              for _, rows in blocks[j]])
            y = self.labels[index]
            weights = self.class_weight[runs].gather(1, y) * mask
            w = self.weight[runs].requires_grad_(True)
            b = self.bias[runs].requires_grad_(True)
            logits = torch.baddbmm(b.unsqueeze(1), self.x[index], w.transpose(1, 2))
            losses = _losses(logits, y, weights)
            losses.sum().backward()
            grads = [cast(torch.Tensor, w.grad), cast(torch.Tensor, b.grad)]  # set by backward()
            self.adam.step(runs, grads, lrs[runs.cpu().numpy()])
            total.index_add_(0, runs.cpu(), losses.detach().cpu().double())  # += float(loss), as the image path
        return [float(total[i]) / max(1, math.ceil(len(self.data.train[i]) / self.size)) for i in active]

    @torch.no_grad()
    def _val_losses(self, active: list[int]) -> list[float]:
        runs = torch.tensor(active, dtype=torch.long, device=self.device)
        index, mask = self.val_index[runs], self.val_mask[runs]
        logits = torch.baddbmm(self.bias[runs].unsqueeze(1), self.x[index], self.weight[runs].transpose(1, 2))
        y = self.labels[index]
        return _losses(logits, y, self.class_weight[runs].gather(1, y) * mask).cpu().tolist()

    def fit(self, progress: TrainProgress | None = None, label: str = "") -> None:
        """Train until every run has stopped (early stop or epoch limit), each keeping its best epoch."""
        settings, epoch = self.plan.settings, 0
        while active := self.active():
            train_losses = self._epoch(epoch, active)
            val_losses = self._val_losses(active)
            improved = []
            for i, train_loss, val_loss in zip(active, train_losses, val_losses, strict=True):
                state = self.states[i]
                state.train_loss.append(train_loss)
                state.val_loss.append(val_loss)
                state.lr.append(self._lr(i))
                if val_loss < state.best_loss:
                    state.best_loss, state.best_epoch, state.bad_epochs = val_loss, state.epoch, 0
                    improved.append(i)
                else:
                    state.bad_epochs += 1
                if state.epoch + 1 >= settings.warmup:
                    self.plateaus[i].step(val_loss)
                state.epoch += 1
            if improved:
                self.best_weight[improved] = self.weight[improved]
                self.best_bias[improved] = self.bias[improved]
            epoch += 1
            if progress is not None:
                progress(label, epoch, settings.max_epochs, f"{len(self.active())} of {len(self.runs)} runs "
                         "training")
        if progress is not None:
            progress(label, epoch, settings.max_epochs, f"done: {len(self.runs)} runs in {epoch} epochs")

    @torch.no_grad()
    def scores(self, i: int, part: str) -> np.ndarray:
        """Positive-class probabilities of run ``i``'s best head on its ``val`` or ``test`` images, a batch at
        a time as `Trainer.scores` (the same matrix products, so the same bits)."""
        rows = (self.data.val if part == "val" else self.data.test)[i].to(self.device)
        size = self.plan.settings.batch_size_for(self.plan.task)
        logits = [F.linear(self.x[batch], self.best_weight[i], self.best_bias[i]) for batch in rows.split(size)]
        return torch.cat(logits).float().softmax(1)[:, 1].cpu().double().numpy()


# --------------------------------------------------------------------------------------------- request


def train_heads(plan: TrainPlan, runs: Sequence[Run], out: Path, *, weights: str | Path | None = None,
                random_init: bool = False, store: str | Path | None = None, device: str = "auto",
                progress: TrainProgress | None = None, load_progress: Progress | None = None,
                notes: list[str] | None = None) -> list[RunRecord]:
    """Train ``runs`` (of one request, not yet recorded) on exact features in one stacked program; write each
    run's folder, head and record as the image path does, and return the records (damaged run folders are
    named in ``notes``, as the image path names them)."""
    started = time.perf_counter()
    target = resolve_device(device)
    model = build_classifier(plan.spec, plan.method, plan.rank, weights=weights, random_init=random_init,
                             seed=plan.settings.seed)
    problem = _train_mode_problem(model)
    if problem is not None:
        raise UsageError(f"--from features: {problem}, so stored features would not be the trained ones; "
                         "use --from images")
    notes = [] if notes is None else notes
    for run in runs:
        check_run_folder(out / run.key, run, plan, notes)
    ids = sorted({i for run in runs for i in run.train + run.val + run.test})
    x, where = exact_features(plan, ids, model, weights=weights, random_init=random_init, store=store,
                              device=target, progress=load_progress)
    extracted = time.perf_counter() - started
    data = _data(plan, runs, x, {i: n for n, i in enumerate(ids)})
    program = HeadsProgram(plan, runs, data, head_module(model), target)
    program.fit(progress, f"{len(runs)} {plan.method.name} runs on stored features")
    seconds = time.perf_counter() - started
    trainable, total = counted_parameters(model)
    head = head_module(model)
    records = []
    for i, run in enumerate(runs):
        state = program.states[i]
        state.elapsed_s = seconds / len(runs)
        record = run_record(plan, run, state, program.scores(i, "val"), program.scores(i, "test"),
                            trainable=trainable, total=total, weights=weights, processes=1,
                            device=target.type, inputs={
                                "trained_on": "features", "images": f"exact features {where}",
                                "program": {"runs": len(runs), "seconds": round(seconds, 3),
                                            "extract_s": round(extracted, 3)}})
        with torch.no_grad():
            head.weight.copy_(program.best_weight[i])
            head.bias.copy_(program.best_bias[i])
        save_artifacts(model, plan.method, out / run.key)
        save_seen(out / run.key, run.train, run.val)
        write_record(record, out)
        records.append(record)
    return records
