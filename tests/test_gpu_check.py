"""The GPU check's CPU smoke mode: the script's whole code path on tiny backbones, so it never rots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("error:.*batching rule.*:UserWarning")
def test_smoke_mode_prints_one_table_with_every_check(capsys):
    check = _load()
    assert check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    title = next(n for n, line in enumerate(lines) if line.startswith("gpu_check on CPU"))
    table = lines[title + 1:]
    assert table[0].split()[:3] == ["check", "what", "value"]
    kinds = {line.split()[0] for line in table[1:] if not line.startswith("[")}
    assert kinds == {"extract", "step", "packed", "train"}
    assert sum(line.startswith("step") for line in table) == 6  # every method
    assert any("bf16 vs fp32" in line for line in table)
    assert any(line.startswith("packed") and "N=4" in line for line in table)
    assert any(line.startswith("train") and "PASS" in line for line in table)
    assert any("0 vmap fallbacks" in line for line in table)  # a footnote
    assert max(len(line) for line in table if not line.startswith("[")) <= 80


def test_missing_packages_are_named(monkeypatch, capsys):
    check = _load()
    monkeypatch.setattr(check, "NEEDED", ("torch", "surely_not_installed_pkg"))
    assert check.main(["--smoke"]) == 2
    assert "missing Python packages: surely_not_installed_pkg" in capsys.readouterr().out
