"""Options a user can get wrong are refused in one line before anything is built: devices and ranks."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from featcache.device import resolve_device
from featcache.errors import UsageError


def test_named_devices_are_checked(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="'tpu' is not supported"):
        resolve_device("tpu")
    with pytest.raises(UsageError, match="is not supported"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match="cuda:0..cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_extract_on_a_missing_device_leaves_no_group(synth_cohort):
    from cli.featcache_app import app

    manifest = synth_cohort(patients=4, size=32)
    result = CliRunner().invoke(app, ["extract", "--model", "resnet18-tiny", "--manifest", str(manifest),
                                      "--device", "tpu"])
    assert result.exit_code != 0 and isinstance(result.exception, UsageError)
    assert not (manifest.parent / "features.zarr").exists()


def test_rank_below_one_is_refused():
    from adapters.classifier import Classifier
    from adapters.methods import apply_method
    from featcache.backbones import build_backbone

    classifier = Classifier(build_backbone("resnet18-tiny"))
    with pytest.raises(UsageError, match="rank must be at least 1"):
        apply_method(classifier, "lora", 0)
