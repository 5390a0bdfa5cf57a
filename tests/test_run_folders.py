"""A trained run as a researcher hands it on: merged exports that timm and transformers load by themselves with
a plain script, predictions that name their class and flag seen images, one trainable count, and run folders
whose damage (checkpoint, head, adapter config, temp files, a read-only target) is one line, never sticky."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from adapters.artifacts import HEAD, PLAIN_SCRIPTS, SEEN, export_merged, load_export, load_model, predict
from adapters.plan import TrainSettings, planned_keys
from adapters.train import CLAIMS, run_train
from adapters.trainer import CHECKPOINT
from cli.adapters_app import app as adapters_app
from featcache.errors import RecordError, WriteError
from featcache.locks import Claims
from featcache.manifest import load_manifest
from featcache.splits import build_splits, save_splits
from featcache.synth import make_cohort

TASK = "SYN"
QUICK = TrainSettings(max_epochs=3, warmup=1, patience=2, plateau_patience=1, batch_size=8,
                      checkpoint_every_s=0)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    manifest = make_cohort(tmp_path_factory.mktemp("cohort"), patients=20, positive_rate=0.4, size=40, seed=5)
    save_splits(build_splits(manifest, TASK, draws=1, shots=(2,)), manifest)
    return manifest


def _train(cohort: Path, out: Path, model: str = "resnet18-tiny", method: str = "lora", **kwargs):
    kwargs.setdefault("settings", QUICK)
    return run_train(cohort, TASK, model, method=method, out=out, device="cpu", folds=["fold0"],
                     head_lrs=kwargs.pop("head_lrs", (1e-2,)), **kwargs)


def _plain_script(folder: Path, image: Path, box: tuple[int, ...] | None) -> float:
    """Run the export's own predict.py (what a colleague runs) and read the score it prints."""
    argv = [str(folder / "predict.py"), str(folder), str(image), *map(str, box or ())]
    out = io.StringIO()
    old = sys.argv
    try:
        sys.argv = argv
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv = old
    return float(out.getvalue().split()[-1])


# ---------------------------------------------------------------------------------------------- exports


@pytest.mark.parametrize(("model", "library"), [("resnet18-tiny", "timm"), ("dinov2-s-tiny", "transformers")])
def test_merged_export_loads_with_its_own_library_and_a_plain_script(cohort, tmp_path, model, library):
    record = _train(cohort, tmp_path / "runs", model).records[0]
    out = export_merged(tmp_path / "runs" / record.key, tmp_path / "export", merge=True)
    meta = json.loads((out / "export.json").read_text())
    pre = json.loads((out / "preprocessing.json").read_text())
    assert meta["library"] == library and meta["positive_class"] == "DEATH" and meta["merged"]
    assert {"size", "mean", "std", "channels", "intensity", "steps"} <= set(pre)
    if library == "timm":  # timm's own call, no prefix stripping: the keys are timm's
        import timm
        from safetensors.torch import load_file

        timm.create_model(**meta["create"]).load_state_dict(load_file(out / "model.safetensors"))
    else:
        from transformers import AutoModel

        AutoModel.from_pretrained(out / "model")
    manifest = load_manifest(cohort)
    for image_id, expected in list(zip(record.test_ids, record.test_scores, strict=True))[:3]:
        got = _plain_script(out, manifest.abspath(image_id), manifest.bbox(image_id))
        assert got == pytest.approx(expected, abs=2e-4), image_id
    ours = load_export(out)
    assert sum(p.numel() for p in ours.parameters()) > 0


def test_readme_shows_the_plain_timm_script():
    assert PLAIN_SCRIPTS["timm"].strip() in README.read_text()


def test_loading_onto_another_base_is_refused(cohort, tmp_path):
    import torch
    from safetensors.torch import save_file

    record = _train(cohort, tmp_path, "resnet18-tiny", "bitfit").records[0]  # a random (tiny) base
    assert record.provenance["base_fingerprint"].startswith("sha256:")
    config = json.loads((tmp_path / record.key / "config.json").read_text())
    assert config["identity"] == record.identity  # the run folder names its base
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, other)
    with pytest.raises(RecordError, match="trained on base weights tiny-random, not sha256:"):
        load_model(tmp_path / record.key, weights=other)
    bad = dict(json.loads((tmp_path / f"{record.key}.json").read_text()))
    bad["provenance"]["base_fingerprint"] = "sha256:0"
    (tmp_path / f"{record.key}.json").write_text(json.dumps(bad))
    with pytest.raises(RecordError, match="random-init base rebuilt here differs"):
        load_model(tmp_path / record.key)


# ---------------------------------------------------------------------------------------------- predict


def test_predict_names_its_class_and_counts_seen_images(cohort, tmp_path):
    record = _train(cohort, tmp_path, "resnet18-tiny", "bitfit").records[0]
    folder = tmp_path / record.key
    seen = json.loads((folder / SEEN).read_text())
    made = predict(folder, cohort, device="cpu")
    assert made.column == "score_DEATH" and set(made.rows[0]) == {"image_id", "patient_id", "score_DEATH", TASK}
    assert made.seen == {"train": len(seen["train"]), "val": len(seen["val"])}
    assert made.seen["train"] == record.provenance["n_train"] and made.seen["val"] == record.provenance["n_val"]
    kept = predict(folder, cohort, device="cpu", exclude_seen=True)
    assert {r["image_id"] for r in kept.rows} == {r["image_id"] for r in made.rows} - set(seen["train"]) - set(
        seen["val"])
    assert set(record.test_ids) <= {r["image_id"] for r in kept.rows}
    result = CliRunner().invoke(adapters_app, ["predict", "--run", str(folder), "--manifest", str(cohort),
                                               "--device", "cpu", "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    seen_line = f"warning: {made.seen['train'] + made.seen['val']} images seen in training ({made.seen['train']} train"
    assert seen_line in result.output
    assert "scoring:" in result.output  # progress, on stderr (stdout may be the CSV)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == f"image_id,patient_id,score_DEATH,{TASK}"


# ---------------------------------------------------------------------------------------------- counts


def test_one_trainable_count_for_lp_everywhere(cohort, tmp_path):
    record = _train(cohort, tmp_path, "resnet18-tiny", "lp").records[0]
    dim = 16  # resnet18-tiny's pooled features
    assert record.trainable_params == dim + 1  # one logit, as the stage-1 probe
    result = CliRunner().invoke(adapters_app, ["methods", "--model", "resnet18-tiny"])
    row = next(line for line in result.output.splitlines() if line.startswith("lp "))
    assert f" {dim + 1} " in f" {row} "
    from featcache.backbones import build_backbone, count_parameters

    assert record.total_params == count_parameters(build_backbone("resnet18-tiny").model)[1] + dim + 1
    from featcache.records import RunRecord

    older = record.to_dict()  # a record from before: both logits counted, no head_count
    older["provenance"] = {k: v for k, v in older["provenance"].items() if k != "head_count"}
    older["trainable_params"], older["total_params"] = 2 * dim + 2, record.total_params + dim + 1
    migrated = RunRecord.from_dict(older)
    assert (migrated.trainable_params, migrated.total_params) == (record.trainable_params, record.total_params)


# ---------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", [b"", b"garbage" * 10, "truncated"])
def test_a_damaged_checkpoint_is_named_and_the_run_restarts(cohort, tmp_path, damage):
    whole = _train(cohort, tmp_path / "whole", "resnet18-tiny", "bitfit").records[0]
    cut = tmp_path / "cut"
    key = whole.key
    (cut / key).mkdir(parents=True)
    (cut / key / "config.json").write_bytes((tmp_path / "whole" / key / "config.json").read_bytes())
    if damage == "truncated":
        with pytest.raises(_Stop):
            _train(cohort, tmp_path / "full", "resnet18-tiny", "bitfit", progress=_stop_after(2))
    else:
        (cut / key / CHECKPOINT).write_bytes(damage)
    if damage == "truncated":
        data = (tmp_path / "full" / key / CHECKPOINT).read_bytes()
        (cut / key / CHECKPOINT).write_bytes(data[: len(data) // 2])
    (cut / f".{key}.json.deadbeef.tmp").write_bytes(b"{")  # a killed record write
    (cut / key / ".head.safetensors.cafe.tmp").write_bytes(b"x")  # a killed artefact write
    report = _train(cohort, cut, "resnet18-tiny", "bitfit")
    (note,) = report.notes
    assert note.startswith(str(cut / key / CHECKPOINT)) and "starts again from scratch" in note
    assert "\n" not in note
    assert report.records[0].test_scores == whole.test_scores
    assert not list(cut.rglob("*.tmp"))


class _Stop(Exception):
    pass


def _stop_after(epochs: int):
    def stop(label, done, total, status):
        if done == epochs and not status.startswith("done"):
            raise _Stop
    return stop


def test_damaged_artefacts_are_one_line_in_predict_and_export(cohort, tmp_path):
    record = _train(cohort, tmp_path / "runs", "resnet18-tiny", "lora").records[0]
    folder = tmp_path / "runs" / record.key
    (folder / HEAD).write_bytes(b"not tensors")
    with pytest.raises(RecordError, match=re.escape(str(folder / HEAD)) + ": damaged"):
        predict(folder, cohort, device="cpu")
    (folder / HEAD).unlink()
    record = _train(cohort, tmp_path / "again", "resnet18-tiny", "lora").records[0]
    folder = tmp_path / "again" / record.key
    (folder / "adapter_config.json").write_text("{garbage")
    result = CliRunner().invoke(adapters_app, ["export", "--run", str(folder), "--out", str(tmp_path / "x"),
                                               "--merge"])
    assert result.exit_code != 0 and "adapter_config.json" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_export_to_a_read_only_folder_is_one_line_and_leaves_nothing(cohort, tmp_path, monkeypatch):
    import errno

    import featcache.fileio

    record = _train(cohort, tmp_path / "runs", "resnet18-tiny", "bitfit").records[0]

    def read_only(*_args):  # what a read-only file system answers (also to root, unlike a chmod)
        raise OSError(errno.EROFS, "Read-only file system")

    for merge in (False, True):
        with monkeypatch.context() as patch:
            patch.setattr(featcache.fileio.os, "replace", read_only)
            with pytest.raises(WriteError, match="cannot write, read-only file system"):
                export_merged(tmp_path / "runs" / record.key, tmp_path / "new" / "out", merge=merge)
        assert not (tmp_path / "new").exists()  # no empty --out (nor its new parent) left behind
    with pytest.raises(RecordError):
        export_merged(tmp_path / "nothing", tmp_path / "fresh" / "out", merge=True)
    assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------------------------------------- claims


def test_two_requests_on_one_folder_share_the_runs(cohort, tmp_path):
    """A run another process has claimed is done last, after waiting; if its record appeared meanwhile it is
    read, not trained again."""
    keys = planned_keys(cohort, TASK, "resnet18-tiny", method="bitfit", folds=["fold0"], head_lrs=(1e-2, 1e-3),
                        settings=QUICK, device="cpu")
    held = Claims(tmp_path / CLAIMS).claim(keys[0])
    assert held is not None
    done: dict[str, object] = {}
    worker = threading.Thread(target=lambda: done.update(report=_train(
        cohort, tmp_path, "resnet18-tiny", "bitfit", head_lrs=(1e-2, 1e-3))))
    worker.start()
    deadline = time.monotonic() + 600
    while not (tmp_path / f"{keys[1]}.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / f"{keys[1]}.json").exists() and not (tmp_path / f"{keys[0]}.json").exists()
    # the "other process" finishes its run: it writes the record, then lets the claim go
    other = _train(cohort, tmp_path / "elsewhere", "resnet18-tiny", "bitfit", head_lrs=(1e-2, 1e-3))
    mine = next(r for r in other.records if r.key == keys[0])
    (tmp_path / f"{keys[0]}.json").write_bytes((tmp_path / "elsewhere" / f"{keys[0]}.json").read_bytes())
    held.release()
    worker.join(600)
    report = done["report"]
    assert report.written == 1 and report.existing == 1
    assert np.allclose(next(r for r in report.records if r.key == keys[0]).test_scores, mine.test_scores)


# ---------------------------------------------------------------------------------------------- output


def test_exit_is_quiet_while_zarrs_io_thread_is_busy(tmp_path):
    """zarr's exit hook waits 0.2 s for its IO thread and then closes the running loop ("Cannot close a
    running event loop", seen under load after extract and probe); ours stops the thread first."""
    script = tmp_path / "busy.py"
    script.write_text(
        "import asyncio, time\nimport featcache.store\nfrom zarr.core import sync\n"
        "async def busy():\n    time.sleep(0.6)\n"
        "asyncio.run_coroutine_threadsafe(busy(), sync._get_loop())\ntime.sleep(0.05)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_plain_tables_have_no_rules_and_no_trailing_blanks():
    from rich.table import Table

    from cli.console import make_console

    out = io.StringIO()
    table = Table(title="t")
    table.add_column("method")
    table.add_column("trainable", justify="right")
    table.add_row("lp", "17")
    make_console(plain=True, file=out).print(table)
    lines = out.getvalue().splitlines()
    assert not re.search("[─━│┃┏┗╇]", out.getvalue())
    assert all(line == line.rstrip() for line in lines) and any(line.startswith("lp") for line in lines)


def test_missing_splits_suggest_a_command_that_succeeds(cohort, tmp_path):
    import shutil

    from cli.featcache_app import app as featcache_app
    from featcache.errors import SplitError
    from featcache.splits import load_splits

    with pytest.raises(SplitError, match="SYNN is neither a dataset task .* nor a column of"):
        load_splits(cohort, "SYNN")
    copy = tmp_path / "c"
    shutil.copytree(cohort.parent, copy)
    manifest = copy / cohort.name
    lines = manifest.read_text().splitlines()
    at = lines[0].split(",").index(TASK)  # a column of one's own, per patient as a real label is
    lines = [lines[0] + ",OUTCOME"] + [f"{line},{'DEAD' if line.split(',')[at] == 'DEATH' else 'ALIVE'}"
                                       for line in lines[1:]]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(SplitError) as refused:
        load_splits(manifest, "OUTCOME")
    command = re.search(r"`featcache (splits .*?)`", str(refused.value)).group(1).replace("VALUE", "DEAD")
    result = CliRunner().invoke(featcache_app, command.split())
    assert result.exit_code == 0, result.output
