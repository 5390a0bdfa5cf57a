"""Which device a command runs on, and the numeric precision that follows from it: one rule for both stages."""

from __future__ import annotations

import os

import torch

from featcache.errors import UsageError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> this rank's GPU when there is one (``LOCAL_RANK`` under torchrun), else the CPU.

    A named device is checked here, before any store or model is touched, so ``--device cuda`` on a machine
    without one (or ``--device tpu``) is one line, not a torch traceback halfway through a run."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise UsageError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"device {device!r}: this machine has no CUDA GPU torch can use; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r}: Apple MPS is not available on this machine; use --device cpu")
    return dev


def precision_for(device: torch.device) -> str:
    """The precision runs on ``device`` use, as records state it: bf16 autocast on CUDA, float32 elsewhere."""
    return "bf16-autocast" if device.type == "cuda" else "float32"
