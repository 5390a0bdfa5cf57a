"""The wheel carries the dataset specs and grids: a plain (non-editable) install, used from another folder,
lists the six specs and expands the shipped grids. Built offline from a copy of the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ["aiforcovid", "cocross", "covid19_ar", "covid19_ny_sbu", "covid_chestxray", "synthetic"]
PROBE = """
import sys
from pathlib import Path
import featcache
from featcache import datasets
assert featcache.__file__.startswith(sys.argv[1]), featcache.__file__
assert str(datasets.data_dir()).startswith(sys.argv[1]), datasets.data_dir()
print(",".join(datasets.list_datasets()))
from study.grid import load_grid, shipped_grids
assert shipped_grids() == ["benchmark", "smoke"], shipped_grids()
grid = load_grid("benchmark", Path.cwd() / "study.yaml")
print(len(grid.backbones), len(grid.methods), len(grid.tasks))
"""


def _pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_wheel_ships_specs_and_grids(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("featcache", "adapters", "cli", "study", "data_manifests"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("featcache-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"data_manifests/{name}.yaml" for name in SPECS} <= names
    assert {"data_manifests/grids/benchmark.yaml", "data_manifests/grids/smoke.yaml"} <= names

    target = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("FEATCACHE_DATASETS", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(target)], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    specs, sizes = done.stdout.split()[0], done.stdout.split()[1:]
    assert specs.split(",") == SPECS and all(int(n) > 0 for n in sizes)
