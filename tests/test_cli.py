"""The two console scripts: their verbs, `featcache models` and `featcache weights` naming all eleven."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.adapters_app import app as adapters_app
from cli.featcache_app import app as featcache_app
from featcache.backbones import BACKBONES

FEATCACHE_VERBS = ("models", "weights", "show", "synth", "datasets", "manifest", "splits", "results", "extract",
                   "pixels", "export", "stores", "probe")


def test_featcache_help_lists_its_verbs():
    result = CliRunner().invoke(featcache_app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for verb in FEATCACHE_VERBS:
        assert f" {verb} " in result.output, verb


def test_adapters_help_lists_its_verbs():
    result = CliRunner().invoke(adapters_app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and " methods " in result.output


def test_weights_names_all_eleven_with_status(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "weights" / "medclip-vit").mkdir(parents=True)
    (tmp_path / "weights" / "medclip-vit" / "pytorch_model.bin").write_bytes(b"x")
    result = CliRunner().invoke(featcache_app, ["weights"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")
             and line.split()[1] in BACKBONES}
    assert set(lines) == set(BACKBONES)
    assert "found" in lines["medclip-vit"] and "medclip-vit/pytorch_model.bin" in lines["medclip-vit"]
    assert "missing" in lines["dinov2-s"] and "facebook/dinov2-small" in lines["dinov2-s"]


def test_models_lists_the_registry():
    result = CliRunner().invoke(featcache_app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert all(name in result.output for name in BACKBONES)
