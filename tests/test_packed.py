"""Packed training (`adapters.packed`): the same records as one run at a time, within float error, on tiny
backbones of each family; an unpacked fallback with one line where packing cannot be exact; no vmap fallback
loop; checkpoints that resume either way; halving on out-of-memory; refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adapters.packed import Packer
from adapters.plan import TrainSettings
from adapters.train import run_train
from cli.adapters_app import app as adapters_app
from featcache.errors import UsageError
from featcache.records import load_records
from featcache.splits import build_splits, save_splits
from featcache.synth import make_cohort

TASK = "SYN"
QUICK = TrainSettings(max_epochs=3, warmup=1, patience=2, plateau_patience=1, batch_size=8, checkpoint_every_s=0,
                      adapter_dropout=0.0)
# vmap's per-run loop over an op without a batching rule announces itself with this warning
NO_FALLBACK = "error:.*batching rule.*:UserWarning"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    manifest = make_cohort(tmp_path_factory.mktemp("cohort"), patients=24, positive_rate=0.4, size=40, seed=3)
    save_splits(build_splits(manifest, TASK, draws=2, shots=(2, 4)), manifest)
    return manifest


def _train(cohort: Path, out: Path, model: str, method: str, pack: int = 1, settings: TrainSettings = QUICK,
           **kwargs):
    kwargs.setdefault("folds", ["fold0"])
    kwargs.setdefault("head_lrs", (1e-2, 1e-3))
    kwargs.setdefault("full", False)
    kwargs.setdefault("shots", (4,))
    kwargs.setdefault("inputs", "images")  # LP too: on stored features it is one batched program already
    return run_train(cohort, TASK, model, method=method, out=out, device="cpu",
                     settings=dataclasses.replace(settings, pack=pack), **kwargs)


def _same(packed, alone) -> None:
    """Same keys, best epochs, curves and test scores within 1e-5; identical records but for wall time and the
    pack width in provenance."""
    one, two = {r.key: r for r in packed}, {r.key: r for r in alone}
    assert one.keys() == two.keys()
    for key, a in one.items():
        b = two[key]
        assert a.training["best_epoch"] == b.training["best_epoch"]
        assert a.training["epochs_run"] == b.training["epochs_run"]
        np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-5)
        for curve in ("train_loss", "val_loss", "lr"):
            np.testing.assert_allclose(a.training["curves"][curve], b.training["curves"][curve], atol=1e-5)
        assert a.provenance.pop("packed") >= 1 and "packed" not in b.provenance
        for d in (a, b):
            d.wall_time_s = d.created = None
            d.metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.metrics.items()}
            d.training = {k: v for k, v in d.training.items() if k not in ("curves", "val_loss")}
            d.test_scores = []
        assert a.to_dict() == b.to_dict()


@pytest.mark.filterwarnings(NO_FALLBACK)
@pytest.mark.parametrize(("model", "method"), [
    ("dinov2-s-tiny", "bitfit"), ("dinov2-s-tiny", "lora"), ("dinov2-s-tiny", "ia3"), ("dinov2-s-tiny", "lp"),
    ("dinov2-s-tiny", "vera"), ("dinov2-s-tiny", "fft"),
    ("resnet18-tiny", "lora"), ("resnet18-tiny", "ia3"), ("resnet18-tiny", "lp"), ("resnet18-tiny", "bitfit"),
])
def test_packed_equals_one_at_a_time(cohort, tmp_path, model, method):
    """Four few-shot runs (two draws x two head LRs) in slots of three: the fourth takes a freed slot."""
    alone = _train(cohort, tmp_path / "alone", model, method)
    packed = _train(cohort, tmp_path / "packed", model, method, pack=3)
    assert packed.notes == [] and packed.written == 4
    _same(packed.records, alone.records)
    assert {r.key for r in load_records(tmp_path / "packed")} == {r.key for r in alone.records}


@pytest.mark.filterwarnings(NO_FALLBACK)
@pytest.mark.parametrize("model", ["clip-l-tiny", "biomedclip-tiny"])
def test_other_vit_families_pack_exactly(cohort, tmp_path, model):
    """LoRA (dropout 0) on the other families, full-data folds of different sizes (padded rows). MedCLIP's Swin
    keeps stochastic depth in training, so it does not pack (next test)."""
    kwargs = dict(full=True, shots=(), folds=["fold0", "fold1"], head_lrs=(1e-2,))
    settings = dataclasses.replace(QUICK, max_epochs=2)
    alone = _train(cohort, tmp_path / "alone", model, "lora", settings=settings, **kwargs)
    packed = _train(cohort, tmp_path / "packed", model, "lora", pack=2, settings=settings, **kwargs)
    _same(packed.records, alone.records)


def test_inexact_packing_runs_one_at_a_time_and_says_why(cohort, tmp_path):
    """FFT on a CNN trains batch norm; LoRA at the benchmark's dropout draws masks, and so does the Swin's
    stochastic depth: one line each, unpacked runs."""
    settings = dataclasses.replace(QUICK, max_epochs=2)
    fft = _train(cohort, tmp_path / "b", "resnet18-tiny", "fft", pack=4, settings=settings, head_lrs=(1e-2,))
    assert len(fft.notes) == 1 and "batch norm trains" in fft.notes[0]
    assert all("packed" not in r.provenance for r in fft.records)
    lora = _train(cohort, tmp_path / "l", "dinov2-s-tiny", "lora", pack=4, head_lrs=(1e-2,),
                  settings=dataclasses.replace(settings, adapter_dropout=None))
    assert len(lora.notes) == 1 and "dropout 0.1 is active" in lora.notes[0]
    swin = _train(cohort, tmp_path / "s", "medclip-vit-tiny", "lora", pack=2, head_lrs=(1e-2,), shots=(2,),
                  settings=dataclasses.replace(settings, max_epochs=1))
    assert len(swin.notes) == 1 and "drop_path" in swin.notes[0] and swin.written == 2


class _Stop(Exception):
    pass


def test_packed_checkpoints_resume_unpacked_to_the_same_records(cohort, tmp_path):
    """Stopped mid-pack, the runs resume one at a time from the packed checkpoints (one format) and end where
    uninterrupted runs do."""
    settings = dataclasses.replace(QUICK, max_epochs=4, patience=4)
    whole = _train(cohort, tmp_path / "whole", "dinov2-s-tiny", "lp", settings=settings)

    def stop_at_3(label, done, total, status):
        if done == 3 and not status.startswith("done"):
            raise _Stop

    with pytest.raises(_Stop):
        _train(cohort, tmp_path / "cut", "dinov2-s-tiny", "lp", pack=4, settings=settings, progress=stop_at_3)
    resumed = _train(cohort, tmp_path / "cut", "dinov2-s-tiny", "lp", settings=settings)
    assert resumed.written == 4
    for a, b in zip(sorted(resumed.records, key=lambda r: r.key), sorted(whole.records, key=lambda r: r.key),
                    strict=True):
        np.testing.assert_allclose(a.training["curves"]["val_loss"], b.training["curves"]["val_loss"], atol=1e-5)
        np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-5)


def test_out_of_memory_halves_the_pack_and_says_so(cohort, tmp_path, monkeypatch):
    """A pass over more than one run that runs out of memory is retried at half the width, same records."""
    logits = Packer.logits

    def small_memory(self, trainers, xs):
        if len(trainers) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return logits(self, trainers, xs)

    settings = dataclasses.replace(QUICK, max_epochs=2)
    alone = _train(cohort, tmp_path / "alone", "resnet18-tiny", "lp", settings=settings)
    monkeypatch.setattr(Packer, "logits", small_memory)
    packed = _train(cohort, tmp_path / "packed", "resnet18-tiny", "lp", pack=4, settings=settings)
    assert packed.notes == ["out of memory with 4 runs in one pass: packing 2 from now on",
                            "out of memory with 2 runs in one pass: packing 1 from now on"]
    _same(packed.records, alone.records)


def test_pack_refusals(cohort, tmp_path):
    for bad in ("0", "-2"):
        result = CliRunner().invoke(adapters_app, ["train", "--method", "lp", "--model", "resnet18-tiny",
                                                   "--task", TASK, "--manifest", str(cohort), "--pack", bad])
        assert result.exit_code != 0 and "--pack" in result.output and "Traceback" not in result.output
    with pytest.raises(UsageError, match="--pack must be at least 1, got 0"):
        TrainSettings(pack=0)
    with pytest.raises(UsageError, match="--adapter-dropout"):
        TrainSettings(adapter_dropout=1.5)


def test_cli_pack_writes_the_records_and_keys_do_not_depend_on_it(cohort, tmp_path):
    args = ["train", "--method", "lora", "--model", "dinov2-s-tiny", "--task", TASK, "--manifest", str(cohort),
            "--fold", "fold0", "--shots", "2", "--head-lr", "1e-2", "--max-epochs", "2", "--warmup", "1",
            "--batch-size", "8", "--adapter-dropout", "0", "--device", "cpu", "--quiet"]
    packed = CliRunner().invoke(adapters_app, [*args, "--pack", "2", "--out", str(tmp_path / "p")])
    assert packed.exit_code == 0, packed.output
    alone = CliRunner().invoke(adapters_app, [*args, "--out", str(tmp_path / "a")])
    assert alone.exit_code == 0, alone.output
    keys = sorted(r.key for r in load_records(tmp_path / "p"))
    assert len(keys) == 2 and keys == sorted(r.key for r in load_records(tmp_path / "a"))
    default = _train(cohort, tmp_path / "d", "dinov2-s-tiny", "lora", settings=dataclasses.replace(
        QUICK, max_epochs=1, adapter_dropout=None), head_lrs=(1e-2,), shots=(2,))
    assert all("adapter_dropout" not in r.options for r in default.records)  # benchmark keys unchanged
    assert all(r.options["adapter_dropout"] == 0.0 for r in load_records(tmp_path / "p"))


def test_cost_model_prices_missing_runs_packed_and_one_at_a_time(tmp_path):
    """Measured wall times give both estimates; a pair measured one way only gets the other through the
    packing gain measured on another pair."""
    from featcache.records import RunRecord, write_record
    from study.expand import Entry
    from study.plan import PlanRow, estimate, packing_gain

    def record(backbone: str, method: str, seconds: float, packed: bool, draw: int) -> None:
        write_record(RunRecord(task=TASK, backbone=backbone, method=method, fold="fold0", seed=42,
                               regime="fewshot", shots=2, draw=draw, wall_time_s=seconds,
                               provenance={"packed": 8} if packed else {}), tmp_path)

    for draw in range(2):
        record("dinov2-s", "lp", 40.0, False, draw)
        record("dinov2-s", "lp", 10.0, True, 10 + draw)  # gain 4
        record("resnet18", "lp", 20.0, False, draw)  # measured one at a time only
    assert packing_gain(load_records(tmp_path)) == pytest.approx(4.0)
    vit, cnn, none = (Entry(b, TASK, m, None, "fewshot", 2) for b, m in
                      (("dinov2-s", "lp"), ("resnet18", "lp"), ("resnet18", "ia3")))
    costs = estimate([PlanRow(vit, 10, 0, True), PlanRow(cnn, 10, 0, True), PlanRow(none, 10, 0, True)], tmp_path)
    assert (costs[vit].seconds, costs[vit].packed) == (400.0, 100.0)
    assert (costs[cnn].seconds, costs[cnn].packed) == (200.0, pytest.approx(50.0))
    assert "measured gain" in costs[cnn].basis
    assert costs[none].seconds is None and costs[none].packed is None
