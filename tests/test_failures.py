"""What the machine can do to a run: a full disk, a read-only folder, a killed parent, a missing GPU. Each ends
in one line and a non-zero exit, never a hang, and leaves nothing half-made."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import MODEL, write_cohort

from featcache.extract import extract_features
from featcache.pixels import cache_pixels

REPO = Path(__file__).resolve().parents[1]
FEATCACHE = [sys.executable, "-c", "from cli.featcache_app import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _file_limit(size: int):
    """``ulimit -f``: files may not grow past ``size`` bytes (Python ignores SIGXFSZ, so writes get EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def _no_root_override() -> None:
    """Make permission bits bind even for root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for the exec."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "cannot drop a capability")


def _run(args: list[str], preexec) -> subprocess.CompletedProcess:
    return subprocess.run([*FEATCACHE, *args], preexec_fn=preexec, env=ENV, capture_output=True, text=True,
                          timeout=240)  # a hang fails the test instead of stalling the suite


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_disk_full_is_one_line_with_and_without_workers(tmp_path):
    """Workers used to hang (their batches went through /dev/shm files the limit forbids); in-process
    writes gave a raw OSError. Both commands share the pipeline: pixels with workers, extract without."""
    manifest = write_cohort(tmp_path, 24)
    pixels = ["pixels", "--model", MODEL, "--manifest", str(manifest), "--workers", "2", "--batch-size", "4"]
    _one_line(_run(pixels, _file_limit(4000)), "pixels.zarr", "file too large")
    # features: a group made first (its metadata is larger than the limit), then chunks that outgrow it
    extract_features(write_cohort(tmp_path / "one", 1), MODEL, store=tmp_path / "f.zarr", dtype="float32")
    extract = ["extract", "--model", MODEL, "--manifest", str(manifest), "--store", str(tmp_path / "f.zarr"),
               "--workers", "0", "--batch-size", "4", "--dtype", "float32"]
    _one_line(_run(extract, _file_limit(1500)), "f.zarr", "file too large")
    done = extract_features(manifest, MODEL, store=tmp_path / "f.zarr", dtype="float32")  # space is back
    assert done.rows == 24 and done.embedded == 24


def test_read_only_store_folder_is_one_line(tmp_path):
    manifest = write_cohort(tmp_path, 4)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    for command in ("extract", "pixels"):
        store = readonly / f"{command}.zarr"
        _one_line(_run([command, "--model", MODEL, "--manifest", str(manifest), "--store", str(store),
                        "--workers", "0"], _no_root_override), "cannot write", "permission denied")
    assert not list(readonly.iterdir())
    extract_features(manifest, MODEL)
    _one_line(_run(["export", "--store", str(tmp_path / "features.zarr"), "--to", str(readonly / "f.h5")],
                   _no_root_override), "f.h5: cannot write, permission denied")
    script = f"from featcache.fileio import atomic_write; atomic_write({str(readonly / 'splits.json')!r}, b'{{}}')"
    proc = subprocess.run([sys.executable, "-c", script], preexec_fn=_no_root_override, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert "WriteError" in proc.stderr and "splits.json: cannot write, permission denied" in proc.stderr


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    manifest = write_cohort(tmp_path, 8)
    script = textwrap.dedent(f"""
        import time
        import featcache.extract as fx
        import featcache.imaging as fi
        decode = fi.GrayDecoder.__call__
        def slow(self, path, bbox):
            time.sleep(120)  # a worker busy with a huge image when its parent dies
            return decode(self, path, bbox)
        fi.GrayDecoder.__call__ = slow
        fx.extract_features({str(manifest)!r}, "{MODEL}", num_workers=2, batch_size=1)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        workers: list[int] = []
        for _ in range(600):  # until both decoding workers are up
            workers = [p for p in _children(parent.pid) if _alive(p)]
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(workers) >= 2
        time.sleep(1.0)  # let them enter their (slow) decode
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            if not any(_alive(p) for p in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        for pid in [parent.pid, *_children(parent.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_leaves_no_group_behind(tmp_path):
    manifest = write_cohort(tmp_path, 3)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the message is the device resolver's; here: no group
        extract_features(manifest, MODEL, device="cuda")
    assert not (tmp_path / "features.zarr" / MODEL).exists()
    assert cache_pixels(manifest, MODEL).embedded == 3  # the pixel cache needs no device at all
