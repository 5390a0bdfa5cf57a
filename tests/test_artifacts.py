"""A trained run's files: what each method saves, the model they rebuild (by folder or record), the export
with and without merging, and damaged or missing files refused in one line naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapters.artifacts import ADAPTER, HEAD, WEIGHTS, export_merged, load_export, load_model, predict, read_run
from adapters.model import backbone_module, head_module
from adapters.plan import TrainSettings
from adapters.train import run_train
from cli.adapters_app import app as adapters_app
from featcache.errors import RecordError
from featcache.records import RunRecord

MODEL = "resnet18-tiny"
ONE_EPOCH = TrainSettings(max_epochs=1, warmup=0, batch_size=8, checkpoint_every_s=0)


@pytest.fixture(scope="module")
def trained(synth_cohort, tmp_path_factory) -> tuple[Path, Path, dict[str, RunRecord]]:
    """(manifest, runs folder, {method: record}): one-epoch LoRA and BitFit runs on fold0."""
    manifest = synth_cohort(patients=24, positive_rate=0.4, size=40, seed=3, draws=2, shots=(2, 4, 16))
    out = tmp_path_factory.mktemp("runs")
    records = {method: run_train(manifest, "SYN", MODEL, method=method, out=out, device="cpu", settings=ONE_EPOCH,
                                 folds=["fold0"], head_lrs=(1e-2,)).records[0]
               for method in ("lora", "bitfit")}
    return manifest, out, records


def _damaged(trained, tmp_path: Path, method: str, name: str, content: bytes = b"garbage") -> Path:
    """A copy of a run folder (and its record) with ``name`` overwritten."""
    _, out, records = trained
    key = records[method].key
    shutil.copytree(out / key, tmp_path / key)
    shutil.copy(out / f"{key}.json", tmp_path / f"{key}.json")
    (tmp_path / key / name).write_bytes(content)
    return tmp_path / key


def test_each_method_saves_what_it_declares(trained):
    _, out, records = trained
    lora, bitfit = out / records["lora"].key, out / records["bitfit"].key
    assert {HEAD, ADAPTER, "adapter_config.json"} <= {p.name for p in lora.iterdir()}
    assert not (lora / WEIGHTS).exists()
    assert (bitfit / HEAD).is_file() and not (bitfit / ADAPTER).exists()
    saved = load_file(bitfit / WEIGHTS)
    assert saved and all(name.endswith(("bias", "running_mean", "running_var", "num_batches_tracked"))
                         for name in saved)  # biases and batch-norm statistics, nothing else
    assert set(load_file(lora / HEAD)) == {"weight", "bias"}


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_saved_files_rebuild_the_trained_model(trained, method):
    manifest, out, records = trained
    key = records[method].key
    model, record = load_model(out / key)
    assert record == records[method] and not model.training
    assert read_run(out / f"{key}.json") == (out / key, record)  # the record file names the same run
    for name, tensor in load_file(out / key / HEAD).items():
        assert torch.equal(head_module(model).state_dict()[name], tensor)
    if method == "bitfit":
        state = backbone_module(model).state_dict()
        assert all(torch.equal(state[n], t) for n, t in load_file(out / key / WEIGHTS).items())
    made = predict(out / key, manifest, device="cpu")
    scores = [row[made.column] for row in made.rows]
    assert scores == [row[made.column] for row in predict(out / f"{key}.json", manifest, device="cpu").rows]
    assert len(scores) == len(set(scores)) > 1  # a model, not a constant


def test_export_copies_or_merges(trained, tmp_path):
    _, out, records = trained
    key = records["lora"].key
    copied = export_merged(out / key, tmp_path / "copy", merge=False)
    assert {p.name: p.read_bytes() for p in copied.iterdir()} == {p.name: p.read_bytes()
                                                                   for p in (out / key).iterdir()}
    merged = load_export(export_merged(out / key, tmp_path / "merged", merge=True))
    unmerged, _ = load_model(out / key)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(x), unmerged(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "name"), [("lora", HEAD), ("lora", ADAPTER), ("lora", "adapter_config.json"),
                                              ("bitfit", WEIGHTS)])
def test_a_damaged_file_is_refused_in_one_line(trained, tmp_path, method, name):
    folder = _damaged(trained, tmp_path, method, name)
    with pytest.raises(RecordError) as refused:
        load_model(folder)
    message = str(refused.value)
    assert "\n" not in message and str(folder) in message
    result = CliRunner().invoke(adapters_app, ["predict", "--run", str(folder), "--manifest", str(trained[0])])
    assert result.exit_code != 0 and isinstance(result.exception, RecordError)


def test_what_is_not_a_trained_run_is_refused(trained, tmp_path):
    folder = _damaged(trained, tmp_path, "bitfit", HEAD, (trained[1] / trained[2]["bitfit"].key / HEAD).read_bytes())
    folder.with_name(f"{folder.name}.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"\.json: not a run record"):
        read_run(folder)
    with pytest.raises(RecordError, match="no run record"):
        read_run(tmp_path / "elsewhere")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text("[]")
    with pytest.raises(RecordError, match=r"export\.json: not an export description"):
        load_export(tmp_path / "export")
