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
    assert stored["metrics"]["roc_auc"] is None and stored["metrics"]["pr_auc"] is None
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
        "pr_auc",
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
    few = [r.metrics["mcc"] for r in load_records(tmp_path) if r.regime == "fewshot"]
    mean, std, n = by[("lora", "fewshot", 8)]["mcc"]
    assert n == 6 and mean == pytest.approx(np.mean(few)) and std == pytest.approx(np.std(few, ddof=1))
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
    for name in ("mcc", "pr_auc"):
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
