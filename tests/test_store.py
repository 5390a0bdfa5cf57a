"""Feature and pixel stores: layout readable by plain zarr, spec keys, refusals, reading API, HDF5 export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import MODEL, write_cohort
from typer.testing import CliRunner

import featcache
from cli.featcache_app import app
from featcache.backbones import build_backbone, get_spec
from featcache.errors import StoreError
from featcache.extract import extract_features
from featcache.imaging import load_image
from featcache.store import (
    KEY_LENGTH,
    RowGroup,
    feature_spec,
    find_feature_group,
    group_name,
    list_groups,
    load_features,
    spec_sha256,
)


def _reference(manifest: Path, model: str = MODEL) -> dict[str, np.ndarray]:
    """Features computed image by image outside the pipeline."""
    from featcache.manifest import load_manifest

    m = load_manifest(manifest)
    backbone, pre = build_backbone(model), get_spec(model).preprocess
    with torch.inference_mode():
        x = torch.stack([load_image(m.abspath(i), pre, m.bbox(i)) for i in m.ids])
        return {k: v.numpy() for k, v in backbone(x).items()}


def test_fresh_store_is_plain_zarr_with_spec_key(tmp_path):
    manifest = write_cohort(tmp_path / "data", 10, bbox={3: (4, 2, 30, 36)})
    result = extract_features(manifest, MODEL, chunk_rows=4, batch_size=3)
    assert (result.rows, result.embedded, result.added, result.model_loaded) == (10, 10, 10, True)

    root = zarr.open_group(tmp_path / "data" / "features.zarr", mode="r")  # plain zarr, no featcache
    group = root[result.group]
    spec = group.attrs["spec"]
    assert result.group == f"{MODEL}/{spec_sha256(spec)[:KEY_LENGTH]}"
    assert group.attrs["spec_sha256"] == spec_sha256(spec)
    assert spec["model"] == MODEL and spec["weights"] == "tiny-random" and spec["dtype"] == "float16"
    assert spec["preprocess"] == get_spec(MODEL).preprocess.to_dict()
    assert spec["views"] == {"cls": 16, "mean": 16} and spec["featcache"] == featcache.__version__
    assert group["image_id"][:].tolist() == [f"id{i:03d}" for i in range(10)]
    assert group["bbox"][3].tolist() == [4, 2, 30, 36] and group["bbox"][0].tolist() == [-1, -1, -1, -1]
    assert group["written"][:].all() and (group["skip_reason"][:] == "").all()
    for view, expected in _reference(manifest).items():
        array = group[view]
        assert array.shape == (10, 16) and array.chunks == (4, 16) and array.dtype == np.float16
        assert array.metadata.dimension_names == ("row", f"{view}_dim")
        np.testing.assert_allclose(array[:].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_changed_spec_gets_its_own_group_and_a_tampered_group_is_refused(tmp_path):
    manifest = write_cohort(tmp_path, 4)
    store = tmp_path / "features.zarr"
    a = extract_features(manifest, MODEL, chunk_rows=2)
    b = extract_features(manifest, MODEL, chunk_rows=2, dtype="float32")
    c = extract_features(manifest, MODEL, chunk_rows=2, views=["cls"])
    assert len({a.group, b.group, c.group}) == 3 and b.embedded == c.embedded == 4
    assert sorted(g.name for g in list_groups(store)) == sorted([a.group, b.group, c.group])

    bspec = get_spec(MODEL)
    for changed in (dataclasses.replace(bspec, input_size=bspec.input_size + 14),
                    dataclasses.replace(bspec, mean=(0.5, 0.5, 0.5)),
                    dataclasses.replace(bspec, intensity="none")):
        assert group_name(MODEL, feature_spec(changed)) != group_name(MODEL, feature_spec(bspec))

    zgroup = zarr.open_group(store / a.group, mode="r+")
    spec = dict(zgroup.attrs["spec"])
    tampered = {**spec, "preprocess": {**spec["preprocess"], "size": 64}}
    zgroup.attrs["spec"] = tampered  # attributes no longer hash to their recorded sha
    with pytest.raises(StoreError, match="refusing"):
        extract_features(manifest, MODEL, chunk_rows=2)
    zgroup.attrs["spec_sha256"] = spec_sha256(tampered)  # consistent, but not the group's key
    with pytest.raises(StoreError, match="does not match the hash"):
        extract_features(manifest, MODEL, chunk_rows=2)


def test_load_features_selects_orders_and_explains(tmp_path):
    manifest = write_cohort(tmp_path, 6)
    store = tmp_path / "features.zarr"
    extract_features(manifest, MODEL, chunk_rows=4)
    ids, X = load_features(store, MODEL, manifest, view="mean")
    assert ids.tolist() == [f"id{i:03d}" for i in range(6)] and X.shape == (6, 16) and X.dtype == np.float32
    np.testing.assert_allclose(X, _reference(manifest)["mean"], rtol=2e-3, atol=2e-3)

    sub_ids, sub = load_features(store, MODEL, ["id004", "id001"])
    assert sub_ids.tolist() == ["id004", "id001"]
    np.testing.assert_array_equal(sub, load_features(store, MODEL)[1][[4, 1]])
    with pytest.raises(StoreError, match=r"1 of 2 images not embedded.*featcache extract"):
        load_features(store, MODEL, ["id001", "nope"])
    with pytest.raises(StoreError, match="no dinov2-s-tiny features with view 'proj'"):
        load_features(store, MODEL, view="proj")
    with pytest.raises(StoreError, match="no densenet121-tiny features.*run `featcache extract"):
        load_features(store, "densenet121-tiny")

    extract_features(manifest, MODEL, chunk_rows=4, dtype="float32")
    with pytest.raises(StoreError, match="several dinov2-s-tiny groups match"):
        load_features(store, MODEL, manifest)
    ids32, X32 = load_features(store, MODEL, manifest, view="mean", dtype="float32")
    np.testing.assert_allclose(X32, X, atol=2e-3)
    assert find_feature_group(store, MODEL, dtype="float16").spec["dtype"] == "float16"


def test_changed_crop_is_reembedded_and_stale_rows_never_served(tmp_path):
    manifest = write_cohort(tmp_path, 5)
    extract_features(manifest, MODEL, chunk_rows=2)
    before = load_features(tmp_path / "features.zarr", MODEL, manifest)[1]
    old = manifest.read_text()
    manifest.write_text(old.replace("id002,img002.png,p1,C0,,,,", "id002,img002.png,p1,C0,2,2,30,30"))
    with pytest.raises(StoreError, match="1 images changed path or crop"):
        load_features(tmp_path / "features.zarr", MODEL, manifest)
    result = extract_features(manifest, MODEL, chunk_rows=2)
    assert (result.embedded, result.changed, result.added) == (1, ["id002"], 0)
    after = load_features(tmp_path / "features.zarr", MODEL, manifest)[1]
    np.testing.assert_array_equal(np.delete(after, 2, 0), np.delete(before, 2, 0))
    np.testing.assert_allclose(after[2], _reference(manifest)["cls"][2], rtol=2e-3, atol=2e-3)
    assert not np.allclose(after[2], before[2])


def test_hdf5_export_round_trip(tmp_path):
    manifest = write_cohort(tmp_path, 7, broken=(5,))
    store = tmp_path / "features.zarr"
    result = extract_features(manifest, MODEL, chunk_rows=3, on_error="skip")
    out = tmp_path / "features.h5"
    run = CliRunner().invoke(app, ["export", "--store", str(store), "--to", str(out), "--model", MODEL])
    assert run.exit_code == 0, run.output
    group = RowGroup.open(store, result.group)
    with h5py.File(out, "r") as h5:
        node = h5[result.group]
        assert json.loads(node.attrs["spec"]) == group.spec and node.attrs["kind"] == "features"
        assert node["image_id"].asstr()[:].tolist() == group.read("image_id").tolist()
        assert node["skip_reason"].asstr()[5] == group.read("skip_reason")[5] != ""
        for view in ("cls", "mean"):
            np.testing.assert_array_equal(node[view][:], group.read(view))  # NaN row of the skipped image too
        np.testing.assert_array_equal(node["written"][:], group.read("written"))
    assert not list(tmp_path.glob(".features.h5*"))  # temp file renamed away
