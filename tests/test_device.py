"""Device resolution: auto picks this rank's GPU or the CPU; a named device this machine lacks is one line
before any work; the precision a record states follows from the device."""

from __future__ import annotations

import pytest
import torch

from featcache.device import precision_for, resolve_device
from featcache.errors import UsageError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA GPUs."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


def test_auto_is_the_cpu_without_a_gpu_and_this_ranks_gpu_with_them(gpus, monkeypatch):
    gpus(0)
    assert resolve_device() == torch.device("cpu")
    gpus(2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)


def test_named_devices_are_checked_against_the_machine(gpus, monkeypatch):
    gpus(0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"^device 'cuda': this machine has no CUDA GPU .*use --device cpu$"):
        resolve_device("cuda")
    gpus(1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match=r"has 1 CUDA GPU\(s\), cuda:0..cuda:0$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="Apple MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "", "meta"])
def test_unknown_devices_are_one_line(name):
    with pytest.raises(UsageError, match=r"^device .* is not supported: use auto, cpu, cuda, cuda:N or mps$"):
        resolve_device(name)


def test_precision_follows_the_device():
    assert precision_for(torch.device("cuda", 0)) == "bf16-autocast"
    assert precision_for(torch.device("cpu")) == precision_for(torch.device("mps")) == "float32"
