"""Grids: a shipped name, a file beside the study or an inline mapping; defaults; each wrong value refused in
one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.methods import HEAD_LRS, METHODS, RANKS
from featcache.errors import StudyError
from featcache.records import PROBE_METHOD
from study.grid import GRID_METHODS, load_grid, parse_grid, shipped_grids


def test_the_method_list_is_the_probe_then_the_method_table():
    assert GRID_METHODS == (PROBE_METHOD, *METHODS)
    assert {"smoke", "benchmark"} <= set(shipped_grids())


def test_a_minimal_grid_takes_the_documented_defaults(tmp_path):
    grid = parse_grid({"backbones": "resnet18", "methods": ["probe", "lora"]}, tmp_path / "g.yaml")
    assert (grid.name, grid.backbones, grid.methods) == ("g", ("resnet18",), ("probe", "lora"))
    assert grid.ranks == RANKS and grid.head_lrs == HEAD_LRS and grid.full and grid.shots == ()
    assert (grid.draws, grid.train_draws, grid.train_folds, grid.view) == (100, 5, None, "cls")


def test_a_grid_file_beside_the_study_wins_over_a_shipped_name(tmp_path):
    study = tmp_path / "study.yaml"
    assert load_grid("smoke", study).name == "smoke"  # shipped
    (tmp_path / "smoke").write_text("backbones: [resnet18-tiny]\nmethods: [probe]\ntrain_folds: [fold1]\n"
                                    "regimes: {full: false, shots: [2, 4]}\n")
    mine = load_grid("smoke", study)
    assert mine.file == tmp_path / "smoke" and mine.train_folds == ("fold1",) and mine.shots == (2, 4)
    assert not mine.full
    inline = load_grid({"backbones": ["resnet18-tiny"], "methods": ["bitfit"]}, study)
    assert inline.file == study and inline.methods == ("bitfit",)


@pytest.mark.parametrize(("raw", "message"), [
    ({"methods": ["probe"]}, "grid.backbones: give at least one"),
    ({"backbones": ["resnet18"], "methods": ["probe", "dora"]}, r"grid.methods: unknown \['dora'\]; choose from probe"),
    ({"backbones": ["nope-net"], "methods": ["probe"]}, "grid.backbones: "),
    ({"backbones": ["resnet18"], "methods": ["lora"], "ranks": ["four"]}, "grid.ranks: expected a list of int"),
    ({"backbones": ["resnet18"], "methods": ["lora"], "regimes": {"few": [2]}}, r"grid.regimes: unknown key"),
    ({"backbones": ["resnet18"], "methods": ["lora"], "exclude": [{"backbone": "x"}]}, "plus a 'reason'"),
    ({"backbones": ["resnet18"], "methods": ["lora"], "exclude": [{"colour": "x", "reason": "r"}]},
     r"grid.exclude: unknown key"),
    ({"backbones": ["resnet18"], "methods": ["lora"], "epochs": 3}, r"grid: unknown key\(s\) \['epochs'\]"),
])
def test_wrong_values_are_one_line_naming_file_and_key(tmp_path, raw, message):
    with pytest.raises(StudyError, match=message) as refused:
        parse_grid(raw, tmp_path / "g.yaml")
    assert str(refused.value).startswith(str(tmp_path / "g.yaml")) and "\n" not in str(refused.value)


def test_a_missing_grid_file_is_named(tmp_path):
    with pytest.raises(StudyError, match="nowhere.yaml"):
        load_grid("nowhere.yaml", Path(tmp_path / "study.yaml"))
