"""A training run's start and end around its trainer, packed or not: the run folder checked, leftovers of a
killed write removed, the checkpoint resumed (a damaged one named and dropped); then the record, artefacts and
cleanup, the record last so that a recorded run is a finished one. Used by `adapters.train` (one run at a time)
and `adapters.packed` (several in one pass) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from adapters.artifacts import check_run_folder, save_artifacts, save_seen
from adapters.classifier import Classifier
from adapters.images import Images
from adapters.model import build_classifier
from adapters.plan import Run, TrainPlan
from adapters.trainer import CHECKPOINT, DamagedCheckpoint, Trainer
from featcache.records import RunRecord, write_record


def start_run(plan: TrainPlan, run: Run, images: Images, out: Path, accelerator: Accelerator, notes: list[str],
              note: Callable[[str], None], model: Callable[[], Classifier]) -> Trainer:
    """A run's trainer on its checked folder over a fresh ``model()``, resumed from its checkpoint where there
    is one (a damaged one is named in ``notes``, removed, and the run starts afresh)."""
    folder = out / run.key
    if accelerator.is_main_process:
        check_run_folder(folder, run, plan, notes)
        _remove_temp_files(out, run.key)
    accelerator.wait_for_everyone()
    trainer = Trainer(plan, run, model(), images, folder, accelerator)
    try:
        trainer.resume()
    except DamagedCheckpoint as err:  # a cache: named once, removed, and the run starts afresh
        notes.append(str(err))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            err.path.unlink(missing_ok=True)
        trainer = Trainer(plan, run, model(), images, folder, accelerator)
    if trainer.note:
        note(f"{plan.method.name} on {plan.spec.name}: {trainer.note}")
    return trainer


def end_run(trainer: Trainer, out: Path, weights: str | Path | None, **provenance: object) -> RunRecord:
    """A fitted run's record (``provenance`` added to it), artefacts and cleanup: the record last, so a
    recorded run is a finished one."""
    plan, run, accelerator = trainer.plan, trainer.run, trainer.acc
    record = trainer.record(plan, weights)
    record.provenance.update(provenance)
    if accelerator.is_main_process:
        save_artifacts(accelerator.unwrap_model(trainer.ddp), plan.method, trainer.folder)
        save_seen(trainer.folder, run.train, run.val)
        write_record(record, out)
        (trainer.folder / CHECKPOINT).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return record


def fresh_classifier(plan: TrainPlan, weights: str | Path | None, random_init: bool) -> Classifier:
    """A fresh model for a run of ``plan`` (the same seeds every time, so a restart equals a first start)."""
    torch.manual_seed(plan.settings.seed)
    settings = plan.settings
    return build_classifier(plan.spec, plan.method, plan.rank, weights=weights, random_init=random_init,
                            seed=settings.seed, grad_ckpt=settings.grad_ckpt, dropout=settings.adapter_dropout)


def _remove_temp_files(out: Path, key: str) -> None:
    """Temp files a killed write of this run left (`atomic_write`'s ``.NAME.*.tmp``): its record's beside the
    folder, its checkpoint's and artefacts' inside. Called under the run's claim, so no live write is touched."""
    leftovers = [*out.glob(f".{key}.json.*.tmp"), *(out / key).glob(".*.tmp")]
    for path in leftovers:
        path.unlink(missing_ok=True)
