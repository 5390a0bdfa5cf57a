"""Pixel cache: a round trip equals decoding, a rerun decodes nothing, backbones of one input size share a
cache (each normalising it its own way), and stale or missing rows are refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL, write_cohort
from torch.utils.data import DataLoader

from featcache.backbones import get_spec
from featcache.errors import StoreError
from featcache.imaging import load_gray, quantize, to_model_input
from featcache.pixels import PixelDataset, cache_pixels


def test_pixel_cache_equals_decoding_path(tmp_path):
    manifest = write_cohort(tmp_path, 6, bbox={1: (5, 3, 33, 37)})
    result = cache_pixels(manifest, MODEL, chunk_rows=4, batch_size=4)
    assert result.embedded == 6
    pre = get_spec(MODEL).preprocess
    ids = [f"id{i:03d}" for i in range(6)]
    raw = PixelDataset(tmp_path / "pixels.zarr", MODEL, ids, raw=True)
    for i in range(6):
        box = (5, 3, 33, 37) if i == 1 else None
        expected = quantize(load_gray(tmp_path / f"img{i:03d}.png", pre.size, box, pre.intensity))
        assert raw[i].dtype == torch.uint8 and torch.equal(raw[i], expected)
    model_input = PixelDataset(tmp_path / "pixels.zarr", MODEL, ids[::-1])
    batches = list(DataLoader(model_input, batch_size=3, num_workers=1))  # reads inside a worker process
    expected = to_model_input(torch.stack([raw[i] for i in range(6)][::-1]), pre)
    torch.testing.assert_close(torch.cat(batches), expected)
    assert cache_pixels(manifest, MODEL, chunk_rows=4).embedded == 0  # complete: nothing decoded again
    with pytest.raises(StoreError, match="not cached"):
        PixelDataset(tmp_path / "pixels.zarr", MODEL, ["id000", "other"])
    assert len(PixelDataset(tmp_path / "pixels.zarr", MODEL, manifest)) == 6  # a manifest is checked row by row
    rows = manifest.read_text().splitlines()
    header = rows[0].split(",")
    cells = rows[2].split(",")
    cells[header.index("bbox_x0")] = "6"  # id001's crop changes after caching: its pixels are stale
    manifest.write_text("\n".join([rows[0], rows[1], ",".join(cells), *rows[3:]]) + "\n")
    with pytest.raises(StoreError, match="changed path or crop"):
        PixelDataset(tmp_path / "pixels.zarr", MODEL, manifest)


def test_backbones_of_one_input_size_share_one_cache(tmp_path):
    manifest = write_cohort(tmp_path, 4)
    first = cache_pixels(manifest, "resnet18-tiny")
    assert first.embedded == 4
    again = cache_pixels(manifest, "clip-l-tiny")  # 32 px too: same pixels, another mean and std
    assert again.embedded == 0 and again.group == first.group
    ids = [f"id{i:03d}" for i in range(4)]
    raw = PixelDataset(tmp_path / "pixels.zarr", "clip-l-tiny", ids, raw=True).read_all()
    for name in ("resnet18-tiny", "clip-l-tiny"):
        images = PixelDataset(tmp_path / "pixels.zarr", name, ids)
        torch.testing.assert_close(torch.stack([images[i] for i in range(4)]),
                                   to_model_input(raw, get_spec(name).preprocess))
    assert not torch.equal(PixelDataset(tmp_path / "pixels.zarr", "resnet18-tiny", ids)[0],
                           PixelDataset(tmp_path / "pixels.zarr", "clip-l-tiny", ids)[0])


def test_a_missing_cache_names_the_command_that_builds_it(tmp_path):
    manifest = write_cohort(tmp_path, 2)
    cache_pixels(manifest, "resnet18-tiny")
    with pytest.raises(StoreError, match=r"no pixel cache for size 28.*run `featcache pixels"):
        PixelDataset(tmp_path / "pixels.zarr", MODEL, manifest)  # dinov2-s-tiny reads 28 px
