"""Embed a manifest's images into a keyed store: resumable, chunk by chunk, on one process or many.

The row pipeline (`run_rows`) is shared by features and the pixel cache: rank 0, holding the group lock,
opens the keyed group, verifies every written row against its checksums (failures lose their flag) and gives
every manifest image a row; each rank takes a contiguous slice of the chunks that still have unwritten rows,
claiming each chunk just before computing it (a chunk another process holds is left to it, and waited for at
the end); DataLoader workers decode; the main thread computes a batch at a time (batches never cross a chunk,
so a resumed or multi-rank run batches every chunk exactly as an uninterrupted one); a writer thread turns
finished chunks into whole-chunk zarr writes, flags them written and lets their claims go. The model is built
only when a rank has work (or before a new group is created, so a bad device or model leaves nothing behind),
so a rerun on a complete store loads none.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featcache.backbones import BackboneSpec, build_backbone, get_spec
from featcache.device import precision_for, resolve_device
from featcache.errors import ImageError
from featcache.fileio import write_errors
from featcache.imaging import GrayDecoder, Preprocess, to_model_input
from featcache.integrity import repair, verify
from featcache.locks import GroupLocks
from featcache.manifest import Manifest, load_manifest
from featcache.store import (
    DEFAULT_CHUNK_ROWS,
    ON_ERROR,
    RowGroup,
    Rows,
    default_store,
    feature_spec,
    group_name,
    manifest_rows,
)

Compute = Callable[[torch.Tensor], dict[str, torch.Tensor]]
Progress = Callable[[int, int], None]  # (images done, images to do) on rank 0


@dataclass(frozen=True)
class ExtractResult:
    """What one run did. ``embedded`` counts rows computed by all ranks; ``skipped`` maps the manifest's
    skipped image ids (this run or earlier ones) to their reasons."""

    store: Path
    group: str
    rows: int
    embedded: int
    added: int
    changed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    model_loaded: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class RowJob:
    """What a store run computes: the keyed group, how a row's image is decoded, the (lazy) batch step."""

    store: Path
    prefix: str
    spec: Mapping[str, Any]
    decode: Callable[[Path, tuple[int, int, int, int] | None], torch.Tensor]
    placeholder: torch.Tensor  # what a skipped image contributes to its batch
    make_compute: Callable[[torch.device], Compute]
    fill: Mapping[str, float]  # value of a skipped row in each data array
    loads_model: bool = True


# --------------------------------------------------------------------------------------------- features


def extract_features(manifest: Manifest | str | Path, model: str | BackboneSpec, *,
                     store: str | Path | None = None, views: Sequence[str] | None = None,
                     weights: str | Path | None = None, random_init: bool = False, dtype: str = "float16",
                     batch_size: int = 64, num_workers: int = 0, on_error: str = "fail", device: str = "auto",
                     chunk_rows: int = DEFAULT_CHUNK_ROWS, retry_skipped: bool = False,
                     progress: Progress | None = None) -> ExtractResult:
    """Embed every image of ``manifest`` with a frozen backbone into ``store`` (default: ``features.zarr``
    beside the manifest), computing only rows not yet written. Under ``torchrun`` each rank takes a share."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    bspec = get_spec(model) if isinstance(model, str) else model
    dev = resolve_device(device)
    precision = precision_for(dev)
    spec = feature_spec(bspec, weights=weights, random_init=random_init, views=views, dtype=dtype,
                        precision=precision)
    pre = bspec.preprocess
    chosen = tuple(spec["views"])

    def make_compute(device: torch.device) -> Compute:
        backbone = build_backbone(bspec, weights=weights, random_init=random_init)
        return feature_step(backbone, pre, chosen, getattr(torch, dtype), device)

    job = RowJob(
        store=Path(store) if store is not None else default_store(manifest.path),
        prefix=bspec.name, spec=spec,
        decode=GrayDecoder(pre.size, pre.intensity), placeholder=torch.zeros(pre.size, pre.size),
        make_compute=make_compute, fill={v: float("nan") for v in chosen})
    return run_rows(job, manifest, batch_size=batch_size, num_workers=num_workers, on_error=on_error,
                    device=dev, chunk_rows=chunk_rows, retry_skipped=retry_skipped, progress=progress)


def feature_step(backbone: torch.nn.Module, pre: Preprocess, views: Sequence[str], dtype: torch.dtype,
                 device: torch.device) -> Compute:
    """The batch step: gray (B, S, S) -> normalised input -> frozen forward -> the chosen views in ``dtype``.
    On a GPU: channels_last and bf16 autocast."""
    cuda = device.type == "cuda"
    backbone = backbone.to(device).eval()
    if cuda:
        backbone = backbone.to(memory_format=torch.channels_last)

    def step(gray: torch.Tensor) -> dict[str, torch.Tensor]:
        x = to_model_input(gray.to(device, non_blocking=True), pre)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = backbone(x)
        return {v: out[v].float().to(dtype) for v in views}

    return step


# --------------------------------------------------------------------------------------------- row pipeline


def run_rows(job: RowJob, manifest: Manifest, *, batch_size: int = 64, num_workers: int = 0,
             on_error: str = "fail", device: torch.device | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
             retry_skipped: bool = False, progress: Progress | None = None) -> ExtractResult:
    """Bring ``job``'s group up to date with ``manifest``; see the module docstring for the steps."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    started = time.perf_counter()
    rows = manifest_rows(manifest, stamp=True)
    device = device or resolve_device()
    dist = Distributed.from_env()
    name = group_name(job.prefix, job.spec)
    locks = GroupLocks(job.store, name)
    added, changed, compute, computed = 0, [], None, 0
    try:
        if dist.rank == 0:
            if len(rows) and not (job.store / name / "zarr.json").is_file():
                compute = job.make_compute(device)  # a new group: the model (and device) must work first
            with locks.group(), write_errors(job.store):
                group = RowGroup.create_or_open(job.store, job.prefix, job.spec, chunk_rows)
                repair(group, verify(group), locks.chunks)
                report = group.sync(rows, hold=locks.chunks)
            added, changed = report.added, report.changed
        dist.barrier()  # the group exists, is verified, and every manifest image has a row
        if dist.rank != 0:
            group = RowGroup.open(job.store, name, mode="r+")
        index = group.locate(rows.image_id)
        plan = plan_chunks(group, index, retry_skipped)
        dist.barrier()  # every rank has read the written mask before any rank writes
        mine = np.array_split(np.arange(len(plan)), dist.world)[dist.rank]
        owned = [plan[i] for i in mine]
        if owned:
            compute = compute or job.make_compute(device)
            computed = _embed(job, group, locks, rows, manifest.root, index, owned, compute,
                              batch_size=batch_size, num_workers=num_workers, on_error=on_error,
                              retry_skipped=retry_skipped, pin=device.type == "cuda",
                              progress=progress if dist.rank == 0 else None)
        computed = dist.sum(computed)  # also the barrier: all chunks are on disk
        skipped = _skipped(group, index, rows) if dist.rank == 0 else {}
    finally:
        dist.close()
    return ExtractResult(store=job.store, group=group.name, rows=len(rows), embedded=computed, added=added,
                         changed=changed, skipped=skipped, model_loaded=compute is not None and job.loads_model,
                         seconds=time.perf_counter() - started)


def plan_chunks(group: RowGroup, index: np.ndarray, retry_skipped: bool = False
                ) -> list[tuple[int, np.ndarray]]:
    """The chunks holding rows to compute, each with its sorted store rows to compute."""
    todo = ~group.read("written")
    if retry_skipped:
        todo |= group.read("skip_reason") != ""
    rows = np.sort(index[todo[index]])
    chunks = rows // group.chunk_rows
    cuts = np.flatnonzero(np.diff(chunks)) + 1
    return [(int(part[0] // group.chunk_rows), part) for part in np.split(rows, cuts) if len(part)]


def _skipped(group: RowGroup, index: np.ndarray, rows: Rows) -> dict[str, str]:
    reasons = group.read("skip_reason", index) if len(index) else np.zeros(0, dtype=str)
    failed = np.flatnonzero(reasons != "")
    return dict(zip(rows.image_id[failed].tolist(), reasons[failed].tolist(), strict=True))


class _RowImages(Dataset):
    """Manifest row -> (row, decoded image, error reason); an unreadable image comes back as a placeholder and
    its reason, so the main process decides between failing (naming the file) and skipping."""

    def __init__(self, paths: list[Path], bboxes: list[tuple[int, int, int, int] | None],
                 decode: Callable[[Path, Any], torch.Tensor], placeholder: torch.Tensor):
        self.paths, self.bboxes, self.decode, self.placeholder = paths, bboxes, decode, placeholder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, self.decode(self.paths[i], self.bboxes[i]), ""
        except ImageError as err:
            return i, self.placeholder, err.reason


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[list[int], np.ndarray, list[str]]:
    """A batch as numpy: workers send it through their pipe rather than a shared-memory file, which a full
    /dev/shm or a file size limit would make torch drop silently (the loader then waits forever)."""
    return [i for i, _, _ in items], torch.stack([x for _, x, _ in items]).numpy(), [r for _, _, r in items]


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader worker start: ask Linux to kill this worker when its parent dies, whatever kills the parent
    (torch's own watchdog only notices while the worker waits for work)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class _ClaimedBatches:
    """The batch sampler: claims each owned chunk just before its first batch and yields the batches of the
    rows still unwritten once it holds it; chunks another process holds are kept in ``deferred``. ``order``
    tells the consumer, batch by batch, the chunk and (on its last batch) the claim to hand to the writer."""

    def __init__(self, group: RowGroup, locks: GroupLocks, owned: list[tuple[int, np.ndarray]],
                 manifest_row: np.ndarray, batch_size: int, retry_skipped: bool):
        self.group, self.locks, self.owned = group, locks, owned
        self.manifest_row, self.batch_size, self.retry_skipped = manifest_row, batch_size, retry_skipped
        self.order: deque[tuple[int, Any]] = deque()
        self.deferred: list[tuple[int, np.ndarray]] = []
        self.held: dict[int, Any] = {}

    def __iter__(self) -> Iterator[list[int]]:
        for chunk, store_rows in self.owned:
            lock = self.locks.try_chunk(chunk)
            if lock is None:
                self.deferred.append((chunk, store_rows))
                continue
            todo = self._still_todo(chunk, store_rows)
            if not len(todo):
                lock.release()
                continue
            self.held[chunk] = lock
            for start in range(0, len(todo), self.batch_size):
                last = start + self.batch_size >= len(todo)
                self.order.append((chunk, lock if last else None))
                yield self.manifest_row[todo[start:start + self.batch_size]].tolist()

    def _still_todo(self, chunk: int, store_rows: np.ndarray) -> np.ndarray:
        """The rows another process has not written since the plan was made."""
        local = store_rows - self.group.chunk_slice(chunk).start
        written = self.group.read_block("written", chunk)
        if written is None:
            return store_rows
        todo = ~written[local]
        if self.retry_skipped:
            reasons = self.group.read_block("skip_reason", chunk)
            todo |= True if reasons is None else reasons[local] != ""
        return store_rows[todo]

    def release(self) -> None:
        for lock in self.held.values():
            lock.release(force=True)
        self.held.clear()


def _embed(job: RowJob, group: RowGroup, locks: GroupLocks, rows: Rows, root: Path, index: np.ndarray,
           owned: list[tuple[int, np.ndarray]], compute: Compute, *, batch_size: int, num_workers: int,
           on_error: str, retry_skipped: bool, pin: bool, progress: Progress | None) -> int:
    """Compute the owned chunks batch by batch, each finished chunk going to the writer thread; then wait for
    the chunks other processes held and compute whatever they left. Returns the rows computed here."""
    manifest_row = np.full(group.n_rows, -1, dtype=np.int64)
    manifest_row[index] = np.arange(len(index))
    images = _RowImages([root / rows.path[i] for i in range(len(rows))],
                        [rows.bbox_of(i) for i in range(len(rows))], job.decode, job.placeholder)
    workers: dict[str, Any] = {"num_workers": num_workers}
    if num_workers:
        workers.update(worker_init_fn=functools.partial(_die_with_parent, os.getpid()), persistent_workers=False)
    total, done = sum(len(r) for _, r in owned), 0
    if progress:
        progress(0, total)
    remaining = owned
    with ChunkWriter(group, job.fill) as writer:
        while remaining:
            sampler = _ClaimedBatches(group, locks, remaining, manifest_row, batch_size, retry_skipped)
            loader = DataLoader(images, batch_sampler=sampler, collate_fn=_collate, **workers)
            pending: list[tuple[list[int], dict[str, torch.Tensor], list[str]]] = []
            try:
                for batch_rows, x, reasons in loader:
                    chunk, last = sampler.order.popleft()
                    if on_error == "fail" and any(reasons):
                        bad = next(i for i, r in enumerate(reasons) if r)
                        raise ImageError(root / rows.path[batch_rows[bad]], reasons[bad])
                    batch = torch.from_numpy(x)
                    pending.append((batch_rows, compute(batch.pin_memory() if pin else batch), reasons))
                    done += len(batch_rows)
                    if progress:
                        progress(done, total)
                    if last is not None:
                        del sampler.held[chunk]
                        writer.put(chunk, index, pending, last)
                        pending = []
            finally:
                sampler.release()
            for chunk, _ in sampler.deferred:
                locks.wait_chunk(chunk)  # holding nothing: whoever holds it finishes it, then we look again
            remaining = sampler.deferred
    return writer.rows


class ChunkWriter:
    """Writes finished chunks on a thread behind a bounded queue, so zarr encoding and disk I/O overlap the
    next batches and memory stays flat; each chunk's claim is let go once it is written. A writer error is
    raised in the caller at its next `put` or at exit; an error in the caller still lets chunks already
    queued land, since each is complete."""

    def __init__(self, group: RowGroup, fill: Mapping[str, float], depth: int = 2):
        self.group, self.fill = group, fill
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.rows = 0
        self.thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)

    def __enter__(self) -> ChunkWriter:
        self.thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc is None:
            raise self.error

    def put(self, chunk: int, index: np.ndarray, parts: list[tuple[list[int], dict[str, torch.Tensor],
                                                                  list[str]]], claim: Any) -> None:
        if self.error is not None:
            claim.release(force=True)
            raise self.error
        self.queue.put((chunk, index, parts, claim))

    def _run(self) -> None:
        for chunk, index, parts, claim in iter(self.queue.get, None):
            try:
                if self.error is None:
                    self._write(chunk, index, parts)
            except BaseException as err:  # noqa: BLE001 - handed to the caller thread
                self.error = err
            finally:
                claim.release(force=True)

    def _write(self, chunk: int, index: np.ndarray,
               parts: list[tuple[list[int], dict[str, torch.Tensor], list[str]]]) -> None:
        store_rows = np.concatenate([index[r] for r, _, _ in parts])
        reasons = np.asarray([r for _, _, rs in parts for r in rs], dtype=str)
        values = {name: torch.cat([out[name] for _, out, _ in parts]).cpu().numpy() for name in parts[0][1]}
        failed = reasons != ""
        for name, fill in self.fill.items():
            values[name][failed] = fill
        with write_errors(self.group.where):
            self.group.write_chunk(chunk, store_rows, values, reasons)
        self.rows += len(store_rows)


# --------------------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Distributed:
    """This process's rank under torchrun (``WORLD_SIZE`` > 1), else a world of one. Ranks only need barriers,
    so the process group is gloo whatever the device; one set up by the caller is reused, never closed."""

    rank: int = 0
    world: int = 1
    owned: bool = False

    @classmethod
    def from_env(cls) -> Distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owned)

    def sum(self, value: int) -> int:
        """``value`` summed over the ranks (a barrier too)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()

