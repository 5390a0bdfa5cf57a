"""GPU check: what the toolkit does on one GPU, in one table (a script, not a test; <= 8 min on an H100/H200).

Rows (random weights throughout, so nothing is downloaded; inputs are random 224 px batches except the last):

- extract: images/s of a backbone's forward pass (its pooled views, as `featcache extract` computes them) at
  batch 128 in float32 and under bf16 autocast, for resnet50, dinov2-b and dinov2-l (a ViT-L/14), and the largest
  bf16-vs-float32 feature difference (max |bf16 - fp32| over the batch, relative to max |fp32|);
- step: seconds per optimiser step of `adapters train`'s trainer (its `train_epoch` over one batch of 128 images:
  batch assembly, bf16 autocast, class-weighted loss, backward, Adam) per method on dinov2-b;
- packed: few-shot runs per hour (k = 8: 16 support images, 64 validation images, 150 epochs a run assumed)
  one at a time against N runs packed (`adapters.packed`), LoRA r8 at dropout 0 on dinov2-b;
- train: one short `adapters train` request (dinov2-s-tiny, LoRA, 2 runs of 6 epochs) on the GPU and on the
  CPU: the largest difference of test scores and of best validation losses, against a stated tolerance
  (bf16 autocast on the GPU, float32 on the CPU: 0.05 on scores and losses);

each with the peak GPU memory it took. ``--smoke`` runs the same code on the CPU with tiny backbones and small
batches in seconds (the test suite runs it so this script never rots); its numbers mean nothing.

Needs, beyond torch, transformers, peft, timm and accelerate: this project's own dependencies that its import
path touches (numpy, safetensors, scikit-learn, pillow, pydicom, zarr, h5py, filelock, pyyaml, typer, rich,
open_clip_torch); the script names any that are missing, and exits. On a machine without PyPI, bring them as
wheels: here, ``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION`` for each (pure-Python
ones are ``py3-none-any``), carry ``.whl``, and there ``pip install --no-index --no-deps --target /tmp/site
.whl/*.whl && export PYTHONPATH=/tmp/site:$PWD``.

    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEEDED = ("torch", "transformers", "peft", "timm", "accelerate", "numpy", "safetensors", "sklearn", "PIL",
          "pydicom", "zarr", "h5py", "filelock", "yaml", "typer", "rich", "open_clip")
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch"}
TOLERANCE = 0.05  # GPU (bf16 autocast) vs CPU (float32): test scores and best validation losses


@dataclass(frozen=True)
class Setup:
    """What a check runs: real-size on the GPU, or tiny on the CPU (``--smoke``)."""

    device: str
    extract: tuple[str, ...]
    batch: int
    batches: int
    step_model: str
    steps: int
    packs: tuple[int, ...]
    shots: int
    val: int
    epochs: int
    size: int
    train_epochs: int
    head_lrs: tuple[float, ...]


GPU = Setup("cuda", ("resnet50", "dinov2-b", "dinov2-l"), 128, 10, "dinov2-b", 5, (16, 64), 8, 64, 3, 224, 6,
            (1e-2, 1e-3))
SMOKE = Setup("cpu", ("resnet50-tiny", "dinov2-b-tiny"), 8, 1, "dinov2-b-tiny", 1, (4,), 2, 8, 1, 32, 2, (1e-2,))


@dataclass
class Row:
    check: str
    what: str
    value: str
    memory: str = ""
    note: str = ""


def missing_modules() -> list[str]:
    return [PIP_NAMES.get(m, m) for m in NEEDED if importlib.util.find_spec(m) is None]


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> str:
    import torch

    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize(device)
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction(setup: Setup, device) -> list[Row]:
    """Images/s of each backbone's views in float32 and bf16 autocast; the largest relative feature difference."""
    import torch

    from featcache.backbones import build_backbone, get_spec

    rows = []
    for name in setup.extract:
        spec = get_spec(name)
        backbone = build_backbone(spec, random_init=not spec.is_tiny).to(device).eval()
        if spec.family == "cnn" and device.type == "cuda":
            backbone = backbone.to(memory_format=torch.channels_last)
        size = spec.preprocess.size
        x = torch.randn(setup.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        feats = {}
        for precision in ("float32", "bf16"):
            _peak_reset(device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=precision == "bf16"):
                feats[precision] = {k: v.float() for k, v in backbone(x).items()}
                _sync(device)
                start = time.perf_counter()
                for _ in range(setup.batches):
                    backbone(x)
                _sync(device)
            rate = setup.batch * setup.batches / (time.perf_counter() - start)
            rows.append(Row("extract", f"{name} {precision}", f"{rate:,.0f} img/s", _peak(device)))
        diff = max(float((feats["bf16"][k] - feats["float32"][k]).abs().max() / feats["float32"][k].abs().max())
                   for k in feats["float32"])
        rows.append(Row("extract", f"{name} bf16 vs fp32", f"{diff:.2e} rel.", "",
                        "max |bf16 - fp32| / max |fp32| over the batch's views"))
        del backbone
    return rows


def _cohort(folder: Path, size: int, patients: int) -> Path:
    from featcache.splits import build_splits, save_splits
    from featcache.synth import make_cohort

    manifest = make_cohort(folder, patients=patients, positive_rate=0.5, size=size, seed=0)
    save_splits(build_splits(manifest, "SYN", draws=2, shots=(2,)), manifest)
    return manifest


def _runs(manifest: Path, model: str, method: str, setup: Setup, n: int, train: int, val: int, batch: int):
    """A plan for ``model`` x ``method`` and ``n`` runs with their own seeded training sets of ``train``
    images (both classes) and one validation part of ``val`` images."""
    import torch

    from adapters.images import load_images
    from adapters.plan import Run, TrainSettings, plan

    real = not model.endswith("-tiny")
    settings = TrainSettings(batch_size=batch, warmup=5, checkpoint_every_s=1e9, adapter_dropout=0.0)
    rank = 8 if method in ("lora", "vera") else None
    the_plan = plan(manifest, "SYN", model, method=method, rank=rank, settings=settings, random_init=real,
                    device=setup.device, folds=["fold0"], head_lrs=(1e-3,))
    ids = list(the_plan.labels)
    by_class = {c: [i for i in ids if the_plan.labels[i] == c] for c in (0, 1)}
    held = tuple(by_class[0][: val // 2] + by_class[1][: val - val // 2])
    runs = []
    for r in range(n):
        g = torch.Generator().manual_seed(r)
        pick = [by_class[c][val // 2 + int(j)] for c in (0, 1)
                for j in torch.randperm(len(by_class[c]) - val // 2 - 1, generator=g)[: train // 2]]
        runs.append(Run("check", "fewshot", train // 2, r, 1e-3, tuple(pick), held, held, f"check{r}", {}))
    images = load_images(the_plan.manifest, ids, the_plan.spec.preprocess)
    return dataclasses.replace(the_plan, runs=tuple(runs)), runs, images, real, rank


def step_times(setup: Setup, device, manifest: Path) -> list[Row]:
    """Seconds per optimiser step of the trainer at the benchmark's batch size, per method."""
    from adapters.methods import METHODS
    from adapters.model import build_classifier
    from adapters.train import _accelerator
    from adapters.trainer import Trainer

    rows = []
    acc = _accelerator(setup.device)
    for method in METHODS:
        the_plan, runs, images, real, rank = _runs(manifest, setup.step_model, method, setup, 1, setup.batch,
                                                   4, setup.batch)
        model = build_classifier(the_plan.spec, the_plan.method, rank, random_init=real)
        t = Trainer(the_plan, runs[0], model, images, Path(tempfile.mkdtemp()), acc)
        t.train_epoch(10)
        _peak_reset(device)
        _sync(device)
        start = time.perf_counter()
        for i in range(setup.steps):
            t.train_epoch(11 + i)
        _sync(device)
        rows.append(Row("step", f"{setup.step_model} {method} b{setup.batch}",
                        f"{(time.perf_counter() - start) / setup.steps:.3f} s/step", _peak(device)))
        del t, model
    return rows


def packed_rates(setup: Setup, device, manifest: Path, per_run: int = 150) -> list[Row]:
    """Few-shot runs per hour, one at a time vs packed, LoRA at dropout 0 (each epoch: steps + validation)."""
    from adapters.model import build_classifier
    from adapters.packed import Packer
    from adapters.train import _accelerator
    from adapters.trainer import Trainer

    train = 2 * setup.shots
    the_plan, runs, images, real, rank = _runs(manifest, setup.step_model, "lora", setup, max(setup.packs), train,
                                               setup.val, train)
    acc = _accelerator(setup.device)
    folder = Path(tempfile.mkdtemp())
    model = build_classifier(the_plan.spec, the_plan.method, rank, random_init=real, dropout=0.0)
    alone = Trainer(the_plan, runs[0], model, images, folder, acc)
    alone.train_epoch(0)
    alone.scores("val")
    _peak_reset(device)
    _sync(device)
    start = time.perf_counter()
    for e in range(setup.epochs):
        alone.train_epoch(1 + e)
        alone.scores("val")
    _sync(device)
    alone_s = (time.perf_counter() - start) / setup.epochs
    what = f"{setup.step_model} lora k={setup.shots}"
    rows = [Row("packed", f"{what} N=1", f"{3600 / alone_s / per_run:,.0f} runs/h", _peak(device),
                f"{alone_s:.3f} s/epoch; {per_run} epochs a run assumed")]
    del alone, model
    for n in setup.packs:
        base = build_classifier(the_plan.spec, the_plan.method, rank, random_init=real, dropout=0.0)
        notes: list[str] = []
        packer = Packer(the_plan, images, folder, acc, base, n, notes.append)
        trainers = [Trainer(the_plan, run, packer.shell(), images, folder, acc) for run in runs[:n]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            packer.train_epoch(trainers)
            packer.val_losses(trainers)
            _peak_reset(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(setup.epochs):
                packer.train_epoch(trainers)
                packer.val_losses(trainers)
            _sync(device)
        packed_s = (time.perf_counter() - start) / setup.epochs
        fallbacks = sum("batching rule" in str(w.message) for w in caught)
        rate = n * 3600 / packed_s / per_run
        rows.append(Row("packed", f"{what} N={n}", f"{rate:,.0f} runs/h", _peak(device),
                        f"{rate * alone_s * per_run / 3600:.1f}x one at a time; {fallbacks} vmap fallbacks"
                        + (f"; {'; '.join(notes)}" if notes else "")))
        del packer, trainers, base
    return rows


def train_match(setup: Setup, folder: Path) -> list[Row]:
    """One short training request on the check's device and on the CPU: scores and losses within TOLERANCE."""
    import numpy as np

    from adapters.plan import TrainSettings
    from adapters.train import run_train

    manifest = _cohort(folder / "train", 40, 24)
    settings = TrainSettings(max_epochs=setup.train_epochs, warmup=1, patience=6, plateau_patience=2, batch_size=8,
                             checkpoint_every_s=1e9)
    records = {}
    for device in dict.fromkeys((setup.device, "cpu")):
        start = time.perf_counter()
        report = run_train(manifest, "SYN", "dinov2-s-tiny", method="lora", folds=["fold0"], head_lrs=setup.head_lrs,
                           settings=settings, out=folder / f"runs-{device}", device=device)
        records[device] = (sorted(report.records, key=lambda r: r.options["head_lr"]), time.perf_counter() - start)
    (here, here_s), (cpu, cpu_s) = records[setup.device], records["cpu"]
    scores = max(float(np.max(np.abs(np.array(a.test_scores) - np.array(b.test_scores))))
                 for a, b in zip(here, cpu, strict=True))
    losses = max(abs(a.training["val_loss"] - b.training["val_loss"]) for a, b in zip(here, cpu, strict=True))
    ok = scores <= TOLERANCE and losses <= TOLERANCE and all(math.isfinite(r.training["val_loss"]) for r in here)
    return [Row("train", f"adapters train {setup.device} vs cpu", f"{'PASS' if ok else 'FAIL'}", "",
                f"max |score diff| {scores:.2e}, max |best val loss diff| {losses:.2e} (tolerance {TOLERANCE}); "
                f"{here_s:.0f} s vs {cpu_s:.0f} s")]


def print_table(rows: list[Row], title: str) -> None:
    """The table in about 72 columns; each row's note below it as a numbered footnote."""
    header = Row("check", "what", "value", "peak GPU")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("check", "what", "value", "memory")]
    print(title)
    notes = []
    for r in [header, *rows]:
        mark = ""
        if r.note:
            notes.append(r.note)
            mark = f" [{len(notes)}]"
        print(f"{r.check:<{widths[0]}}  {r.what:<{widths[1]}}  {r.value:>{widths[2]}}  {r.memory:>{widths[3]}}{mark}",
              flush=True)
    for n, note in enumerate(notes, 1):
        print(f"[{n}] {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny backbones: the code path, not numbers")
    parser.add_argument("--device", default=None, help="default cuda (cpu under --smoke)")
    parser.add_argument("--skip", default="", help="comma list of checks to leave out: extract,step,packed,train")
    args = parser.parse_args(argv)
    if missing := missing_modules():
        print(f"missing Python packages: {' '.join(missing)}; install them (see this script's doc for wheels)")
        return 2
    import torch

    setup = SMOKE if args.smoke else GPU
    if args.device:
        setup = dataclasses.replace(setup, device=args.device)
    if setup.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --smoke (CPU, tiny models) or on a GPU machine")
        return 2
    device = torch.device(setup.device)
    skip = set(filter(None, args.skip.split(",")))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp())
    rows: list[Row] = []
    if "extract" not in skip:
        rows += extraction(setup, device)
    manifest = _cohort(folder / "cohort", setup.size, max(24, setup.batch + 8, setup.val + 2 * setup.shots + 8))
    if "step" not in skip:
        rows += step_times(setup, device, manifest)
    if "packed" not in skip:
        rows += packed_rates(setup, device, manifest)
    if "train" not in skip:
        rows += train_match(setup, folder)
    print_table(rows, f"gpu_check on {gpu} (torch {torch.__version__}, load {load}, "
                      f"{time.perf_counter() - started:.0f} s{', SMOKE: numbers mean nothing' if args.smoke else ''})")
    return 1 if any(r.value == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
