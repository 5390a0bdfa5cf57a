"""Probe engine benchmark: the few-shot grid of one backbone and task, torch solver against scikit-learn, on a
quiet and on a loaded machine side by side in one run.

Few-shot grid, end to end through `featcache.probe.run_probe` (features read from a zarr store, persisted
splits, inner-CV C selection over 13 C values, refit, test scores, metrics, one JSON record per run):
5 shot levels x 5 folds x R draws (default 100), D = 1,024 synthetic float16 features (class signal plus
low-rank nuisance structure) for 1,500 images, i.e. 300 test images per fold. scikit-learn runs the same code
with `--solver sklearn` on fewer draws and is extrapolated linearly (the output says so). "torch, all threads"
is the solver's former rule (every op on all intra-op threads), kept to show what the single-thread rule for
small systems buys (see `featcache.solver`). Then full-data probe time (`probe_full`: 13 C on train, choice on
validation, refit on train + validation) for D = 384 ... 2,048.

Each measurement runs twice: "quiet" (whatever else runs on the machine: the load average is printed) and
"loaded", with ``--load`` extra busy-loop processes (default 3 per CPU, the load of a busy shared node) started
by this script and stopped after.

    python benchmarks/bench_probe.py [--threads N] [--draws 100] [--sk-draws 5] [--load N] [--full-dims 384,2048]

The store is written through the store API with random-init specs (no model, no images: only features are
read).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from itertools import count
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from featcache import solver
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


BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"  # ends with its parent


@contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU for the duration of the block (each also ends if this script dies)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        time.sleep(1.0)  # let them get scheduled
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@contextmanager
def all_threads() -> Iterator[None]:
    """The solver's former rule: every op on all intra-op threads."""
    saved = solver.SINGLE_THREAD_MAX, solver.SINGLE_THREAD_WORK
    solver.SINGLE_THREAD_MAX = solver.SINGLE_THREAD_WORK = 0
    try:
        yield
    finally:
        solver.SINGLE_THREAD_MAX, solver.SINGLE_THREAD_WORK = saved


def both(name: str, measure: Callable[[], object], load: int) -> tuple[object, object, float, float]:
    """``measure()`` quiet, then under ``load`` busy loops; with the 1-minute load average after each. Each
    figure is also printed as it comes, so a run stopped early still leaves its numbers in the log."""
    quiet = measure()
    quiet_load = os.getloadavg()[0]
    print(f"{name}: quiet {_seconds(quiet):.1f} s (load {quiet_load:.1f})", flush=True)
    with busy_loops(load):
        loaded = measure()
        loaded_load = os.getloadavg()[0]
    print(f"{name}: loaded {_seconds(loaded):.1f} s (load {loaded_load:.1f})", flush=True)
    return quiet, loaded, quiet_load, loaded_load


def _seconds(measured: object) -> float:
    return measured[0] if isinstance(measured, tuple) else measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--sk-draws", type=int, default=5, help="draws per fold for the scikit-learn path")
    parser.add_argument("--sk-full-folds", type=int, default=1, help="folds timed for scikit-learn full data")
    parser.add_argument("--full-dims", default="384,768,1024,2048", help="D of the full-data table ('' for none)")
    parser.add_argument("--load", type=int, default=3 * (os.cpu_count() or 1), help="busy loops when loaded")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # whole lines in a log
    console.print(f"torch threads {args.threads} on {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} "
                  f"before; loaded = {args.load} extra busy-loop processes")

    with tempfile.TemporaryDirectory() as tmp:
        X, y = features(args.images, 1024)
        manifest = cohort(Path(tmp), y, args.draws)
        store(manifest, MODELS[1024], X)
        runs = count()

        def grid(solver_name: str, draws: int | None, former: bool = False) -> Callable[[], tuple[float, dict]]:
            def measure() -> tuple[float, dict]:
                with all_threads() if former else nullcontext():
                    return fewshot(manifest, solver_name, draws, Path(tmp) / f"out{next(runs)}")
            return measure

        timed = {
            "torch": both("few-shot torch", grid("torch", None), args.load),
            "torch, all threads (former rule)": both("few-shot torch former rule", grid("torch", None, former=True),
                                                     args.load),
            "sklearn": both(f"few-shot sklearn {args.sk_draws} draws", grid("sklearn", args.sk_draws), args.load),
        }
    scale = args.draws / args.sk_draws
    mcc_torch, mcc_sk = timed["torch"][0][1], timed["sklearn"][0][1]
    diff = max(abs(mcc_sk[key] - mcc_torch[key]) for key in mcc_sk)
    former = timed["torch, all threads (former rule)"][0][1]
    diff_former = max(abs(former[key] - mcc_torch[key]) for key in mcc_torch)
    loads = {name: f"{v[2]:.1f} / {v[3]:.1f}" for name, v in timed.items()}
    table = Table(title=f"few-shot grid end to end: 5 k x 5 folds x {args.draws} draws = {len(mcc_torch)} runs, "
                        f"13 C, D=1024, {args.images // 5} test images per fold")
    for name in ("path", "quiet s", "loaded s", "loaded / quiet", "sklearn / path, quiet", "sklearn / path, loaded",
                 "load avg quiet / loaded"):
        table.add_column(name, justify="right")
    sk_q, sk_l = timed["sklearn"][0][0] * scale, timed["sklearn"][1][0] * scale
    for name, ((q, _), (lo, _), *_) in timed.items():
        factor = scale if name == "sklearn" else 1
        label = f"sklearn ({args.sk_draws} draws, x{scale:g})" if name == "sklearn" else name
        table.add_row(label, f"{q * factor:.1f}", f"{lo * factor:.1f}", f"{lo / q:.1f}x",
                      f"{sk_q / (q * factor):.1f}x", f"{sk_l / (lo * factor):.1f}x", loads[name])
    console.print(table)
    console.print(f"max |MCC diff| per run: torch vs sklearn {diff:.4f} over {len(mcc_sk)} runs; torch vs its "
                  f"former rule {diff_former:.2g} over {len(mcc_torch)} runs")

    full = Table(title=f"full-data probes: {args.images} images, 5 folds, 13 C on train + refit "
                       f"(sklearn x{5 / args.sk_full_folds:g} from {args.sk_full_folds} fold)")
    for name in ("D", "torch quiet s", "torch loaded s", "sklearn quiet s", "sklearn loaded s", "ratio quiet",
                 "ratio loaded"):
        full.add_column(name, justify="right")
    for D in (int(d) for d in args.full_dims.split(",") if d.strip()):
        Xd, yd = features(args.images, D, seed=D)
        t_quiet, t_loaded, *_ = both(f"full D={D} torch", partial(full_data, Xd, yd, "torch", 5), args.load)
        k_quiet, k_loaded, *_ = both(f"full D={D} sklearn", partial(full_data, Xd, yd, "sklearn", args.sk_full_folds),
                                     args.load)
        k_quiet, k_loaded = k_quiet * 5 / args.sk_full_folds, k_loaded * 5 / args.sk_full_folds
        full.add_row(str(D), f"{t_quiet:.1f}", f"{t_loaded:.1f}", f"{k_quiet:.1f}", f"{k_loaded:.1f}",
                     f"{k_quiet / t_quiet:.1f}x", f"{k_loaded / t_loaded:.1f}x")
    console.print(full)
    console.print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
