"""Pixel cache: images decoded, cropped and resized once, stored as uint8, read by stage-2 epochs.

Decoding a 2,000-pixel DICOM costs far more than a forward pass of a small backbone; fine-tuning for
hundreds of epochs should pay it once. The cache holds ``quantize(load_gray(...))`` at a backbone's input
size in a keyed group ``<store>/pixels/<key>`` (same row layout as a feature group, see
:mod:`featcache.store`), keyed by what decides the pixels only (size, intensity, crop rule): backbones with
the same input size share it. Each row is one inner chunk of an R-row shard, so a shuffled epoch reads single
rows without decoding whole chunks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

import featcache
from featcache.backbones import BackboneSpec, get_spec
from featcache.errors import StoreError
from featcache.extract import ExtractResult, Progress, RowJob, run_rows
from featcache.imaging import GrayDecoder, Preprocess, to_model_input
from featcache.integrity import row_digests
from featcache.manifest import Manifest, load_manifest
from featcache.store import (
    CROP_RULE,
    LAYOUT_VERSION,
    WHY_REBUILD,
    RowGroup,
    check_inputs,
    default_store,
    group_name,
    rows_of,
)

PIXEL_PREFIX = "pixels"
DEFAULT_PIXEL_CHUNK_ROWS = 64


def pixel_spec(pre: Preprocess) -> dict[str, Any]:
    """What decides the cached pixels; mean/std and channels are applied when reading, so are not in it."""
    return {"kind": "pixels", "size": pre.size, "intensity": pre.intensity, "crop": CROP_RULE,
            "dtype": "uint8", "quantize": "round(255 * gray)", "featcache": featcache.__version__,
            "layout": LAYOUT_VERSION}


def cache_pixels(manifest: Manifest | str | Path, model: str | BackboneSpec, *,
                 store: str | Path | None = None, batch_size: int = 64, num_workers: int = 0,
                 on_error: str = "fail", chunk_rows: int = DEFAULT_PIXEL_CHUNK_ROWS,
                 retry_skipped: bool = False, progress: Progress | None = None) -> ExtractResult:
    """Decode every image of ``manifest`` at ``model``'s input size into ``store`` (default: ``pixels.zarr``
    beside the manifest); resumable and rank-parallel like feature extraction, and no model is ever built."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    pre = (get_spec(model) if isinstance(model, str) else model).preprocess
    size = pre.size
    job = RowJob(
        store=Path(store) if store is not None else default_store(manifest.path, "pixels"),
        prefix=PIXEL_PREFIX, spec=pixel_spec(pre),
        decode=GrayDecoder(size, pre.intensity, quantized=True),
        placeholder=torch.zeros(size, size, dtype=torch.uint8),
        make_compute=lambda device: _identity, fill={"pixels": 0}, loads_model=False)
    return run_rows(job, manifest, batch_size=batch_size, num_workers=num_workers, on_error=on_error,
                    device=torch.device("cpu"), chunk_rows=chunk_rows, retry_skipped=retry_skipped,
                    progress=progress)


def _identity(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pixels": batch}


def open_pixels(store: str | Path, pre: Preprocess) -> RowGroup:
    """The pixel group for ``pre`` in ``store``; a missing one says which command builds it."""
    name = group_name(PIXEL_PREFIX, pixel_spec(pre))
    return RowGroup.open(store, name, missing=f"{store}: no pixel cache for size {pre.size}, intensity "
                         f"{pre.intensity!r}; run `featcache pixels --model ... --manifest ... --store {store}`")


class PixelDataset(Dataset):
    """Cached images as model input: item ``i`` is image ``i`` of ``images`` as a ``(C, S, S)`` float tensor
    normalised for ``model`` (or, with ``raw=True``, the stored ``(S, S)`` uint8). ``images`` is a manifest
    (path or ``Manifest``: all its images, each checked against the path and crop it was cached from) or a
    sequence of image ids. Every image must be cached and not skipped. Safe in DataLoader workers: each
    process opens the store itself."""

    def __init__(self, store: str | Path, model: str | BackboneSpec | None, images: Any, *,
                 preprocess: Preprocess | None = None, raw: bool = False):
        if preprocess is None:
            if model is None:
                raise ValueError("PixelDataset needs a model or a preprocess")
            preprocess = (get_spec(model) if isinstance(model, str) else model).preprocess
        self.pre = preprocess
        self.store, self.raw = Path(store), raw
        group = open_pixels(store, self.pre)
        group.require("pixels", "checksum")
        wanted = rows_of(images)
        if wanted is None:
            raise ValueError("PixelDataset needs images: a manifest or image ids")
        self.rows = group.locate(wanted.image_id)
        ready = (self.rows >= 0) & group.read("written")[np.maximum(self.rows, 0)]
        ready &= group.read("skip_reason")[np.maximum(self.rows, 0)] == ""
        if not ready.all():
            missing = wanted.image_id[~ready]
            raise StoreError(f"{group.where}: {len(missing)} of {len(self.rows)} images not cached or "
                             f"skipped (e.g. {missing[:3].tolist()}); run `featcache pixels` for them")
        group.read_checked("image_id", self.rows)
        group.read_checked("skip_reason", self.rows)
        if wanted.path.size:
            check_inputs(group, self.rows, wanted)
        self.name, self.where = group.name, group.where
        self.digests = group.read("checksum", self.rows)[:, group.columns.index("pixels")]
        self._pixels: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i``, checked against its recorded digest (about as costly as one more copy of it)."""
        row = int(self.rows[i])
        try:
            pixels = np.asarray(self._array()[row])
        except Exception as err:  # noqa: BLE001 - a codec's error for damaged bytes, whatever its type
            raise StoreError(f"{self.where}/pixels: row {row} does not decode ({type(err).__name__}); "
                             f"{WHY_REBUILD}") from None
        if row_digests(pixels[None])[0] != self.digests[i]:
            raise StoreError(f"{self.where}/pixels: row {row} fails its checksum; {WHY_REBUILD}")
        gray = torch.from_numpy(pixels)
        return gray if self.raw else to_model_input(gray, self.pre)

    def read_all(self) -> torch.Tensor:
        """Every image as stored, ``(N, S, S)`` uint8 in the order of ``images``, checked against its digest:
        one read of the rows rather than one per image (a training run loads its images once)."""
        group = RowGroup.open(self.store, self.name)
        return torch.from_numpy(np.ascontiguousarray(group.read_checked("pixels", self.rows)))

    def _array(self) -> Any:
        if self._pid != os.getpid():  # reopened in each DataLoader worker
            self._pixels = RowGroup.open(self.store, self.name).arrays["pixels"]
            self._pid = os.getpid()
        return self._pixels
