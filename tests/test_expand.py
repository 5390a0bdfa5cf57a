"""A grid as entries: every level once, --only narrowing by field globs, and what cannot run kept with its
reason (a method a backbone lacks layers for, per-center levels without centers, the grid's own rules)."""

from __future__ import annotations

import pytest

from featcache.errors import UsageError
from study.expand import Entry, expand, expected_runs, matches, parse_only
from study.grid import load_grid
from study.studyfile import STUDY_FILE, load_study

_STUDY = """\
tasks: [SYN, CAR]
grid:
  backbones: [resnet18-tiny, dinov2-s-tiny]
  methods: [probe, lora, vera]
  ranks: [4, 8]
  regimes: {full: true, shots: [2], center_shots: [2]}
  draws: 3
  train_draws: 2
  train_folds: [fold0, fold1]
  head_lrs: [0.01, 0.001]
  exclude:
    - {backbone: dinov2-*, method: lora, regime: fewshot, reason: not this time}
"""


@pytest.fixture
def study(tmp_path):
    (tmp_path / STUDY_FILE).write_text(_STUDY)
    return load_study(tmp_path / STUDY_FILE)


def test_every_level_once_and_every_exclusion_with_its_reason(study):
    grid = study.grid()
    entries, excluded = expand(study, grid)
    every = entries + [x.entry for x in excluded]
    assert len(every) == len(set(every)) == 2 * 2 * (1 + 2 + 2) * 3  # tasks x backbones x variants x levels
    reasons = {x.entry: x.reason for x in excluded}
    vera_cnn = Entry("resnet18-tiny", "SYN", "vera", 4, "full", None)
    assert "vera does not apply to resnet18-tiny" in reasons[vera_cnn] and vera_cnn not in entries
    assert "covid19_ar has no centers" in reasons[Entry("dinov2-s-tiny", "CAR", "probe", None, "fewshot-center", 2)]
    assert reasons[Entry("dinov2-s-tiny", "SYN", "lora", 8, "fewshot", 2)] == "not this time"
    assert Entry("dinov2-s-tiny", "SYN", "lora", 8, "full", None) in entries
    assert Entry("dinov2-s-tiny", "SYN", "probe", None, "fewshot-center", 2) in entries  # SYN has centers


def test_only_narrows_by_field_globs_and_a_method_matches_its_variants(study):
    grid = study.grid()
    entries, excluded = expand(study, grid, parse_only("backbone=resnet*,method=lora|probe,task=SYN,regime=full"))
    assert [(e.method, e.rank) for e in entries] == [("probe", None), ("lora", 4), ("lora", 8)]
    assert not excluded  # vera is not asked for, so not reported
    lora8 = Entry("resnet18-tiny", "SYN", "lora", 8, "full", None)
    assert matches(lora8, {"method": "lora-r8"}) and not matches(lora8, {"method": "lora-r4"})
    assert matches(lora8, {"stage": "2", "k": ""}) and not matches(lora8, {"rank": "4"})
    assert parse_only(None) == parse_only("") == {}
    for bad in ("colour=red", "backbone", "backbone=", "stage=1,,"):
        with pytest.raises(UsageError, match="each term is FIELD=PATTERN"):
            parse_only(bad)


def test_expected_runs_count_folds_draws_and_head_lrs(study, tmp_path):
    grid = study.grid()
    folds = 5  # SYN's k
    assert expected_runs(Entry("r", "SYN", "probe", None, "full", None), grid) == folds
    assert expected_runs(Entry("r", "SYN", "probe", None, "fewshot", 2), grid) == folds * 3
    assert expected_runs(Entry("r", "SYN", "lora", 4, "full", None), grid) == 2 * 2  # train folds x head LRs
    assert expected_runs(Entry("r", "SYN", "lora", 4, "fewshot", 2), grid) == 2 * 2 * 2
    every_fold = load_grid({"backbones": ["resnet18-tiny"], "methods": ["bitfit"], "head_lrs": [0.01]},
                           tmp_path / STUDY_FILE)
    assert expected_runs(Entry("r", "SYN", "bitfit", None, "full", None), every_fold) == folds
