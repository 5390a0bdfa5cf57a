"""The images a training run reads, held in memory as the 8-bit grays the pixel cache stores.

A run passes over its images hundreds of times; decoding a DICOM costs far more than a forward pass of a small
backbone. So every image a `run_train` call needs is loaded once, as ``(N, S, S)`` uint8: read from the pixel
cache (`featcache pixels`) when it holds the backbone's input size, else decoded through `featcache.imaging` and
quantised exactly as the cache would (``round(255 * gray)``). The two sources give identical bytes, so whether a
cache existed never changes a result. Mean/std and channel replication are applied per batch on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.errors import StoreError
from featcache.imaging import GrayDecoder, Preprocess, to_model_input
from featcache.manifest import Manifest
from featcache.pixels import PIXEL_PREFIX, PixelDataset, pixel_spec
from featcache.store import Rows, default_store, group_name, list_groups, manifest_rows

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclass(frozen=True)
class Images:
    """Images by id as uint8 ``(N, S, S)``, and where they came from (recorded in each run's provenance)."""

    ids: np.ndarray
    gray: torch.Tensor
    source: str
    position: dict[str, int]

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.position[i] for i in ids], dtype=torch.long)

    def batch(self, rows: torch.Tensor, pre: Preprocess, device: torch.device) -> torch.Tensor:
        """Model input ``(B, C, S, S)`` of the given rows, normalised for the backbone, on ``device``."""
        return to_model_input(self.gray[rows].to(device, non_blocking=True), pre)


def find_pixels(manifest: Manifest, pre: Preprocess, store: str | Path | None) -> Path | None:
    """The pixel store to read, or None to decode. An explicit ``store`` must hold this input size (else one
    line naming the sizes it holds); the default ``pixels.zarr`` beside the manifest is used when it does."""
    explicit = store is not None
    path = Path(store) if store is not None else default_store(manifest.path, "pixels")
    if not path.exists():
        if explicit:
            raise StoreError(f"{path}: no such pixel store; make it with `featcache pixels --model ... "
                             f"--manifest {manifest.path} --store {path}`")
        return None
    wanted = group_name(PIXEL_PREFIX, pixel_spec(pre))
    groups = list_groups(path, kind="pixels")
    if any(g.name == wanted for g in groups):
        return path
    if explicit:
        held = ", ".join(sorted({f"size {g.spec.get('size')} ({g.spec.get('intensity')})" for g in groups}))
        raise StoreError(f"{path}: no pixel cache for input size {pre.size} ({pre.intensity}); it holds "
                         f"{held or 'none'}; run `featcache pixels --model ... --manifest {manifest.path} "
                         f"--store {path}` for this backbone")
    return None


def load_images(manifest: Manifest, ids: Sequence[str], pre: Preprocess, store: str | Path | None = None,
                progress: Progress | None = None) -> Images:
    """The images ``ids`` of ``manifest`` at ``pre``'s size, from the pixel cache or decoded (see module doc)."""
    ids = list(dict.fromkeys(ids))
    pixels = find_pixels(manifest, pre, store)
    if pixels is not None:
        every = manifest_rows(manifest)
        where = {i: n for n, i in enumerate(every.image_id.tolist())}
        pick = np.array([where[i] for i in ids], dtype=np.int64)
        wanted = Rows(every.image_id[pick], every.path[pick], every.bbox[pick])  # checked against the cache
        dataset = PixelDataset(pixels, None, wanted, preprocess=pre, raw=True)
        gray = dataset.read_all()
        source = f"pixel cache {pixels}/{dataset.name}"
    else:
        decode = GrayDecoder(pre.size, pre.intensity, quantized=True)
        gray = torch.empty((len(ids), pre.size, pre.size), dtype=torch.uint8)
        for n, image_id in enumerate(ids):
            gray[n] = decode(manifest.abspath(image_id), manifest.bbox(image_id))
            if progress is not None:
                progress(n + 1, len(ids))
        source = "decoded (featcache.imaging, quantised to uint8 as the pixel cache)"
    return Images(np.asarray(ids), gray, source, {i: n for n, i in enumerate(ids)})
