"""Two independent `extract` processes on one store: row bookkeeping serialised, chunks claimed, not repeated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from conftest import MODEL, write_cohort

from featcache.extract import extract_features
from featcache.integrity import verify
from featcache.store import list_groups, load_features

REPO = Path(__file__).resolve().parents[1]

# Waits for a start file, so both processes run their extraction at the same time, with a slow batch step.
RUNNER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import featcache.extract as fx

    manifest, store, go = sys.argv[1:4]
    step = fx.feature_step
    def slow(*args, **kwargs):
        inner = step(*args, **kwargs)
        def run(x):
            time.sleep(0.15)
            return inner(x)
        return run
    fx.feature_step = slow
    Path(go + "." + Path(manifest).stem).touch()
    while not Path(go).exists():
        time.sleep(0.02)
    result = fx.extract_features(manifest, "dinov2-s-tiny", store=store, chunk_rows=4, batch_size=2)
    print(json.dumps({"embedded": result.embedded, "added": result.added}))
""")


def _subset(manifest: Path, name: str, keep: list[int]) -> Path:
    lines = manifest.read_text().splitlines()
    out = manifest.with_name(name)
    out.write_text("\n".join([lines[0], *(lines[1 + i] for i in keep)]) + "\n")
    return out


def _together(tmp_path: Path, *manifests: Path) -> list[dict]:
    """Run one extraction per manifest, each in its own process, started at the same moment."""
    go = tmp_path / "go"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(m), str(tmp_path / "features.zarr"), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in manifests]
    deadline = time.monotonic() + 240
    while not all(Path(f"{go}.{m.stem}").exists() for m in manifests) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_concurrent_processes_lose_nothing_and_compute_each_row_once(tmp_path):
    full = write_cohort(tmp_path, 18)
    a = _subset(full, "a.csv", list(range(12)))
    same = _subset(full, "same.csv", list(range(12)))  # a second run of manifest a
    b = _subset(full, "b.csv", list(range(17, 5, -1)))  # another manifest: overlapping, in another order
    results = _together(tmp_path, a, same, b)
    assert sum(r["embedded"] for r in results) == 18  # shared images and chunks computed once
    assert sum(r["added"] for r in results) == 18
    store = tmp_path / "features.zarr"
    (group,) = list_groups(store)
    assert group.n_rows == 18 and group.read("written").all() and verify(group).ok
    extract_features(full, MODEL, store=tmp_path / "alone.zarr", chunk_rows=4)
    _, expected = load_features(tmp_path / "alone.zarr", MODEL, full)
    for manifest, rows in ((a, list(range(12))), (same, list(range(12))), (b, list(range(17, 5, -1)))):
        ids, X = load_features(store, MODEL, manifest)
        assert ids.tolist() == [f"id{i:03d}" for i in rows]
        np.testing.assert_allclose(X, expected[rows], atol=2e-3, rtol=2e-3)
