"""Locks that let independent processes share a store (two `featcache extract` runs, say) or a runs folder
(two `study run`s: `Claims` of run keys, taken by `adapters.train`).

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


class Claims:
    """Named claims in one folder: whoever holds a name's claim does that name's work (a store's chunk, a
    training run); the others go on with other work and come back to wait for it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._made = False

    def _lock(self, name: str) -> FileLock:
        if not self._made:
            with write_errors(self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
            self._made = True
        return FileLock(self.folder / f"{name}.lock", thread_local=False)  # released by the writer thread

    def claim(self, name: str, wait: bool = False) -> FileLock | None:
        """Take the claim of ``name`` (waiting for it with ``wait``, else None when another process holds it);
        the caller releases it once the work is done (a killed process's claim is dropped by the kernel)."""
        lock = self._lock(name)
        try:
            with write_errors(self.folder):
                lock.acquire(blocking=wait)
        except Timeout:
            return None
        return lock

    def wait(self, name: str) -> None:
        """Wait until whoever holds the claim of ``name`` lets it go."""
        with write_errors(self.folder), self._lock(name):
            pass


class GroupLocks(Claims):
    """The group lock and the chunk claims of one group of one store."""

    def __init__(self, store: str | Path, group: str):
        store = Path(store).resolve()
        super().__init__(store.parent / f".{store.name}.locks" / group)

    @contextmanager
    def group(self) -> Iterator[None]:
        """Hold the group lock (waiting for it)."""
        lock = self._lock("group")
        with write_errors(self.folder), lock:
            yield

    def try_chunk(self, chunk: int) -> FileLock | None:
        """Claim a chunk if no other process holds it; the caller releases it once the chunk is written."""
        return self.claim(f"chunk-{chunk}")

    def wait_chunk(self, chunk: int) -> None:
        """Wait until whoever holds the chunk's claim lets it go."""
        self.wait(f"chunk-{chunk}")

    @contextmanager
    def chunks(self, chunks: Sequence[int]) -> Iterator[None]:
        """Hold several claims (waiting for each, in order) while their rows' flags change."""
        with ExitStack() as stack:
            for chunk in sorted(chunks):
                claim = self.claim(f"chunk-{chunk}", wait=True)
                assert claim is not None  # a waiting claim is always taken
                stack.callback(claim.release)
            yield
