"""The synthetic cohort: counts, imbalance, decodable PNG and DICOM, a valid manifest, outcome signal."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pydicom
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from typer.testing import CliRunner

from featcache.datasets import get_task
from featcache.errors import ManifestError
from featcache.manifest import load_manifest, validate
from featcache.synth import make_cohort


@pytest.fixture(scope="module")
def png_cohort(tmp_path_factory):
    return load_manifest(make_cohort(tmp_path_factory.mktemp("png"), patients=40, size=64, seed=1))


def _pixels(m, image_id) -> np.ndarray:
    return np.asarray(Image.open(m.abspath(image_id)), dtype=np.float32) / 255.0


def test_counts_imbalance_and_valid_manifest(tmp_path):
    m = load_manifest(
        make_cohort(tmp_path, patients=25, positive_rate=0.2, images_per_patient=(2, 4), centers=4, size=48)
    )
    report = validate(m)
    assert report.ok, report.summary()
    assert report.patients == 25 and set(report.centers) == {"C1", "C2", "C3", "C4"}
    per_patient = Counter(m.patients(m.ids))
    assert set(per_patient.values()) <= {2, 3, 4} and len(m) == sum(per_patient.values())
    ids, y = m.labels(get_task("SYN"))
    label = dict(zip(m.patients(ids), y.tolist(), strict=True))
    assert len(ids) == len(m) and sum(label.values()) == 5  # exactly round(25 * 0.2) DEATH patients
    assert {c for c, positive in zip(m.centers(ids), y, strict=True) if positive} == set(report.centers)
    for image_id in m.ids:
        x0, y0, x1, y1 = m.bbox(image_id)
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        assert m.abspath(image_id).parts[-3:-1] == (m.centers([image_id])[0], m.patients([image_id])[0])


def test_same_seed_same_files(tmp_path):
    one = make_cohort(tmp_path / "a", patients=5, size=40, seed=7)
    two = make_cohort(tmp_path / "b", patients=5, size=40, seed=7)
    other = make_cohort(tmp_path / "c", patients=5, size=40, seed=8)
    assert one.read_bytes() == two.read_bytes() != other.read_bytes()
    for rel in load_manifest(one).column("path"):
        assert (one.parent / rel).read_bytes() == (two.parent / rel).read_bytes()


def test_png_decodes(png_cohort, tmp_path):
    image = Image.open(png_cohort.abspath(png_cohort.ids[0]))
    assert image.mode == "L" and image.size == (64, 64)
    m16 = load_manifest(make_cohort(tmp_path, patients=2, centers=1, size=40, fmt="png16"))
    image = Image.open(m16.abspath(m16.ids[0]))
    assert image.mode == "I;16" and np.asarray(image).max() > 255


def test_dicom_decodes_with_monochrome1_centers(tmp_path):
    m = load_manifest(make_cohort(tmp_path, patients=4, centers=2, size=40, fmt="dicom"))
    assert validate(m).ok
    seen = set()
    for image_id in m.ids:
        ds = pydicom.dcmread(m.abspath(image_id))
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.Rows, ds.Columns) == (16, 12, 40, 40)
        assert ds.PatientID == m.patients([image_id])[0] and ds.Modality == "DX"
        pixels = ds.pixel_array.astype(float)
        assert pixels.max() <= 4095
        air, chest = pixels[:3, :3].mean(), pixels[18:22, 18:22].mean()
        inverted = ds.PhotometricInterpretation == "MONOCHROME1"
        assert (air > chest) if inverted else (air < chest)  # stored values inverted for MONOCHROME1
        seen.add((m.centers([image_id])[0], ds.PhotometricInterpretation))
    assert seen == {("C1", "MONOCHROME2"), ("C2", "MONOCHROME1")}


def test_featcache_imaging_decodes_both_formats(tmp_path):
    imaging = pytest.importorskip("featcache.imaging")
    for fmt in ("png", "dicom"):
        m = load_manifest(make_cohort(tmp_path / fmt, patients=2, centers=2, size=40, fmt=fmt))
        for image_id in m.ids:
            image = imaging.decode(m.abspath(image_id))
            assert image.shape == (40, 40) and 0.0 <= image.min() and image.max() <= 1.0
            assert image[:3, :3].mean() < image[18:22, 18:22].mean()  # air dark after decoding


def test_positive_patients_have_more_opacity(png_cohort):
    m = png_cohort
    ids, y = m.labels(get_task("SYN"))
    lower_lungs = []
    for image_id in ids:
        x0, y0, x1, y1 = m.bbox(image_id)
        lower_lungs.append(_pixels(m, image_id)[(y0 + y1) // 2 : y1, x0:x1].mean())
    lower_lungs = np.array(lower_lungs)
    assert lower_lungs[y == 1].mean() > lower_lungs[y == 0].mean() + 0.02


def test_linear_probe_on_pixels_beats_chance(png_cohort):
    m = png_cohort
    ids, y = m.labels(get_task("SYN"))
    x = np.stack([_pixels(m, i).reshape(16, 4, 16, 4).mean(axis=(1, 3)).ravel() for i in ids])
    scores = cross_val_predict(
        LogisticRegression(max_iter=2000),
        x,
        y,
        groups=m.patients(ids),
        cv=GroupKFold(4),
        method="predict_proba",
    )[:, 1]
    assert roc_auc_score(y, scores) > 0.7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": "jpeg"},
        {"patients": 2, "centers": 3},
        {"positive_rate": 1.5},
        {"images_per_patient": (3, 2)},
        {"size": 8},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_cohort(tmp_path, **kwargs)


def test_cli_synth(tmp_path):
    from cli.featcache_app import app

    runner = CliRunner()
    out = tmp_path / "cohort"
    args = [
        "synth",
        "--out",
        str(out),
        "--patients",
        "6",
        "--positive-rate",
        "0.5",
        "--format",
        "dicom",
        "--centers",
        "2",
        "--size",
        "40",
        "--seed",
        "3",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    m = load_manifest(out / "manifest.csv")
    assert m.abspath(m.ids[0]).suffix == ".dcm" and sum(m.labels(get_task("SYN"))[1]) > 0
    assert "valid" in result.output

    result = runner.invoke(app, ["synth", "--out", str(out), "--patients", "2", "--centers", "3"])
    assert result.exit_code == 2 and "centers" in result.output
    result = runner.invoke(app, ["manifest", "validate", str(tmp_path / "absent.csv")])
    assert isinstance(result.exception, ManifestError)
