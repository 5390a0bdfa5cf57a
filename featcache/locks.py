"""Locks that let independent processes share a store (two `featcache extract` runs, say).

Beside the store, in ``.<store name>.locks/<group>/``, a group lock serialises the row bookkeeping (creating the
group, repairing it, adding rows, changing flags) and one claim per chunk makes its computing and writing
exclusive, so two runs with the same manifest split the chunks between them instead of both computing every
one. Claims are taken without waiting while work remains elsewhere; torchrun ranks own disjoint chunks, so
theirs never contend. The locks are `filelock`'s (flock): the kernel drops them when a process dies, so a
killed run never leaves a stale lock. They live outside the zarr hierarchy so plain zarr readers never see them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from featcache.fileio import write_errors


class GroupLocks:
    """The group lock and the chunk claims of one group of one store."""

    def __init__(self, store: str | Path, group: str):
        store = Path(store).resolve()
        self.folder = store.parent / f".{store.name}.locks" / group
        self._made = False

    def _lock(self, name: str) -> FileLock:
        if not self._made:
            with write_errors(self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
            self._made = True
        return FileLock(self.folder / name, thread_local=False)  # released by the writer thread

    @contextmanager
    def group(self) -> Iterator[None]:
        """Hold the group lock (waiting for it)."""
        lock = self._lock("group.lock")
        with write_errors(self.folder), lock:
            yield

    def try_chunk(self, chunk: int) -> FileLock | None:
        """Claim a chunk if no other process holds it; the caller releases it once the chunk is written."""
        lock = self._lock(f"chunk-{chunk}.lock")
        try:
            with write_errors(self.folder):
                lock.acquire(blocking=False)
        except Timeout:
            return None
        return lock

    def wait_chunk(self, chunk: int) -> None:
        """Wait until whoever holds the chunk's claim lets it go."""
        with write_errors(self.folder), self._lock(f"chunk-{chunk}.lock"):
            pass

    @contextmanager
    def chunks(self, chunks: Sequence[int]) -> Iterator[None]:
        """Hold several claims (waiting for each, in order) while their rows' flags change."""
        with ExitStack() as stack:
            for chunk in sorted(chunks):
                lock = self._lock(f"chunk-{chunk}.lock")
                with write_errors(self.folder):
                    lock.acquire()
                stack.callback(lock.release)
            yield
