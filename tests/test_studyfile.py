"""The study file: paths resolved against its folder, the weights policy by canonical backbone name, per-task
manifests, the commented template that loads back, and wrong values in one line naming file and key."""

from __future__ import annotations

import pytest

from featcache.backbones import get_spec
from featcache.errors import StudyError
from study.studyfile import STUDY_FILE, load_study, write_study


def test_paths_resolve_against_the_study_folder(tmp_path):
    (tmp_path / "s").mkdir()
    path = tmp_path / "s" / STUDY_FILE
    path.write_text("manifest: data/m.csv\nfeatures: ../shared/f.zarr\nmodel: medclip\ndevice: cpu\n"
                    "weights: {medclip: w/medclip.bin, dinov2-s: random-init}\n"
                    "executor: {partition: gpu, time_min: 30}\ndefaults: {probe: {shots: '2,4'}}\n")
    study = load_study(path)
    assert study.manifest == tmp_path / "s" / "data" / "m.csv" and study.features == tmp_path / "shared" / "f.zarr"
    assert study.runs == tmp_path / "s" / "runs" and study.report == tmp_path / "s" / "report"  # defaults
    assert study.name == "s" and study.model == get_spec("medclip").name and study.device == "cpu"
    assert study.weights_for("medclip") == (tmp_path / "s" / "w" / "medclip.bin", False)
    assert study.weights_for("dinov2-s") == (None, True) and study.weights_for("resnet18") == (None, False)
    assert study.executor == {"partition": "gpu", "time_min": 30} and study.defaults == {"probe": {"shots": "2,4"}}
    with pytest.raises(StudyError, match="no grid; add `grid: smoke`"):
        study.grid()


def test_per_task_manifests_name_the_tasks(tmp_path):
    (tmp_path / STUDY_FILE).write_text("manifest: all.csv\nmanifests: {CAR: car.csv, NY: ny.csv}\n")
    study = load_study(tmp_path / STUDY_FILE)
    assert study.tasks == ("CAR", "NY")
    assert study.manifest_for("CAR") == tmp_path / "car.csv" and study.manifest_for("SYN") == tmp_path / "all.csv"


def test_the_template_loads_and_is_kept_unless_forced(tmp_path):
    path = write_study(tmp_path, manifest="cohort/manifest.csv", tasks=("SYN",), model="dinov2-s",
                       weights={"dinov2-s": "random-init"})
    study = load_study(path)
    assert study.tasks == ("SYN",) and study.grid().name == "smoke" and study.weights_for("dinov2-s")[1]
    with pytest.raises(StudyError, match="already here.*--force"):
        write_study(tmp_path)
    assert load_study(write_study(tmp_path, force=True)).tasks == ()


@pytest.mark.parametrize(("text", "message"), [
    ("executor: {gpus: 2}\n", r"executor: unknown key\(s\) \['gpus'\]"),
    ("defaults: {probe: 3}\n", r"defaults.probe: expected a mapping, got 3"),
    ("weights: [a, b]\n", "weights: expected a mapping"),
    ("manifests: [a.csv]\n", "manifests: expected a mapping"),
])
def test_wrong_values_are_one_line_naming_file_and_key(tmp_path, text, message):
    (tmp_path / STUDY_FILE).write_text(text)
    with pytest.raises(StudyError, match=message) as refused:
        load_study(tmp_path / STUDY_FILE)
    assert str(refused.value).startswith(str(tmp_path / STUDY_FILE)) and "\n" not in str(refused.value)


def test_a_task_list_holds_names_not_mappings(tmp_path):
    path = tmp_path / STUDY_FILE
    path.write_text("tasks: [{a: 1}]\n")
    with pytest.raises(StudyError, match=r"tasks: expected a list of str"):
        load_study(path)
