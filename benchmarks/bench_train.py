"""Stage-2 benchmark: ratios measured side by side in one run (a script, not a test).

1. step time of `adapters train` (its epoch loop over one batch: train mode, batch assembly from the uint8
   images, class-weighted loss, Accelerate backward, Adam step) against a minimal hand-written torch + peft loop
   on the same batch and model, per method, on tiny and real-size backbones; steps interleaved so machine load
   hits both sides alike (goal <= 1.1x);
2. the images of a run read from the pixel cache against decoded from DICOM files, and the first epoch with each;
3. peak RSS of training per method on the real-size backbones, each in a fresh process;
4. LP cost: the cached probe (extract once + every fold's probe) against `adapters train --method lp
   --from images` over the same folds and head-LR grid, same images and backbone, protocol defaults (goal >=
   100x); MCC of both;
5. the benchmark's LP on exact stored features (`--from features`, the one extraction included) against the
   image path, 5 folds x 3 head LRs at protocol defaults, on resnet18-tiny and one real-size backbone (random
   weights): ratio (goal >= 1000x) and equal metrics; then a few-shot LP grid (5 k x 5 folds x 5 draws x 3 head
   LRs) on the features path: total seconds.
6. packed training (`adapters.packed`): few-shot run-epochs per hour with N = 4, 16, 64 runs in one pass
   against one run at a time (each epoch = its training steps + its validation pass), on tiny and (with
   --real) real-size ViT and CNN with random weights, LoRA at dropout 0 and LP; peak memory per run; and
   how many vmap fallback-loop warnings were raised (0: no op fell back to a per-run loop).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py [--sections 1,2,3,4,5,6] [--steps 4] [--real]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adapters.images import load_images  # noqa: E402
from adapters.methods import HEAD_LRS, METHODS  # noqa: E402
from adapters.model import build_classifier  # noqa: E402
from adapters.packed import Packer  # noqa: E402
from adapters.plan import Run, TrainSettings, plan  # noqa: E402
from adapters.train import _accelerator, run_train  # noqa: E402
from adapters.trainer import Trainer, class_weights  # noqa: E402
from featcache.backbones import get_spec  # noqa: E402
from featcache.datasets import get_task  # noqa: E402
from featcache.manifest import load_manifest  # noqa: E402
from featcache.splits import build_splits, save_splits  # noqa: E402
from featcache.synth import make_cohort  # noqa: E402

TINY = ("resnet18-tiny", "dinov2-s-tiny")
REAL = ("resnet18", "dinov2-s")


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def cohort(folder: Path, size: int, patients: int = 24) -> Path:
    manifest = make_cohort(folder, patients=patients, positive_rate=0.4, size=size, seed=0)
    save_splits(build_splits(manifest, "SYN", draws=2, shots=(2,)), manifest)
    return manifest


def trainer(manifest: Path, model: str, method: str, batch: int) -> Trainer:
    """A `Trainer` whose training part is exactly one batch, so one epoch = one optimiser step."""
    real = not model.endswith("-tiny")
    settings = TrainSettings(batch_size=batch, warmup=0, checkpoint_every_s=1e9)
    rank = METHODS[method].rank_for(None)
    the_plan = plan(manifest, "SYN", model, method=method, rank=rank, settings=settings, random_init=real,
                    device="cpu")
    ids = load_manifest(manifest).labels(get_task("SYN"))[0]
    by_class = {c: [i for i in ids if the_plan.labels[i] == c] for c in (0, 1)}
    train = tuple(by_class[0][: batch // 2] + by_class[1][: batch - batch // 2])
    held = tuple(i for i in ids if i not in train)[:4]
    run = Run("bench", "full", None, None, 1e-3, train, held, held, "bench", {})
    images = load_images(the_plan.manifest, train + held, the_plan.spec.preprocess)
    model_ = build_classifier(the_plan.spec, the_plan.method, rank, random_init=real)
    return Trainer(dataclasses.replace(the_plan, runs=(run,)), run, model_, images, Path(tempfile.mkdtemp()),
                   _accelerator("cpu"))


def hand_loop(t: Trainer, model: str, method: str):
    """The same model and batch in the fewest lines of torch + peft: one closure per step."""
    spec = get_spec(model)
    net = build_classifier(spec, METHODS[method], METHODS[method].rank_for(None),
                           random_init=not model.endswith("-tiny"))
    head = {id(p) for p in net.head_parameters()}
    body = [p for p in net.parameters() if p.requires_grad and id(p) not in head]
    groups = [{"params": net.head_parameters(), "lr": 1e-3}] + ([{"params": body, "lr": 1e-4}] if body else [])
    optimizer = torch.optim.Adam(groups)
    rows = t.rows["train"]
    x = t.images.batch(rows, spec.preprocess, torch.device("cpu"))
    y = t.y["train"]
    weight = class_weights(y)
    net.train()

    def step() -> None:
        F.cross_entropy(net(x), y, weight=weight).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cases(models: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (backbone, method) that applies: VeRA wraps Linear layers only, so not CNNs."""
    return [(model, method) for model in models for method in METHODS
            if method != "vera" or get_spec(model).peft.same_shape]


def step_times(manifest: Path, models: tuple[str, ...], steps: int, batch: int) -> None:
    print(f"\n1. step time, adapters train vs hand-written torch + peft loop (batch {batch}, median of {steps} "
          f"interleaved steps after one warm-up; load {load()})")
    print(f"{'backbone':<16}{'method':<8}{'ours s/step':>12}{'hand s/step':>12}{'ratio':>8}")
    for model, method in cases(models):
        t = trainer(manifest, model, method, batch)
        hand = hand_loop(t, model, method)
        ours_s, hand_s = [], []
        for i in range(steps + 1):
            start = time.perf_counter()
            t.train_epoch(10 + i)
            middle = time.perf_counter()
            hand()
            end = time.perf_counter()
            if i:
                ours_s.append(middle - start)
                hand_s.append(end - middle)
        ours, bare = statistics.median(ours_s), statistics.median(hand_s)
        print(f"{model:<16}{method:<8}{ours:>12.4f}{bare:>12.4f}{ours / bare:>7.2f}x", flush=True)


def images_and_epoch(n: int) -> None:
    from bench_extract import write_dicoms

    from featcache.pixels import cache_pixels

    print(f"\n2. images of a run: pixel cache vs decoding {n} DICOMs (2048 px, 16-bit) at 224 px; load {load()}")
    folder = Path(tempfile.mkdtemp())
    manifest = load_manifest(write_dicoms(folder, n, 2048))
    pre = get_spec("resnet18").preprocess
    start = time.perf_counter()
    decoded = load_images(manifest, manifest.ids, pre)
    decode_s = time.perf_counter() - start
    cache_pixels(manifest, "resnet18")
    start = time.perf_counter()
    cached = load_images(manifest, manifest.ids, pre)
    cache_s = time.perf_counter() - start
    assert torch.equal(decoded.gray, cached.gray), "the two sources must give identical bytes"
    print(f"decode {decode_s:.2f} s ({n / decode_s:.1f} img/s), pixel cache {cache_s:.2f} s "
          f"({n / cache_s:.1f} img/s): {decode_s / cache_s:.1f}x; identical uint8 images. Later epochs read "
          "memory either way; the cache saves the decode once per run (x folds x head LRs x methods).")


def peak_rss(models: tuple[str, ...], batch: int) -> None:
    print(f"\n3. peak RSS of building the model + 2 training steps per method (fresh process each, batch {batch}, "
          f"224 px; resident size before, imports and images, in brackets); load {load()}")
    print(f"{'backbone':<16}{'method':<8}{'peak RSS MiB':>24}")
    for model, method in cases(models):
        done = subprocess.run([sys.executable, __file__, "--rss-child", model, method, str(batch)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        value = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else f"failed: {done.stderr[-200:]}"
        print(f"{model:<16}{method:<8}{value:>24}", flush=True)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(model: str, method: str, batch: int) -> None:
    """Peak RSS of building the model and two steps, beside the resident size before (imports, cohort):
    the kernel's high-water mark is reset after the cohort is made (``clear_refs`` 5)."""
    folder = Path(tempfile.mkdtemp())
    manifest = cohort(folder, 224, patients=max(12, batch))
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    t = trainer(manifest, model, method, batch)
    for epoch in range(2):
        t.train_epoch(epoch)
    print(f"{_status_mib('VmHWM'):.0f} (before {before:.0f})")


def lp_cost(model: str, patients: int) -> None:
    from featcache.extract import extract_features
    from featcache.metrics import summarize
    from featcache.probe import run_probe
    from featcache.records import select_head_lr

    print(f"\n4. LP cost on {model}, {patients} synthetic patients, 5 folds: cached probe vs end-to-end LP "
          f"(head LRs 1e-2,1e-3,1e-4; protocol defaults: <= 1000 epochs, patience 100, warm-up 50); load {load()}")
    folder = Path(tempfile.mkdtemp())
    manifest = cohort(folder, 64, patients=patients)
    start = time.perf_counter()
    extract_features(manifest, model)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    probe = run_probe(manifest, "SYN", model, full=True, out=folder / "probe")
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    lp = run_train(manifest, "SYN", model, method="lp", out=folder / "lp", device="cpu", inputs="images")
    lp_s = time.perf_counter() - start
    chosen, notes = select_head_lr(lp.records)
    epochs = sum(r.training["epochs_run"] for r in lp.records)
    cached = extract_s + probe_s
    mcc_probe = summarize([r.metrics["mcc_val_thr"] for r in probe.records])
    mcc_lp = summarize([r.metrics["mcc_val_thr"] for r in chosen])
    print(f"cached: extract {extract_s:.1f} s + probes {probe_s:.1f} s = {cached:.1f} s; MCC {mcc_probe.mean:.3f} "
          f"± {mcc_probe.std:.3f}")
    print(f"end-to-end LP: {len(lp.records)} runs, {epochs} epochs, {lp_s:.1f} s; MCC {mcc_lp.mean:.3f} ± "
          f"{mcc_lp.std:.3f} ({notes[0] if notes else ''})")
    print(f"cost ratio: {lp_s / cached:.0f}x cheaper from the cache")


def _fewshot_runs(manifest: Path, model: str, method: str, n: int, support: int, val: int):
    """A plan and ``n`` few-shot runs with their own seeded support sets (``support`` images, both classes)
    and a common validation part of ``val`` images, as one request's draws x head LRs would be."""
    real = not model.endswith("-tiny")
    settings = TrainSettings(batch_size=support, warmup=5, checkpoint_every_s=1e9, adapter_dropout=0.0)
    the_plan = plan(manifest, "SYN", model, method=method, settings=settings, random_init=real, device="cpu",
                    folds=["fold0"], head_lrs=(1e-3,))
    ids = list(the_plan.labels)
    by_class = {c: [i for i in ids if the_plan.labels[i] == c] for c in (0, 1)}
    held = tuple(by_class[0][-val // 2:] + by_class[1][-(val - val // 2):])
    runs = []
    for r in range(n):
        g = torch.Generator().manual_seed(r)
        pick = [by_class[c][int(j)] for c in (0, 1)
                for j in torch.randperm(len(by_class[c]) - val, generator=g)[: support // 2]]
        runs.append(Run("bench", "fewshot", support // 2, r, 1e-3, tuple(pick), held, held, f"bench{r}", {}))
    images = load_images(the_plan.manifest, ids, the_plan.spec.preprocess)
    return dataclasses.replace(the_plan, runs=tuple(runs)), runs, images, real


def _reset_peak() -> float:
    """Resident MiB now, the kernel's high-water mark reset to it (peak growth = VmHWM - this)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def packed_rates(manifest: Path, model: str, method: str, packs: list[int], support: int, val: int,
                 epochs: int, per_run: int) -> None:
    """Run-epochs per hour packed vs alone for one backbone x method, interleaving nothing (each side timed
    over ``epochs`` epochs after one warm-up epoch); peak RSS growth per run."""
    import warnings

    the_plan, runs, images, real = _fewshot_runs(manifest, model, method, max(packs), support, val)
    acc = _accelerator("cpu")
    folder = Path(tempfile.mkdtemp())
    model_ = build_classifier(the_plan.spec, the_plan.method, None, random_init=real, dropout=0.0)
    alone = Trainer(the_plan, runs[0], model_, images, folder, acc)
    before = _reset_peak()
    alone.train_epoch(0)
    alone.scores("val")
    start = time.perf_counter()
    for e in range(epochs):
        alone.train_epoch(1 + e)
        alone.scores("val")
    alone_s = (time.perf_counter() - start) / epochs
    alone_mib = _status_mib("VmHWM") - before
    del alone, model_
    print(f"{model:<16}{method:<7}{'1':>4}{alone_s:>10.3f}{3600 / alone_s:>12.0f}"
          f"{3600 / alone_s / per_run:>10.1f}{'1.00x':>8}{alone_mib:>12.0f}{'':>6}", flush=True)
    for n in packs:
        base = build_classifier(the_plan.spec, the_plan.method, None, random_init=real, dropout=0.0)
        packer = Packer(the_plan, images, folder, acc, base, n, print)
        trainers = [Trainer(the_plan, run, packer.shell(), images, folder, acc) for run in runs[:n]]
        before = _reset_peak()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            packer.train_epoch(trainers)
            packer.val_losses(trainers)
            start = time.perf_counter()
            for _ in range(epochs):
                packer.train_epoch(trainers)
                packer.val_losses(trainers)
            packed_s = (time.perf_counter() - start) / epochs
        fallbacks = sum("batching rule" in str(w.message) for w in caught)
        per_run_mib = (_status_mib("VmHWM") - before) / n
        rate = n * 3600 / packed_s
        print(f"{'':<16}{'':<7}{n:>4}{packed_s:>10.3f}{rate:>12.0f}{rate / per_run:>10.1f}"
              f"{rate * alone_s / 3600:>7.2f}x{per_run_mib:>12.0f}{fallbacks:>6}", flush=True)
        del packer, trainers, base


def packing(models: tuple[str, ...], packs: list[int], real_packs: list[int], epochs: int, per_run: int) -> None:
    print(f"\n6. packed few-shot training vs one run at a time (k=2: 4 support images, 8 validation images; "
          f"seconds per epoch of all N runs; run-epochs/h; runs/h at {per_run} epochs a run (assumed: warm-up 50 + "
          f"patience 100 puts a few-shot run at >= 150); peak RSS growth per run; vmap fallback warnings); "
          f"load {load()}")
    print(f"{'backbone':<16}{'method':<7}{'N':>4}{'s/epoch':>10}{'run-ep/h':>12}{'runs/h':>10}{'gain':>8}"
          f"{'MiB/run':>12}{'fallb':>6}")
    folder = Path(tempfile.mkdtemp())
    manifests: dict[int, Path] = {}
    for model in models:
        size = max(32, get_spec(model).preprocess.size)  # the synthetic chests need 32 px; images are resized
        if size not in manifests:
            manifests[size] = cohort(folder / str(size), size, patients=24)
        manifest = manifests[size]
        for method in ("lora", "lp"):
            packed_rates(manifest, model, method, packs if model.endswith("-tiny") else real_packs, 4, 8, epochs,
                         per_run)
    print(f"load {load()}. Gain = packed run-epochs/h over one at a time. On a CPU the frozen layers' matmuls are "
          "already large enough to keep the cores busy at real size, so packing pays there only the per-step "
          "overhead it saves; it pays most on tiny backbones and on a GPU (see benchmarks/gpu_check.py).")
def lp_paths(model: str, patients: int, size: int, folds: list[str] | None = None,
             head_lrs: tuple[float, ...] = HEAD_LRS) -> None:
    """Features path against the image path: the same runs (``folds`` (default all 5) x ``head_lrs``, protocol
    defaults), the features path's time including its one extraction; the records must agree. A real-size
    backbone's image path costs hours for the whole grid on 2 cores: `--lp-real-runs` bounds it (the ratio is
    per run either way)."""
    import numpy as np

    real = not model.endswith("-tiny")
    what = f"{len(folds) if folds else 5} folds x {len(head_lrs)} head LRs"
    print(f"\n5a. LP on {model}{' (random weights)' if real else ''}, {patients} synthetic patients at {size} px, "
          f"{what}, protocol defaults: features path vs image path; load {load()}")
    folder = Path(tempfile.mkdtemp())
    manifest = cohort(folder, size, patients=patients)
    timed = {}
    for inputs in ("features", "images"):
        start = time.perf_counter()
        timed[inputs] = run_train(manifest, "SYN", model, method="lp", out=folder / inputs, device="cpu",
                                  inputs=inputs, random_init=real, folds=folds, head_lrs=head_lrs).records
        timed[inputs + "_s"] = time.perf_counter() - start
    feats = {r.key: r for r in timed["features"]}
    imgs = {r.key: r for r in timed["images"]}
    epochs = sum(r.training["epochs_run"] for r in imgs.values())
    same_epoch = all(feats[k].training["best_epoch"] == imgs[k].training["best_epoch"] for k in imgs)
    score_diff = max(float(np.abs(np.subtract(feats[k].test_scores, imgs[k].test_scores)).max()) for k in imgs)
    discrete = [m for m in next(iter(imgs.values())).metrics if m != "val_threshold"]
    same_metrics = all(feats[k].metrics[m] == imgs[k].metrics[m] or feats[k].metrics[m] != feats[k].metrics[m]
                       for k in imgs for m in discrete)
    extract_s = timed["features"][0].provenance["program"]["extract_s"]
    print(f"image path: {len(imgs)} runs, {epochs} epochs, {timed['images_s']:.1f} s")
    print(f"features path: {timed['features_s']:.2f} s (extraction {extract_s:.2f} s)")
    print(f"ratio: {timed['images_s'] / timed['features_s']:,.0f}x; same best epochs: {same_epoch}; max test "
          f"score difference {score_diff:.1e}; metrics identical (threshold to 1e-6): {same_metrics}", flush=True)


def fewshot_grid(model: str, patients: int) -> None:
    shots = (2, 4, 8, 16, 32)
    print(f"\n5b. few-shot LP grid on the features path: {model}, {patients} synthetic patients, k {shots} x 5 "
          f"folds x 5 draws x 3 head LRs, protocol defaults; load {load()}")
    folder = Path(tempfile.mkdtemp())
    manifest = make_cohort(folder, patients=patients, positive_rate=0.4, size=32, seed=0)
    save_splits(build_splits(manifest, "SYN", draws=5, shots=shots), manifest)
    start = time.perf_counter()
    report = run_train(manifest, "SYN", model, method="lp", full=False, shots=shots, draws=5, out=folder / "lp",
                       device="cpu", inputs="features")
    seconds = time.perf_counter() - start
    epochs = sum(r.training["epochs_run"] for r in report.records)
    print(f"{len(report.records)} runs, {epochs} epochs in all, {seconds:.1f} s total "
          f"({seconds / max(1, len(report.records)) * 1000:.0f} ms per run); skipped: {len(report.skipped)}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="1,2,3,4,5,6")
    parser.add_argument("--lp-real", default="resnet18", help="section 5's real-size backbone (random weights)")
    parser.add_argument("--lp-patients", type=int, default=60, help="section 5's tiny cohort (image path: hours)")
    parser.add_argument("--lp-real-patients", type=int, default=20, help="section 5's real-size cohort")
    parser.add_argument("--lp-real-runs", default="fold0:1e-3",
                        help="section 5's real-size runs, FOLD:HEAD_LR (all:all for the whole 5 x 3 grid: hours)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--real", action="store_true", help="also real-size resnet18 and dinov2-s")
    parser.add_argument("--dicoms", type=int, default=24)
    parser.add_argument("--lp-model", default="resnet18-tiny")
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--rss-child", nargs=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 on a loaded machine: contended OpenMP barriers cost ~100 ms an op)")
    parser.add_argument("--packs", default="4,16,64", help="section 6: runs per pass, tiny backbones")
    parser.add_argument("--real-packs", default="4,16,64", help="section 6: runs per pass, real-size backbones")
    parser.add_argument("--epochs", type=int, default=2, help="section 6: epochs timed per case")
    parser.add_argument("--per-run", type=int, default=150, help="section 6: epochs a few-shot run is assumed")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return
    torch.set_num_threads(args.threads)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "load": load()}))
    sections = {int(s) for s in args.sections.split(",")}
    if 1 in sections:
        folder = Path(tempfile.mkdtemp())
        step_times(cohort(folder, 32), TINY, args.steps, args.batch)
        if args.real:
            step_times(cohort(folder / "real", 224), REAL, args.steps, args.batch)
    if 2 in sections:
        images_and_epoch(args.dicoms)
    if 3 in sections:
        peak_rss(REAL if args.real else TINY, args.batch)
    if 4 in sections:
        lp_cost(args.lp_model, args.patients)
    if 5 in sections:
        fewshot_grid("resnet18-tiny", 200)
        lp_paths("resnet18-tiny", args.lp_patients, 64)
        fold, _, lr = args.lp_real_runs.partition(":")
        lp_paths(args.lp_real, args.lp_real_patients, 224, None if fold == "all" else [fold],
                 HEAD_LRS if lr in ("", "all") else (float(lr),))
    if 6 in sections:
        packing(TINY + (REAL if args.real else ()), [int(n) for n in args.packs.split(",")],
                [int(n) for n in args.real_packs.split(",")], args.epochs, args.per_run)


if __name__ == "__main__":
    main()
