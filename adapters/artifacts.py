"""A trained run's files, and the model they rebuild: for `adapters predict` and `adapters export`.

Beside each record ``<out>/<key>.json`` the run folder ``<out>/<key>/`` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors`` for LoRA, VeRA and IA3, peft's own format
  (``save_pretrained``): ``PeftModel.from_pretrained(backbone_module, folder)`` loads it on the same backbone;
- ``head.safetensors``: the task head (``weight`` (2, D), ``bias`` (2,)); logit 1 is the positive class;
- ``weights.safetensors`` for FFT and BitFit: the backbone tensors training changed (all of them, or the
  biases and batch-norm statistics), by their names in the backbone module;
- ``config.json``: what defines the run (its key's fields and the identity of its base weights), written
  when it started;
- ``seen.json``: the image ids it trained and validated on (`predict` warns about them, or drops them).

The base a run loads onto must be the one it trained on: the same weights identity (revision or checksum),
and for random-init bases the same fingerprint of the rebuilt weights (a random-init base is not saved: it is
rebuilt from its seed and checked against the fingerprint recorded at training).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from adapters.classifier import Classifier
from adapters.methods import METHODS, Method, get_method
from adapters.model import backbone_module, build_classifier, head_module, mutable_names
from adapters.plan import Run, TrainPlan
from featcache.backbones import get_spec, weights_identity
from featcache.backbones.weights import RANDOM_INIT
from featcache.errors import FeatcacheError, RecordError, UsageError
from featcache.fileio import atomic_write, write_errors
from featcache.records import PROBE_METHOD, RunRecord

HEAD = "head.safetensors"
WEIGHTS = "weights.safetensors"
ADAPTER = "adapter_model.safetensors"
SEEN = "seen.json"
CHECKPOINT = "checkpoint.pt"  # written by `adapters.trainer` while a run trains; a cache, never exported
MODEL = "model.safetensors"
EXPORT = "export.json"
PREPROCESSING = "preprocessing.json"
_PLAIN_ARGS = """\
folder, image, box = sys.argv[1], sys.argv[2], [int(v) for v in sys.argv[3:7]]  # box: x0 y0 x1 y1, if any
pre, meta = (json.load(open(f"{folder}/{name}.json")) for name in ("preprocessing", "export"))
"""
_PLAIN_PIXELS = """\
gray = Image.open(image).convert("L").crop(box or None)
gray = torch.tensor(np.asarray(gray, np.float32) / 255)[None, None]
x = F.interpolate(gray, size=(pre["size"],) * 2, mode="bilinear", antialias=True)[0]
if pre["intensity"] == "minmax":
    x = (x - x.min()) / (x.max() - x.min())
x = (x.clamp(0, 1) * 255).round() / 255  # the 8-bit pixels training read
mean, std = (torch.tensor(pre[k][: pre["channels"]])[:, None, None] for k in ("mean", "std"))
x = (x.expand(pre["channels"], -1, -1) - mean) / std
"""
# predict.py written into a merged export, one per source library (the README shows the timm one): the same
# argument handling and pixel steps, the library's own loading call and forward.
PLAIN_SCRIPTS = {
    "timm": """\
import json, sys
import numpy as np, timm, torch, torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

""" + _PLAIN_ARGS + """\
model = timm.create_model(**meta["create"]).eval()
model.load_state_dict(load_file(f"{folder}/model.safetensors"))
head = load_file(f"{folder}/head.safetensors")
""" + _PLAIN_PIXELS + """\
with torch.no_grad():
    print(torch.softmax(model(x[None]) @ head["weight"].T + head["bias"], 1)[0, 1].item())
""",
    "transformers": """\
import json, sys
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

""" + _PLAIN_ARGS + """\
model = AutoModel.from_pretrained(f"{folder}/model").eval()
head = load_file(f"{folder}/head.safetensors")
""" + _PLAIN_PIXELS + """\
with torch.no_grad():
    out = model(pixel_values=x[None])
    features = out.pooler_output if meta["features"].endswith("pooler_output") else out.last_hidden_state[:, 0]
    print(torch.softmax(features @ head["weight"].T + head["bias"], 1)[0, 1].item())
""",
    "featcache": """\
import sys

import torch
from adapters.artifacts import load_export
from featcache.imaging import load_image

folder, image = sys.argv[1], sys.argv[2]
model = load_export(folder)
with torch.no_grad():
    print(model(load_image(image, model.backbone.spec.preprocess)[None]).softmax(1)[0, 1].item())
""",
}

CONFIG = "config.json"  # what defines the run, written when it started


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


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


def check_run_folder(folder: Path, run: Run, plan: TrainPlan, notes: list[str]) -> None:
    """A run folder is this run's or refused: written with the run's defining fields, compared on resume. An
    unreadable config.json is damage, not another run: named in ``notes``, rewritten, the checkpoint dropped."""
    config = {"key": run.key, "task": plan.task, "backbone": plan.spec.name, "method": plan.method.name,
              "fold": run.fold, "regime": run.regime, "shots": run.shots, "draw": run.draw,
              "options": run.options, "identity": plan.identity, "splits_digest": plan.splits.digest()}
    path = folder / CONFIG
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            notes.append(f"{path}: damaged, rewritten; this run starts again from scratch")
            (folder / CHECKPOINT).unlink(missing_ok=True)
            found = None
        if found is not None and found != json.loads(json.dumps(config)):
            raise UsageError(f"{folder}: a run folder of another configuration sits under this run's key; "
                             "move it away or use another --out")
        if found is not None:
            return
    atomic_write(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def save_seen(folder: Path, train: list[str] | tuple[str, ...], val: list[str] | tuple[str, ...]) -> None:
    """The images the run trained and validated on, so `predict` can warn about (or drop) them."""
    atomic_write(folder / SEEN, (json.dumps({"train": list(train), "val": list(val)}) + "\n").encode())


def read_run(run: str | Path) -> tuple[Path, RunRecord]:
    """A run given as its folder, its record file or ``<out>/<key>``: (folder, record)."""
    path = Path(run)
    folder = path.with_suffix("") if path.suffix == ".json" else path
    record_file = folder.with_name(f"{folder.name}.json")
    if not record_file.is_file():
        raise RecordError(f"{run}: no run record {record_file} (a run is finished once its record exists)")
    try:
        record = RunRecord.from_dict(json.loads(record_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RecordError(f"{record_file}: not a run record ({err})") from err
    if record.method == PROBE_METHOD or not (folder / HEAD).is_file():
        raise RecordError(f"{folder}: holds no trained model (a stage-2 run folder has {HEAD}); probe records "
                          "score cached features, not images")
    return folder, record


def positive_class(record: RunRecord) -> str:
    """The name of the class the run's score is the probability of (recorded since runs record it; else the
    dataset spec's task; else "positive")."""
    if record.provenance.get("positive_class"):
        return str(record.provenance["positive_class"])
    from featcache.datasets import get_task

    try:
        return get_task(record.task).positive
    except FeatcacheError:
        return "positive"


def _check_base(folder: Path, record: RunRecord, spec, weights: str | Path | None, random_init: bool) -> None:
    """Refuse to load a run onto base weights other than its own, in one line: the weights' identity
    (revision or checksum) must be the recorded one."""
    found = weights_identity(spec, weights, random_init)
    if found != record.identity:
        raise RecordError(f"{folder}: trained on base weights {record.identity}, not {found}; pass the weights "
                          "it was trained on with --weights")


def load_model(run: str | Path, weights: str | Path | None = None) -> tuple[Classifier, RunRecord]:
    """Rebuild a trained run's classifier in eval mode: backbone (its weights are the run's: ``weights``, or
    the path recorded at training, or the same seeded random init, checked against the base's fingerprint),
    method, and the saved tensors. Another base, or a damaged file, is refused in one line naming it."""
    from peft import PeftModel

    folder, record = read_run(run)
    spec = get_spec(record.backbone)
    method = get_method(record.method)
    weights = weights if weights is not None else record.provenance.get("weights_path")
    random_init = record.identity == RANDOM_INIT
    _check_base(folder, record, spec, weights, random_init)
    model = build_classifier(spec, METHODS["lp"] if method.peft else method, None, weights=weights,
                             random_init=random_init)
    recorded = record.provenance.get("base_fingerprint")
    if recorded and model.base_fingerprint != recorded:
        raise RecordError(f"{folder}: the random-init base rebuilt here differs from the one this run trained on "
                          "(another torch or library version?); rebuild it where it was trained")
    if method.peft:  # peft's own loader on the plain backbone module
        try:
            model.backbone.model = PeftModel.from_pretrained(model.backbone.model, str(folder))
        except Exception as err:  # noqa: BLE001 - a damaged adapter is one line, whatever peft raises
            raise RecordError(f"{folder / 'adapter_config.json'} or {ADAPTER}: damaged or not this run's adapter "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if (folder / WEIGHTS).is_file():
        _load_strict(backbone_module(model), _read_tensors(folder / WEIGHTS), folder / WEIGHTS)
    _load_strict(head_module(model), _read_tensors(folder / HEAD), folder / HEAD)
    return model.eval(), record


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for garbage
        raise RecordError(f"{path}: damaged, not a safetensors file ({str(err).splitlines()[0][:120]})") from None


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        result = module.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # wrong shapes
        raise RecordError(f"{path}: tensors do not fit the rebuilt model ({str(err).splitlines()[-1].strip()})"
                          ) from None
    if result.unexpected_keys:
        raise RecordError(f"{path}: tensors {result.unexpected_keys[:3]} do not fit the rebuilt model")


# ---- export


@contextmanager
def _new_folder(out: Path) -> Iterator[None]:
    """Create ``out`` (a write refusal is one line); if what follows fails, remove what was created, so a refused
    export leaves no empty or half-written folder behind."""
    top = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def export_merged(run: str | Path, out: str | Path, merge: bool, weights: str | Path | None = None) -> Path:
    """Write the run's model to ``out``. Without ``merge``: the run folder's files as they were saved. With it:
    LoRA/IA3/VeRA folded into the backbone (``merge_and_unload``), written for the source library's own loader
    (see `_library_files`), ``head.safetensors`` beside it, ``preprocessing.json`` (the input rules) and
    ``export.json`` (how to load it)."""
    out = Path(out)
    if not merge:
        folder, _ = read_run(run)
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                 and f.name != CHECKPOINT}
        with _new_folder(out):
            for name, data in files.items():
                atomic_write(out / name, data)
        return out
    model, record = load_model(run, weights)
    method = get_method(record.method)
    if method.mergeable:
        model.backbone.model = model.backbone.model.merge_and_unload()
    elif method.peft:
        raise UsageError(f"{record.method} cannot be merged")
    spec = model.backbone.spec
    head = {k: v.detach().clone() for k, v in head_module(model).state_dict().items()}
    meta: dict[str, Any] = {"backbone": record.backbone, "method": record.method, "merged": method.mergeable,
            "weights": record.identity, "task": record.task, "key": record.key,
            "positive_class": positive_class(record), "positive_logit": 1,
            "head": {"file": HEAD, "input": spec.head_view, "logits": ["negative", "positive"]}}
    with _new_folder(out):
        meta.update(_library_files(model, out))
        _write_tensors(out / HEAD, head)
        atomic_write(out / PREPROCESSING, (json.dumps(preprocessing(spec), indent=2) + "\n").encode())
        atomic_write(out / EXPORT, (json.dumps(meta, indent=2) + "\n").encode())
        atomic_write(out / "predict.py", PLAIN_SCRIPTS.get(meta["library"], PLAIN_SCRIPTS["featcache"]).encode())
    return out


def preprocessing(spec) -> dict[str, object]:
    """The input rules of a backbone, in words and numbers a plain script can apply (`featcache.imaging`)."""
    pre = spec.preprocess
    return {
        "size": pre.size, "mean": list(pre.mean), "std": list(pre.std), "channels": pre.channels,
        "intensity": pre.intensity,
        "steps": [
            "decode to gray in [0, 1]: 8-bit /255, 16-bit /65535, colour by ITU-R BT.601 luma; DICOM: modality "
            "and VOI LUT, MONOCHROME1 inverted (air dark)",
            "crop to the manifest's bbox (x0, y0, x1, y1, half-open) when the row has one; else no crop",
            f"resize the whole image to {pre.size}x{pre.size}: bilinear, antialiased, align_corners=False "
            "(torch.nn.functional.interpolate); no aspect-preserving pad",
            "intensity: min-max to [0, 1] after the resize" if pre.intensity == "minmax"
            else "intensity: none (the decoded [0, 1] values)",
            "quantise to 8 bits: round(255 * gray) / 255 (training read these bytes)",
            f"replicate the gray image into {pre.channels} channel(s); subtract mean, divide by std per channel",
        ],
    }


def _library_files(model: Classifier, out: Path) -> dict[str, Any]:
    """Write the merged backbone (without its head) for its own library, and say how to load it:
    timm (`timm.create_model(**create)` + `load_state_dict`, also BiomedCLIP's timm trunk); transformers
    (`AutoModel.from_pretrained(folder)`); anything else our way (`adapters.artifacts.load_export`)."""
    spec = model.backbone.spec
    module: Any = backbone_module(model)  # the library's own module (save_pretrained, ...)
    if spec.source == "timm" or (spec.source == "open_clip" and spec.family == "timm_vit"):
        trunk = getattr(module, "trunk", module)
        slot = f"{spec.head}." if spec.head else None
        state = {k: v for k, v in trunk.state_dict().items() if slot is None or not k.startswith(slot)}
        if spec.source == "open_clip" and spec.head_view == "proj":
            raise UsageError(f"{spec.name}: a head on the projection does not export to plain timm")
        _write_tensors(out / MODEL, state)
        create = {"model_name": spec.arch, "num_classes": 0,
                  **(dict(spec.config) if spec.source == "timm" else {})}
        return {"library": "timm", "model": MODEL, "create": _jsonable(create),
                "features": "model(x): the pooled features (num_classes=0)"}
    if spec.source == "hf":
        module.save_pretrained(str(out / "model"))
        feature = "pooler_output" if spec.family in ("clip", "swin") else "last_hidden_state[:, 0]"
        return {"library": "transformers", "model": "model", "load": "transformers.AutoModel.from_pretrained",
                "features": f"model(pixel_values=x).{feature}"}
    _write_tensors(out / MODEL, model.state_dict())
    return {"library": "featcache", "model": MODEL, "load": "adapters.artifacts.load_export",
            "features": "load_export(folder)(x) gives the two logits (head included)"}


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def load_export(folder: str | Path) -> Classifier:
    """A merged export as a plain classifier (no peft), in eval mode, whatever library wrote it: the backbone
    is built with random weights and then overwritten with the exported ones."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / EXPORT).read_text(encoding="utf-8"))
        backbone = meta["backbone"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecordError(f"{folder / EXPORT}: not an export description ({type(err).__name__}: "
                          f"{_first_line(err)})") from None
    model = build_classifier(get_spec(backbone), METHODS["lp"], None, random_init=True)
    library = meta.get("library", "featcache")
    if library == "featcache":
        model.load_state_dict(_read_tensors(folder / MODEL))
        return model.eval()
    module = backbone_module(model)
    if library == "timm":
        _load_strict(getattr(module, "trunk", module), _read_tensors(folder / MODEL), folder / MODEL)
    else:
        from transformers import AutoModel

        module.load_state_dict(AutoModel.from_pretrained(str(folder / "model")).state_dict(), strict=False)
    _load_strict(head_module(model), _read_tensors(folder / HEAD), folder / HEAD)
    return model.eval()


# ---- predict


def seen_images(folder: Path) -> dict[str, set[str]] | None:
    """The run's train and validation image ids (None for a run folder written before they were saved)."""
    path = folder / SEEN
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {part: set(map(str, data[part])) for part in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError):
        raise RecordError(f"{path}: damaged (not the run's train/val image lists)") from None


@dataclass
class Prediction:
    """`predict`'s rows, the score column's name, and how many scored images the run had seen."""

    rows: list[dict[str, object]]
    column: str
    seen: dict[str, int] | None  # images of the run's train / val parts among those scored (None: unknown)
    dropped: int = 0


@torch.no_grad()
def predict(run: str | Path, manifest: str | Path, *, weights: str | Path | None = None,
            pixels: str | Path | None = None, device: str = "auto", batch_size: int = 64,
            exclude_seen: bool = False, progress: Callable[[str, int, int], None] | None = None) -> Prediction:
    """Score every image of ``manifest`` with a trained run: one row per image (id, patient, the probability
    of the positive class in a column named after it, and the label where the manifest has the run's task
    column). Images the run trained or validated on are counted (``seen``) and, with ``exclude_seen``, left
    out. ``progress(stage, done, total)`` follows decoding and scoring."""
    from adapters.images import load_images
    from featcache.device import resolve_device
    from featcache.manifest import load_manifest

    model, record = load_model(run, weights)
    folder, _ = read_run(run)
    seen = seen_images(folder)
    the_manifest = load_manifest(manifest)
    ids = list(the_manifest.ids)
    counts = None if seen is None else {part: sum(i in seen[part] for i in ids) for part in ("train", "val")}
    dropped = 0
    if exclude_seen and seen is not None:
        kept = [i for i in ids if i not in seen["train"] and i not in seen["val"]]
        dropped, ids = len(ids) - len(kept), kept
    target = resolve_device(device)
    model.to(target)
    pre = model.backbone.spec.preprocess
    decoding = (lambda done, total: progress("decoding", done, total)) if progress is not None else None
    images = load_images(the_manifest, ids, pre, pixels, progress=decoding)
    scores = []
    if progress is not None:
        progress("scoring", 0, len(images.ids))
    for rows in torch.arange(len(images.ids)).split(batch_size):
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
            scores.append(model(images.batch(rows, pre, target)).float().softmax(1)[:, 1].cpu())
        if progress is not None:
            progress("scoring", int(rows[-1]) + 1, len(images.ids))
    values = torch.cat(scores).double().tolist() if scores else []
    column = f"score_{positive_class(record)}"
    labels = dict(zip(the_manifest.ids, the_manifest.column(record.task), strict=True)) \
        if record.task in the_manifest.columns else None
    patients = the_manifest.patients(images.ids.tolist())
    rows_out = []
    for n, image_id in enumerate(images.ids.tolist()):
        row: dict[str, object] = {"image_id": image_id, "patient_id": patients[n], column: values[n]}
        if labels is not None:
            row[record.task] = labels[image_id]
        rows_out.append(row)
    return Prediction(rows_out, column, counts, dropped)
