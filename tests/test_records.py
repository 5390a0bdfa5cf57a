from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.errors import FeatcacheError
from featcache.metrics import evaluate
from featcache.records import (
    TRACKED,
    RunRecord,
    gather,
    load_records,
    record_exists,
    run_key,
    select_head_lr,
    summarize_records,
    versions,
    write_record,
)

DEFINING = dict(
    task="NY",
    backbone="resnet18",
    method="lora",
    fold="fold0",
    seed=42,
    options={"r": 8, "lr": 1e-4, "targets": ["qkv", "fc1"]},
    regime="fewshot",
    shots=8,
    draw=3,
    splits_digest="ab" * 32,
    identity="resnet18@sha256:1234",
)
CHANGES = dict(
    task="NY_icu",
    backbone="dinov2-s",
    method="bitfit",
    fold="fold1",
    seed=43,
    options={"r": 16, "lr": 1e-4, "targets": ["qkv", "fc1"]},
    regime="fewshot-center",
    shots=16,
    draw=4,
    splits_digest="cd" * 32,
    identity="resnet18@sha256:9999",
)


def make_record(**overrides) -> RunRecord:
    rng = np.random.default_rng(overrides.pop("rng_seed", 0))
    y = np.r_[0, 1, rng.integers(0, 2, 18)]
    s = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    fields = {**DEFINING, **overrides}
    return RunRecord(
        **fields,
        test_ids=[f"img{i}" for i in range(y.size)],
        test_labels=y,
        test_scores=s,
        metrics=evaluate(y, s),
        wall_time_s=1.5,
        trainable_params=1234,
        total_params=11_000_000,
        provenance={"store": "/stores/resnet18/abc"},
    )


def test_run_key_is_stable_and_order_free():
    key = run_key(**DEFINING)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert run_key(**DEFINING) == key
    reordered = dict(reversed(list(DEFINING.items())))
    reordered["options"] = dict(reversed(list(DEFINING["options"].items())))
    assert run_key(**reordered) == key
    assert make_record().key == key


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_any_defining_change_gives_a_new_key(name):
    assert run_key(**{**DEFINING, name: CHANGES[name]}) != run_key(**DEFINING)


def test_full_regime_defaults_and_checks():
    full = run_key(task="NY", backbone="resnet18", method="lp", fold="fold0", seed=42)
    assert full == run_key(task="NY", backbone="resnet18", method="lp", fold="fold0", seed=42, options={})
    with pytest.raises(ValueError, match="need shots"):
        make_record(shots=None)
    with pytest.raises(ValueError, match="regime"):
        make_record(regime="zero-shot")
    with pytest.raises(ValueError, match="differ in length"):
        RunRecord(
            task="NY",
            backbone="b",
            method="m",
            fold="f",
            seed=0,
            test_ids=["a"],
            test_labels=[],
            test_scores=[],
        )


def test_versions_recorded_with_missing_as_null():
    found = versions()
    assert set(found) == {"featcache", *TRACKED}
    assert found["numpy"] == np.__version__
    assert all(v is None or isinstance(v, str) for v in found.values())


def test_write_is_atomic_and_nan_becomes_null(tmp_path):
    y = [0, 0, 0]
    record = make_record()
    record.test_labels, record.test_scores, record.test_ids = y, [0.1, 0.7, 0.2], ["a", "b", "c"]
    record.metrics = evaluate(y, record.test_scores)  # single-class: NaN AUCs
    path = write_record(record, tmp_path / "runs")
    assert path.name == f"{record.key}.json"
    assert record_exists(tmp_path / "runs", record.key)
    assert sorted(os.listdir(tmp_path / "runs")) == [path.name]  # no temp file left

    def refuse_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    stored = json.loads(path.read_text(), parse_constant=refuse_nan)
    assert stored["metrics"]["roc_auc"] is None and stored["metrics"]["average_precision"] is None
    assert stored["key"] == record.key and stored["provenance"] == {"store": "/stores/resnet18/abc"}
    [loaded] = load_records(tmp_path / "runs")
    assert loaded.key == record.key and loaded.test_scores == record.test_scores


def test_killed_write_leaves_nothing(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_record(make_record(), tmp_path)
    assert os.listdir(tmp_path) == []


def test_load_skips_temp_files_and_names_bad_records(tmp_path):
    write_record(make_record(), tmp_path)
    (tmp_path / ".abc.json.x1.tmp").write_text("{half")
    assert len(load_records(tmp_path)) == 1
    (tmp_path / "broken.json").write_text("{half")
    with pytest.raises(FeatcacheError, match="broken.json: not a run record"):
        load_records(tmp_path)


def _records(folder):
    for fold in range(3):
        write_record(
            make_record(regime="full", shots=None, draw=None, fold=f"fold{fold}", rng_seed=fold), folder
        )
        for draw in range(2):
            write_record(make_record(fold=f"fold{fold}", draw=draw, rng_seed=10 + draw), folder)
    write_record(make_record(method="lp", options={}, regime="full", shots=None, draw=None), folder)


def test_gather_writes_one_flat_row_per_run(tmp_path):
    _records(tmp_path / "runs")
    out = gather(tmp_path / "runs", tmp_path / "results.csv")
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10
    columns = list(rows[0])
    expected = ["key", "task", "backbone", "method", "regime", "shots", "draw", "fold", "seed", "wall_time_s"]
    expected += [
        "trainable_params",
        "opt_r",
        "opt_lr",
        "opt_targets",
        "mcc",
        "mcc_val_thr",
        "average_precision",
        "pr_auc_trapezoid",
        "roc_auc",
    ]
    for name in [*expected, "version_numpy"]:
        assert name in columns, name
    assert not any("score" in c or c.startswith("test_") for c in columns)
    assert len({r["key"] for r in rows}) == 10
    lp = next(r for r in rows if r["method"] == "lp")
    assert lp["opt_r"] == "" and lp["shots"] == "" and lp["mcc_val_thr"] == ""  # NaN and None: empty cells
    assert float(lp["mcc"]) == pytest.approx(make_record().metrics["mcc"])


def test_summary_groups_over_folds_and_draws(tmp_path):
    _records(tmp_path)
    rows = summarize_records(load_records(tmp_path))
    by = {(r["method"], r["regime"], r["shots"]): r for r in rows}
    assert by[("lora", "fewshot", 8)]["runs"] == 6 and by[("lora", "full", None)]["runs"] == 3
    assert by[("lp", "full", None)]["runs"] == 1
    few = {}
    for r in load_records(tmp_path):
        if r.regime == "fewshot":
            few.setdefault(r.fold, []).append(r.metrics["mcc"])
    fold_means = [np.mean(v) for v in few.values()]
    mean, std, n = by[("lora", "fewshot", 8)]["mcc"]
    assert n == 3 and mean == pytest.approx(np.mean(fold_means)) and std == pytest.approx(np.std(fold_means, ddof=1))
    spread = by[("lora", "fewshot", 8)]["mcc_draw_std"]
    assert spread == pytest.approx(np.mean([np.std(v, ddof=1) for v in few.values()]))
    assert by[("lora", "full", None)]["folds"] == 3 and np.isnan(by[("lora", "full", None)]["mcc_draw_std"])
    assert by[("lora", "fewshot", 8)]["options"] == 'lr=0.0001,r=8,targets=["qkv","fc1"]'


def test_cli_results(tmp_path):
    _records(tmp_path / "runs")
    result = CliRunner().invoke(app, ["results", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "results.csv").is_file()
    assert "10 runs" in result.output and "±" in result.output and "fewshot" in result.output
    out = tmp_path / "elsewhere" / "r.csv"
    assert CliRunner().invoke(app, ["results", str(tmp_path / "runs"), "--out", str(out)]).exit_code == 0
    assert out.read_text() == (tmp_path / "runs" / "results.csv").read_text()
    missing = CliRunner().invoke(app, ["results", str(tmp_path / "nothing")])
    assert missing.exit_code != 0


def _fold_record(fold: int, seed: int) -> RunRecord:
    rng = np.random.default_rng(seed)
    y = np.r_[0, 1, rng.integers(0, 2, 38)]
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    ids = [f"f{fold}_img{i}" for i in range(y.size)]
    return RunRecord(task="NY", backbone="resnet18", method="lp", fold=f"fold{fold}", seed=42, regime="full",
                     test_ids=ids, test_labels=y, test_scores=s, test_patients=[i[:-1] for i in ids],
                     metrics=evaluate(y, s))


def test_pooled_interval_over_disjoint_folds_and_summary_csv(tmp_path):
    from featcache.metrics import binary_metrics
    from featcache.records import pooled_interval, write_summary

    folds = [_fold_record(f, seed=f) for f in range(5)]
    pooled = pooled_interval(folds)
    y = np.concatenate([r.test_labels for r in folds])
    s = np.concatenate([r.test_scores for r in folds])
    assert pooled["n"] == y.size and pooled["patients"] < y.size  # two images per patient id prefix
    for name in ("mcc", "average_precision"):
        assert pooled[name] == pytest.approx(binary_metrics(y, s)[name])
        low, high = pooled[f"{name}_ci"]
        assert low < pooled[name] < high
    draws = [_fold_record(0, seed=d) for d in range(3)]  # one fold's test set scored by several draws
    assert pooled_interval(draws) is None
    assert pooled_interval([make_record()]) is None  # no patients recorded

    rows = summarize_records(folds, pooled=True)
    path = write_summary(rows, tmp_path / "summary.csv")
    (row,) = list(csv.DictReader(path.open()))
    assert row["runs"] == "5" and float(row["pooled_mcc_ci_low"]) == pytest.approx(pooled["mcc_ci"][0])
    assert float(row["mcc_mean"]) == pytest.approx(np.mean([r.metrics["mcc"] for r in folds]))


def _hand(fold: str, draw: int, mcc: float, drawn: dict | None = None) -> RunRecord:
    record = make_record(fold=fold, draw=draw)
    record.metrics = {**record.metrics, "mcc": mcc}
    if drawn is not None:
        record.provenance = {"drawn_patients": drawn}
    return record


def test_fewshot_summary_averages_draws_within_folds_then_spreads_over_folds():
    """Known answers: fold means 0.2 and 0.6 give 0.4 ± 0.283 over 2 folds, not the 6 runs pooled."""
    values = {"fold0": [0.1, 0.2, 0.3], "fold1": [0.5, 0.5, 0.8]}
    drawn = {"fold0": {"positive": 5, "negative": 30}, "fold1": {"positive": 7, "negative": 25}}
    records = [_hand(fold, d, v, drawn[fold]) for fold, vs in values.items() for d, v in enumerate(vs)]
    (row,) = summarize_records(records, metrics=("mcc",))
    assert (row["runs"], row["folds"]) == (6, 2)
    assert row["mcc"].n == 2 and row["mcc"].mean == pytest.approx(0.4)
    assert row["mcc"].std == pytest.approx(np.sqrt(0.08))
    assert row["mcc_draw_std"] == pytest.approx((0.1 + np.std([0.5, 0.5, 0.8], ddof=1)) / 2)
    assert row["drawn_patients"] == {"positive": 5, "negative": 25}  # smallest over folds, per class
    nan_draw = _hand("fold1", 3, float("nan"), drawn["fold1"])  # an undefined value leaves its fold's mean
    (again,) = summarize_records([*records, nan_draw], metrics=("mcc",))
    assert again["mcc"].mean == pytest.approx(0.4) and again["runs"] == 7


def test_drawn_patients_counts_distinct_patients_per_class():
    from featcache.records import drawn_patients

    patients = np.array(["a", "b", "a", "c", "d", "d", "e"])
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    assert drawn_patients(patients, labels) == {"positive": 2, "negative": 3}


def _old_probe_record() -> dict:
    """A cached-probe record as written before the probe had its own method name and AP its own name."""
    y = [0, 1, 1, 0, 1, 0]
    s = [0.2, 0.7, 0.4, 0.1, 0.9, 0.6]
    metrics = evaluate(y, s, threshold=0.5)
    metrics["pr_auc"] = metrics.pop("average_precision")
    del metrics["pr_auc_trapezoid"]
    options = {"head": "l2-logreg", "select": "pr_auc", "solver": "torch"}
    old = dict(task="NY", backbone="resnet18", method="lp", fold="fold0", seed=42, options=options,
               regime="full", shots=None, draw=None, splits_digest="ab", identity="resnet18/x")
    return {**old, "key": run_key(**old), "test_ids": list("abcdef"), "test_labels": y, "test_scores": s,
            "test_patients": ["p1", "p2", "p2", "p3", "p4", "p5"], "metrics": metrics, "provenance": {"C": 1.0}}


def test_old_probe_records_read_back_as_probe_with_current_metrics(tmp_path):
    old = _old_probe_record()
    (tmp_path / f"{old['key']}.json").write_text(json.dumps(old))
    [record] = load_records(tmp_path)
    assert record.method == "probe" and record.options["select"] == "average_precision"
    assert record.key != old["key"]  # the run key follows the migrated fields
    assert record.metrics["average_precision"] == old["metrics"]["pr_auc"] and "pr_auc" not in record.metrics
    fresh = evaluate(old["test_labels"], old["test_scores"], threshold=0.5, patients=old["test_patients"])
    for name in ("pr_auc_trapezoid", "patient_mcc", "patient_average_precision", "patient_mcc_val_thr"):
        assert record.metrics[name] == pytest.approx(fresh[name]), name
    assert "method lp -> probe" in record.provenance["migrated"] and record.provenance["C"] == 1.0
    write_record(record, tmp_path)  # the same run, now also under its current key: one record, not two
    [again] = load_records(tmp_path)
    assert again.key == record.key and len(list(tmp_path.glob("*.json"))) == 2
    stage2 = {**old, "method": "lp", "options": {"head_lr": 1e-3}}  # end-to-end LP keeps its name
    assert RunRecord.from_dict(stage2).method == "lp"


def test_results_csv_has_the_selection_outcome(tmp_path):
    from featcache.records import select_head_lr, write_results

    probe = make_record(method="probe", options={"head": "l2-logreg"})
    probe.provenance = {"C": 0.1, "C_rule": "validation", "C_edge": None}
    runs = [make_record(method="lp", options={"head_lr": lr}, rng_seed=i) for i, lr in enumerate((1e-2, 1e-3))]
    for run, loss in zip(runs, (0.4, 0.3), strict=True):
        run.training = {"best_epoch": 12, "val_loss": loss}
    kept, notes = select_head_lr([probe, *runs])
    assert {r.key for r in kept} == {probe.key, runs[1].key} and "head LR 0.001" in notes[0]
    path = write_results([probe, *runs], tmp_path / "results.csv", selected={r.key for r in kept})
    rows = {r["method"] + r["opt_head_lr"]: r for r in csv.DictReader(path.open())}
    assert rows["probe"]["selected_C"] == "0.1" and rows["probe"]["C_rule"] == "validation"
    assert rows["probe"]["head_lr_selected"] == "" and rows["lp0.001"]["head_lr_selected"] == "True"
    assert rows["lp0.01"]["head_lr_selected"] == "False" and rows["lp0.001"]["train_best_epoch"] == "12"


def test_cli_results_selects_head_lr_shows_patient_level_and_writes_selection(tmp_path):
    folder = tmp_path / "runs"
    for fold in range(2):
        for lr, loss in ((1e-2, 0.5), (1e-3, 0.2)):
            run = make_record(method="lp", options={"head_lr": lr}, regime="full", shots=None, draw=None,
                              fold=f"fold{fold}", rng_seed=fold)
            run.training = {"best_epoch": 7, "val_loss": loss}
            write_record(run, folder)
        probe = make_record(method="probe", options={"head": "l2-logreg"}, regime="full", shots=None, draw=None,
                            fold=f"fold{fold}", rng_seed=fold)
        probe.test_patients = [f"p{i // 2}" for i in range(len(probe.test_ids))]
        probe.test_labels = [probe.test_labels[i - i % 2] for i in range(len(probe.test_ids))]
        probe.metrics = evaluate(probe.test_labels, probe.test_scores, patients=probe.test_patients)
        probe.provenance = {"C": 100.0, "C_rule": "validation", "C_edge": "upper" if fold else None}
        write_record(probe, folder)
    result = CliRunner().invoke(app, ["results", str(folder), "--level", "patient", "--pr-trapezoid"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "selected NY resnet18 lp full: head LR 0.001 by mean validation loss" in text
    assert "C at an edge of the grid in 1 of 2 runs" in text and "patient level" in text and "PR trapz" in text
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 6 and {r["selected_C"] for r in rows if r["method"] == "probe"} == {"100.0"}
    assert sorted(r["head_lr_selected"] for r in rows if r["method"] == "lp") == ["False", "False", "True", "True"]
    summary = {r["method"]: r for r in csv.DictReader((folder / "results_summary.csv").open())}
    assert summary["lp"]["options"] == "head_lr=0.001" and summary["lp"]["runs"] == "2"
    assert summary["probe"]["patient_mcc_mean"] != summary["probe"]["mcc_mean"]
    assert summary["probe"]["patient_average_precision_folds"] == "2"
    every = CliRunner().invoke(app, ["results", str(folder), "--all-head-lrs"])
    assert every.exit_code == 0 and "selected" not in every.output
    other = make_record(method="probe", options={"head": "l2-logreg", "refit": "none"}, regime="full", shots=None,
                        draw=None)
    write_record(other, folder)  # a second option set: numbered, and the legend names only what differs
    text = CliRunner().invoke(app, ["results", str(folder)]).output
    assert {"probe #1: refit=–", "probe #2: refit=none"} <= set(text.splitlines()) or \
        {"probe #1: refit=none", "probe #2: refit=–"} <= set(text.splitlines())
    assert "head=" not in text
    assert any(line.startswith("wrote ") and line.endswith("(one row per configuration)")
               for line in text.splitlines())  # off a terminal (a log) a line is written whole, never wrapped
    assert CliRunner().invoke(app, ["results", str(folder), "--level", "study"]).exit_code == 2


def test_fewshot_records_of_different_rules_are_never_pooled(tmp_path):
    """A few-shot record made before the rule was recorded reads back as the old rule (support sets from
    train + val); summaries, head-LR selection and `featcache results` keep the two rules apart."""
    new = [make_record(fold=f"fold{f}", draw=d, support_from="train", rng_seed=f * 3 + d)
           for f in range(2) for d in range(3)]
    old = []
    for record in new[:3]:
        data = record.to_dict()
        del data["support_from"]
        data["splits_digest"] = "ef" * 32  # another split file: another key
        old.append(RunRecord.from_dict(data))
    assert {r.support_from for r in old} == {"train+val"} and "support_from train+val" in old[0].provenance["migrated"]
    rows = summarize_records(new + old, metrics=("mcc",))
    assert sorted((row["support_from"], row["runs"]) for row in rows) == [("train", 6), ("train+val", 3)]
    for record in new + old:
        record.options = {**record.options, "head_lr": 1e-3}
        record.training = {"val_loss": 0.3}
    kept, notes = select_head_lr(new + old)
    assert len(kept) == 9 and len(notes) == 2 and any("(support from train+val)" in n for n in notes)
    for record in new + old:
        write_record(record, tmp_path)
    result = CliRunner().invoke(app, ["results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "fewshot k=8 (old rule)" in result.output and "remake the splits" in " ".join(result.output.split())
    full = make_record(regime="full", shots=None, draw=None)
    assert RunRecord.from_dict(full.to_dict()).support_from is None  # full data: no support set, no rule
