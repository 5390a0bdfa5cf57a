"""Packed training: several runs of one request (one backbone x method x task x regime) in one batched pass.

A few-shot run trains on 4-64 images: alone, it leaves a GPU idle and pays per-step overhead on a CPU. Here up
to ``--pack N`` runs train together. The frozen backbone is built once; each run keeps a *shell*, a copy of the
classifier that shares every frozen tensor with the base and owns only its trainable ones (adapters + head,
biases, or the head), so each run's `Trainer` (optimiser, warm-up, plateau, early stop, best epoch, checkpoint,
record, artefacts) is the unpacked one, unchanged. Each step stacks the runs' trainable tensors and applies them
with `torch.func.functional_call` under `torch.func.vmap` over the base (peft's own modules: vmap folds the run
dimension into the batch of every frozen layer and batches the adapted ones). Each run draws its own batches
(its epoch's ``randperm``); a run with fewer images than another is padded with rows that the loss leaves out,
so its gradient is its own. A run that stops frees its slot for the next one.

Exact by construction where every sample is computed alone: frozen batch norm (eval mode), no active dropout.
Batch norm that trains (FFT on a CNN) mixes a batch's rows, and dropout masks are drawn per call, so
such requests run one at a time with one line saying why (`why_not_packable`). Attention runs eagerly (fused
scaled-dot-product attention has no vmap batching rule and would loop over the runs). Records, keys, checkpoints
and artefacts are those of unpacked runs; a record's wall time is its share of the pack's, and its provenance
names the pack width. Out of GPU memory, the pack halves and says so.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from filelock import FileLock
from torch import nn
from torch.func import functional_call, vmap

from adapters.classifier import Classifier
from adapters.images import Images
from adapters.lifecycle import end_run, fresh_classifier, start_run
from adapters.model import frozen_modules, mutable_names, set_train_mode
from adapters.plan import Run, TrainPlan
from adapters.trainer import Trainer, TrainProgress, _augment, _placed, batches
from featcache.locks import Claims
from featcache.records import RunRecord, record_path

Note = Callable[[str], None]


def why_not_packable(model: Classifier, accelerator: Accelerator) -> str | None:
    """Why packed runs of this model would not equal unpacked ones (None: they do): a module that trains in
    train mode with batch statistics, or an active dropout; packing also runs in one process only."""
    if accelerator.num_processes > 1:
        return "packing runs in one process, not under torchrun"
    set_train_mode(model)
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase):
            return f"batch norm trains ({name}): its batch statistics mix the rows of a pack"
        rate = _dropout_rate(module)
        if rate > 0:
            return f"dropout {rate:g} is active ({name}): its masks differ packed"
    return None


def _dropout_rate(module: nn.Module) -> float:
    """The dropout (or drop-path) probability a module applies in train mode: a Dropout's ``p``, or a float
    attribute named for dropping (HF attention keeps its rate as a number; timm and HF drop-path as drop_prob)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return float(module.p)
    rates = [v for k, v in vars(module).items() if "drop" in k and isinstance(v, float)]
    return max(rates, default=0.0)


def eager_attention(model: nn.Module) -> None:
    """Attention as plain matmuls and softmax, which vmap batches: transformers' models switch to their eager
    implementation, timm's attention blocks stop using the fused kernel."""
    modules: list[Any] = list(model.modules())  # the libraries' modules: their attributes are not nn.Module's
    for module in modules:
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            if hasattr(module, "set_attn_implementation"):
                module.set_attn_implementation("eager")
            else:
                config._attn_implementation = "eager"


class Packer:
    """The base model, the runs in its slots, and the batched steps over them."""

    def __init__(self, plan: TrainPlan, images: Images, out: Path, accelerator: Accelerator, base: Classifier,
                 width: int, note: Note):
        self.plan, self.images, self.out, self.acc, self.note = plan, images, out, accelerator, note
        self.width = width
        self.base = _placed(base, plan.spec.family, accelerator).to(accelerator.device)
        eager_attention(self.base)
        mutable = set(mutable_names(self.base))
        state = self.base.state_dict(keep_vars=True)
        self.names = [n for n, p in self.base.named_parameters() if p.requires_grad]
        self.shared = {id(t): t for n, t in state.items() if n not in mutable}
        self.frozen = frozen_modules(self.base)

    def shell(self) -> Classifier:
        """A copy of the base that shares its frozen tensors and owns its trainable ones (their initial values
        are the base's: every run of a request initialises from the same seed)."""
        return cast(Classifier, copy.deepcopy(self.base, memo=dict(self.shared)))

    def params(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        own = dict(self.acc.unwrap_model(trainer.ddp).named_parameters())
        return {n: own[n] for n in self.names}

    # ---- batched passes

    def logits(self, trainers: Sequence[Trainer], xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each run's logits of its own inputs, in one vmapped pass; shorter inputs padded, padding dropped."""
        n = max(len(x) for x in xs)
        x = torch.stack([x if len(x) == n else torch.cat([x, x[:1].expand(n - len(x), *x.shape[1:])]) for x in xs])
        each = [self.params(t) for t in trainers]
        stacked = {name: torch.stack([p[name] for p in each]) for name in self.names}

        def one(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, params, (inputs,))

        with self.acc.autocast():
            out = vmap(one)(stacked, x)
        return [o[: len(xi)].float() for o, xi in zip(out, xs, strict=True)]

    def chunked(self, items: list, step: Callable[[list], None], on_oom: Callable[[list], None]) -> None:
        """``step`` over ``items`` in chunks of at most ``width``; out of memory, the width halves (and says so)
        and the failed chunk is retried."""
        i = 0
        while i < len(items):
            chunk = items[i: i + self.width]
            try:
                step(chunk)
            except torch.OutOfMemoryError:
                on_oom(chunk)
                if self.width == 1:
                    raise
                self.width //= 2
                self.note(f"out of memory with {len(chunk)} runs in one pass: packing {self.width} from now on")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            i += len(chunk)

    def train_epoch(self, trainers: list[Trainer]) -> list[float]:
        """One epoch of every run (each at its own epoch number), stepped together; each run's mean loss."""
        pre, device, augment = self.plan.spec.preprocess, self.acc.device, self.plan.settings.augment
        set_train_mode(self.base, self.frozen)
        plans, gens, totals = [], [], [0.0] * len(trainers)
        labels = [t.y["train"].to(device) for t in trainers]
        for t in trainers:
            t.warm_up(t.state.epoch)
            gens.append(t.generator(t.state.epoch))
            plans.append(batches(len(t.rows["train"]), t.step_size, gens[-1]))
        for s in range(max(len(p) for p in plans)):
            items = []
            for i, t in enumerate(trainers):  # drawn in run order, as each run's own epoch draws them
                if s < len(plans[i]):
                    x = self.images.batch(t.rows["train"][plans[i][s]], pre, device)
                    items.append((t, _augment(x, gens[i]) if augment else x, labels[i][plans[i][s]], i))
            self.chunked(items, partial(self._train_step, totals), self._drop_grads)
        return [total / max(1, math.ceil(len(t.rows["train"]) / t.step_size))
                for total, t in zip(totals, trainers, strict=True)]

    def _train_step(self, totals: list[float], chunk: list[tuple[Trainer, torch.Tensor, torch.Tensor, int]]) -> None:
        """One optimiser step of each run in ``chunk`` (trainer, inputs, labels, index into ``totals``)."""
        logits = self.logits([t for t, *_ in chunk], [x for _, x, *_ in chunk])
        losses = [t._loss(out, y, t.weight[y].sum()) for (t, _, y, _), out in zip(chunk, logits, strict=True)]
        self.acc.backward(torch.stack(losses).sum())
        for (t, _, _, i), loss in zip(chunk, losses, strict=True):
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            totals[i] += float(loss.detach())

    @staticmethod
    def _drop_grads(chunk: list[tuple[Trainer, torch.Tensor, torch.Tensor, int]]) -> None:
        for t, *_ in chunk:
            t.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def val_losses(self, trainers: list[Trainer]) -> list[float]:
        """Each run's class-weighted validation loss, as `Trainer.scores` computes it, in batched passes."""
        pre, device = self.plan.spec.preprocess, self.acc.device
        size = self.plan.settings.batch_size_for(self.plan.task)
        self.base.eval()
        parts = [t.rows["val"].split(size) for t in trainers]
        logits: list[list[torch.Tensor]] = [[] for _ in trainers]
        for c in range(max(len(p) for p in parts)):
            items = [(trainers[i], self.images.batch(parts[i][c], pre, device), logits[i])
                     for i in range(len(trainers)) if c < len(parts[i])]
            self.chunked(items, self._val_step, lambda chunk: None)
        losses = []
        for t, parts_i in zip(trainers, logits, strict=True):
            y = t.y["val"].to(device)
            losses.append(float(t._loss(torch.cat(parts_i), y, t.weight[y].sum())))
        return losses

    def _val_step(self, chunk: list[tuple[Trainer, torch.Tensor, list[torch.Tensor]]]) -> None:
        for (_, _, into), out in zip(chunk, self.logits([t for t, *_ in chunk], [x for _, x, _ in chunk]),
                                     strict=True):
            into.append(out)


def train_packed(plan: TrainPlan, runs: Sequence[Run], images: Images, out: Path, accelerator: Accelerator,
                 claims: Claims, weights: str | Path | None, random_init: bool, progress: TrainProgress | None,
                 note: Note, notes: list[str]) -> tuple[list[RunRecord], list[Run], list[Run]]:
    """Train ``runs`` (none recorded when planned) ``plan.settings.pack`` at a time, each while holding its
    claim (as `adapters.train.claimed_run` does). Returns the records written, the runs to train one at a time
    (all of them, with a line in ``notes``, where packing cannot be exact), and the runs another process holds
    or has recorded meanwhile (for the caller to wait on and read back)."""
    base = fresh_classifier(plan, weights, random_init)
    why = why_not_packable(base, accelerator)
    if why is not None:
        notes.append(f"--pack: {plan.spec.name} {plan.method.name} runs one at a time: {why}")
        return [], list(runs), []
    packer = Packer(plan, images, out, accelerator, base, min(plan.settings.pack, len(runs)), notes.append)
    queue = list(runs)
    records: list[RunRecord] = []
    deferred: list[Run] = []
    locks: dict[Trainer, FileLock] = {}
    try:
        _pack_loop(packer, queue, records, deferred, locks, claims, weights, progress, note, notes)
    finally:
        for lock in locks.values():
            lock.release()
    return records, [], deferred


def _pack_loop(packer: Packer, queue: list[Run], records: list[RunRecord], deferred: list[Run],
               locks: dict[Trainer, FileLock], claims: Claims, weights: str | Path | None,
               progress: TrainProgress | None, note: Note, notes: list[str]) -> None:
    """Fill the slots with claimed runs, train the pack an epoch at a time, retire stopped runs."""
    plan, out, acc, settings = packer.plan, packer.out, packer.acc, packer.plan.settings
    active: list[Trainer] = []
    last_save = time.monotonic()
    while queue or active:
        while True:  # retire stopped runs (also resumed ones that had stopped), fill the freed slots
            for t in [t for t in active if t.done]:
                t.finish(progress)
                records.append(end_run(t, out, weights, packed=packer.width))
                locks.pop(t).release()
                active.remove(t)
            if not queue or len(active) >= packer.width:
                break
            while queue and len(active) < packer.width:
                run = queue.pop(0)
                lock = claims.claim(run.key, wait=False)
                if lock is None or record_path(out, run.key).is_file():  # another process trains or trained it
                    deferred.append(run)
                    if lock is not None:
                        lock.release()
                else:
                    try:
                        trainer = start_run(plan, run, packer.images, out, acc, notes, note, packer.shell)
                    except BaseException:
                        lock.release()
                        raise
                    locks[trainer] = lock
                    active.append(trainer)
        if not active:
            continue
        started = time.perf_counter()
        train_losses = packer.train_epoch(active)
        val_losses = packer.val_losses(active)
        share = (time.perf_counter() - started) / len(active)
        for t, train_loss, val_loss in zip(active, train_losses, val_losses, strict=True):
            t.end_epoch(train_loss, val_loss, share)
        if time.monotonic() - last_save >= settings.checkpoint_every_s:
            for t in active:
                t.save_checkpoint()
            last_save = time.monotonic()
        for t in active:
            t.report(progress)
