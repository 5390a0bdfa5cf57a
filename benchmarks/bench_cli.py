"""CLI start-up benchmark: how fast a command fails on missing weights, against importing torch alone.

The suite checks the behaviour (one error line, torch never imported); this script measures the time, which on
a shared machine depends on the load. Each command runs ``--repeat`` times in a fresh interpreter; the median is
reported beside ``python -c "import torch"`` measured in the same run, with the load average.

    python benchmarks/bench_cli.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from featcache.synth import make_cohort


def seconds(argv: list[str], env: dict[str, str], repeat: int) -> float:
    """Median wall time of ``argv`` in a fresh process (its exit code is not checked: failing is the point)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    console = Console()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_cohort(Path(tmp) / "cohort", patients=4, size=64)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": f"{tmp}/hub", "FEATCACHE_WEIGHTS": f"{tmp}/w"}
        cli = [sys.executable, "-m", "cli.featcache_app"]
        rows = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "featcache --version": [*cli, "--version"],
            "featcache extract (missing weights)": [*cli, "extract", "--model", "dinov2-s", "--manifest",
                                                    str(manifest)],
            "adapters methods (meta device)": [sys.executable, "-m", "cli.adapters_app", "methods", "--model",
                                                   "dinov2-s"],
        }
        timed = {name: seconds(argv, env, args.repeat) for name, argv in rows.items()}
    torch_s = timed['python -c "import torch"']
    table = Table(title=f"start-up, median of {args.repeat} fresh processes")
    for column in ("command", "seconds", "vs import torch"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, value in timed.items():
        table.add_row(name, f"{value:.2f}", f"{value / torch_s:.2f}x")
    console.print(table)
    console.print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
