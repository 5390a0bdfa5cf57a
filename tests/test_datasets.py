"""Dataset specs and builders: each builder on a small metadata file in its dataset's official layout."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featcache import datasets
from featcache.datasets import build_manifest, get_dataset, get_task, list_datasets, list_tasks
from featcache.errors import ManifestError
from featcache.manifest import load_manifest, validate
from featcache.synth import write_dicom

PIXELS = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)


def _csv(path, header: list[str], rows: list[dict], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def _png(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((PIXELS * 255).astype(np.uint8)).save(path)


def _dicom(path, patient: str, uid: str, modality: str = "DX") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, PIXELS, patient_id=patient, image_id=uid, modality=modality)


def _rows(manifest_path) -> dict[str, dict[str, str]]:
    return {row["image_id"]: row for row in load_manifest(manifest_path).rows}


# --- specs --------------------------------------------------------------------------------------------------


def test_builtin_specs_and_tasks():
    assert list_datasets() == [
        "aiforcovid",
        "cocross",
        "covid19_ar",
        "covid19_ny_sbu",
        "covid_chestxray",
        "synthetic",
    ]
    assert sorted(list_tasks()) == sorted(
        ["AFC", "AFC_death", "CAR", "CoCross", "NY", "NY_icu", "COVIDX_death", "COVIDX_icu", "SYN"]
    )
    afc = get_task("AFC")
    assert (afc.dataset, afc.column, afc.cv, afc.k, afc.has_centers) == (
        "aiforcovid",
        "Prognosis",
        "loco",
        6,
        True,
    )
    assert afc.classes == {"MILD": 0, "SEVERE": 1} and afc.positive == "SEVERE" and afc.negative == "MILD"
    ny = get_task("NY")
    assert (ny.column, ny.positive, ny.cv, ny.k, ny.has_centers) == (
        "last.status",
        "deceased",
        "kfold",
        5,
        False,
    )
    assert get_task("NY_icu").classes == {"False": 0, "True": 1}
    assert get_task("CAR").column == "ICU Admit" and get_task("CAR").positive == "1"
    assert get_task("CoCross").classes == {"Alive": 0, "Death": 1}
    assert get_task("COVIDX_death").positive == "N" and get_task("COVIDX_icu").positive == "Y"
    assert get_task("SYN").has_centers and get_task("SYN").cv == "kfold"
    afc_spec = get_dataset("aiforcovid")
    assert afc_spec.published["images"] == 1585 and afc_spec.centers == ("A", "B", "C", "D", "E", "F")
    assert get_dataset("covid19_ar").published == {
        "source": get_dataset("covid19_ar").published["source"],
        "patients": 105,
        "images": 233,
    }
    for name in list_datasets():
        spec = get_dataset(name)
        assert spec.source and spec.licence and spec.obtain, name
    with pytest.raises(ManifestError, match="unknown dataset 'nope'"):
        get_dataset("nope")
    with pytest.raises(ManifestError, match="unknown task 'NOPE'"):
        get_task("NOPE")


def test_classify_normalises_raw_values():
    car, icu, death = get_task("CAR"), get_task("NY_icu"), get_task("AFC_death")
    assert [car.classify(v) for v in ("1", "1.0", " 0 ", "Y", "no")] == ["1", "1", "0", "1", "0"]
    assert [icu.classify(v) for v in ("TRUE", "false", "1", "")] == ["True", "False", "True", ""]
    assert [death.classify(v) for v in ("0", "1", "DEATH", "alive", "NaN", None)] == [
        "ALIVE",
        "DEATH",
        "DEATH",
        "ALIVE",
        "",
        "",
    ]
    assert car.classify("maybe") is None and death.classify("2") is None


def _spec_text(**override: str) -> str:
    fields = {
        "name": "mine",
        "positive": '"yes"',
        "classes": '{"no": 0, "yes": 1}',
        "scheme": "kfold",
        "key": "MINE",
        "layout": "table",
    } | override
    return f"""
name: {fields["name"]}
title: t
source: s
licence: l
obtain: o
layout: {fields["layout"]}
metadata: {{files: [meta.csv], id_column: id, patient_column: pid, center: X}}
images: {{dirs: [imgs], pattern: "{{id}}.png"}}
cv: {{scheme: {fields["scheme"]}, k: 3}}
tasks:
  {fields["key"]}: {{column: outcome, classes: {fields["classes"]}, positive: {fields["positive"]}}}
"""


def test_user_specs_from_env(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(_spec_text())
    (tmp_path / "cocross.yaml").write_text(_spec_text(name="cocross", key="CoCross"))
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
    assert "mine" in list_datasets()
    task = get_task("MINE")
    assert (task.dataset, task.k, task.classes) == ("mine", 3, {"no": 0, "yes": 1})
    assert get_task("CoCross").column == "outcome"  # the user's spec replaces the built-in one

    _csv(tmp_path / "data/meta.csv", ["id", "pid", "outcome"], [{"id": "a", "pid": "p", "outcome": "YES"}])
    _png(tmp_path / "data/imgs/a.png")
    report = build_manifest("mine", tmp_path / "data", tmp_path / "data/m.csv")
    assert _rows(report.manifest)["a"]["MINE"] == "yes"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"positive": "maybe"}, "classes must map one class to 0 and 'maybe' to 1"),
        ({"classes": '{"no": 0, "yes": 2}'}, "classes must map"),
        ({"classes": "{no: 0, yes: 1}"}, "tasks.MINE: quote 'false'-like words, YAML reads them as booleans"),
        ({"scheme": "holdout"}, "cv.scheme 'holdout' is not one of"),
        ({"scheme": "loco"}, "leave-one-center-out needs metadata.center_column"),
        ({"layout": "zip"}, "layout 'zip' is not one of"),
        ({"key": "AFC"}, "task key 'AFC' is defined in both"),
    ],
)
def test_bad_user_specs_name_the_file(tmp_path, monkeypatch, override, message):
    (tmp_path / "mine.yaml").write_text(_spec_text(**override))
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
    with pytest.raises(ManifestError, match=message):
        list_datasets()


def test_env_folder_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(ManifestError, match="not a folder"):
        list_datasets()


# --- builders, one per official layout ----------------------------------------------------------------------

AFC_COLUMNS = ["ImageFile", "Hospital", "Age", "Sex", "Temp_C", "Cough", "Position", "Prognosis", "Death"]


def test_build_aiforcovid(tmp_path):
    root = tmp_path / "AIforCOVID"
    first = [
        {"ImageFile": "P_1_1", "Hospital": "A", "Age": 70, "Sex": "M", "Prognosis": "SEVERE", "Death": 1},
        {"ImageFile": "P_1_2", "Hospital": "A", "Age": 55, "Sex": "F", "Prognosis": "MILD", "Death": 0},
        {"ImageFile": "P_2_1", "Hospital": "B", "Age": 61, "Sex": "M", "Prognosis": "mild", "Death": ""},
        {"ImageFile": "P_2_9", "Hospital": "B", "Age": 40, "Sex": "F", "Prognosis": "MILD", "Death": 0},
    ]
    _csv(root / "AIforCOVID.csv", AFC_COLUMNS, first, delimiter=";")  # an Italian-locale spreadsheet export
    _csv(
        root / "AIforCOVID_r2.csv",
        AFC_COLUMNS,
        [{"ImageFile": "P_6_1", "Hospital": "F", "Prognosis": "SEVERE", "Death": "1.0"}],
    )
    for folder, name in [("imgs", "P_1_1"), ("imgs", "P_1_2"), ("imgs", "P_2_1"), ("imgs_r2", "P_6_1")]:
        _dicom(root / folder / f"{name}.dcm", name, name)
    _dicom(root / "imgs" / "P_3_1.dcm", "P_3_1", "P_3_1")  # present, in no table

    report = build_manifest("aiforcovid", root, root / "manifest.csv")
    rows = _rows(report.manifest)
    assert sorted(rows) == ["P_1_1", "P_1_2", "P_2_1", "P_6_1"]
    assert rows["P_1_1"] == {
        "image_id": "P_1_1",
        "path": "imgs/P_1_1.dcm",
        "patient_id": "P_1_1",
        "center": "A",
        "AFC": "SEVERE",
        "AFC_death": "DEATH",
    }
    assert rows["P_2_1"]["AFC"] == "MILD" and rows["P_2_1"]["AFC_death"] == ""
    assert rows["P_6_1"]["path"] == "imgs_r2/P_6_1.dcm" and rows["P_6_1"]["AFC_death"] == "DEATH"
    assert report.missing == ["P_2_9 (AIforCOVID.csv:5: P_2_9.dcm)"]
    assert report.unlisted == ["imgs/P_3_1.dcm"]
    assert report.validation.ok and report.validation.nan == {"AFC": 0, "AFC_death": 1}
    table = {what: (found, published) for what, found, published in report.comparison()}
    assert table["images"] == (4, 1585) and table["AFC MILD"] == (2, 839) and table["AFC SEVERE"] == (2, 746)
    assert table["AFC center A SEVERE"] == (1, 85) and table["AFC center F MILD"] == (0, 544)
    assert validate(report.manifest).ok  # paths resolve from the manifest's folder


NY_COLUMNS = [
    "to_patient_id",
    "covid19_statuses",
    "visit_start_datetime",
    "last.status",
    "age.splits",
    "gender_concept_name",
    "is_icu",
    "was_ventilated",
]


def test_build_ny_sbu(tmp_path):
    root = tmp_path / "ny"
    _csv(
        root / "deidentified_overlap_tcia.csv",
        NY_COLUMNS,
        [
            {"to_patient_id": "A000001", "last.status": "deceased", "is_icu": "True"},
            {"to_patient_id": "A000002", "last.status": "discharged", "is_icu": "False"},
            {"to_patient_id": "A000003", "last.status": "discharged", "is_icu": ""},
        ],
    )
    tree = root / "COVID-19-NY-SBU"
    _dicom(tree / "A000001/01-01-2020-CHEST AP-1/1.000000-AP-1/1-1.dcm", "A000001", "u1")
    _dicom(tree / "A000001/01-03-2020-CHEST AP-2/1.000000-AP-2/1-1.dcm", "A000001", "u2")
    _dicom(tree / "A000001/01-04-2020-CT CHEST-3/2.000000-AXIAL-3/1-1.dcm", "A000001", "u3", modality="CT")
    _dicom(tree / "A000002/02-01-2020-CHEST PA-4/1.000000-PA-4/1-1.dcm", "A000002", "u4", modality="CR")
    _dicom(tree / "A000009/02-01-2020-CHEST PA-5/1.000000-PA-5/1-1.dcm", "A000009", "u5")
    (tree / "A000002/notes.dcm").write_bytes(b"not dicom")

    report = build_manifest("covid19_ny_sbu", root, root / "manifest.csv")
    m = load_manifest(report.manifest)
    assert len(m) == 3 and set(m.patients(m.ids)) == {"A000001", "A000002"}
    assert all(image_id.startswith("1.2.826.0.1.3680043.8.498.") for image_id in m.ids)  # SOPInstanceUIDs
    assert set(m.centers(m.ids)) == {"SBU"}
    ids, y = m.labels("NY")
    assert sorted(zip(m.patients(ids), y.tolist(), strict=True)) == [
        ("A000001", 1),
        ("A000001", 1),
        ("A000002", 0),
    ]
    assert m.labels("NY_icu")[1].tolist().count(1) == 2
    assert report.skipped == {"modality CT": 1, "unreadable DICOM": 1}
    assert report.missing == ["A000003 (deidentified_overlap_tcia.csv:4: no CR/DX images)"]
    assert report.unlisted == ["COVID-19-NY-SBU/A000009/02-01-2020-CHEST PA-5/1.000000-PA-5/1-1.dcm"]
    assert report.comparison()[:2] == [("images", 3, None), ("patients", 2, 1384)]
    assert validate(report.manifest).ok


def test_build_covid19_ar(tmp_path, monkeypatch):
    root = tmp_path / "ar"
    header = ["PATIENT_ID", "Age", "Gender", "ICU Admit", "Mortality"]
    _csv(
        root / "COVID-19-AR-clinical.csv",
        header,
        [
            {"PATIENT_ID": "COVID-19-AR-16406491", "ICU Admit": "1"},
            {"PATIENT_ID": "COVID-19-AR-16406492", "ICU Admit": "0.0"},
            {"PATIENT_ID": "COVID-19-AR-16406493", "ICU Admit": "unknown"},
        ],
    )
    for i, pid in enumerate(["COVID-19-AR-16406491", "COVID-19-AR-16406492", "COVID-19-AR-16406493"]):
        _dicom(root / "COVID-19-AR" / pid / "study" / "series" / "1-1.dcm", pid, f"ar{i}", modality="CR")
    with pytest.raises(ManifestError, match=r"write the manifest in .*ar or a folder above it.*FEATCACHE_DATA_ROOTS"):
        build_manifest("covid19_ar", root, tmp_path / "out" / "manifest.csv")
    monkeypatch.setenv("FEATCACHE_DATA_ROOTS", str(root))  # the opt-in for images apart from the manifest
    report = build_manifest("covid19_ar", root, tmp_path / "out" / "manifest.csv")
    rows = {row["patient_id"]: row for row in load_manifest(report.manifest).rows}
    assert {pid: row["CAR"] for pid, row in rows.items()} == {
        "COVID-19-AR-16406491": "1",
        "COVID-19-AR-16406492": "0",
        "COVID-19-AR-16406493": "",
    }
    assert rows["COVID-19-AR-16406491"]["path"].startswith("../ar/COVID-19-AR/")  # relative to the manifest
    assert report.unmapped == {"CAR": {"unknown": 1}}
    assert validate(report.manifest).ok


def test_build_cocross(tmp_path):
    root = tmp_path / "cc"
    _csv(
        root / "CoCross.csv",
        ["ID", "Age", "ICU Outcome"],
        [
            {"ID": 101, "ICU Outcome": "Death"},
            {"ID": 102, "ICU Outcome": "Alive"},
            {"ID": 103, "ICU Outcome": "alive"},
        ],
    )
    for i in (101, 102, 103):
        _png(root / "imgs" / f"{i}.jpeg")
    report = build_manifest("cocross", root, root / "manifest.csv")
    ids, y = load_manifest(report.manifest).labels("CoCross")
    assert ids == ["101", "102", "103"] and y.tolist() == [1, 0, 0]
    assert report.missing == [] and report.unlisted == []


IEEE_COLUMNS = [
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "RT_PCR_positive",
    "survival",
    "intubated",
    "intubation_present",
    "went_icu",
    "in_icu",
    "needed_supplemental_O2",
    "extubated",
    "temperature",
    "pO2_saturation",
    "leukocyte_count",
    "neutrophil_count",
    "lymphocyte_count",
    "view",
    "modality",
    "date",
    "location",
    "folder",
    "filename",
    "doi",
    "url",
    "license",
    "clinical_notes",
    "other_notes",
]


def test_build_covid_chestxray(tmp_path):
    root = tmp_path / "covid-chestxray-dataset"
    covid = "Pneumonia/Viral/COVID-19"
    rows = [
        {
            "patientid": 2,
            "offset": 0,
            "finding": covid,
            "survival": "Y",
            "went_icu": "N",
            "view": "PA",
            "modality": "X-ray",
            "folder": "images",
            "filename": "a.jpg",
            "clinical_notes": "cough, fever",
        },
        {
            "patientid": 2,
            "offset": 3,
            "finding": covid,
            "survival": "Y",
            "went_icu": "",
            "view": "AP Supine",
            "modality": "X-ray",
            "folder": "images",
            "filename": "b.jpg",
        },
        {
            "patientid": 7,
            "offset": 1,
            "finding": covid,
            "survival": "N",
            "went_icu": "Y",
            "view": "AP",
            "modality": "X-ray",
            "folder": "images",
            "filename": "c.png",
        },
        {
            "patientid": 7,
            "finding": covid,
            "survival": "N",
            "view": "L",
            "modality": "X-ray",
            "folder": "images",
            "filename": "d.jpg",
        },
        {
            "patientid": 9,
            "finding": "Pneumonia/Bacterial",
            "survival": "Y",
            "view": "PA",
            "modality": "X-ray",
            "folder": "images",
            "filename": "e.jpg",
        },
        {
            "patientid": 9,
            "finding": covid,
            "view": "Axial",
            "modality": "CT",
            "folder": "volumes",
            "filename": "f.nii.gz",
        },
        {
            "patientid": 11,
            "finding": covid,
            "survival": "N",
            "view": "PA",
            "modality": "X-ray",
            "folder": "images",
            "filename": "gone.jpg",
        },
    ]
    _csv(root / "metadata.csv", IEEE_COLUMNS, rows)
    for name in ("a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg", "z.jpg"):
        _png(root / "images" / name)
    report = build_manifest("covid_chestxray", root, root / "manifest.csv")
    m = load_manifest(report.manifest)
    assert m.ids == ["a.jpg", "b.jpg", "c.png"] and m.patients(m.ids) == ["2", "2", "7"]
    ids, y = m.labels("COVIDX_death")
    assert ids == ["a.jpg", "b.jpg", "c.png"] and y.tolist() == [0, 0, 1]  # survival N = died = positive
    assert m.labels("COVIDX_icu")[0] == ["a.jpg", "c.png"]
    assert report.skipped == {
        "modality not in ['X-ray']": 1,
        "view not in ['PA', 'AP', 'AP Supine', 'AP semi erect']": 1,
        "finding lacks 'COVID-19'": 1,
    }
    assert report.missing == ["gone.jpg (metadata.csv:8: gone.jpg)"]
    assert report.unlisted == ["images/z.jpg"]  # d.jpg and e.jpg are listed (then filtered), not unlisted


def test_build_synthetic_round_trip(synth_cohort, tmp_path):
    original = load_manifest(synth_cohort(patients=6, size=48, centers=2, seed=3, to=tmp_path / "syn"))
    report = build_manifest("synthetic", tmp_path / "syn", tmp_path / "syn" / "rebuilt.csv")
    rebuilt = load_manifest(report.manifest)
    assert rebuilt.rows == [{k: v for k, v in row.items() if k != "view"} for row in original.rows]
    assert report.missing == [] and report.unlisted == []


# --- builder errors -----------------------------------------------------------------------------------------


def test_metadata_missing_points_at_spreadsheet(tmp_path):
    (tmp_path / "AIforCOVID.xlsx").write_bytes(b"PK")
    with pytest.raises(
        ManifestError, match=r"no metadata file matching \['AIforCOVID\*\.csv'\].*AIforCOVID\.xlsx"
    ):
        build_manifest("aiforcovid", tmp_path, tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="data root is not a folder"):
        build_manifest("aiforcovid", tmp_path / "absent", tmp_path / "m.csv")


def test_metadata_column_missing_names_file_and_column(tmp_path):
    _csv(tmp_path / "CoCross.csv", ["ID", "Outcome"], [{"ID": 1, "Outcome": "Death"}])
    with pytest.raises(ManifestError, match=r"CoCross\.csv: no column\(s\) \['ICU Outcome'\]"):
        build_manifest("cocross", tmp_path, tmp_path / "m.csv")


def test_no_images_found(tmp_path):
    _csv(tmp_path / "CoCross.csv", ["ID", "ICU Outcome"], [{"ID": 1, "ICU Outcome": "Death"}])
    with pytest.raises(
        ManifestError, match=r"no cocross images found in \['imgs'\] \(1 listed images missing"
    ):
        build_manifest("cocross", tmp_path, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_patient_listed_twice_in_per_patient_metadata(tmp_path):
    _csv(
        tmp_path / "deidentified_overlap_tcia.csv",
        NY_COLUMNS,
        [
            {"to_patient_id": "A1", "last.status": "deceased"},
            {"to_patient_id": "A1", "last.status": "discharged"},
        ],
    )
    with pytest.raises(ManifestError, match=r"patients listed more than once: A1 \(.*csv:2, .*csv:3\)"):
        build_manifest("covid19_ny_sbu", tmp_path, tmp_path / "m.csv")


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_datasets_and_build(tmp_path, monkeypatch):
    from cli import _common
    from cli.featcache_app import app

    monkeypatch.setattr(_common.console, "width", 200)
    runner = CliRunner()
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0, result.output
    for word in (
        "aiforcovid",
        "AFC_death",
        "NY_icu",
        "COVIDX_death",
        "loco k=6",
        "kfold k=5",
        "collection/covid-19-ny-sbu",
    ):
        assert word in result.output

    root = tmp_path / "cc"
    _csv(
        root / "CoCross.csv",
        ["ID", "ICU Outcome"],
        [{"ID": 1, "ICU Outcome": "Death"}, {"ID": 2, "ICU Outcome": "Alive"}, {"ID": 3, "ICU Outcome": "?"}],
    )
    _png(root / "imgs/1.jpeg")
    _png(root / "imgs/3.jpeg")
    _png(root / "imgs/4.jpeg")
    out = tmp_path / "m.csv"
    args = ["manifest", "build", "--dataset", "cocross", "--root", str(root), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    for text in (
        "listed in the metadata but missing: 1",
        "2 (CoCross.csv:3: 2.jpeg)",
        "images present but unlisted: 1",
        "imgs/4.jpeg",
        "values outside the mapping",
        "'?' x1",
    ):
        assert text in result.output

    result = runner.invoke(
        app, ["manifest", "build", "--dataset", "nope", "--root", str(root), "--out", str(out)]
    )
    assert isinstance(result.exception, ManifestError)

    # A manifest that builds but breaks the layout (one id listed twice) is written, reported, and fails.
    _csv(root / "CoCross.csv", ["ID", "ICU Outcome"], [{"ID": 1, "ICU Outcome": "Death"}] * 2)
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ManifestError) and "duplicate_id" in str(result.exception)
    assert "rows 2, 3" in result.output
