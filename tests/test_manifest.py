"""The canonical manifest: loading, writing, accessors, and every validation error naming its rows."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from featcache.datasets import get_task
from featcache.errors import ManifestError
from featcache.manifest import load_manifest, validate, write_manifest

SYN, AFC = get_task("SYN"), get_task("AFC")
TASKS = (SYN, AFC)

HEADER = "image_id,path,patient_id,center,bbox_x0,bbox_y0,bbox_x1,bbox_y1,SYN,AFC"


def _manifest(tmp_path, lines: list[str], header: str = HEADER, images: bool = True):
    """A manifest written verbatim (so tests control row order), with its image files."""
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    if images:
        for line in lines:
            rel = line.split(",")[1]
            if rel:
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / rel).write_bytes(b"img")
    return path


GOOD = [
    "a1,img/a1.png,pA,C1,10,20,110,220,DEATH,SEVERE",
    "a2,img/a2.png,pA,C1,,,,,DEATH,",
    "b1,img/b1.png,pB,C2,0,0,50,60,ALIVE,MILD",
    "c1,img/c1.png,pC,C2,,,,,,MILD",
]


def _kinds(report) -> dict[str, object]:
    return {issue.kind: issue for issue in report.errors}


def test_accessors(tmp_path):
    m = load_manifest(_manifest(tmp_path, GOOD))
    assert len(m) == 4 and m.ids == ["a1", "a2", "b1", "c1"]
    assert m.root == tmp_path and m.tasks(["AFC", "SYN", "NY"]) == ["SYN", "AFC"]
    ids, y = m.labels(SYN)
    assert ids == ["a1", "a2", "b1"] and y.dtype == np.int8 and y.tolist() == [1, 1, 0]
    ids, y = m.labels(AFC)
    assert ids == ["a1", "b1", "c1"] and y.tolist() == [1, 0, 0]
    assert m.patients(["b1", "a2"]) == ["pB", "pA"] and m.centers(["c1"]) == ["C2"]
    assert m.abspath("b1") == tmp_path / "img/b1.png"
    assert m.bbox("a1") == (10, 20, 110, 220) and m.bbox("a2") is None
    assert m.rows[2] == dict(zip(HEADER.split(","), GOOD[2].split(","), strict=True))
    assert m.line("c1") == 5
    assert m.digest() == hashlib.sha256((tmp_path / "manifest.csv").read_bytes()).hexdigest()
    with pytest.raises(ManifestError, match="no image_id 'zz'"):
        m.patients(["zz"])
    with pytest.raises(ManifestError, match="no column 'NY'"):
        m.labels(get_task("NY"))
    assert m.tasks([]) == [] and "columns=" in repr(m)


def test_root_override_and_no_bbox(tmp_path):
    path = _manifest(tmp_path, ["x,x.png,p,c,ALIVE"], header="image_id,path,patient_id,center,SYN")
    m = load_manifest(path, root=tmp_path / "elsewhere")
    assert m.abspath("x") == tmp_path / "elsewhere" / "x.png" and m.bbox("x") is None


def test_labels_outside_mapping_raise_with_rows(tmp_path):
    m = load_manifest(_manifest(tmp_path, [*GOOD, "d1,img/d1.png,pD,C3,,,,,alive,"]))
    with pytest.raises(ManifestError, match=r"SYN labels outside \['ALIVE', 'DEATH'\] at rows 6"):
        m.labels(SYN)


def test_write_is_deterministic_and_atomic(tmp_path):
    rows = [
        {"image_id": "b", "path": "b.png", "patient_id": "p2", "center": "C", "SYN": "ALIVE", "view": "PA"},
        {
            "image_id": "a",
            "path": "a.png",
            "patient_id": "p1",
            "center": "C",
            "SYN": None,
            "bbox_x0": 1.0,
            "bbox_y0": 2,
            "bbox_x1": np.int64(30),
            "bbox_y1": 40,
            "view": float("nan"),
        },
    ]
    one = write_manifest(rows, tmp_path / "one.csv")
    two = write_manifest(reversed(rows), tmp_path / "two.csv")
    assert one.read_bytes() == two.read_bytes()
    assert one.read_text().splitlines() == [
        "image_id,path,patient_id,center,bbox_x0,bbox_y0,bbox_x1,bbox_y1,SYN,view",
        "a,a.png,p1,C,1,2,30,40,,",
        "b,b.png,p2,C,,,,,ALIVE,PA",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]  # no temp files left
    assert load_manifest(one).digest() != load_manifest(write_manifest(rows[:1], tmp_path / "x.csv")).digest()
    with pytest.raises(ManifestError, match=r"lack required columns \['center'\]"):
        write_manifest([{"image_id": "a", "path": "a", "patient_id": "p"}], tmp_path / "bad.csv")


def test_valid_manifest_counts(tmp_path):
    report = validate(_manifest(tmp_path, GOOD), tasks=TASKS)
    assert report.ok and report.errors == []
    assert (report.images, report.patients, report.centers) == (4, 3, {"C1": 2, "C2": 2})
    assert report.tasks == {"SYN": {"ALIVE": 1, "DEATH": 2}, "AFC": {"MILD": 2, "SEVERE": 1}}
    assert report.nan == {"SYN": 1, "AFC": 1}  # counted, not an error
    assert report.by_center["AFC"] == {"C1": {"SEVERE": 1}, "C2": {"MILD": 2}}
    assert "valid, 4 images, 3 patients" in report.summary()
    report.raise_for_errors()


def test_duplicate_ids(tmp_path):
    report = validate(_manifest(tmp_path, [*GOOD, "b1,img/b1b.png,pB,C2,,,,,ALIVE,MILD"]), tasks=TASKS)
    issue = _kinds(report)["duplicate_id"]
    assert issue.rows == [4, 6] and issue.ids == ["b1", "b1"]


def test_duplicate_paths_are_refused(tmp_path):
    """A copied row (new image id and patient, same file) would put one image in train and test."""
    copies = ["x1,img/b1.png,pX,C2,,,,,DEATH,SEVERE", "x2,img/./a1.png,pY,C1,,,,,ALIVE,MILD"]
    report = validate(_manifest(tmp_path, [*GOOD, *copies]), tasks=TASKS)
    issue = _kinds(report)["duplicate_path"]
    assert issue.rows == [2, 4, 6, 7] and issue.ids == ["a1", "b1", "x1", "x2"]
    assert [i.kind for i in report.errors] == ["duplicate_path"]
    with pytest.raises(ManifestError, match=r"1 error \(duplicate_path\); first: duplicate_path: .*rows 2, 4"):
        report.raise_for_errors()


def test_missing_files(tmp_path):
    path = _manifest(tmp_path, GOOD)
    (tmp_path / "img/a2.png").unlink()
    issue = _kinds(validate(path, tasks=TASKS))["missing_file"]
    assert issue.rows == [3] and issue.ids == ["a2"]
    assert validate(path, check_files=False, tasks=TASKS).ok


def test_labels_outside_mapping(tmp_path):
    report = validate(_manifest(tmp_path, [*GOOD, "d1,img/d1.png,pD,C3,,,,,Dead,MILD"]), tasks=TASKS)
    issue = _kinds(report)["label_outside_mapping"]
    assert issue.rows == [6] and issue.ids == ["d1"] and "SYN" in issue.message
    assert report.tasks["SYN"] == {"ALIVE": 1, "DEATH": 2}  # the bad value is not counted as a class


def test_conflicting_labels_per_patient(tmp_path):
    lines = [*GOOD, "a3,img/a3.png,pA,C1,,,,,ALIVE,SEVERE"]
    kinds = _kinds(validate(_manifest(tmp_path, lines), tasks=TASKS))
    assert kinds["conflicting_labels"].rows == [2, 3, 6] and "SYN" in kinds["conflicting_labels"].message
    errors = validate(tmp_path / "manifest.csv", tasks=TASKS).errors
    assert len([i for i in errors if i.kind == "conflicting_labels"]) == 1
    assert validate(tmp_path / "manifest.csv").errors == []  # no task given: labels are not checked


def test_patient_in_two_centers(tmp_path):
    issue = _kinds(validate(_manifest(tmp_path, [*GOOD, "c2,img/c2.png,pC,C3,,,,,,MILD"]), tasks=TASKS))[
        "patient_in_two_centers"
    ]
    assert issue.rows == [5, 6] and issue.ids == ["c1", "c2"]


def test_missing_required_columns(tmp_path):
    path = _manifest(tmp_path, ["a,a.png,ALIVE"], header="image_id,path,SYN")
    report = validate(path, tasks=TASKS)
    issue = _kinds(report)["missing_columns"]
    assert "patient_id" in issue.message and "center" in issue.message
    with pytest.raises(ManifestError, match="no column 'patient_id'"):
        load_manifest(path).patients(["a"])


def test_bad_bbox_and_empty_values(tmp_path):
    lines = [*GOOD, "e1,img/e1.png,,C1,5,5,5,9,,", "e2,img/e2.png,pE,C1,1,2,x,4,,"]
    kinds = _kinds(validate(_manifest(tmp_path, lines), tasks=TASKS))
    assert kinds["bad_bbox"].rows == [6, 7]
    assert kinds["empty_value"].rows == [6] and "patient_id" in kinds["empty_value"].message
    with pytest.raises(ManifestError, match=r"row 7 \(e2\): bbox .* is not four numbers"):
        load_manifest(tmp_path / "manifest.csv").bbox("e2")
    with pytest.raises(ManifestError, match=r"row 6 \(e1\): bbox .* needs 0 <= x0 < x1"):
        load_manifest(tmp_path / "manifest.csv").bbox("e1")


def test_malformed_files(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,path,patient_id,center\na,a.png,p\n")
    with pytest.raises(ManifestError, match="rows 2 do not have 4 fields"):
        load_manifest(path)
    path.write_text("")
    with pytest.raises(ManifestError, match="empty manifest"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "absent.csv")


def test_report_summary_is_one_line_and_raises(tmp_path):
    report = validate(_manifest(tmp_path, [*GOOD, "b1,img/b1b.png,pB,C2,,,,,Dead,MILD"]), tasks=TASKS)
    assert not report.ok and "\n" not in report.summary()
    with pytest.raises(ManifestError, match=r"2 errors \(duplicate_id, label_outside_mapping\)"):
        report.raise_for_errors()
    assert report.to_dict()["errors"][0]["rows"] == [4, 6]


def test_large_manifest_round_trip(tmp_path):
    n = 100_000
    rows = [
        {
            "image_id": f"i{i:06d}",
            "path": f"x/{i}.png",
            "patient_id": f"p{i // 3}",
            "center": f"C{i // 3 % 4}",
            "SYN": ("ALIVE", "DEATH", "")[i % 3],
        }
        for i in range(n)
    ]
    m = load_manifest(write_manifest(rows, tmp_path / "big.csv"))
    report = validate(m, check_files=False, tasks=TASKS)
    assert report.images == n and report.nan["SYN"] == n // 3
    assert [i.kind for i in report.errors] == ["conflicting_labels"]  # p0 has ALIVE and DEATH images


def test_parquet_needs_pyarrow_or_round_trips(tmp_path):
    rows = [{"image_id": "a", "path": "a.png", "patient_id": "p", "center": "C", "SYN": "DEATH"}]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ManifestError, match="needs pyarrow"):
            write_manifest(rows, tmp_path / "m.parquet")
        (tmp_path / "m.parquet").write_bytes(b"PAR1")
        with pytest.raises(ManifestError, match="needs pyarrow"):
            load_manifest(tmp_path / "m.parquet")
        return
    m = load_manifest(write_manifest(rows, tmp_path / "m.parquet"))
    assert m.labels(SYN)[1].tolist() == [1]


def test_cli_validate(tmp_path):
    from cli.featcache_app import app

    runner = CliRunner()
    good = _manifest(tmp_path, GOOD)
    result = runner.invoke(app, ["manifest", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "SEVERE" in result.output

    (tmp_path / "img/a2.png").unlink()
    result = runner.invoke(app, ["manifest", "validate", str(good)])
    assert result.exit_code != 0 and isinstance(result.exception, ManifestError)
    assert "missing_file" in result.output and "rows 3" in result.output
    assert runner.invoke(app, ["manifest", "validate", str(good), "--no-check-files"]).exit_code == 0


def test_paths_outside_the_manifest_folder_are_refused(tmp_path, monkeypatch):
    """`../../x.png` and `/etc/passwd` would be read by extract: refused by validate and at load."""
    data = tmp_path / "data"
    data.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"img")
    lines = [*GOOD, "x1,../secret.png,pX,C1,,,,,ALIVE,", f"x2,{secret},pY,C1,,,,,ALIVE,",
             "x3,img/../img/a1.png,pZ,C1,,,,,ALIVE,"]
    path = _manifest(data, lines, images=False)
    for rel in ("img/a1.png", "img/a2.png", "img/b1.png", "img/c1.png"):
        (data / rel).parent.mkdir(exist_ok=True)
        (data / rel).write_bytes(b"img")
    issue = _kinds(validate(path, tasks=TASKS))["path_outside_root"]
    assert issue.rows == [6, 7] and issue.ids == ["x1", "x2"]  # x3 stays inside after normalising
    with pytest.raises(ManifestError, match=r"image paths outside the manifest's folder .* at rows 6, 7 "
                                            r"\(e.g. '../secret.png'\).*FEATCACHE_DATA_ROOTS"):
        load_manifest(path)
    from cli.featcache_app import app

    result = CliRunner().invoke(app, ["manifest", "validate", str(path)])
    assert result.exit_code != 0 and "path_outside_root" in result.output
    monkeypatch.setenv("FEATCACHE_DATA_ROOTS", str(tmp_path))  # the explicit opt-in
    assert load_manifest(path).abspath("x1") == data / "../secret.png"
    assert "path_outside_root" not in _kinds(validate(path, tasks=TASKS))


def test_empty_image_id_is_refused_at_load(tmp_path):
    path = _manifest(tmp_path, [*GOOD, ",img/e.png,pE,C1,,,,,ALIVE,"])
    assert _kinds(validate(path, tasks=TASKS))["empty_value"].rows == [6]
    with pytest.raises(ManifestError, match=r"manifest.csv: empty image_id at rows 6; every image needs an id"):
        load_manifest(path)
