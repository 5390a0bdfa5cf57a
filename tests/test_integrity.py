"""Store integrity: damaged chunks, arrays and metadata are recomputed by the next run or refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL, write_cohort
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.errors import StoreError
from featcache.extract import extract_features
from featcache.integrity import row_digests, verify
from featcache.pixels import PixelDataset, cache_pixels
from featcache.store import RowGroup, load_features


def _cohort(tmp_path: Path, n: int = 10) -> tuple[Path, Path, str, np.ndarray]:
    """A complete float32 store (chunks of 4 rows) and its features in manifest order."""
    manifest = write_cohort(tmp_path, n)
    result = extract_features(manifest, MODEL, chunk_rows=4, dtype="float32")
    store = tmp_path / "features.zarr"
    return manifest, store, result.group, load_features(store, MODEL, manifest)[1]


def _chunk(store: Path, group: str, array: str, chunk: int) -> Path:
    opened = RowGroup.open(store, group)
    return opened.chunk_file(array, chunk)


def _stores(store: Path, *extra: str):
    return CliRunner().invoke(app, ["stores", "--store", str(store), *extra])


def test_digest_sees_any_word_and_ignores_string_padding():
    rows = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float16)
    base = row_digests(rows)
    assert len(set(base.tolist())) == 5 and (base != 0).all()
    for i in range(7):
        changed = rows.copy()
        changed[2, i] = np.float16(changed[2, i] + 1)
        assert (row_digests(changed) != base).tolist() == [False, False, True, False, False]
    assert row_digests(np.zeros((1, 64), np.uint8))[0] != 0  # a lost chunk of zeros never matches "nothing"
    narrow, wide = np.array(["ab", ""]), np.array(["ab", "", "longer text"])
    assert row_digests(narrow).tolist() == row_digests(wide)[:2].tolist()
    swapped = rows.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert row_digests(swapped)[0] != base[0] or rows[0, 0] == rows[0, 1]


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_damaged_data_chunk_is_refused_then_recomputed(tmp_path, damage):
    manifest, store, group, before = _cohort(tmp_path)
    path = _chunk(store, group, "cls", 1)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:7])
    else:
        path.write_bytes(b"\x00garbage" * 9)
    with pytest.raises(StoreError) as err:
        load_features(store, MODEL, manifest)
    assert group in str(err.value) and "4-7" in str(err.value) and "\n" not in str(err.value)
    verdict = verify(RowGroup.open(store, group))
    assert not verdict.ok and verdict.bad.tolist() == [4, 5, 6, 7]
    run = _stores(store, "--verify")
    assert run.exit_code == 1 and "next extract (or pixels) recomputes 4 rows" in run.output

    again = extract_features(manifest, MODEL, chunk_rows=4, dtype="float32")
    assert again.embedded == 4
    np.testing.assert_array_equal(load_features(store, MODEL, manifest)[1], before)
    assert verify(RowGroup.open(store, group)).ok and _stores(store, "--verify").exit_code == 0


def test_garbage_written_chunk_and_group_metadata_are_rebuilt(tmp_path):
    manifest, store, group, before = _cohort(tmp_path)
    _chunk(store, group, "written", 0).write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"written: chunk of rows 0-3 does not decode"):
        load_features(store, MODEL, manifest)
    assert _stores(store).exit_code == 0  # listed, with "?" for the damaged flags, no traceback
    run = _stores(store, "--verify")
    assert run.exit_code == 1 and "written flags of 4 rows lost; next extract (or pixels) recomputes 4" in run.output
    assert extract_features(manifest, MODEL, chunk_rows=4, dtype="float32").embedded == 4
    np.testing.assert_array_equal(load_features(store, MODEL, manifest)[1], before)

    (store / group / "zarr.json").write_text("{not json")
    run = _stores(store)
    assert run.exit_code == 0 and "zarr.json) unreadable" in run.output
    with pytest.raises(StoreError, match="zarr.json\\) unreadable"):
        load_features(store, MODEL, manifest, dtype="float32")
    assert extract_features(manifest, MODEL, chunk_rows=4, dtype="float32").embedded == 0  # rewritten
    np.testing.assert_array_equal(load_features(store, MODEL, manifest)[1], before)


def test_lost_image_ids_and_reordered_manifest_never_mix_rows(tmp_path):
    manifest, store, group, before = _cohort(tmp_path)
    _chunk(store, group, "image_id", 0).unlink()  # ids of rows 0-3 are gone, their features and flags remain
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], *lines[1:][::-1]]) + "\n")  # the manifest, reversed
    result = extract_features(manifest, MODEL, chunk_rows=4, dtype="float32")
    assert result.embedded == 4 and result.added == 4
    ids, X = load_features(store, MODEL, manifest)
    assert ids.tolist() == [f"id{i:03d}" for i in range(10)][::-1]
    np.testing.assert_array_equal(X, before[::-1])


@pytest.mark.parametrize("damage", ["remove view", "edit dtype", "garbage metadata", "shrink"])
def test_damaged_array_metadata_is_one_line_then_rebuilt(tmp_path, damage):
    manifest, store, group, before = _cohort(tmp_path)
    meta = store / group / "cls" / "zarr.json"
    if damage == "remove view":
        shutil.rmtree(meta.parent)
    elif damage == "garbage metadata":
        meta.write_text("garbage")
    else:
        doc = json.loads(meta.read_text())
        if damage == "edit dtype":
            doc["data_type"] = "float16"
        else:
            doc["shape"] = [3, doc["shape"][1]]
        meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as err:
        load_features(store, MODEL, manifest)
    assert f"{group}: array cls" in str(err.value) and "\n" not in str(err.value)
    run = _stores(store, "--verify")
    assert run.exit_code == 1 and "next extract (or pixels) recomputes 10 rows" in run.output
    assert extract_features(manifest, MODEL, chunk_rows=4, dtype="float32").embedded == 10
    np.testing.assert_array_equal(load_features(store, MODEL, manifest)[1], before)


def test_damaged_pixel_shard_is_refused_then_recomputed(tmp_path):
    manifest = write_cohort(tmp_path, 6)
    result = cache_pixels(manifest, MODEL, chunk_rows=4)
    store = tmp_path / "pixels.zarr"
    before = torch.stack(list(PixelDataset(store, MODEL, manifest, raw=True)))
    _chunk(store, result.group, "pixels", 1).unlink()  # rows 4-5 now read as zeros
    dataset = PixelDataset(store, MODEL, manifest, raw=True)
    assert torch.equal(dataset[0], before[0])
    with pytest.raises(StoreError, match="row 4 fails its checksum"):
        dataset[4]
    assert cache_pixels(manifest, MODEL, chunk_rows=4).embedded == 2
    assert torch.equal(torch.stack(list(PixelDataset(store, MODEL, manifest, raw=True))), before)
