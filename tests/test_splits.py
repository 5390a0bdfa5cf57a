from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.errors import SplitError
from featcache.splits import (
    MIN_VAL_PATIENTS,
    SUPPORT_FROM,
    build_splits,
    describe,
    load_splits,
    make_splits,
    read_splits,
    save_splits,
    splits_path,
)

CENTERS = ("A", "B", "C")


def cohort(patients: int = 120, positive_rate: float = 0.35, seed: int = 0, centers=CENTERS):
    """Image-level arrays: 1-4 images per patient, one label and one center per patient."""
    rng = np.random.default_rng(seed)
    ids, y, groups, sites = [], [], [], []
    for p in range(patients):
        label = int(rng.random() < positive_rate)
        site = centers[p % len(centers)]
        for j in range(int(rng.integers(1, 5))):
            ids.append(f"img{p:04d}_{j}")
            y.append(label)
            groups.append(f"P{p:04d}")
            sites.append(site)
    return ids, np.array(y), groups, sites


def lookup(ids, y, groups, sites):
    return (
        dict(zip(ids, y, strict=True)),
        dict(zip(ids, groups, strict=True)),
        dict(zip(ids, sites, strict=True)),
    )


def patients_of(members, patient) -> set[str]:
    return {patient[i] for i in members}


@pytest.fixture(scope="module")
def data():
    return cohort()


@pytest.fixture(scope="module")
def kfold(data):
    return make_splits(*data, task="T", scheme="kfold", k=5, draws=6, seed=7, per_center=True)


@pytest.fixture(scope="module")
def loco(data):
    return make_splits(*data, task="T", scheme="loco", draws=6, seed=7)


@pytest.mark.parametrize("which", ["kfold", "loco"])
def test_no_patient_in_two_parts(which, data, kfold, loco):
    splits = kfold if which == "kfold" else loco
    ids, _, _, _ = data
    _, patient, _ = lookup(*data)
    tests = []
    for fold in splits.folds:
        train, val, test = (patients_of(part, patient) for part in (fold.train, fold.val, fold.test))
        assert not (train & val) and not (train & test) and not (val & test), fold.name
        assert sorted(fold.train + fold.val + fold.test) == sorted(ids)
        assert list(fold.train) == sorted(fold.train) and list(fold.test) == sorted(fold.test)
        tests.extend(fold.test)
    assert sorted(tests) == sorted(ids)  # every image is tested exactly once


@pytest.mark.parametrize("which", ["kfold", "loco"])
def test_fewshot_drawn_from_fold_training_patients(which, data, kfold, loco):
    splits = kfold if which == "kfold" else loco
    label, patient, _ = lookup(*data)
    for fold in splits.folds:
        pool = set(fold.train)
        assert set(fold.fewshot) | set(fold.skipped["fewshot"]) == set(splits.shots)
        assert {2, 4, 8, 16} <= set(fold.fewshot)
        for k in fold.fewshot:
            draws = splits.fewshot(fold, k)
            assert len(draws) == splits.draws
            for support in draws:
                assert set(support) <= pool
                assert len(patients_of(support, patient)) == len(support) == 2 * k  # one image per patient
                assert Counter(label[i] for i in support) == {0: k, 1: k}
            assert len({tuple(d) for d in draws}) > 1  # draws differ


def test_stratification_and_validation_share(data, kfold):
    label, patient, _ = lookup(*data)
    rate = np.mean(list(label.values()))
    for fold in kfold.folds:
        assert abs(np.mean([label[i] for i in fold.test]) - rate) < 0.1
        assert abs(np.mean([label[i] for i in fold.val]) - rate) < 0.1
        pool = patients_of(fold.train + fold.val, patient)
        assert 0.1 <= len(patients_of(fold.val, patient)) / len(pool) <= 0.2  # default 0.15 of the patients


def test_loco_folds_are_centers(data, loco):
    _, _, site = lookup(*data)
    assert loco.fold_names == ("center-A", "center-B", "center-C")
    assert loco.k is None and loco.val_fraction == 0.10
    for fold, center in zip(loco.folds, CENTERS, strict=True):
        assert {site[i] for i in fold.test} == {center}
        assert center not in {site[i] for i in fold.train + fold.val}


def test_fewshot_per_center(data, loco):
    label, patient, site = lookup(*data)
    assert loco.center_shots == (2, 4, 8, 16)
    for fold in loco.folds:
        others = set(CENTERS) - {site[fold.test[0]]}
        assert {2, 4} <= set(fold.fewshot_center)
        for k in fold.fewshot_center:
            for support in loco.fewshot_per_center(fold, k):
                assert set(support) <= set(fold.train)
                assert len(patients_of(support, patient)) == len(support)
                counts = Counter((site[i], label[i]) for i in support)
                assert counts == {(c, lab): k for c in others for lab in (0, 1)}


def test_short_class_skips_k_and_records_why(tmp_path):
    ids, y, groups, sites = cohort(patients=60, positive_rate=0.12, seed=3)
    label, patient, _ = lookup(ids, y, groups, sites)
    splits = make_splits(ids, y, groups, sites, task="T", k=3, draws=2, seed=1, per_center=False)
    for fold in splits.folds:
        positives = len({patient[i] for i in fold.train if label[i]})
        skipped = fold.skipped["fewshot"]
        assert sorted(skipped) == [k for k in splits.shots if k > positives]
        assert all("class 1 (positive)" in why and fold.name in why for why in skipped.values())
        with pytest.raises(SplitError, match="skipped: .*class 1 \\(positive\\) has"):
            splits.fewshot(fold, 32)
    manifest = tmp_path / "m.csv"
    saved = json.loads(save_splits(splits, manifest).read_text())
    assert "32" in saved["folds"][0]["skipped"]["fewshot"]
    assert "32" not in saved["folds"][0]["fewshot"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, data):
    ids, y, groups, sites = data
    options = dict(task="T", scheme="kfold", draws=4, per_center=True)
    first = save_splits(
        make_splits(ids, y, groups, sites, seed=11, **options), tmp_path / "a.csv"
    ).read_bytes()
    order = np.random.default_rng(0).permutation(len(ids))  # row order of the manifest must not matter
    shuffled = [[seq[i] for i in order] for seq in (ids, y, groups, sites)]
    second = save_splits(make_splits(*shuffled, seed=11, **options), tmp_path / "b.csv").read_bytes()
    other = make_splits(ids, y, groups, sites, seed=12, **options).to_json().encode()
    assert first == second
    assert first != other
    assert not list((tmp_path / "a.splits").glob(".*"))  # no temp files left behind


def test_draws_are_independent_streams(data):
    few = make_splits(*data, task="T", draws=3, seed=5, shots=(2, 4))
    more = make_splits(*data, task="T", draws=8, seed=5, shots=(4,))
    for a, b in zip(few.folds, more.folds, strict=True):
        assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
        assert a.fewshot[4] == b.fewshot[4][:3]


def test_round_trip_and_lookup(tmp_path, kfold):
    path = save_splits(kfold, tmp_path / "cohort.csv")
    assert path == tmp_path / "cohort.splits" / "T.json"
    loaded = read_splits(path)
    assert loaded == kfold and loaded.digest() == kfold.digest()
    assert loaded.fold("fold2") is loaded.folds[2]
    with pytest.raises(SplitError, match="no fold named"):
        loaded.fold("fold9")
    with pytest.raises(SplitError, match="no fewshot draws for k=3"):
        loaded.fewshot(0, 3)


def test_refusals():
    ids, y, groups, sites = cohort(patients=30)
    with pytest.raises(SplitError, match="fewer than k=40 folds"):
        make_splits(ids, y, groups, sites, k=40)
    bad = y.copy()
    first_patient = [i for i, g in enumerate(groups) if g == groups[0]]
    if len(first_patient) == 1:
        first_patient = [i for i, g in enumerate(groups) if groups.count(g) > 1][:2]
    bad[first_patient[0]] = 1 - bad[first_patient[0]]
    with pytest.raises(SplitError, match="conflicting labels"):
        make_splits(ids, bad, groups, sites)
    moved = list(sites)
    moved[first_patient[0]] = "Z"
    with pytest.raises(SplitError, match="conflicting centers"):
        make_splits(ids, y, groups, moved, scheme="loco")
    with pytest.raises(SplitError, match="at least 2 centers"):
        make_splits(ids, y, groups, None, scheme="loco")
    with pytest.raises(SplitError, match="duplicate image ids"):
        make_splits(ids + ids[:1], np.r_[y, y[:1]], groups + groups[:1], sites + sites[:1])


def test_describe_counts(data, kfold):
    ids, y, groups, _ = data
    rows = describe(kfold, ids, y, groups)
    assert len(rows) == 3 * len(kfold.folds)
    assert sum(r["images"] for r in rows if r["part"] == "test") == len(ids)
    assert sum(r["positives"] for r in rows if r["part"] == "test") == int(y.sum())


# --- with a manifest ---------------------------------------------------------------------------------------


def write_manifest_csv(path: Path, patients: int = 40, seed: int = 0) -> Path:
    ids, y, groups, sites = cohort(patients=patients, positive_rate=0.4, seed=seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "path", "patient_id", "center", "SYN"])
        for i, lab, g, c in zip(ids, y, groups, sites, strict=True):
            writer.writerow([i, f"images/{i}.png", g, c, "DEATH" if lab else "ALIVE"])
        writer.writerow(["unlabelled", "images/unlabelled.png", "P9999", "A", ""])
    return path


def test_manifest_splits_refused_after_manifest_changes(tmp_path):
    manifest = write_manifest_csv(tmp_path / "cohort.csv")
    with pytest.raises(SplitError, match="featcache splits --manifest"):
        load_splits(manifest, "SYN")
    made = build_splits(manifest, "SYN", draws=3)
    assert made.scheme == "kfold" and made.k == 5 and made.center_shots  # from the SYN spec: k-fold, centers
    assert "unlabelled" not in {i for f in made.folds for i in f.test}
    save_splits(made, manifest)
    assert load_splits(manifest, "SYN") == made
    write_manifest_csv(manifest, seed=1)
    with pytest.raises(SplitError, match=r"manifest digest .* recompute with `featcache splits"):
        load_splits(manifest, "SYN")


def test_cli_splits(tmp_path):
    manifest = write_manifest_csv(tmp_path / "cohort.csv", patients=60)
    args = ["splits", "--manifest", str(manifest), "--task", "SYN", "--draws", "3", "--shots", "2,4,64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    path = splits_path(manifest, "SYN")
    assert str(path) in result.output.replace("\n", "")
    assert "fold4" in result.output and "k=64" in result.output
    assert load_splits(manifest, "SYN").shots == (2, 4, 64)
    first = path.read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert path.read_bytes() == first

    loco = CliRunner().invoke(app, [*args, "--scheme", "loco", "--val-fraction", "0.2", "--seed", "3"])
    assert loco.exit_code == 0, loco.output
    made = load_splits(manifest, "SYN")
    assert made.fold_names == ("center-A", "center-B", "center-C") and made.val_fraction == 0.2

    bad = CliRunner().invoke(app, [*args, "--shots", "2,x"])
    assert bad.exit_code != 0 and "comma-separated" in bad.output


# --- hand-edited split files ------------------------------------------------------------------------------


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data["folds"][0], data)
    path.write_text(json.dumps(data))


def _move_one_test_image_to_train(fold, _data):
    counts = Counter(i.split("_")[0] for i in fold["test"])  # ids are img<patient>_<n>
    image = next(i for i in fold["test"] if counts[i.split("_")[0]] > 1)
    fold["test"].remove(image)
    fold["train"].append(image)


def _test_image_into_a_draw(fold, _data):
    draw = fold["fewshot"]["2"][0]
    draw[0] = fold["test"][0]


def _val_image_into_a_draw(fold, _data):
    fold["fewshot"]["2"][0][0] = fold["val"][0]  # the old rule's leak: a validation patient in a support set


def _only_negatives_in_train(fold, _data):
    fold["val"] += [i for i in fold["train"] if i in _POSITIVES]
    fold["train"] = [i for i in fold["train"] if i not in _POSITIVES]
    fold["fewshot"] = {}  # else the draws' positives, now in val, are refused first


def _thin_val(fold, _data):
    """All but one positive validation patient moved to train: too few to set a threshold, draws kept."""
    patients = sorted({i.split("_")[0] for i in fold["val"] if i in _POSITIVES})
    moved = [i for i in fold["val"] if i in _POSITIVES and i.split("_")[0] != patients[0]]
    fold["val"] = [i for i in fold["val"] if i not in moved]
    fold["train"] = sorted(fold["train"] + moved)


def _unknown_id(fold, _data):
    fold["val"].append("img_nobody")


def _empty_val(fold, _data):
    fold["val"] = []


def _one_class_draw(fold, _data):
    one_each = {i.split("_")[0]: i for i in sorted(fold["train"]) if i not in _POSITIVES}  # one image a patient
    fold["fewshot"]["2"][1] = sorted(one_each.values())[:4]


_POSITIVES: set[str] = set()
EDITS = {
    "test patient in train": (_move_one_test_image_to_train, "patients in both train and test"),
    "test image in a draw": (_test_image_into_a_draw, "fewshot k=2 draw 0 holds ids outside the train part"),
    "val image in a draw": (_val_image_into_a_draw, "fewshot k=2 draw 0 holds ids outside the train part"),
    "one class in train": (_only_negatives_in_train, "the train part has no positive"),
    "unknown id": (_unknown_id, "does not label for this task: img_nobody"),
    "thin val": (_thin_val, "holds few-shot draws, but fold0's validation part holds 1 positive patient(s), fewer "
                            f"than the {MIN_VAL_PATIENTS} of each class"),
    "empty val": (_empty_val, "the val part is empty"),
    "draw of one class": (_one_class_draw, "not 2 patients per class"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_hand_edited_split_file_is_refused_in_one_line(tmp_path, edit):
    """The manifest is unchanged (its digest still matches), so only checking the file itself catches these."""
    manifest = write_manifest_csv(tmp_path / "cohort.csv", patients=60)
    with manifest.open() as fh:
        _POSITIVES.update(row["image_id"] for row in csv.DictReader(fh) if row["SYN"] == "DEATH")
    path = save_splits(build_splits(manifest, "SYN", draws=3, per_center=False), manifest)
    change, words = EDITS[edit]
    _edit(path, change)
    with pytest.raises(SplitError) as err:
        load_splits(manifest, "SYN")
    message = str(err.value)
    assert message.startswith(f"{path}: fold0: ") and words in message and "\n" not in message, message
    result = CliRunner().invoke(app, ["probe", "--model", "resnet18-tiny", "--task", "SYN", "--manifest",
                                      str(manifest), "--shots", "2", "--out", str(tmp_path / "runs")])
    assert result.exit_code != 0 and isinstance(result.exception, SplitError)
    assert not (tmp_path / "runs").exists()


def test_split_file_checked_on_its_own(tmp_path, kfold):
    path = save_splits(kfold, tmp_path / "cohort.csv")
    _edit(path, lambda fold, _d: fold["val"].append(fold["test"][0]))
    with pytest.raises(SplitError, match=r"fold0: ids in both val and test: img"):
        read_splits(path)
    data = json.loads(kfold.to_json())
    data["folds"][1]["fewshot"]["2"][0] = [["nested"], 7]
    path.write_text(json.dumps(data))
    with pytest.raises(SplitError, match="fold1: fewshot k=2 draw 0 holds ids that are not strings"):
        read_splits(path)
    for garbage in ("{not json", '{"format": 2, "support_from": "train", "folds": [{"name": 3}]}', "[]"):
        path.write_text(garbage)
        with pytest.raises(SplitError, match="not a valid split file"):
            read_splits(path)
    data = json.loads(save_splits(kfold, tmp_path / "cohort.csv").read_text())
    data["folds"][0]["skipped"] = {}  # a kind left out reads as nothing skipped, not a KeyError later
    path.write_text(json.dumps(data))
    assert read_splits(path).folds[0].skipped == {"fewshot": {}, "fewshot_center": {}}


# --- the few-shot rule: support sets from the train part, one whole validation part per fold --------------


COHORTS = {
    "kfold, 3 centers": (dict(patients=120), dict(scheme="kfold", k=5, per_center=True)),
    "loco, 3 centers": (dict(patients=120), dict(scheme="loco")),
    "kfold, imbalanced": (dict(patients=90, positive_rate=0.15, seed=4), dict(k=3, per_center=False)),
    "kfold, small": (dict(patients=24, positive_rate=0.4, seed=2), dict(k=3, per_center=False, shots=(1, 2, 4))),
    "loco, 4 centers": (dict(patients=80, seed=5, centers=("A", "B", "C", "D")), dict(scheme="loco")),
}


@pytest.mark.parametrize("name", list(COHORTS))
def test_support_sets_come_from_the_train_part_and_every_draw_validates_on_one_whole_part(name):
    made_with, options = COHORTS[name]
    data = cohort(**made_with)
    label, patient, site = lookup(*data)
    splits = make_splits(*data, task="T", draws=5, seed=9, **options)
    assert splits.support_from == SUPPORT_FROM == "train"
    drawn = 0
    for fold in splits.folds:
        val_patients = patients_of(fold.val, patient)
        for per_center, kind in ((False, "fewshot"), (True, "fewshot_center")):
            for k, draws in getattr(fold, kind).items():
                for support in draws:
                    drawn += 1
                    assert set(support) <= set(fold.train) and not patients_of(support, patient) & val_patients
                    strata = Counter((site[i] if per_center else "", label[i]) for i in support)
                    assert set(strata.values()) == {k}
        if fold.fewshot or fold.fewshot_center:  # the one validation part all draws of the fold share
            for c in (0, 1):
                assert len({patient[i] for i in fold.val if label[i] == c}) >= MIN_VAL_PATIENTS, fold.name
    assert drawn


def test_a_fold_whose_validation_part_cannot_validate_skips_its_levels_with_why():
    ids = [f"i{p:02d}" for p in range(30)]
    y = [1 if p < 5 else 0 for p in range(30)]  # 5 positive patients: a 2-fold pool of 2 keeps 1 for validation
    splits = make_splits(ids, y, ids, task="T", k=2, draws=2, seed=0, shots=(1,), per_center=False)
    short = [fold for fold in splits.folds if fold.skipped["fewshot"]]
    assert short and all(not fold.fewshot for fold in short)
    why = short[0].skipped["fewshot"][1]
    assert why == (f"{short[0].name}'s validation part holds 1 positive patient(s), fewer than the "
                   f"{MIN_VAL_PATIENTS} of each class a validation threshold needs")
    with pytest.raises(SplitError, match=f"{short[0].name}: fewshot k=1 was skipped: {short[0].name}'s validation"):
        splits.fewshot(short[0], 1)


def test_few_shot_without_a_validation_part_is_refused():
    data = cohort(patients=40)
    with pytest.raises(SplitError) as err:
        make_splits(*data, task="T", val_fraction=0, draws=2, per_center=False)
    assert "no fold can validate a few-shot run (fold0 has no validation part" in str(err.value)
    assert "--shots '' --no-per-center" in str(err.value)
    folds_only = make_splits(*data, task="T", val_fraction=0, shots=(), per_center=False)
    assert all(not fold.val and not fold.fewshot for fold in folds_only.folds)


def test_a_file_made_under_the_old_rule_is_refused_with_the_command_that_remakes_it(tmp_path):
    manifest = write_manifest_csv(tmp_path / "cohort.csv", patients=60)
    path = save_splits(build_splits(manifest, "SYN", draws=3, shots=(2, 4), per_center=False), manifest)
    old = json.loads(path.read_text())
    old["format"] = 1
    del old["support_from"]
    path.write_text(json.dumps(old))
    with pytest.raises(SplitError) as err:
        load_splits(manifest, "SYN")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: made under the old few-shot rule (support sets "
                                                      "drawn from train + validation patients); remake it with")
    assert (f"`featcache splits --manifest {manifest} --task SYN --scheme kfold --k 5 --val-fraction 0.15 "
            "--shots '2,4' --no-per-center --draws 3 --seed 42`") in message
    with pytest.raises(SplitError, match=f"remake it with `featcache splits --manifest {manifest} "):
        read_splits(path)  # without the manifest: the one beside the split folder
    result = CliRunner().invoke(app, ["probe", "--model", "resnet18-tiny", "--task", "SYN", "--manifest",
                                      str(manifest), "--shots", "2", "--out", str(tmp_path / "runs")])
    assert result.exit_code != 0 and "old few-shot rule" in str(result.exception)
