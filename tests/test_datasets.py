"""Dataset specs and builders: each builder on a small metadata file in its dataset's official layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import openpyxl
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from featcache import datasets
from featcache.builders import LATER, OwnCohort, build_manifest, build_own, view_of
from featcache.datasets import get_dataset, get_task, list_datasets, list_tasks
from featcache.errors import ManifestError, UsageError
from featcache.manifest import load_manifest, validate
from featcache.synth import write_dicom

PIXELS = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)


@pytest.fixture(autouse=True)
def _fresh_tasks(monkeypatch):
    monkeypatch.setattr(datasets, "_ADHOC", {})  # each test starts like a new process


def _csv(path, header: list[str], rows: list[dict], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def _png(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((PIXELS * 255).astype(np.uint8)).save(path)


def _dicom(path, patient: str, uid: str, modality: str = "DX", view: str = "PA", date: str = "",
           series: str = "") -> None:
    """A 16x16 radiograph; ``view`` is its ViewPosition ('' = absent), ``series`` its SeriesDescription."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, PIXELS, patient_id=patient, image_id=uid, modality=modality, view=view or "PA")
    ds = pydicom.dcmread(path)
    if not view:
        del ds.ViewPosition
    if date:
        ds.StudyDate = date
    if series:
        ds.SeriesDescription = series
    ds.save_as(path)


def _xlsx(path, sheets: dict[str, list[list]]) -> None:
    """An Excel workbook written with openpyxl: sheet name -> rows (title lines included as given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    book.save(path)


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
    assert get_dataset("covid19_ar").published["patients"] == 105
    assert get_dataset("cocross").metadata.longitudinal and get_dataset("cocross").metadata.sheet == "Data"
    assert "healthcare10020276" in get_dataset("cocross").source
    assert {n: get_dataset(n).images.per_patient for n in list_datasets()} == {
        "aiforcovid": "first", "cocross": "first", "covid19_ar": "first", "covid19_ny_sbu": "first",
        "covid_chestxray": "all", "synthetic": "all"}
    for name in list_datasets():
        spec = get_dataset(name)
        assert spec.source and spec.licence and spec.obtain and spec.images.per_patient_why, name
        assert "as CSV" not in spec.obtain, name  # releases are read as shipped
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


# --- views ----------------------------------------------------------------------------------------------------


def test_view_spellings():
    frontal = ["PA", "AP", "AP Supine", "AP erect", "AP semi erect", "ap"]
    assert {view_of(v) for v in frontal} == {"frontal"}
    assert {view_of(v) for v in ("L", "LL", "RL", "LATERAL", "Lateral")} == {"lateral"}
    assert view_of("", "Lateral L") == "lateral" and view_of("", "", "CHEST PA") == "frontal"
    assert view_of("", "", "CHEST PA AND LATERAL") == ""  # a two-view study says nothing of one image
    assert view_of("", "CHEST 1 VIEW") == "" and view_of("Axial") == ""


# --- builders, one per release as shipped ---------------------------------------------------------------------

AFC_COLUMNS = ["ImageFile", "Hospital", "Age", "Sex", "Temp_C", "Cough", "Position", "Prognosis", "Death"]


def test_build_aiforcovid_from_its_three_workbooks(tmp_path):
    root = tmp_path / "AIforCOVID"
    _xlsx(root / "AIforCOVID.xlsx", {"Sheet1": [
        AFC_COLUMNS,
        ["P_42", "A", 70, "M", 37.5, 1, "supine", "SEVERE", 1],
        ["P_43", "A", 55, "F", None, 0, "erect", "MILD", 0],
        ["P_44", "B", 61, "M", None, 0, "erect", "MILD", None],
        ["P_45", "B", 40, "F", None, 0, "erect", "MILD", 0],
    ]})
    _xlsx(root / "AIforCOVID_r2.xlsx", {"Sheet1": [AFC_COLUMNS, ["P_1_142", "C", 80, "M", None, 1, "", "SEVERE", 1.0]]})
    _xlsx(root / "AIforCOVID_r3.xlsx", {"Sheet1": [AFC_COLUMNS, ["P_3_377", "F", 66, "F", None, 0, "", "MILD", 0.0]]})
    for folder, name in [("imgs", "P_42"), ("imgs", "P_43"), ("imgs", "P_44"), ("imgs_r2", "P_1_142"),
                         ("imgs_r3", "P_3_377")]:
        _dicom(root / folder / f"{name}.dcm", name, name)
    _dicom(root / "imgs" / "P_99.dcm", "P_99", "P_99")  # present, in no table

    report = build_manifest("aiforcovid", root, root / "manifest.csv")
    rows = _rows(report.manifest)
    assert rows == {
        "P_1_142": {"image_id": "P_1_142", "path": "imgs_r2/P_1_142.dcm", "patient_id": "P_1_142", "center": "C",
                    "AFC": "SEVERE", "AFC_death": "DEATH"},
        "P_3_377": {"image_id": "P_3_377", "path": "imgs_r3/P_3_377.dcm", "patient_id": "P_3_377", "center": "F",
                    "AFC": "MILD", "AFC_death": "ALIVE"},
        "P_42": {"image_id": "P_42", "path": "imgs/P_42.dcm", "patient_id": "P_42", "center": "A",
                 "AFC": "SEVERE", "AFC_death": "DEATH"},
        "P_43": {"image_id": "P_43", "path": "imgs/P_43.dcm", "patient_id": "P_43", "center": "A",
                 "AFC": "MILD", "AFC_death": "ALIVE"},
        "P_44": {"image_id": "P_44", "path": "imgs/P_44.dcm", "patient_id": "P_44", "center": "B",
                 "AFC": "MILD", "AFC_death": ""},
    }
    assert report.missing == ["P_45 (AIforCOVID.xlsx[Sheet1]:5: P_45.dcm)"]
    assert report.unlisted == ["imgs/P_99.dcm"] and report.skipped == {"no file": 1}
    assert [name.rsplit("/", 1)[-1] for name in report.tables] == [
        "AIforCOVID.xlsx (sheet Sheet1)", "AIforCOVID_r2.xlsx (sheet Sheet1)", "AIforCOVID_r3.xlsx (sheet Sheet1)"]
    table = {what: (found, published) for what, found, published in report.comparison()}
    assert table["images"] == (5, 1585) and table["AFC MILD"] == (3, 839) and table["AFC SEVERE"] == (2, 746)
    assert table["AFC center A SEVERE"] == (1, 85) and table["AFC center F MILD"] == (1, 544)
    assert table["AFC_death images"] == (4, None) and table["AFC_death patients"] == (4, None)
    summary = json.loads(report.summary_path.read_text())
    assert report.summary_path == root / "manifest.summary.json"
    assert summary["tasks"]["AFC"]["centers"]["A"] == {"images": 2, "positives": 1, "negatives": 1}
    assert summary["tasks"]["AFC_death"] | {"centers": None, "classes": None} == {
        "images": 4, "patients": 4, "positives": 2, "negatives": 2, "positive": "DEATH", "negative": "ALIVE",
        "centers": None, "classes": None}
    assert {"what": "images", "found": 5, "published": 1585, "difference": -1580} in summary["comparison"]
    assert summary["skipped"] == {"no file": 1} and summary["unmatched_images"] == 1
    assert validate(report.manifest, tasks=get_dataset("aiforcovid").tasks.values()).ok

    (root / "AIforCOVID.csv").write_text("ImageFile,Hospital,Prognosis,Death\nP_42,A,SEVERE,1\n")
    with pytest.raises(ManifestError, match=r"AIforCOVID\.xlsx: the same table as AIforCOVID\.csv in another "
                                            r"format; keep one of them"):
        build_manifest("aiforcovid", root, root / "manifest.csv")


NY_TABLE = "deidentified_overlap_tcia.csv.cleaned.csv_20210806.csv"
NY_DICTIONARY = "deidentified_overlap_tcia.csv.cleaned.csv.template_20210806.csv"
NY_COLUMNS = ["to_patient_id", "covid19_statuses", "visit_start_datetime", "last.status", "age.splits",
              "gender_concept_name", "is_icu", "was_ventilated", "age.splits"]  # one name twice, as released


def _ny_release(root) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / NY_TABLE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(NY_COLUMNS)
        writer.writerow(["A000001", "positive", "2020-03-01", "deceased", "[70,80)", "MALE", "True", "1", "[70,80)"])
        writer.writerow(["A000002", "positive", "2020-03-02", "discharged", "[50,60)", "FEMALE", "False", "0",
                         "[50,60)"])
        writer.writerow(["A000003", "positive", "2020-03-03", "discharged", "[30,40)", "MALE", "", "0", "[30,40)"])
    _csv(root / NY_DICTIONARY, ["column_name", "column_type", "description"],
         [{"column_name": "to_patient_id", "column_type": "string", "description": "id"},
          {"column_name": "last.status", "column_type": "string", "description": "outcome"}])
    tree = root / "COVID-19-NY-SBU"
    _dicom(tree / "A000001/03-02-2020-NA-CHEST AP PORT-2/1.000000-AP-2/1-1.dcm", "A000001", "u2", date="20200302")
    _dicom(tree / "A000001/03-01-2020-NA-CHEST AP PORT-1/1.000000-AP-1/1-1.dcm", "A000001", "u1", date="20200301")
    _dicom(tree / "A000001/03-01-2020-NA-CHEST PA AND LAT-3/2.000000-LAT-3/1-1.dcm", "A000001", "u3", view="LL",
           date="20200301")
    _dicom(tree / "A000001/03-04-2020-NA-CT CHEST-4/2.000000-AXIAL-4/1-1.dcm", "A000001", "u4", modality="CT")
    _dicom(tree / "A000002/03-02-2020-NA-CHEST PA-5/1.000000-PA-5/1-1.dcm", "A000002", "u5", modality="CR")
    _dicom(tree / "A000009/03-02-2020-NA-CHEST PA-6/1.000000-PA-6/1-1.dcm", "A000009", "u6")
    (tree / "A000002/notes.dcm").write_bytes(b"not dicom")


def test_build_ny_sbu_as_released(tmp_path):
    root = tmp_path / "ny"
    _ny_release(root)
    report = build_manifest("covid19_ny_sbu", root, root / "manifest.csv")
    m = load_manifest(report.manifest)
    uid = {pydicom.dcmread(p).SOPInstanceUID: p.parent.parent.name for p in root.rglob("1-1.dcm")}
    assert sorted((uid[i], p) for i, p in zip(m.ids, m.patients(m.ids), strict=True)) == [
        ("03-01-2020-NA-CHEST AP PORT-1", "A000001"), ("03-02-2020-NA-CHEST PA-5", "A000002")]  # the first study
    assert set(m.centers(m.ids)) == {"SBU"}
    ids, y = m.labels(get_task("NY"))
    assert sorted(zip(m.patients(ids), y.tolist(), strict=True)) == [("A000001", 1), ("A000002", 0)]
    assert m.labels(get_task("NY_icu"))[1].tolist().count(1) == 1
    assert report.skipped == {"CT": 1, "not frontal": 1, "unreadable": 1, "no file": 1, LATER: 1}
    assert report.missing == [f"A000003 ({NY_TABLE}:4: no CR/DX images)"]
    assert report.unlisted == ["COVID-19-NY-SBU/A000009/03-02-2020-NA-CHEST PA-6/1.000000-PA-6/1-1.dcm"]
    assert report.tables == [str(root / NY_TABLE)]
    assert report.ignored == [f"{NY_DICTIONARY}: lacks the needed columns (e.g. a data dictionary)"]
    assert report.notes == []  # the twice-named column is not one the builder reads
    assert report.comparison()[:2] == [("images", 2, None), ("patients", 2, 1384)]

    every = build_manifest("covid19_ny_sbu", root, root / "all.csv", per_patient="all")
    assert every.validation.images == 3 and LATER not in every.skipped
    laterals = build_manifest("covid19_ny_sbu", root, root / "views.csv", per_patient="all", views="all")
    assert laterals.validation.images == 4 and "not frontal" not in laterals.skipped


def test_build_covid19_ar_from_its_workbook(tmp_path, monkeypatch):
    root = tmp_path / "ar"
    header = ["PATIENT_ID", "AGE", "SEX", "ICU Admit", "# ICU admits", "MORTALITY"]
    _xlsx(root / "COVID_19_AR_ClinicalCorrelates_July202020.xlsx", {"Clinical Correlates": [
        ["COVID-19-AR Clinical Correlates (July 2020)"],
        header,
        ["COVID-19-AR-16406491", 70, "M", "Y", 2, "Y"],
        ["COVID-19-AR-16406492", 55, "F", "N", 0, "N"],
        ["COVID-19-AR-16406493", 62, "F", "N", 0, "N"],
    ]})
    tree = root / "COVID-19-AR"
    first = "COVID-19-AR-16406491"
    _dicom(tree / first / "04-01-2020-NA-XR CHEST 2V-1/1.000000-PA-1/1-1.dcm", first, "a1", modality="CR",
           date="20200401")
    _dicom(tree / first / "04-01-2020-NA-XR CHEST 2V-1/2.000000-Lateral L-2/1-1.dcm", first, "a2", modality="CR",
           view="", date="20200401", series="Lateral L")
    _dicom(tree / first / "04-05-2020-NA-CT CHEST-3/3.000000-AXIAL-3/1-1.dcm", first, "a3", modality="CT")
    _dicom(tree / "COVID-19-AR-16406492/04-02-2020-NA-XR CHEST 1V-4/1.000000-NA-4/1-1.dcm",
           "COVID-19-AR-16406492", "a4", modality="DX", view="")  # no view anywhere: kept and counted
    _dicom(tree / "COVID-19-AR-16406493/04-03-2020-NA-XR CHEST-5/1.000000-AP-5/1-1.dcm",
           "COVID-19-AR-16406493", "a5", modality="DX", view="AP")
    with pytest.raises(ManifestError, match=r"write the manifest in .*ar or a folder above it.*FEATCACHE_DATA_ROOTS"):
        build_manifest("covid19_ar", root, tmp_path / "out" / "manifest.csv")
    monkeypatch.setenv("FEATCACHE_DATA_ROOTS", str(root))  # the opt-in for images apart from the manifest
    report = build_manifest("covid19_ar", root, tmp_path / "out" / "manifest.csv")
    rows = {row["patient_id"]: row for row in load_manifest(report.manifest).rows}
    assert {pid: (row["CAR"], row["path"].split("/")[-2]) for pid, row in rows.items()} == {
        "COVID-19-AR-16406491": ("1", "1.000000-PA-1"),
        "COVID-19-AR-16406492": ("0", "1.000000-NA-4"),
        "COVID-19-AR-16406493": ("0", "1.000000-AP-5"),
    }
    assert rows[first]["path"].startswith("../ar/COVID-19-AR/")  # relative to the manifest
    assert report.skipped == {"CT": 1, "not frontal": 1} and report.view_unknown == 1
    assert report.tables[0].endswith("COVID_19_AR_ClinicalCorrelates_July202020.xlsx (sheet Clinical Correlates)")
    assert report.tasks["CAR"] | {"centers": None} == {
        "images": 3, "patients": 3, "positives": 1, "negatives": 2, "positive": "1", "negative": "0",
        "classes": {"0": 2, "1": 1}, "centers": None}


def _cocross_rows(*rows) -> list[list]:
    return [["ID", "Day", "Age", "PaO2/FiO2", "ICU Outcome"], *rows]


def test_build_cocross_from_its_longitudinal_workbook(tmp_path):
    root = tmp_path / "cc"
    _xlsx(root / "CoCross_database.xlsx", {
        "Info": [["CoCross database, see the paper"]],
        "Data": _cocross_rows([101, 1, 70, 180, None], [101, 2, 70, 120, "Death"], [101, 3, 70, 90, None],
                              [102, 1, 55, 250, "Alive"], [102, 2, 55, 260, None], [103, 1, 60, 200, "alive"],
                              [104, 1, 48, 210, None]),
    })
    _xlsx(root / "variables.xlsx", {"Sheet1": [["variable", "unit"], ["PaO2/FiO2", "mmHg"]]})
    _png(root / "imgs" / "101.jpeg")
    _png(root / "imgs" / "102" / "day1.jpeg")
    _png(root / "imgs" / "102" / "day3.jpeg")
    _png(root / "imgs" / "103.jpeg")
    _png(root / "imgs" / "104.jpeg")
    report = build_manifest("cocross", root, root / "manifest.csv")
    m = load_manifest(report.manifest)
    assert m.rows == [
        {"image_id": "101", "path": "imgs/101.jpeg", "patient_id": "101", "center": "CoCross", "CoCross": "Death"},
        {"image_id": "102/day1", "path": "imgs/102/day1.jpeg", "patient_id": "102", "center": "CoCross",
         "CoCross": "Alive"},
        {"image_id": "103", "path": "imgs/103.jpeg", "patient_id": "103", "center": "CoCross", "CoCross": "Alive"},
    ]
    assert report.skipped == {"no label": 1, LATER: 1}
    assert report.ignored == ["variables.xlsx: no sheet 'Data'"]
    every = build_manifest("cocross", root, root / "every.csv", per_patient="all")
    assert load_manifest(every.manifest).ids == ["101", "102/day1", "102/day3", "103"]

    _xlsx(root / "CoCross_database.xlsx", {"Data": _cocross_rows([101, 1, 70, 1, "Death"], [101, 2, 70, 1, "Alive"],
                                                                 [102, 1, 55, 2, "Alive"])})
    with pytest.raises(ManifestError, match=r"cocross: 1 patients whose rows disagree on CoCross: 101$"):
        build_manifest("cocross", root, root / "manifest.csv")


IEEE_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated",
                "intubation_present", "went_icu", "in_icu", "needed_supplemental_O2", "extubated", "temperature",
                "pO2_saturation", "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality",
                "date", "location", "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
                ""]  # the release's trailing empty column


@pytest.mark.parametrize("patient_header", ["patientid", "Patientid"])  # the current and an earlier release
def test_build_covid_chestxray(tmp_path, patient_header):
    root = tmp_path / "covid-chestxray-dataset"
    covid = "Pneumonia/Viral/COVID-19"

    def row(pid, name, view="PA", survival="Y", icu="", modality="X-ray", finding=covid, offset=""):
        return {patient_header: pid, "offset": offset, "finding": finding, "survival": survival, "went_icu": icu,
                "view": view, "modality": modality, "folder": "images", "filename": name}

    rows = [row(2, "a.jpg", icu="N", offset=0), row(2, "b.jpg", view="AP Supine", offset=3),
            row(7, "c.png", view="AP", survival="N", icu="Y", offset=1), row(7, "d.jpg", view="L", survival="N"),
            row(8, "h.jpg", view="AP erect", survival="N"), row(9, "e.jpg", finding="Pneumonia/Bacterial"),
            row(9, "f.nii.gz", view="Axial", modality="CT", survival=""), row(11, "gone.jpg", survival="N"),
            row(12, "u.jpg", survival="")]
    _csv(root / "metadata.csv", [patient_header, *IEEE_COLUMNS[1:]], rows)
    for name in ("a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg", "h.jpg", "u.jpg", "z.jpg"):
        _png(root / "images" / name)
    report = build_manifest("covid_chestxray", root, root / "manifest.csv")
    m = load_manifest(report.manifest)
    assert m.ids == ["a.jpg", "b.jpg", "c.png", "h.jpg"] and m.patients(m.ids) == ["2", "2", "7", "8"]
    ids, y = m.labels(get_task("COVIDX_death"))
    assert ids == m.ids and y.tolist() == [0, 0, 1, 1]  # survival N = died = positive
    assert m.labels(get_task("COVIDX_icu"))[0] == ["a.jpg", "c.png"]
    assert report.skipped == {"CT": 1, "not frontal": 1, "finding lacks 'COVID-19'": 1, "no file": 1,
                              "no label": 1}
    assert report.missing == ["gone.jpg (metadata.csv:9: gone.jpg)"]
    assert report.unlisted == ["images/z.jpg"]  # d, e and u are listed (then left out), not unlisted
    assert report.notes == ([] if patient_header == "patientid" else
                            [f"{root / 'metadata.csv'}: column 'Patientid' read as 'patientid'"])
    first = build_manifest("covid_chestxray", root, root / "first.csv", per_patient="first")
    assert load_manifest(first.manifest).ids == ["a.jpg", "c.png", "h.jpg"]  # the smallest offset


def test_build_synthetic_round_trip(synth_cohort, tmp_path):
    original = load_manifest(synth_cohort(patients=6, size=48, centers=2, seed=3, to=tmp_path / "syn"))
    report = build_manifest("synthetic", tmp_path / "syn", tmp_path / "syn" / "rebuilt.csv")
    rebuilt = load_manifest(report.manifest)
    assert rebuilt.rows == [{k: v for k, v in row.items() if k != "view"} for row in original.rows]
    assert report.missing == [] and report.unlisted == []


# --- a cohort of one's own --------------------------------------------------------------------------------------


def _own(tmp_path, suffix: str = ".csv"):
    folder = tmp_path / "mine"
    rows = [["file", "pid", "SURV", "site"]]
    for i in range(40):  # 20 patients, 6 of them DEATH; a file named with or without its suffix
        rows.append([f"x{i}.png" if i % 2 else f"x{i}", f"p{i // 2}", "DEATH" if i // 2 % 3 == 0 and i < 36 else
                     "ALIVE", "north" if i < 20 else "south"])
        _png(folder / "images" / f"x{i}.png")
    if suffix == ".xlsx":
        _xlsx(folder / "labels.xlsx", {"Sheet1": rows})
    else:
        _csv(folder / "labels.csv", rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]])
    return folder, OwnCohort(folder / f"labels{suffix}", folder / "images", "file", "pid", "SURV", "DEATH", "site")


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_own_cohort_in_one_command(tmp_path, suffix):
    folder, cohort = _own(tmp_path, suffix)
    report = build_own(cohort, folder / "manifest.csv")
    m = load_manifest(report.manifest)
    assert len(m) == 40 and m.rows[0] == {"image_id": "x0", "path": "images/x0.png", "patient_id": "p0",
                                          "center": "north", "SURV": "DEATH"}
    assert report.tasks["SURV"]["positives"] == 12 and report.tasks["SURV"]["patients"] == 20
    assert (folder / "SURV.dataset.yaml").is_file() and report.summary_path.is_file()
    task = datasets.task_for(m, "SURV")  # no --positive: the spec beside the manifest defines it
    assert (task.classes, task.dataset, task.has_centers) == ({"ALIVE": 0, "DEATH": 1}, "", True)
    assert datasets.get_task("SURV") is task and m.labels(task)[1].sum() == 12
    assert "SURV" in [t.key for t in datasets.tasks_of(m)]
    with pytest.raises(UsageError, match="positive class 'DEATH', not 'ALIVE'"):
        datasets.task_for(m, "SURV", "ALIVE")


def test_own_cohort_flows_into_splits(tmp_path):
    from cli.featcache_app import app
    from featcache.splits import load_splits

    folder, cohort = _own(tmp_path)
    runner = CliRunner()
    args = ["manifest", "build", "--table", str(cohort.table), "--images", str(cohort.images), "--image-col",
            "file", "--patient-col", "pid", "--label-col", "SURV", "--positive", "DEATH", "--center-col", "site",
            "--out", str(folder / "manifest.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SURV DEATH" in result.output and "summary:" in result.output
    datasets._ADHOC.clear()  # a later process
    made = runner.invoke(app, ["splits", "--manifest", str(folder / "manifest.csv"), "--task", "SURV", "--k", "2",
                               "--shots", ""])
    assert made.exit_code == 0, made.output
    datasets._ADHOC.clear()
    assert load_splits(folder / "manifest.csv", "SURV").classes == ("ALIVE", "DEATH")

    taken = runner.invoke(app, [*args[:-2], "--task", "AFC", "--out", str(folder / "m2.csv")])
    assert isinstance(taken.exception, UsageError) and "belongs to dataset spec" in str(taken.exception)
    assert not (folder / "m2.csv").exists()


def test_own_cohort_refusals(tmp_path):
    folder, cohort = _own(tmp_path)
    with pytest.raises(ManifestError, match=r"labels\.csv: column 'SURV' holds 2 value\(s\) \('ALIVE', 'DEATH'\); "
                                            r"a task with --positive 'DIED' needs the value 'DIED'"):
        build_own(OwnCohort(cohort.table, cohort.images, "file", "pid", "SURV", "DIED"), folder / "m.csv")
    with pytest.raises(ManifestError, match=r"no column\(s\) \['Surv_'\].*'Surv_' -> 'SURV'"):
        build_own(OwnCohort(cohort.table, cohort.images, "file", "pid", "Surv_", "DEATH"), folder / "m.csv")
    assert not list(folder.glob("*.yaml")) and not (folder / "m.csv").exists()


# --- refusals -----------------------------------------------------------------------------------------------


def test_two_candidate_tables_and_empty_table(tmp_path):
    _ny_release(tmp_path)
    copy = tmp_path / "deidentified_overlap_tcia.csv.cleaned.csv_20210901.csv"
    copy.write_text((tmp_path / NY_TABLE).read_text())
    with pytest.raises(ManifestError, match=r"two candidate covid19_ny_sbu tables hold the needed columns: .*"
                                            r"20210806\.csv, .*20210901\.csv; keep one, or name it with --table"):
        build_manifest("covid19_ny_sbu", tmp_path, tmp_path / "m.csv")
    report = build_manifest("covid19_ny_sbu", tmp_path, tmp_path / "m.csv", tables=[copy])
    assert report.validation.images == 2
    copy.write_text(",".join(NY_COLUMNS) + "\n\n")
    with pytest.raises(ManifestError, match=r"20210901\.csv: empty table \(no rows below the header on line 1\)"):
        build_manifest("covid19_ny_sbu", tmp_path, tmp_path / "m.csv", tables=[copy])


def test_label_outside_the_mapping_names_its_row(tmp_path):
    _csv(tmp_path / "COVID_19_AR_ClinicalCorrelates_July202020.csv", ["PATIENT_ID", "ICU Admit"],
         [{"PATIENT_ID": "a", "ICU Admit": "Y"}, {"PATIENT_ID": "b", "ICU Admit": "unknown"}])
    with pytest.raises(ManifestError, match=r"label values outside the mapping of covid19_ar\.yaml \(CAR: 0, 1, "
                                            r"N -> 0.*\): COVID_19_AR_ClinicalCorrelates_July202020\.csv:3 "
                                            r"ICU Admit='unknown'; add them under tasks"):
        build_manifest("covid19_ar", tmp_path, tmp_path / "m.csv")
    assert not list(tmp_path.glob("m*"))


def test_metadata_missing_and_columns_missing(tmp_path):
    with pytest.raises(ManifestError, match=r"no metadata table matching \['AIforCOVID\*\.xlsx', 'AIforCOV"):
        build_manifest("aiforcovid", tmp_path, tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="data root is not a folder"):
        build_manifest("aiforcovid", tmp_path / "absent", tmp_path / "m.csv")
    _xlsx(tmp_path / "CoCross.xlsx", {"Data": [["ID", "Outcome"], [1, "Death"]]})
    with pytest.raises(ManifestError, match=r"CoCross\.xlsx\[Data\]: no column\(s\) \['ICU Outcome'\] \(needs "
                                            r"\['ID', 'ICU Outcome'\]; closest: 'ICU Outcome' -> 'Outcome'"):
        build_manifest("cocross", tmp_path, tmp_path / "m.csv")
    _xlsx(tmp_path / "CoCross.xlsx", {"Sheet1": [["ID", "ICU Outcome"], [1, "Death"]]})
    with pytest.raises(ManifestError, match=r"CoCross\.xlsx: no sheet 'Data' \(sheets: Sheet1\)"):
        build_manifest("cocross", tmp_path, tmp_path / "m.csv")
    (tmp_path / "CoCross.xlsx").write_bytes(b"PK not a workbook")
    with pytest.raises(ManifestError, match=r"CoCross\.xlsx: not a readable Excel workbook"):
        build_manifest("cocross", tmp_path, tmp_path / "m.csv")


def test_no_images_found(tmp_path):
    _xlsx(tmp_path / "CoCross.xlsx", {"Data": [["ID", "ICU Outcome"], [1, "Death"]]})
    with pytest.raises(ManifestError, match=r"no cocross images kept from \['imgs'\] \(1 listed images missing"):
        build_manifest("cocross", tmp_path, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "m.summary.json").exists()


def test_patient_listed_twice_in_per_patient_metadata(tmp_path):
    _csv(tmp_path / NY_TABLE, NY_COLUMNS[:-1], [{"to_patient_id": "A1", "last.status": "deceased"},
                                                {"to_patient_id": "A1", "last.status": "discharged"}])
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
    for word in ("aiforcovid", "AFC_death", "NY_icu", "COVIDX_death", "loco k=6", "kfold k=5",
                 "collection/covid-19-ny-sbu"):
        assert word in result.output

    root = tmp_path / "ny"
    _ny_release(root)
    for i in range(7):
        _dicom(root / f"COVID-19-NY-SBU/B{i}/01-01-2020-NA-CHEST PA-9/1.000000-PA-9/1-1.dcm", f"B{i}", f"b{i}")
    out = tmp_path / "m.csv"
    args = ["manifest", "build", "--dataset", "covid19_ny_sbu", "--root", str(root), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "m.summary.json").is_file()
    for text in ("table: ", NY_DICTIONARY, "patients", "1384", "-1382", "skipped 1: CT", "skipped 1: not frontal",
                 "cohort: views frontal, per patient first", "images that match no patient: 8",
                 "... and 3 more (--verbose lists all)", "listed in the metadata but missing: 1", "summary:"):
        assert text in result.output, text
    verbose = runner.invoke(app, [*args, "--verbose"])
    assert "COVID-19-NY-SBU/B6/" in verbose.output and "more (--verbose" not in verbose.output

    result = runner.invoke(app, ["manifest", "build", "--dataset", "nope", "--root", str(root), "--out", str(out)])
    assert isinstance(result.exception, ManifestError)
    result = runner.invoke(app, ["manifest", "build", "--table", str(root / NY_TABLE), "--out", str(out)])
    assert result.exit_code != 0 and "missing: --images" in result.output
    result = runner.invoke(app, [*args, "--per-patient", "some"])
    assert result.exit_code != 0


def test_own_cohort_in_a_study(tmp_path, monkeypatch):
    from cli.featcache_app import app

    folder, cohort = _own(tmp_path)
    build_own(cohort, folder / "manifest.csv")
    datasets._ADHOC.clear()  # a later process: the study names only the manifest and the task
    monkeypatch.chdir(folder)
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--manifest", "manifest.csv", "--task", "SURV"]).exit_code == 0
    (folder / "study.yaml").write_text(
        "manifest: manifest.csv\ntasks: [SURV]\nruns: runs\n"
        "grid: {backbones: [resnet18-tiny], methods: [probe], regimes: {full: true, shots: []}}\n")
    ran = runner.invoke(app, ["study", "run"], env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    records = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    assert len(records) == 5 and {r["task"] for r in records} == {"SURV"}
    reported = runner.invoke(app, ["report"])
    assert reported.exit_code == 0, reported.output
    report = (folder / "report" / "report.md").read_text()
    cohort = report.split("## Cohort", 1)[1].split("\n## ", 1)[0]  # the cohort table read labels through the spec
    assert "SURV" in cohort and "north" in cohort and "DEATH" in cohort
