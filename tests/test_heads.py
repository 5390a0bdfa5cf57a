"""`adapters train --method lp` on exact stored features: the same numbers as through the images, on every
family, full data and few-shot; the batched Adam bit for bit; the store key of its own; refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adapters.artifacts import predict
from adapters.heads import HEAD_VIEW, StackedAdam
from adapters.plan import TrainSettings
from adapters.train import run_train
from adapters.trainer import batches
from cli.adapters_app import app as adapters_app
from featcache.errors import UsageError
from featcache.extract import extract_features
from featcache.integrity import verify
from featcache.store import RowGroup, find_feature_group, list_groups

TASK = "SYN"
FAMILIES = ("resnet18-tiny", "dinov2-s-tiny", "clip-l-tiny", "medclip-vit-tiny", "biomedclip-tiny")
# short, but long enough for warm-up, a plateau cut and an early stop to happen
SHORT = TrainSettings(max_epochs=8, warmup=2, patience=3, plateau_patience=1, batch_size=8,
                      checkpoint_every_s=1e9)
CONTINUOUS = ("val_threshold",)  # a value between two validation scores: equal to float rounding


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory) -> Path:
    manifest = synth_cohort(patients=24, positive_rate=0.4, size=40, seed=3, draws=2, shots=(2,),
                            to=tmp_path_factory.mktemp("cohort"))  # this module's copy: features go beside it
    return manifest


def _both(cohort: Path, out: Path, model: str, **kwargs):
    kwargs = {"settings": SHORT, "folds": ["fold0"], "device": "cpu", **kwargs}
    images = run_train(cohort, TASK, model, method="lp", out=out / "images", inputs="images", **kwargs)
    features = run_train(cohort, TASK, model, method="lp", out=out / "features", inputs="features", **kwargs)
    return ({r.key: r for r in images.records}, {r.key: r for r in features.records})


def _assert_same(images: dict, features: dict) -> None:
    assert images.keys() == features.keys() and images  # the same runs, under the same keys
    for key, a in images.items():
        b = features[key]
        assert (a.provenance["trained_on"], b.provenance["trained_on"]) == ("images", "features")
        assert a.training["best_epoch"] == b.training["best_epoch"], key
        assert a.training["epochs_run"] == b.training["epochs_run"], key
        assert np.allclose(a.test_scores, b.test_scores, rtol=0, atol=1e-5), key
        assert np.allclose(a.training["curves"]["val_loss"], b.training["curves"]["val_loss"], rtol=1e-5)
        assert a.training["curves"]["lr"] == b.training["curves"]["lr"]  # warm-up and plateau alike
        for name, value in a.metrics.items():
            if name in CONTINUOUS:
                assert math.isclose(value, b.metrics[name], abs_tol=1e-6), name
            else:
                assert value == b.metrics[name] or (value != value and b.metrics[name] != b.metrics[name]), name


@pytest.mark.parametrize("model", FAMILIES)
def test_features_path_gives_the_image_paths_numbers(cohort, tmp_path, model):
    images, features = _both(cohort, tmp_path / "full", model, head_lrs=(1e-2,))
    _assert_same(images, features)
    assert {r.training["stopped"] for r in images.values()} <= {"early", "max-epochs"}
    images, features = _both(cohort, tmp_path / "few", model, full=False, shots=(2,), draws=2,
                               head_lrs=(1e-2, 1e-3))
    _assert_same(images, features)


def test_features_path_writes_what_predict_reads_and_skips_recorded_runs(cohort, tmp_path):
    report = run_train(cohort, TASK, "resnet18-tiny", method="lp", settings=SHORT, folds=["fold0", "fold1"],
                       head_lrs=(1e-2, 1e-3), out=tmp_path, device="cpu")
    assert report.written == 4 and {r.provenance["trained_on"] for r in report.records} == {"features"}
    program = report.records[0].provenance["program"]
    assert program["runs"] == 4 and program["seconds"] >= program["extract_s"] > 0
    record = report.records[0]
    made = predict(tmp_path / record.key, cohort, device="cpu")
    scored = {row["image_id"]: row[made.column] for row in made.rows}
    assert np.allclose([scored[i] for i in record.test_ids], record.test_scores, atol=1e-6)
    again = run_train(cohort, TASK, "resnet18-tiny", method="lp", settings=SHORT, folds=["fold0", "fold1"],
                      head_lrs=(1e-2, 1e-3), out=tmp_path, device="cpu")
    assert (again.written, again.existing) == (0, 4)


def test_exact_features_have_a_key_of_their_own_and_damage_is_repaired(cohort, tmp_path):
    store = tmp_path / "features.zarr"
    extract_features(cohort, "resnet18-tiny", store=store, device="cpu")  # stage 1: float16, float pixels
    first = run_train(cohort, TASK, "resnet18-tiny", method="lp", settings=SHORT, folds=["fold0"],
                      head_lrs=(1e-2,), out=tmp_path / "a", device="cpu", features=store).records[0]
    groups = list_groups(store, "features")
    assert len(groups) == 2  # stage 1's group is not used: the exact one is keyed apart
    exact = next(g for g in groups if HEAD_VIEW in g.spec["views"])
    assert exact.spec["dtype"] == "float32" and "uint8" in exact.spec["pixels"]
    assert find_feature_group(store, "resnet18-tiny", "cls").name != exact.name  # probes never see it
    chunk = exact.chunk_file(HEAD_VIEW, 0)
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # damaged bytes: repaired on the next run, as stage 1
    assert not verify(RowGroup.open(store, exact.name)).ok
    second = run_train(cohort, TASK, "resnet18-tiny", method="lp", settings=SHORT, folds=["fold0"],
                       head_lrs=(1e-2,), out=tmp_path / "b", device="cpu", features=store).records[0]
    assert second.test_scores == first.test_scores
    assert verify(RowGroup.open(store, exact.name)).ok


def test_stacked_adam_is_torch_adam_bit_for_bit():
    """Runs with their own LRs, some skipping steps (no batch at that index), against one torch Adam each."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 2, 37, generator=generator), torch.randn(4, 2, generator=generator)
    lrs = [1e-2, 1e-3, 1e-4, 5e-2]
    own = []
    for r in range(4):
        w, b = weight[r].clone().requires_grad_(), bias[r].clone().requires_grad_()
        own.append((w, b, torch.optim.Adam([w, b], lr=lrs[r])))
    stacked = StackedAdam([weight, bias])
    for step in range(60):
        runs = [r for r in range(4) if (step + r) % 3]
        g_w, g_b = torch.randn(4, 2, 37, generator=generator), torch.randn(4, 2, generator=generator)
        for r in runs:
            w, b, adam = own[r]
            w.grad, b.grad = g_w[r].clone(), g_b[r].clone()
            adam.step()
        index = torch.tensor(runs)
        stacked.step(index, [g_w[index], g_b[index]], np.array([lrs[r] for r in runs]))
    for r, (w, b, _) in enumerate(own):
        assert torch.equal(w.detach(), weight[r]) and torch.equal(b.detach(), bias[r])


def test_refusals_are_one_line(cohort, tmp_path):
    augmented = TrainSettings(max_epochs=1, warmup=0, batch_size=8, augment=True)
    with pytest.raises(UsageError, match="--from features: augmentation changes the images"):
        run_train(cohort, TASK, "resnet18-tiny", method="lp", settings=augmented, out=tmp_path, inputs="features")
    with pytest.raises(UsageError, match="--from features: method lora trains the backbone"):
        run_train(cohort, TASK, "resnet18-tiny", method="lora", out=tmp_path, inputs="features")
    with pytest.raises(UsageError, match="--from 'pixels'"):
        run_train(cohort, TASK, "resnet18-tiny", method="lp", out=tmp_path, inputs="pixels")
    result = CliRunner().invoke(adapters_app, [
        "train", "--method", "lp", "--model", "resnet18-tiny", "--task", TASK, "--manifest", str(cohort),
        "--out", str(tmp_path), "--augment", "--from", "features", "--device", "cpu"])
    assert result.exit_code != 0 and isinstance(result.exception, UsageError)  # printed in one line by run_app
    assert str(result.exception).startswith("--from features: augmentation") and "\n" not in str(result.exception)
    assert not list(tmp_path.glob("*.json"))


def test_a_trailing_batch_of_one_joins_the_previous():
    """n = size + 1 (two batches before the merge) used to fail on the image path too."""
    parts = batches(33, 32, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [33] and sorted(torch.cat(parts).tolist()) == list(range(33))
    assert [len(p) for p in batches(65, 32, torch.Generator().manual_seed(0))] == [32, 33]
