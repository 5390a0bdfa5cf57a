"""Stage 2 end to end: `run_train` on every family, closed-form trainable counts, artefacts that plain peft
loads, merge, resume after a kill, accumulation, DDP, and every refusal as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapters.artifacts import export_merged, load_export, load_model, predict
from adapters.classifier import Classifier
from adapters.images import load_images
from adapters.methods import METHODS, apply_method
from adapters.model import counted_parameters, head_module
from adapters.plan import TrainSettings, planned_keys
from adapters.train import run_train
from adapters.trainer import CHECKPOINT, _State, batch_norm_note, make_plateau, observe
from cli.adapters_app import app as adapters_app
from cli.featcache_app import app as featcache_app
from featcache.backbones import build_backbone, count_parameters, get_spec
from featcache.errors import FeatcacheError, SplitError, StoreError, UsageError
from featcache.extract import extract_features
from featcache.manifest import load_manifest
from featcache.pixels import cache_pixels
from featcache.probe import run_probe
from featcache.records import load_records
from featcache.splits import build_splits, save_splits, support_digest

TASK = "SYN"
QUICK = TrainSettings(max_epochs=3, warmup=1, patience=2, plateau_patience=1, batch_size=8,
                      checkpoint_every_s=0)
FAMILIES = ("resnet18-tiny", "dinov2-s-tiny", "clip-l-tiny", "medclip-vit-tiny", "biomedclip-tiny")


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory) -> Path:
    """24 patients at 40 px, splits with 2 draws per level (this module's copy: LP runs cache features beside it)."""
    return synth_cohort(patients=24, positive_rate=0.4, size=40, seed=3, draws=2, shots=(2, 4, 16),
                        to=tmp_path_factory.mktemp("cohort"))


def _train(cohort: Path, out: Path, model: str = "dinov2-s-tiny", method: str = "lora", **kwargs):
    kwargs.setdefault("settings", QUICK)
    kwargs.setdefault("folds", ["fold0"])
    kwargs.setdefault("head_lrs", (1e-2,))
    return run_train(cohort, TASK, model, method=method, out=out, device="cpu", **kwargs)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("model", FAMILIES)
def test_every_method_trains_exactly_what_it_declares(cohort, tmp_path, model):
    """One short run per method: the saved model differs from a fresh build only in what the method trains
    (its parameters, and batch-norm statistics of modules it trains), and the head always changes."""
    for method in METHODS:
        if method == "vera" and not get_spec(model).peft.same_shape:
            continue
        out = tmp_path / method
        record = _train(cohort, out, model, method, settings=TrainSettings(
            max_epochs=1, warmup=0, batch_size=8, checkpoint_every_s=0)).records[0]
        trained, _ = load_model(out / record.key)
        fresh = apply_method(Classifier(build_backbone(model), n_out=2), method)
        declared = {n for n, p in fresh.named_parameters() if p.requires_grad}
        before, after = fresh.state_dict(), trained.state_dict()
        assert set(before) == set(after), method
        changed = {n for n in after if not torch.equal(before[n], after[n])}
        stats = {n for n in changed if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        assert changed - stats <= declared, (method, sorted(changed - stats - declared)[:4])
        head = {n for n in declared if n.startswith("head.") or ".fc." in f".{n}" or n.endswith(("fc.weight",
                                                                                               "fc.bias"))}
        assert head & changed, method
        if method == "lp":
            assert not stats  # a frozen backbone keeps its batch-norm statistics
        assert record.trainable_params == counted_parameters(fresh)[0] == count_parameters(fresh)[0] - (
            head_module(fresh).in_features + 1)  # the head counted as one logit


def _closed_form(model: str, method: str, r: int = 8) -> int:
    """Trainable parameters by formula from the module shapes (not by counting requires_grad)."""
    spec = get_spec(model)
    net = build_backbone(model).model
    head = spec.views[spec.head_view] * 2 + 2
    mods = dict(net.named_modules())

    def targets(names):
        return [m for path, m in mods.items() if any(path == n or path.endswith(f".{n}") for n in names)]

    if method == "bitfit":
        slot = spec.head or "\0"
        return head + sum(p.numel() for n, p in net.named_parameters()
                          if n.endswith("bias") and not n.startswith(f"{slot}."))
    if method == "lora":
        total = 0
        for m in targets(spec.peft.attention + spec.peft.mlp + spec.peft.conv):
            if isinstance(m, torch.nn.Conv2d):
                total += r * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * r
            else:
                total += r * (m.in_features + m.out_features)
        return head + total
    if method == "vera":
        return head + sum(m.out_features + r for m in targets(spec.peft.same_shape))
    if method == "ia3":
        ff = spec.peft.feedforward
        total = 0
        for path, m in mods.items():
            names = spec.peft.attention + spec.peft.feedforward + spec.peft.conv
            if not any(path == n or path.endswith(f".{n}") for n in names):
                continue
            is_ff = any(path == n or path.endswith(f".{n}") for n in ff)
            if isinstance(m, torch.nn.Conv2d):
                total += m.in_channels if is_ff else m.out_channels
            elif path == spec.head:
                total += head // 2 - 1  # the head slot's input features (the new head's D)
            else:
                total += m.in_features if is_ff else m.out_features
        return head + total
    raise ValueError(method)


@pytest.mark.parametrize("model", ["dinov2-s-tiny", "resnet18-tiny"])
@pytest.mark.parametrize("method", ["lora", "vera", "ia3", "bitfit"])
def test_trainable_counts_equal_closed_form(model, method):
    if method == "vera" and model == "resnet18-tiny":
        with pytest.raises(UsageError, match="use lora, ia3 or bitfit"):
            apply_method(Classifier(build_backbone(model), n_out=2), method)
        return
    trainable, _ = count_parameters(apply_method(Classifier(build_backbone(model), n_out=2), method))
    assert trainable == _closed_form(model, method)


def test_record_has_protocol_settings_and_results_gather_it_beside_probes(cohort, tmp_path):
    report = _train(cohort, tmp_path / "runs", method="bitfit", head_lrs=(1e-2, 1e-3))
    assert report.written == 2
    record = report.records[0]
    assert record.method == "bitfit" and record.regime == "full"
    for name in ("head_lr", "backbone_lr", "max_epochs", "patience", "warmup", "plateau_patience", "min_lr",
                 "batch_size", "accumulate", "validation", "loss", "optimizer"):
        assert name in record.options, name
    assert record.options["backbone_lr"] == 1e-4
    assert 1 <= record.training["best_epoch"] <= record.training["epochs_run"] <= 3
    assert len(record.training["curves"]["val_loss"]) == record.training["epochs_run"]
    assert record.training["val_loss"] == min(record.training["curves"]["val_loss"])
    assert record.test_patients and len(record.test_scores) == len(record.test_ids)
    assert 0 < record.trainable_params < record.total_params
    again = _train(cohort, tmp_path / "runs", method="bitfit", head_lrs=(1e-2, 1e-3))
    assert again.written == 0 and again.existing == 2
    assert not list((tmp_path / "runs").glob(f"*/{CHECKPOINT}"))  # a finished run keeps no checkpoint
    keys = planned_keys(cohort, TASK, "dinov2-s-tiny", method="bitfit", folds=["fold0"], head_lrs=(1e-2, 1e-3),
                        settings=QUICK, device="cpu")
    assert sorted(keys) == sorted(r.key for r in report.records)
    result = CliRunner().invoke(featcache_app, ["results", str(tmp_path / "runs")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "selected SYN dinov2-s-tiny bitfit full: head LR" in result.output  # chosen by validation loss


def test_fewshot_trains_on_support_and_validates_on_the_whole_validation_part(cohort, tmp_path):
    """Every draw of a fold trains on its support set (from the train part) and validates on the fold's whole
    validation part; the probe of stage 1 reads the same support sets (their digests in both records)."""
    report = _train(cohort, tmp_path, method="lp", full=False, shots=(2,), draws=2)
    assert {(r.regime, r.shots, r.draw) for r in report.records} == {("fewshot", 2, 0), ("fewshot", 2, 1)}
    splits_file = json.loads((cohort.parent / "manifest.splits" / f"{TASK}.json").read_text())
    fold = splits_file["folds"][0]
    for record in report.records:
        support = fold["fewshot"]["2"][record.draw]
        assert set(support) <= set(fold["train"]) and record.provenance["n_train"] == 4 == len(support)
        assert record.provenance["n_val"] == len(fold["val"])  # every draw: the same, whole part
        assert record.options["validation"].startswith("fold validation part, whole")
        assert record.support_from == "train" and record.provenance["support"] == support_digest(support)
    copy = tmp_path / "stage1"
    shutil.copytree(cohort.parent, copy)
    extract_features(copy / cohort.name, "dinov2-s-tiny")
    probes = run_probe(copy / cohort.name, TASK, "dinov2-s-tiny", shots=(2,), draws=2, out=tmp_path / "probe")
    probed = {(r.fold, r.draw): r.provenance["support"] for r in probes.records}
    assert all(probed[(r.fold, r.draw)] == r.provenance["support"] for r in report.records)


def test_a_fold_whose_validation_part_cannot_validate_is_not_trained(synth_cohort, tmp_path):
    """14 patients, 2 folds: fold1's validation part holds one positive patient. Its level is skipped with the
    split file's reason (fold0 trains); a hand edit that keeps draws beside a thin part is refused in one line."""
    manifest = synth_cohort(patients=14, positive_rate=0.35, size=40, seed=0, to=tmp_path / "c")
    path = save_splits(build_splits(manifest, TASK, k=2, shots=(1,), draws=1, per_center=False), manifest)
    report = run_train(manifest, TASK, "resnet18-tiny", method="lp", full=False, shots=(1,), head_lrs=(1e-2,),
                       settings=QUICK, out=tmp_path / "runs", device="cpu")
    assert {r.fold for r in report.records} == {"fold0"}
    assert report.skipped == ["fold1 k=1: fold1's validation part holds 1 positive patient(s), fewer than the 2 "
                              "of each class a validation threshold needs"]
    edited = json.loads(path.read_text())
    from featcache.datasets import get_task

    ids, codes = load_manifest(manifest).labels(get_task(TASK))
    label = dict(zip(ids, codes.tolist(), strict=True))
    one_each = {label[i]: i for i in reversed(edited["folds"][1]["train"])}  # a k=1 draw from fold1's train
    edited["folds"][1]["fewshot"] = {"1": [sorted(one_each.values())]}  # beside a part that cannot validate
    edited["folds"][1]["skipped"] = {}
    path.write_text(json.dumps(edited))
    message = _refused(["train", "--method", "lp", "--model", "resnet18-tiny", "--task", TASK, "--manifest",
                        str(manifest), "--shots", "1", "--device", "cpu", "--out", str(tmp_path / "runs")])
    assert "fold1: " in message and "validation part holds 1 positive patient(s)" in message, message


def test_same_seed_same_record_and_accumulation_changes_nothing(cohort, tmp_path):
    """Bitwise equal reruns; accumulation equal within float error (BitFit: no dropout, whose masks would
    differ with the micro-batch shapes)."""
    one = _train(cohort, tmp_path / "a", method="bitfit").records[0]
    two = _train(cohort, tmp_path / "b", method="bitfit").records[0]
    assert one.test_scores == two.test_scores and one.training["curves"] == two.training["curves"]
    acc = _train(cohort, tmp_path / "c", method="bitfit", settings=TrainSettings(
        max_epochs=3, warmup=1, patience=2, plateau_patience=1, batch_size=4, accumulate=2,
        checkpoint_every_s=0)).records[0]
    np.testing.assert_allclose(acc.test_scores, one.test_scores, atol=1e-5)
    np.testing.assert_allclose(acc.training["curves"]["val_loss"], one.training["curves"]["val_loss"], atol=1e-5)


def test_accumulation_is_exact_unless_batch_norm_trains_and_then_says_so(cohort, tmp_path):
    """resnet18-tiny: BitFit keeps batch norm in eval mode (its biases train on fixed statistics), so
    accumulation changes nothing; FFT trains batch norm, each micro-batch normalises with its own statistics,
    and the run says so in one line and in its record."""
    def quick(accumulate: int) -> TrainSettings:
        return TrainSettings(max_epochs=1, warmup=0, patience=1, plateau_patience=1, batch_size=8 // accumulate,
                             accumulate=accumulate, checkpoint_every_s=0)

    said: list[str] = []
    runs = {(method, acc): run_train(cohort, TASK, "resnet18-tiny", method=method, folds=["fold0"],
                                     head_lrs=(1e-2,), settings=quick(acc), out=tmp_path / f"{method}{acc}",
                                     device="cpu", note=said.append).records[0]
            for method in ("bitfit", "fft") for acc in (1, 2)}
    np.testing.assert_allclose(runs["bitfit", 2].test_scores, runs["bitfit", 1].test_scores, atol=1e-5)
    assert "batch_norm" not in runs["bitfit", 2].provenance
    assert not np.allclose(runs["fft", 2].test_scores, runs["fft", 1].test_scores, atol=1e-7)
    assert said == ["fft on resnet18-tiny: batch norm trains in this run, so its numbers differ slightly from one "
                    "process without accumulation: --accumulate 2 (statistics per micro-batch)"]
    assert runs["fft", 2].provenance["batch_norm"] == said[0].split(": ", 1)[1]
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    assert batch_norm_note(model, 1, 2, synced=True) is None and batch_norm_note(model, 1, 1, False) is None
    assert "2 processes without synchronised batch norm" in batch_norm_note(model, 1, 2, synced=False)
    assert batch_norm_note(model.eval(), 4, 2, synced=False) is None


def test_plateau_cuts_and_early_stop_fall_on_pinned_epochs():
    """A fixed curve: down to 0.1 at epoch 9, flat, then 0.005 % lower at epoch 20 and flat again. Early stop
    counts that as better (strictly lower) and stops 40 epochs later; the plateau (relative 1e-4) does not, so
    it cuts on the 11th epoch without its own improvement (patience 10: epoch 20), then every 11 epochs."""
    settings = TrainSettings(warmup=5, patience=40, plateau_patience=10)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1.0)
    plateau, state = make_plateau(optimizer, settings), _State()
    curve = [1 - 0.1 * e for e in range(10)] + [0.1] * 10 + [0.1 * (1 - 5e-5)] * 200
    cuts, best = [], []
    while state.bad_epochs < settings.patience:
        before = optimizer.param_groups[0]["lr"]
        if observe(state, plateau, curve[state.epoch], settings):
            best.append(state.epoch - 1)
        if optimizer.param_groups[0]["lr"] < before:
            cuts.append(state.epoch - 1)
    assert best == list(range(10)) + [20] and state.best_epoch == 20
    assert state.epoch == 61  # epochs 21..60 are the 40 without a strictly lower loss
    assert cuts == [20, 31, 42, 53]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_pixel_cache_and_decoding_give_identical_images(cohort, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(cohort.parent, copy)
    manifest = load_manifest(copy / cohort.name)
    pre = get_spec("dinov2-s-tiny").preprocess
    decoded = load_images(manifest, manifest.ids[:7], pre)
    cache_pixels(manifest, "dinov2-s-tiny")
    cached = load_images(manifest, manifest.ids[:7], pre)
    assert "pixel cache" in cached.source and "decoded" in decoded.source
    assert torch.equal(decoded.gray, cached.gray)


# ------------------------------------------------------------------------------------------ artefacts


def test_adapter_loads_with_plain_peft_and_merge_equals_unmerged(cohort, tmp_path):
    from peft import PeftModel

    record = _train(cohort, tmp_path / "runs", method="lora").records[0]
    folder = tmp_path / "runs" / record.key
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= {
        p.name for p in folder.iterdir()}
    # plain peft: the backbone module, the saved adapter, the saved head; the record's test scores back
    backbone = build_backbone("dinov2-s-tiny")
    model = PeftModel.from_pretrained(backbone.model, str(folder)).eval()
    head = torch.nn.Linear(16, 2)
    head.load_state_dict(load_file(folder / "head.safetensors"))
    manifest = load_manifest(cohort)
    images = load_images(manifest, record.test_ids, backbone.spec.preprocess)
    x = images.batch(torch.arange(len(record.test_ids)), backbone.spec.preprocess, torch.device("cpu"))
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0]
        scores = head(cls).softmax(1)[:, 1]
    unmerged, _ = load_model(folder)
    with torch.no_grad():
        ours = unmerged(x).softmax(1)[:, 1]
    np.testing.assert_allclose(ours.numpy(), record.test_scores, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), record.test_scores, atol=1e-5)
    export_merged(folder, tmp_path / "merged", merge=True)
    merged = load_export(tmp_path / "merged")
    with torch.no_grad():
        np.testing.assert_allclose(merged(x).softmax(1)[:, 1].numpy(), ours.numpy(), atol=1e-5)
    made = predict(folder, cohort, device="cpu")
    by_id = {r["image_id"]: r[made.column] for r in made.rows}
    np.testing.assert_allclose([by_id[i] for i in record.test_ids], record.test_scores, atol=1e-5)


@pytest.mark.parametrize("method", ["bitfit", "fft", "ia3"])
def test_saved_weights_reproduce_the_record(cohort, tmp_path, method):
    record = _train(cohort, tmp_path, "resnet18-tiny", method).records[0]
    made = predict(tmp_path / record.key, cohort, device="cpu")
    by_id = {r["image_id"]: r[made.column] for r in made.rows}
    np.testing.assert_allclose([by_id[i] for i in record.test_ids], record.test_scores, atol=1e-5)


# ------------------------------------------------------------------------------------------ resume


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_record(cohort, tmp_path):
    settings = TrainSettings(max_epochs=6, warmup=2, patience=6, plateau_patience=1, batch_size=8,
                             checkpoint_every_s=0)
    whole = _train(cohort, tmp_path / "whole", method="lora", settings=settings).records[0]

    def stop_at_4(label, done, total, status):
        if done == 4 and not status.startswith("done"):
            raise _Stop

    with pytest.raises(_Stop):
        _train(cohort, tmp_path / "cut", method="lora", settings=settings, progress=stop_at_4)
    saved = torch.load(tmp_path / "cut" / whole.key / CHECKPOINT, weights_only=True)
    assert saved["state"]["epoch"] == 4
    resumed = _train(cohort, tmp_path / "cut", method="lora", settings=settings).records[0]
    assert resumed.test_scores == whole.test_scores
    assert resumed.training["curves"] == whole.training["curves"]
    assert resumed.metrics == whole.metrics


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli.adapters_app import main; main()", *args]


def test_sigkill_then_same_command_ends_with_the_uninterrupted_record(cohort, tmp_path):
    """A real SIGKILL mid-run (checkpoints written atomically every epoch), then the same run again."""
    settings = TrainSettings(max_epochs=12, warmup=2, patience=12, plateau_patience=2, batch_size=8,
                             checkpoint_every_s=0)
    whole = _train(cohort, tmp_path / "whole", "resnet18-tiny", "bitfit", settings=settings).records[0]
    cut = tmp_path / "cut"
    args = ["train", "--method", "bitfit", "--model", "resnet18-tiny", "--task", TASK, "--manifest",
            str(cohort), "--fold", "fold0", "--head-lr", "1e-2", "--max-epochs", "12", "--warmup", "2",
            "--patience", "12", "--plateau-patience", "2", "--batch-size", "8", "--checkpoint-every", "0",
            "--device", "cpu", "--quiet", "--out", str(cut)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(cut.glob(f"*/{CHECKPOINT}")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    assert not list(cut.glob("*.json"))  # no record yet
    resumed = _train(cohort, cut, "resnet18-tiny", "bitfit", settings=settings).records[0]
    assert resumed.test_scores == whole.test_scores and resumed.metrics == whole.metrics
    assert resumed.training["curves"] == whole.training["curves"]


# ------------------------------------------------------------------------------------------ scale-out


@pytest.mark.parametrize("model", ["dinov2-s-tiny", "resnet18-tiny"])  # LayerNorm; batch norm (eval in BitFit)
def test_two_process_ddp_matches_one_process(cohort, tmp_path, model):
    args = ["--method", "bitfit", "--model", model, "--task", TASK, "--manifest", str(cohort),
            "--fold", "fold0", "--head-lr", "1e-2", "--max-epochs", "4", "--warmup", "1", "--batch-size", "8",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli("train", *args, "--out", str(tmp_path / "one")), check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29500 + os.getpid() % 1000)]
    done = subprocess.run([*torchrun, "-m", "cli.adapters_app", "train", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (one,), (two,) = load_records(tmp_path / "one"), load_records(tmp_path / "two")
    assert two.provenance["processes"] == 2
    assert two.training["best_epoch"] == one.training["best_epoch"]
    np.testing.assert_allclose(two.test_scores, one.test_scores, atol=1e-5)  # float sums in another order
    np.testing.assert_allclose(two.training["curves"]["val_loss"], one.training["curves"]["val_loss"], atol=1e-5)
    assert [p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".json"] == [f"{two.key}.json"]


# ------------------------------------------------------------------------------------------ refusals


def _refused(args: list[str]) -> str:
    """The one-line reason the CLI gives (a toolkit error, printed by `run_app`, or a usage error)."""
    result = CliRunner().invoke(adapters_app, args)
    assert result.exit_code != 0, result.output
    if isinstance(result.exception, FeatcacheError):
        return str(result.exception)
    return result.output


def test_bad_input_is_one_line(cohort, tmp_path):
    base = ["train", "--model", "dinov2-s-tiny", "--task", TASK, "--manifest", str(cohort), "--out",
            str(tmp_path / "r"), "--max-epochs", "1"]
    assert "choose from" in _refused([*base, "--method", "dora"])
    assert "--rank applies to lora and vera only" in _refused([*base, "--method", "bitfit", "--rank", "4"])
    with pytest.raises(UsageError, match="use lora, ia3 or bitfit"):
        _train(cohort, tmp_path, "resnet18-tiny", "vera")
    with pytest.raises(SplitError, match="fold0 k=16: .*class 1 .positive. has 6 patients in fold0's train part"):
        _train(cohort, tmp_path, method="lp", full=False, shots=(16,))
    with pytest.raises(SplitError, match="SYN_missing is neither a dataset task .* nor a column"):
        run_train(cohort, "SYN_missing", "dinov2-s-tiny", method="lp", out=tmp_path)
    copy = tmp_path / "c"
    shutil.copytree(cohort.parent, copy)
    cache_pixels(copy / cohort.name, "resnet18-tiny")  # 32 px, not dinov2-s-tiny's 28
    with pytest.raises(StoreError, match="no pixel cache for input size 28"):
        _train(copy / cohort.name, tmp_path, pixels=copy / "pixels.zarr")
    assert "weights" in _refused(["train", "--method", "lp", "--model", "dinov2-s", "--task", TASK,
                                  "--manifest", str(cohort)])


def test_run_folder_of_another_configuration_is_refused(cohort, tmp_path):
    key = planned_keys(cohort, TASK, "dinov2-s-tiny", method="lp", folds=["fold0"], head_lrs=(1e-2,),
                       settings=QUICK, device="cpu")[0]
    (tmp_path / key).mkdir()
    (tmp_path / key / "config.json").write_text('{"key": "something else"}')
    with pytest.raises(FeatcacheError, match="another configuration"):
        _train(cohort, tmp_path, method="lp")
    assert not list(tmp_path.glob("*.json"))


def test_cli_train_bitfit_then_results(cohort, tmp_path):
    result = CliRunner().invoke(adapters_app, [
        "train", "--method", "bitfit", "--model", "resnet18-tiny", "--task", TASK, "--manifest", str(cohort),
        "--fold", "fold0", "--max-epochs", "2", "--warmup", "1", "--head-lr", "1e-2", "--out",
        str(tmp_path), "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 run record (0 already there)" in result.output
    (record,) = load_records(tmp_path)
    assert record.method == "bitfit" and record.backbone == "resnet18-tiny"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "dinov2-s"])
def test_real_size_one_epoch(cohort, tmp_path, model):
    report = run_train(cohort, TASK, model, method="lora", random_init=True, folds=["fold0"], head_lrs=(1e-3,),
                       settings=TrainSettings(max_epochs=1, warmup=0, batch_size=8), out=tmp_path, device="cpu")
    assert report.written == 1 and report.records[0].identity == "random-init"
