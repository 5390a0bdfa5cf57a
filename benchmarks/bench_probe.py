"""Probe engine benchmark: the few-shot grid of one backbone and task, torch solver against scikit-learn.

Few-shot grid, end to end through `featcache.probe.run_probe` (features read from a zarr store, persisted
splits, inner-CV C selection over 13 C values, refit, test scores, metrics, one JSON record per run):
5 shot levels x 5 folds x R draws (default 100), D = 1,024 synthetic float16 features (class signal plus
low-rank nuisance structure) for 1,500 images, i.e. 300 test images per fold. scikit-learn runs the same code
with `--solver sklearn` on fewer draws and is extrapolated linearly (the output says so). Then full-data probe
time (`probe_full`: 13 C on train, choice on validation, refit on train + validation) for D = 384 ... 2,048.

    python benchmarks/bench_probe.py [--threads 2] [--draws 100] [--sk-draws 5]

The store is written through the store API with random-init specs (no model, no images: only features are
read). Other processes may share the CPU: the load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from featcache.manifest import load_manifest, write_manifest
from featcache.probe import Part, ProbeOptions, probe_full, run_probe
from featcache.splits import build_splits, save_splits
from featcache.store import RowGroup, feature_spec, manifest_rows

TASK = "SYN"  # the synthetic dataset's task: classes ALIVE / DEATH
MODELS = {384: "dinov2-s", 768: "dinov2-b", 1024: "dinov2-l", 2048: "resnet50"}  # backbones with a D-dim cls


def features(n: int, D: int, seed: int = 0, positive_rate: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Class shift + 20-dim nuisance structure + noise, rounded to float16 as a store holds them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_rate).astype(np.int64)
    nuisance = rng.normal(size=(n, 20)) @ rng.normal(size=(20, D)) * 3 / np.sqrt(20)
    X = nuisance + rng.normal(size=(n, D)) + 0.3 * np.outer(y, rng.normal(size=D))
    return X.astype(np.float16).astype(np.float32), y


def cohort(folder: Path, y: np.ndarray, draws: int) -> Path:
    """A manifest (one image per patient, one center; files are never opened) and its persisted splits."""
    rows = [{"image_id": f"img{i:05d}", "path": f"images/img{i:05d}.png", "patient_id": f"p{i:05d}",
             "center": "C0", TASK: ("ALIVE", "DEATH")[label]} for i, label in enumerate(y)]
    manifest = write_manifest(rows, folder / "manifest.csv")
    save_splits(build_splits(manifest, TASK, draws=draws, per_center=False), manifest)
    return manifest


def store(manifest: Path, model: str, X: np.ndarray) -> Path:
    """Write ``X`` as the ``cls`` view of ``model`` into features.zarr beside the manifest, chunk by chunk."""
    spec = feature_spec(model, random_init=True, views=["cls"])
    path = manifest.parent / "features.zarr"
    group = RowGroup.create_or_open(path, spec["model"], spec)
    index = group.sync(manifest_rows(load_manifest(manifest))).index  # store row of each manifest row
    by_row = X[np.argsort(index)].astype(np.float16)
    for chunk in range(-(-group.n_rows // group.chunk_rows)):
        rows = np.arange(group.n_rows)[group.chunk_slice(chunk)]
        group.write_chunk(chunk, rows, {"cls": by_row[rows]}, np.full(len(rows), ""))
    return path


def fewshot(manifest: Path, solver: str, draws: int, out: Path) -> tuple[float, dict]:
    """Seconds for the whole grid through `run_probe`, and MCC per (k, fold, draw)."""
    start = time.perf_counter()
    report = run_probe(manifest, TASK, MODELS[1024], draws=draws, out=out,
                       options=ProbeOptions(solver=solver, device="cpu"))
    seconds = time.perf_counter() - start
    return seconds, {(r.shots, r.fold, r.draw): r.metrics["mcc"] for r in report.records}


def full_data(X: np.ndarray, y: np.ndarray, solver: str, n_folds: int) -> float:
    """Seconds for full-data probes of ``n_folds`` of 5 folds (15 % of each pool for validation)."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    parts = []
    for test in np.array_split(order, 5)[:n_folds]:
        pool = np.setdiff1d(order, test)
        val = rng.choice(pool, len(pool) * 15 // 100, replace=False)
        parts.append(Part(np.setdiff1d(pool, val), np.sort(val), np.sort(test)))
    start = time.perf_counter()
    probe_full(X, y, parts, ProbeOptions(solver=solver, device="cpu"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--sk-draws", type=int, default=5, help="draws per fold for the scikit-learn path")
    parser.add_argument("--sk-full-folds", type=int, default=1, help="folds timed for scikit-learn full data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} before "
                  "(other processes may share these cores)")

    with tempfile.TemporaryDirectory() as tmp:
        X, y = features(args.images, 1024)
        manifest = cohort(Path(tmp), y, args.draws)
        store(manifest, MODELS[1024], X)
        t_torch, mcc_torch = fewshot(manifest, "torch", None, Path(tmp) / "torch")
        t_sk, mcc_sk = fewshot(manifest, "sklearn", args.sk_draws, Path(tmp) / "sklearn")
    scale = args.draws / args.sk_draws
    diff = max(abs(mcc_sk[key] - mcc_torch[key]) for key in mcc_sk)
    grid = Table(title=f"few-shot grid end to end: 5 k x 5 folds x {args.draws} draws = {len(mcc_torch)} runs, "
                       f"13 C, D=1024, {args.images // 5} test images per fold")
    for name in ("path", "seconds", "ratio", "max |MCC diff| per run"):
        grid.add_column(name, justify="right")
    grid.add_row("torch", f"{t_torch:.1f}", "1", "")
    grid.add_row(f"sklearn ({args.sk_draws} draws, x{scale:g} extrapolated)",
                 f"{t_sk * scale:.0f} ({t_sk:.1f} measured)", f"{t_sk * scale / t_torch:.0f}x",
                 f"{diff:.4f} over {len(mcc_sk)} runs")
    console.print(grid)

    full = Table(title=f"full-data probes: {args.images} images, 5 folds, 13 C on train + refit")
    for name in ("D", "torch s", f"sklearn s (x{5 / args.sk_full_folds:g} from {args.sk_full_folds} fold)",
                 "ratio"):
        full.add_column(name, justify="right")
    for D in MODELS:
        Xd, yd = features(args.images, D, seed=D)
        t_full = full_data(Xd, yd, "torch", 5)
        t_full_sk = full_data(Xd, yd, "sklearn", args.sk_full_folds) * 5 / args.sk_full_folds
        full.add_row(str(D), f"{t_full:.1f}", f"{t_full_sk:.1f}", f"{t_full_sk / t_full:.1f}x")
    console.print(full)
    console.print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
