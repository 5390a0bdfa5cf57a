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
  batches; checkpoints hold the mutable weights, optimiser, scheduler, early-stopping state and RNG. A checkpoint
  is a cache: a damaged one (garbage, truncated, empty, of another model) is named in `TrainReport.notes`,
  removed, and the run starts from scratch.
- Requests sharing an ``out`` (two `study run`s) share its runs: each run is trained under a claim of its key
  (``out/.claims/``, `featcache.locks.Claims`); runs another process holds are done last, after waiting for it.

Accelerate supplies device placement, DDP (gloo on CPU, NCCL on GPUs), bf16 autocast on CUDA and ``no_sync``;
the images are held in memory (`adapters.images`), so no DataLoader or sampler state is needed.

The request is planned by `adapters.plan`, each run's model is built by `adapters.model`, trained by
`adapters.trainer`, and its files written by `adapters.artifacts`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from adapters.heads import train_heads, use_features
from adapters.images import Images, load_images
from adapters.lifecycle import end_run, fresh_classifier, start_run
from adapters.methods import HEAD_LRS, Method
from adapters.plan import Run, TrainPlan, TrainSettings, plan
from adapters.trainer import CHECKPOINT, TrainProgress
from featcache.device import resolve_device
from featcache.locks import Claims
from featcache.records import RunRecord, read_record, record_path

CLAIMS = ".claims"  # inside --out: one claim per run key being trained (`featcache.locks.Claims`)


@dataclass
class TrainReport:
    """Every run of a request (new and already recorded), and the levels that could not run, with why."""

    records: list[RunRecord] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was repaired on the way (a damaged checkpoint), how
    # the runs were packed (`adapters.packed`)


def run_train(manifest: str | Path, task: str, model: str, *, method: str | Method, rank: int | None = None,
              full: bool = True, shots: Sequence[int] = (), draws: int | None = None, per_center: bool = False,
              folds: Sequence[str] | None = None, head_lrs: Sequence[float] = HEAD_LRS,
              settings: TrainSettings | None = None, weights: str | Path | None = None,
              random_init: bool = False, pixels: str | Path | None = None, out: str | Path = "runs",
              device: str = "auto", progress: TrainProgress | None = None,
              load_progress: Callable[[int, int], None] | None = None, positive: str | None = None,
              note: Callable[[str], None] | None = None, inputs: str = "auto",
              features: str | Path | None = None) -> TrainReport:
    """Train ``model`` adapted by ``method`` on ``task``: every fold (``full``) or fold x draw of each shot
    level, for each head LR; one record per run in ``out`` (artefacts in ``out/<key>/``). Recorded runs are
    read back, not retrained; an interrupted run resumes from its last checkpoint. ``note`` gets, once per
    distinct text, why a run's numbers depend on accumulation or processes (`adapters.trainer.batch_norm_note`).
    See the module doc.

    ``inputs`` (``--from``): ``auto`` trains LP without augmentation on exact stored features (the feature
    store ``features``, default beside the manifest; `adapters.heads`), ``features`` insists on it,
    ``images`` always trains through the backbone."""
    the_plan = plan(manifest, task, model, method=method, rank=rank, full=full, shots=shots, draws=draws,
                    per_center=per_center, folds=folds, head_lrs=head_lrs, settings=settings, weights=weights,
                    random_init=random_init, device=device, positive=positive)
    on_features = use_features(the_plan, inputs, int(os.environ.get("WORLD_SIZE", "1")))
    out = Path(out)
    report = TrainReport(skipped=list(the_plan.skipped))
    todo = []
    for run in the_plan.runs:
        if record_path(out, run.key).is_file():
            read_back(out, run, report)
        else:
            todo.append(run)
    if not todo:
        return report
    if on_features:
        report.records += train_heads(the_plan, todo, out, weights=weights, random_init=random_init,
                                      store=features, device=device, progress=progress, load_progress=load_progress,
                                      notes=report.notes)
        report.written = len(todo)
        return report
    ids = sorted({i for run in todo for i in run.train + run.val + run.test})
    images = load_images(the_plan.manifest, ids, the_plan.spec.preprocess, pixels, progress=load_progress)
    accelerator = _accelerator(device)
    said: set[str] = set()

    def once(line: str) -> None:
        if note is not None and line not in said:
            said.add(line)
            note(line)

    claims = Claims(out / CLAIMS)
    deferred: list[Run] = []
    if the_plan.settings.pack > 1 and len(todo) > 1:
        from adapters.packed import train_packed

        records, todo, deferred = train_packed(the_plan, todo, images, out, accelerator, claims, weights,
                                               random_init, progress, once, report.notes)
        report.records += records
        report.written += len(records)
    deferred += [run for run in todo if not claimed_run(the_plan, run, images, out, accelerator, claims, report,
                                                        weights, random_init, progress, once, wait=False)]
    for run in deferred:  # another process holds them: wait for it, then read its record (or train if it died)
        claimed_run(the_plan, run, images, out, accelerator, claims, report, weights, random_init, progress, once,
                     wait=True)
    return report


def read_back(out: Path, run: Run, report: TrainReport) -> None:
    report.records.append(read_record(record_path(out, run.key)))
    report.existing += 1
    (out / run.key / CHECKPOINT).unlink(missing_ok=True)  # a kill between record and cleanup


def claimed_run(plan: TrainPlan, run: Run, images: Images, out: Path, accelerator: Accelerator, claims: Claims,
                 report: TrainReport, weights: str | Path | None, random_init: bool,
                 progress: TrainProgress | None, note: Callable[[str], None], *, wait: bool) -> bool:
    """Train ``run`` (or read its record, when another process wrote it meanwhile) while holding its claim, so
    that two requests on one ``out`` (two `study run`s) share the runs; False when not claimed (``wait`` off
    and another process holds it). Rank 0 claims for all ranks."""
    lock = claims.claim(run.key, wait=wait) if accelerator.is_main_process else None
    held = lock is not None
    if accelerator.num_processes > 1:
        held = broadcast_object_list([held])[0]
    if not held:
        return False
    try:
        if record_path(out, run.key).is_file():
            read_back(out, run, report)
        else:
            report.records.append(_train_run(plan, run, images, out, accelerator, weights, random_init, progress,
                                             report.notes, note))
            report.written += 1
    finally:
        if lock is not None:
            lock.release()
    return True


def _accelerator(device: str) -> Accelerator:
    resolved = resolve_device(device)
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision="bf16" if resolved.type == "cuda" else "no")


def _train_run(plan: TrainPlan, run: Run, images: Images, out: Path, accelerator: Accelerator,
               weights: str | Path | None, random_init: bool, progress: TrainProgress | None,
               notes: list[str], note: Callable[[str], None]) -> RunRecord:
    trainer = start_run(plan, run, images, out, accelerator, notes, note,
                        lambda: fresh_classifier(plan, weights, random_init))
    trainer.fit(progress)
    return end_run(trainer, out, weights)
