"""Store locks across processes: a chunk claim is exclusive, a waiter gets it when the holder lets go, and a
killed holder leaves its lock file but no lock (the kernel drops flock locks with the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from featcache.locks import GroupLocks

REPO = Path(__file__).resolve().parents[1]


def _holder(store: Path, chunk: int | None) -> subprocess.Popen:
    """A process that claims ``chunk`` of ``store``'s group g (or, with None, takes its group lock), says so,
    and keeps it until its stdin closes."""
    take = "held = locks.group(); held.__enter__()" if chunk is None else f"held = locks.try_chunk({chunk})"
    script = textwrap.dedent(f"""
        import sys
        from featcache.locks import GroupLocks
        locks = GroupLocks({str(store)!r}, "g")
        {take}  # kept in a name: a dropped FileLock releases itself
        assert held
        print("held", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "features.zarr"


def test_a_claim_held_by_another_process_is_not_taken_until_released(store):
    child = _holder(store, 3)
    try:
        mine = GroupLocks(store, "g")
        assert mine.try_chunk(3) is None  # the other process computes chunk 3
        other = mine.try_chunk(4)
        assert other is not None and other.is_locked  # the rest is free
        other.release()
    finally:
        child.stdin.close()  # the holder lets go and exits
        child.wait(timeout=60)
    mine.wait_chunk(3)  # returns at once now
    claim = mine.try_chunk(3)
    assert claim is not None
    claim.release()


def test_a_killed_holder_leaves_its_file_but_no_lock(store):
    child = _holder(store, 0)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stdin.close()
    folder = store.parent / ".features.zarr.locks" / "g"
    assert (folder / "chunk-0.lock").exists()  # the file stays behind...
    claim = GroupLocks(store, "g").try_chunk(0)
    assert claim is not None  # ...but nobody holds it
    claim.release()
    assert not store.exists()  # the locks live beside the store, outside the zarr hierarchy


def test_group_lock_and_claims_in_one_process(store):
    locks = GroupLocks(store, "g")
    with locks.group(), locks.chunks([2, 1]):
        other = GroupLocks(store, "g")
        assert other.try_chunk(1) is None and other.try_chunk(2) is None  # both held while flags change
    again = GroupLocks(store, "g").try_chunk(1)
    assert again is not None
    again.release()


def test_group_lock_is_exclusive_across_processes(store):
    child = _holder(store, None)
    try:
        from filelock import FileLock, Timeout

        with pytest.raises(Timeout):
            FileLock(store.parent / ".features.zarr.locks" / "g" / "group.lock").acquire(timeout=0.2)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    with GroupLocks(store, "g").group():
        pass  # free once the holder exits
