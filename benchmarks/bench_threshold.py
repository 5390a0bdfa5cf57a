"""Cost of the full-data threshold rule: refit on train + val with a cross-fitted threshold (the default)
against testing the train-only model (``--no-refit``), on synthetic features of 1,500 images, 5 folds.

    python benchmarks/bench_threshold.py [--threads 2] [--images 1500]

Prints seconds per rule and their ratio for D = 384 ... 2,048, and the mean |difference| in test MCC at the
chosen threshold between the rules. Other processes may share the CPU: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from featcache.metrics import evaluate
from featcache.probe import Part, ProbeOptions, probe_full


def features(n: int, D: int, seed: int = 0, positive_rate: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Class shift + 20-dim nuisance structure + noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_rate).astype(np.int64)
    X = rng.normal(size=(n, 20)) @ rng.normal(size=(20, D)) + rng.normal(size=(n, D))
    X += 0.15 * np.outer(y, rng.normal(size=D))
    return X.astype(np.float32), y


def parts(y: np.ndarray) -> list[Part]:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    out = []
    for test in np.array_split(order, 5):
        pool = np.setdiff1d(order, test)
        val = rng.choice(pool, len(pool) * 15 // 100, replace=False)
        out.append(Part(np.setdiff1d(pool, val), np.sort(val), np.sort(test)))
    return out


def timed(X: np.ndarray, y: np.ndarray, folds: list[Part], refit: bool) -> tuple[float, list[float]]:
    start = time.perf_counter()
    fitted = probe_full(X, y, folds, ProbeOptions(refit=refit, device="cpu"))
    seconds = time.perf_counter() - start
    mcc = [evaluate(y[p.test], f.scores, y[f.thr_rows], f.thr_scores)["mcc_val_thr"]
           for p, f in zip(folds, fitted, strict=True)]
    return seconds, mcc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} before")
    table = Table(title=f"full-data probes, {args.images} images, 5 folds, 13 C")
    for name in ("D", "refit + cross-fit s", "no refit s", "ratio", "mean |MCC@val diff|"):
        table.add_column(name, justify="right")
    for D in (384, 768, 1024, 2048):
        X, y = features(args.images, D, seed=D)
        folds = parts(y)
        t_refit, mcc_refit = timed(X, y, folds, True)
        t_alone, mcc_alone = timed(X, y, folds, False)
        diff = float(np.mean(np.abs(np.subtract(mcc_refit, mcc_alone))))
        table.add_row(str(D), f"{t_refit:.2f}", f"{t_alone:.2f}", f"{t_refit / t_alone:.2f}x", f"{diff:.3f}")
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
