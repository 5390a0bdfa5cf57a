"""`run_train`: the request loop of end-to-end training of a backbone + linear head under one adaptation
method, on the persisted folds and few-shot draws of stage 1, one `RunRecord` per run (fold x draw x head LR).

Protocol defaults (the benchmark's, Ruffini et al. 2025; each is in every record's options):

- Class-weighted cross-entropy over two logits, weights ``n / (2 n_c)`` from the run's training images; the
  validation loss uses the same weights, so it is the objective measured on held-out images.
- Adam; head LR from the grid {1e-2, 1e-3, 1e-4} (one run and record each), backbone/adapter LR 1e-5 for FFT
  and 1e-4 for the PEFT methods (IA3's vector on a CNN's head input is an adapter tensor: adapter LR). Linear
  warm-up over the first 50 epochs; early stop after 100 consecutive epochs without a strictly lower validation
  loss; at most 1000 epochs; LR x0.1 (floor 1e-8) by PyTorch's ``ReduceLROnPlateau`` from the last warm-up epoch
  on: on the 26th consecutive epoch whose loss is not below its best x (1 - 1e-4) (`adapters.trainer.observe`
  states both rules exactly). The weights of the epoch with the lowest validation loss are the ones scored on
  the test part, and the MCC threshold is chosen on that same model's validation scores.
- Few-shot: the model trains on the support set of the fold and draw, drawn from the fold's train part; every
  draw validates (early stopping, LR plateau, threshold, head-LR selection) on the fold's whole validation part,
  as full data does. The benchmark subsampled only the training data; no test image is ever seen before the
  final scoring. A fold whose validation part cannot validate has its levels skipped (`featcache.splits`).
- Modules whose parameters are all frozen run in eval mode (batch-norm statistics and dropout of a frozen
  backbone stay fixed: LP and LoRA on a CNN do not drift its statistics), and so does batch norm whose scale is
  frozen (BitFit trains its bias on fixed statistics); the rest trains in train mode.
- A batch is ``batch_size * accumulate`` images; its loss is the class-weighted mean over the whole batch, summed
  exactly over micro-batches and ranks (DDP), so accumulation and ``torchrun`` change nothing but memory and
  speed — except where batch norm trains (FFT on a CNN): each micro-batch, and on CPU each process, normalises
  with its own statistics (synchronised batch norm joins processes on CUDA only); such a run says so in one
  line and in its record (``provenance.batch_norm``). Dropout masks (LoRA, VeRA) are drawn per process, so
  several processes give a run of equal standing, not equal numbers. A trailing batch of one image joins the
  previous one (batch norm needs two).
- Each epoch visits the training images in the order ``randperm(seed, epoch)``, so a resumed run sees the same
  batches; checkpoints hold the mutable weights, optimiser, scheduler, early-stopping state and RNG.

Accelerate supplies device placement, DDP (gloo on CPU, NCCL on GPUs), bf16 autocast on CUDA and ``no_sync``;
the images are held in memory (`adapters.images`), so no DataLoader or sampler state is needed.

The request is planned by `adapters.plan`, each run's model is built by `adapters.model`, trained by
`adapters.trainer`, and its files written by `adapters.artifacts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from adapters.artifacts import save_artifacts
from adapters.classifier import Classifier
from adapters.images import Images, load_images
from adapters.methods import HEAD_LRS, Method
from adapters.model import build_classifier
from adapters.plan import Run, TrainPlan, TrainSettings, plan
from adapters.trainer import CHECKPOINT, Trainer, TrainProgress
from featcache.device import resolve_device
from featcache.errors import UsageError
from featcache.fileio import atomic_write
from featcache.records import RunRecord, record_path, write_record

CONFIG = "config.json"


@dataclass
class TrainReport:
    """Every run of a request (new and already recorded), and the levels that could not run, with why."""

    records: list[RunRecord] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the runs were trained, where it is worth a line


def _check_folder(folder: Path, run: Run, plan: TrainPlan) -> None:
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


def run_train(manifest: str | Path, task: str, model: str, *, method: str | Method, rank: int | None = None,
              full: bool = True, shots: Sequence[int] = (), draws: int | None = None, per_center: bool = False,
              folds: Sequence[str] | None = None, head_lrs: Sequence[float] = HEAD_LRS,
              settings: TrainSettings | None = None, weights: str | Path | None = None,
              random_init: bool = False, pixels: str | Path | None = None, out: str | Path = "runs",
              device: str = "auto", progress: TrainProgress | None = None,
              load_progress: Callable[[int, int], None] | None = None, positive: str | None = None,
              note: Callable[[str], None] | None = None) -> TrainReport:
    """Train ``model`` adapted by ``method`` on ``task``: every fold (``full``) or fold x draw of each shot
    level, for each head LR; one record per run in ``out`` (artefacts in ``out/<key>/``). Recorded runs are
    read back, not retrained; an interrupted run resumes from its last checkpoint. ``note`` gets, once per
    distinct text, why a run's numbers depend on accumulation or processes (`adapters.trainer.batch_norm_note`).
    See the module doc."""
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
    said: set[str] = set()

    def once(line: str) -> None:
        if note is not None and line not in said:
            said.add(line)
            note(line)

    if the_plan.settings.pack > 1 and len(todo) > 1:
        from adapters.packed import train_packed

        records, notes = train_packed(the_plan, todo, images, out, accelerator, weights, random_init, progress,
                                      once)
        report.records += records
        report.written += len(records)
        report.notes += notes
        return report
    for run in todo:
        report.records.append(_train_run(the_plan, run, images, out, accelerator, weights, random_init, progress,
                                         once))
        report.written += 1
    return report


def _accelerator(device: str) -> Accelerator:
    resolved = resolve_device(device)
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision="bf16" if resolved.type == "cuda" else "no")


def _train_run(plan: TrainPlan, run: Run, images: Images, out: Path, accelerator: Accelerator,
               weights: str | Path | None, random_init: bool, progress: TrainProgress | None,
               note: Callable[[str], None]) -> RunRecord:
    torch.manual_seed(plan.settings.seed)
    settings = plan.settings
    model = build_classifier(plan.spec, plan.method, plan.rank, weights=weights, random_init=random_init,
                             seed=settings.seed, grad_ckpt=settings.grad_ckpt, dropout=settings.adapter_dropout)
    trainer = start_run(plan, run, model, images, out, accelerator, note)
    trainer.fit(progress)
    return end_run(trainer, out, weights)


def start_run(plan: TrainPlan, run: Run, model: Classifier, images: Images, out: Path,
              accelerator: Accelerator, note: Callable[[str], None]) -> Trainer:
    """A run's trainer on its checked folder, resumed from its checkpoint where there is one; ``note`` gets
    the trainer's batch-norm note."""
    folder = out / run.key
    if accelerator.is_main_process:
        _check_folder(folder, run, plan)
    accelerator.wait_for_everyone()
    trainer = Trainer(plan, run, model, images, folder, accelerator)
    if trainer.note:
        note(f"{plan.method.name} on {plan.spec.name}: {trainer.note}")
    trainer.resume()
    return trainer


def end_run(trainer: Trainer, out: Path, weights: str | Path | None, **provenance: object) -> RunRecord:
    """A fitted run's record (``provenance`` added to it), artefacts and cleanup: the record last, so a
    recorded run is a finished one."""
    record = trainer.record(trainer.plan, weights)
    record.provenance.update(provenance)
    accelerator = trainer.acc
    if accelerator.is_main_process:
        save_artifacts(accelerator.unwrap_model(trainer.ddp), trainer.plan.method, trainer.folder)
        write_record(record, out)
        (trainer.folder / CHECKPOINT).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return record
