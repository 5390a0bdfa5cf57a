"""A trained run's files, and the model they rebuild: for `adapters predict` and `adapters export`.

Beside each record ``<out>/<key>.json`` the run folder ``<out>/<key>/`` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors`` for LoRA, VeRA and IA3, peft's own format
  (``save_pretrained``): ``PeftModel.from_pretrained(backbone_module, folder)`` loads it on the same backbone;
- ``head.safetensors``: the task head (``weight`` (2, D), ``bias`` (2,)); logit 1 is the positive class;
- ``weights.safetensors`` for FFT and BitFit: the backbone tensors training changed (all of them, or the
  biases and batch-norm statistics), by their names in the backbone module;
- ``config.json``: what defines the run (its key's fields), written when it started.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from adapters.classifier import Classifier
from adapters.methods import METHODS, Method, get_method
from adapters.model import backbone_module, build_classifier, head_module, mutable_names
from featcache.backbones import get_spec
from featcache.errors import RecordError, UsageError
from featcache.fileio import atomic_write
from featcache.records import PROBE_METHOD, RunRecord

HEAD = "head.safetensors"
WEIGHTS = "weights.safetensors"
ADAPTER = "adapter_model.safetensors"


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def save_artifacts(model: Classifier, method: Method, folder: Path) -> None:
    """Write the run's trained weights into ``folder`` (see the module doc); the head always."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_tensors(folder / HEAD, head_module(model).state_dict())
    if method.saves == "adapter":
        model.backbone.model.save_pretrained(str(folder))
    elif method.saves == "weights":  # the names training changes, by the trainer's rule
        head = {id(t) for t in head_module(model).state_dict(keep_vars=True).values()}
        module = backbone_module(model)
        state = module.state_dict(keep_vars=True)
        changed = set(mutable_names(module))
        _write_tensors(folder / WEIGHTS, {n: t for n, t in state.items() if n in changed and id(t) not in head})


def read_run(run: str | Path) -> tuple[Path, RunRecord]:
    """A run given as its folder, its record file or ``<out>/<key>``: (folder, record)."""
    path = Path(run)
    folder = path.with_suffix("") if path.suffix == ".json" else path
    record_file = folder.with_name(f"{folder.name}.json")
    if not record_file.is_file():
        raise RecordError(f"{run}: no run record {record_file} (a run is finished once its record exists)")
    try:
        record = RunRecord.from_dict(json.loads(record_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise RecordError(f"{record_file}: not a run record ({err})") from err
    if record.method == PROBE_METHOD or not (folder / HEAD).is_file():
        raise RecordError(f"{folder}: holds no trained model (a stage-2 run folder has {HEAD}); probe records "
                          "score cached features, not images")
    return folder, record


def load_model(run: str | Path, weights: str | Path | None = None) -> tuple[Classifier, RunRecord]:
    """Rebuild a trained run's classifier in eval mode: backbone (its weights are the run's: ``weights``, or
    the path recorded at training, or the same seeded random init), method, and the saved tensors."""
    from peft import PeftModel

    folder, record = read_run(run)
    spec = get_spec(record.backbone)
    method = get_method(record.method)
    weights = weights if weights is not None else record.provenance.get("weights_path")
    random_init = record.identity == "random-init"
    model = build_classifier(spec, METHODS["lp"] if method.peft else method, None, weights=weights,
                             random_init=random_init)
    if method.peft:  # peft's own loader on the plain backbone module
        model.backbone.model = PeftModel.from_pretrained(model.backbone.model, str(folder))
    if (folder / WEIGHTS).is_file():
        _load_strict(backbone_module(model), load_file(folder / WEIGHTS), folder / WEIGHTS)
    _load_strict(head_module(model), load_file(folder / HEAD), folder / HEAD)
    return model.eval(), record


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    result = module.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RecordError(f"{path}: tensors {result.unexpected_keys[:3]} do not fit the rebuilt model")


def export_merged(run: str | Path, out: str | Path, merge: bool, weights: str | Path | None = None) -> Path:
    """Write the run's model to ``out``: with ``merge``, LoRA/IA3/VeRA folded into the backbone
    (``merge_and_unload``) as one ``model.safetensors`` (backbone + head by the classifier's names) and
    ``export.json``; without it, the adapter, head and changed weights as they were saved."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not merge:
        folder, _ = read_run(run)
        for file in folder.iterdir():
            atomic_write(out / file.name, file.read_bytes())
        return out
    model, record = load_model(run, weights)
    method = get_method(record.method)
    if method.mergeable:
        model.backbone.model = model.backbone.model.merge_and_unload()
    elif method.peft:
        raise UsageError(f"{record.method} cannot be merged")
    _write_tensors(out / "model.safetensors", model.state_dict())
    meta = {"backbone": record.backbone, "method": record.method, "merged": method.mergeable,
            "weights": record.identity, "task": record.task, "key": record.key,
            "positive_logit": 1, "load": "adapters.artifacts.load_export"}
    atomic_write(out / "export.json", (json.dumps(meta, indent=2) + "\n").encode())
    return out


def load_export(folder: str | Path) -> Classifier:
    """A merged export as a plain classifier (no peft), in eval mode; it holds every weight, so the backbone
    is built with random weights and then overwritten."""
    folder = Path(folder)
    meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    model = build_classifier(get_spec(meta["backbone"]), METHODS["lp"], None, random_init=True)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


@torch.no_grad()
def predict(run: str | Path, manifest: str | Path, *, weights: str | Path | None = None,
            pixels: str | Path | None = None, device: str = "auto", batch_size: int = 64
            ) -> list[dict[str, object]]:
    """Score every image of ``manifest`` with a trained run: one row per image (id, patient, positive-class
    probability, and the label where the manifest has the run's task column)."""
    from adapters.images import load_images
    from featcache.device import resolve_device
    from featcache.manifest import load_manifest

    model, record = load_model(run, weights)
    the_manifest = load_manifest(manifest)
    target = resolve_device(device)
    model.to(target)
    pre = model.backbone.spec.preprocess
    images = load_images(the_manifest, the_manifest.ids, pre, pixels)
    scores = []
    for rows in torch.arange(len(images.ids)).split(batch_size):
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
            scores.append(model(images.batch(rows, pre, target)).float().softmax(1)[:, 1].cpu())
    values = torch.cat(scores).double().tolist() if scores else []
    labels = the_manifest.column(record.task) if record.task in the_manifest.columns else None
    rows_out = []
    for n, image_id in enumerate(images.ids.tolist()):
        row: dict[str, object] = {"image_id": image_id, "patient_id": the_manifest.patients([image_id])[0],
                                  "score": values[n]}
        if labels is not None:
            row[record.task] = labels[n]
        rows_out.append(row)
    return rows_out
