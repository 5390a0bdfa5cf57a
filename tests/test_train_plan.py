"""Stage-2 planning (adapters/plan.py): every run a request names, with its key, before any model is built;
keys follow what changes numbers and nothing else; refusals come before work, in one line."""

from __future__ import annotations

import pytest

from adapters.methods import DEFAULT_RANK
from adapters.plan import VALIDATION, TrainSettings, plan, planned_keys
from featcache.errors import SplitError, UsageError
from featcache.manifest import load_manifest

TASK = "SYN"


@pytest.fixture(scope="module")
def cohort(synth_cohort):
    """24 patients at 40 px, splits with 2 draws per level (shared: read-only; planning writes nothing)."""
    return synth_cohort(patients=24, positive_rate=0.4, size=40, seed=3, draws=2, shots=(2, 4, 16))


def test_full_data_runs_are_folds_times_head_lrs_with_distinct_stable_keys(cohort):
    made = plan(cohort, TASK, "resnet18-tiny", method="lora", head_lrs=(1e-2, 1e-3), device="cpu")
    assert made.rank == DEFAULT_RANK and made.precision == "float32" and made.skipped == ()
    assert [(r.fold, r.head_lr) for r in made.runs] == [(f"fold{i}", lr) for i in range(5) for lr in (1e-2, 1e-3)]
    keys = [r.key for r in made.runs]
    assert len(set(keys)) == len(keys) and keys == planned_keys(cohort, TASK, "resnet18-tiny", method="lora",
                                                                 head_lrs=(1e-2, 1e-3), device="cpu",
                                                                 out="ignored", progress=print)
    run = made.runs[0]
    assert run.regime == "full" and run.options["rank"] == DEFAULT_RANK and run.options["head_lr"] == 1e-2
    assert not set(run.train) & set(run.test) and not set(run.val) & set(run.test)


def test_keys_change_with_what_changes_numbers_only(cohort):
    def key(**settings) -> str:
        return plan(cohort, TASK, "resnet18-tiny", method="bitfit", folds=["fold0"], head_lrs=(1e-2,),
                    settings=TrainSettings(**settings), device="cpu").runs[0].key

    base = key()
    assert key(grad_ckpt=True, checkpoint_every_s=5) == base  # memory and I/O only
    assert len({base, key(seed=1), key(max_epochs=10), key(batch_size=4), key(backbone_lr=1e-3)}) == 5


def test_fewshot_runs_validate_without_their_support_patients(cohort):
    made = plan(cohort, TASK, "resnet18-tiny", method="lp", full=False, shots=(2,), folds=["fold0"],
                head_lrs=(1e-2,), device="cpu")
    assert [(r.regime, r.shots, r.draw) for r in made.runs] == [("fewshot", 2, 0), ("fewshot", 2, 1)]
    patients = load_manifest(cohort).patients
    for run in made.runs:
        assert len(run.train) == 4 and not set(patients(run.train)) & set(patients(run.val))
        assert run.val and run.options["validation"] == VALIDATION["fewshot"]
    with pytest.raises(SplitError, match="fold0: 3 draws asked, the split file has 2"):
        plan(cohort, TASK, "resnet18-tiny", method="lp", full=False, shots=(2,), draws=3, folds=["fold0"])


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"model": "resnet18-tiny", "method": "vera"}, UsageError, "vera does not apply to resnet18-tiny"),
    ({"model": "resnet18-tiny", "method": "bitfit", "rank": 4}, UsageError, "--rank applies to"),
    ({"model": "resnet18-tiny", "method": "lora", "rank": 0}, UsageError, "--rank must be at least 1"),
    ({"model": "resnet18-tiny", "method": "lp", "device": "tpu"}, UsageError, "'tpu' is not supported"),
])
def test_requests_that_cannot_run_are_refused_before_any_work(cohort, kwargs, error, message):
    model = kwargs.pop("model")
    with pytest.raises(error, match=message):
        plan(cohort, TASK, model, **kwargs)


@pytest.mark.parametrize(("field", "value", "message"), [("max_epochs", 0, "--max-epochs must be at least 1"),
                                                         ("accumulate", 0, "--accumulate must be at least 1"),
                                                         ("warmup", -1, "--warmup must be >= 0"),
                                                         ("batch_size", 0, "--batch-size >= 1")])
def test_settings_refuse_impossible_values(field, value, message):
    with pytest.raises(UsageError, match=message):
        TrainSettings(**{field: value})
