"""The extraction pipeline: cache semantics, resume after SIGKILL, --on-error, workers, 2-rank gloo, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import MODEL, write_cohort
from PIL import Image
from typer.testing import CliRunner

import featcache.extract as fx
from cli.featcache_app import app
from featcache.errors import ImageError
from featcache.extract import extract_features, plan_chunks
from featcache.store import RowGroup, list_groups, load_features

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("cls", "mean", "image_id", "path", "bbox", "written", "skip_reason")


def _arrays(store: Path, group: str) -> dict[str, np.ndarray]:
    opened = RowGroup.open(store, group)
    return {name: opened.read(name) for name in ARRAYS}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _chunk_files(store: Path, group: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every chunk file: an atomic rewrite changes the inode."""
    files = sorted((store / group).glob("*/c/**/*"))
    return {str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in files if p.is_file()}


def _forbid_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(fx, "build_backbone", refuse)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def test_complete_rerun_loads_no_model(tmp_path, monkeypatch):
    manifest = write_cohort(tmp_path, 6)
    first = extract_features(manifest, MODEL, chunk_rows=4)
    before = _chunk_files(tmp_path / "features.zarr", first.group)
    _forbid_model(monkeypatch)
    again = extract_features(manifest, MODEL, chunk_rows=4)
    assert (again.group, again.embedded, again.added, again.model_loaded) == (first.group, 0, 0, False)
    assert _chunk_files(tmp_path / "features.zarr", first.group) == before


def test_added_images_are_the_only_ones_embedded(tmp_path, monkeypatch):
    manifest = write_cohort(tmp_path / "a", 10)
    first = extract_features(manifest, MODEL, chunk_rows=4, batch_size=4)
    store = tmp_path / "a" / "features.zarr"
    untouched = {k: v for k, v in _chunk_files(store, first.group).items() if k.split("/c/")[1][0] in "01"}
    old = load_features(store, MODEL, manifest)[1]

    grown = write_cohort(tmp_path / "a", 13)  # same first 10 images, 3 more
    computed: list[int] = []
    step = fx.feature_step
    monkeypatch.setattr(fx, "feature_step", lambda *a: (lambda x: computed.append(len(x)) or step(*a)(x)))
    result = extract_features(grown, MODEL, chunk_rows=4, batch_size=4)
    assert (result.added, result.embedded, sum(computed)) == (3, 3, 3)
    ids, X = load_features(store, MODEL, grown)
    assert ids.tolist() == [f"id{i:03d}" for i in range(13)]
    np.testing.assert_array_equal(X[:10], old)
    fresh = extract_features(grown, MODEL, chunk_rows=4, batch_size=4, store=tmp_path / "fresh.zarr")
    np.testing.assert_allclose(X[10:], load_features(tmp_path / "fresh.zarr", MODEL)[1][10:], atol=2e-3)
    assert fresh.embedded == 13
    now = _chunk_files(store, first.group)
    assert {k: now[k] for k in untouched} == untouched  # full chunks of the first run never rewritten


def test_kill_and_resume_gives_identical_arrays(tmp_path):
    manifest = write_cohort(tmp_path, 12)
    options = dict(chunk_rows=2, batch_size=2)
    reference = extract_features(manifest, MODEL, store=tmp_path / "ref.zarr", **options)

    store = tmp_path / "killed.zarr"
    driver = tmp_path / "slow_extract.py"
    driver.write_text(textwrap.dedent(f"""
        import time
        import featcache.extract as fx

        build = fx.build_backbone

        def slow_build(*args, **kwargs):  # each batch takes 0.4 s, so the kill lands mid-run
            backbone = build(*args, **kwargs)
            forward = backbone.forward
            backbone.forward = lambda x: (time.sleep(0.4), forward(x))[1]
            return backbone

        fx.build_backbone = slow_build
        fx.extract_features({str(manifest)!r}, {MODEL!r}, store={str(store)!r}, chunk_rows=2, batch_size=2)
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], env=_env())
    try:
        _wait_for_written(store / reference.group / "written", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = _written(store / reference.group / "written")
    assert 0 < written < 12
    done = _chunk_files(store, reference.group)

    resumed = extract_features(manifest, MODEL, store=store, **options)
    assert resumed.embedded == 12 - written
    after = _chunk_files(store, reference.group)
    assert {k: after[k] for k in done} == done  # no written chunk recomputed or rewritten
    _assert_same(_arrays(store, resumed.group), _arrays(tmp_path / "ref.zarr", reference.group))


def _written(path: Path) -> int:
    try:
        return int(zarr.open_array(path, mode="r")[:].sum())
    except (FileNotFoundError, KeyError, ValueError):  # not created yet
        return 0


def _wait_for_written(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll the store from outside until at least one chunk is flagged written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the extraction finished before it could be killed"
        if _written(path):
            return
        time.sleep(0.02)
    raise AssertionError("no chunk was written in time")


def test_on_error_fail_names_the_file_and_skip_records_it(tmp_path, monkeypatch):
    manifest = write_cohort(tmp_path, 6, broken=(4,))
    with pytest.raises(ImageError, match="img004.png"):
        extract_features(manifest, MODEL, chunk_rows=2)
    runner = CliRunner()
    failed = runner.invoke(app, ["extract", "--model", MODEL, "--manifest", str(manifest), "--workers", "0",
                                 "--chunk-rows", "2"])
    assert failed.exit_code != 0 and isinstance(failed.exception, ImageError)
    (group,) = list_groups(tmp_path / "features.zarr")
    assert group.read("written").tolist() == [True] * 4 + [False] * 2  # chunks before the failure were kept

    ok = runner.invoke(app, ["extract", "--model", MODEL, "--manifest", str(manifest), "--workers", "0",
                             "--on-error", "skip"])
    assert ok.exit_code == 0, ok.output
    assert "1 image skipped" in ok.output and "id004" in ok.output
    assert group.read("written").all() and group.skipped().keys() == {"id004"}
    assert np.isnan(group.read("cls")[4]).all() and not np.isnan(group.read("cls")[[0, 1, 2, 3, 5]]).any()
    ids, X = load_features(tmp_path / "features.zarr", MODEL, manifest)
    assert "id004" not in ids.tolist() and len(X) == 5

    with monkeypatch.context() as patch:
        _forbid_model(patch)  # skipped images are final unless asked: the rerun loads nothing
        again = extract_features(manifest, MODEL, on_error="skip")
    assert again.embedded == 0 and again.skipped.keys() == {"id004"}
    write_cohort(tmp_path, 6)  # the file is repaired
    retried = extract_features(manifest, MODEL, retry_skipped=True)
    assert (retried.embedded, retried.skipped) == (1, {})
    assert not np.isnan(load_features(tmp_path / "features.zarr", MODEL, ["id004"])[1]).any()


def test_decoding_workers_give_the_same_store(tmp_path):
    manifest = write_cohort(tmp_path, 9)
    a = extract_features(manifest, MODEL, store=tmp_path / "w0.zarr", chunk_rows=4, batch_size=3)
    b = extract_features(manifest, MODEL, store=tmp_path / "w2.zarr", chunk_rows=4, batch_size=3,
                         num_workers=2)
    _assert_same(_arrays(tmp_path / "w0.zarr", a.group), _arrays(tmp_path / "w2.zarr", b.group))


def test_plan_covers_unwritten_rows_of_the_manifest_only(tmp_path):
    manifest = write_cohort(tmp_path, 7)
    result = extract_features(manifest, MODEL, chunk_rows=3)
    group = RowGroup.open(tmp_path / "features.zarr", result.group, mode="r+")
    group.arrays["written"][[1, 5, 6]] = False
    plan = plan_chunks(group, group.locate([f"id{i:03d}" for i in (0, 1, 2, 3, 4, 5)]))
    assert [(chunk, rows.tolist()) for chunk, rows in plan] == [(0, [1]), (1, [5])]  # row 6 not in manifest


def test_two_gloo_ranks_equal_one_process(tmp_path):
    manifest = write_cohort(tmp_path, 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): same kernels, same bits
    try:
        single = extract_features(manifest, MODEL, store=tmp_path / "one.zarr", chunk_rows=2, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli.featcache_app", "extract", "--model", MODEL, "--manifest", str(manifest),
               "--store", str(tmp_path / "two.zarr"), "--chunk-rows", "2", "--batch-size", "2",
               "--workers", "0"]
    run = subprocess.run(command, env=_env(OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "10 rows computed" in run.stdout and run.stdout.count("images,") == 1  # rank 0 alone reports
    _assert_same(_arrays(tmp_path / "two.zarr", single.group), _arrays(tmp_path / "one.zarr", single.group))


def test_a_file_replaced_under_the_same_name_is_embedded_again(tmp_path):
    manifest = write_cohort(tmp_path, 6)
    first = extract_features(manifest, MODEL, chunk_rows=4)
    before = load_features(first.store, MODEL, manifest)[1]
    Image.fromarray(np.full((40, 48), 200, dtype=np.uint8)).save(tmp_path / "img002.png")  # new pixels
    again = extract_features(manifest, MODEL, chunk_rows=4)
    assert again.changed == ["id002"] and again.embedded == 1
    after = load_features(first.store, MODEL, manifest)[1]
    assert not np.array_equal(after[2], before[2])
    np.testing.assert_array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))
    assert extract_features(manifest, MODEL, chunk_rows=4).embedded == 0  # and then it is complete
