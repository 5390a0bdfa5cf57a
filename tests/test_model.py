"""Building a run's classifier, and one rule for what training changes: frozen modules run in eval mode, and
a checkpoint holds the trainable parameters plus the buffers of modules in train mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.methods import METHODS
from adapters.model import (
    backbone_module,
    build_classifier,
    frozen_modules,
    head_module,
    mutable_names,
    set_train_mode,
)
from featcache.backbones import get_spec
from featcache.errors import UsageError

CNN, VIT = get_spec("resnet18-tiny"), get_spec("dinov2-s-tiny")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _build(spec, method: str, seed: int = 42):
    return build_classifier(spec, METHODS[method], None, random_init=True, seed=seed)


def test_a_linear_probe_changes_the_head_only_and_keeps_batch_norm_fixed():
    model = _build(CNN, "lp")
    assert mutable_names(model) == ["backbone.model.fc.bias", "backbone.model.fc.weight"]
    set_train_mode(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and head_module(model).training
    assert all(m in frozen_modules(model) for m in norms)


def test_bitfit_changes_biases_and_keeps_batch_norm_beside_its_frozen_scale_fixed():
    model = _build(CNN, "bitfit")
    names = mutable_names(model)
    assert any(n.endswith("bn1.bias") for n in names) and not any(n.endswith(STATISTICS) for n in names)
    assert not [n for n in names if n.endswith("weight") and "fc" not in n]  # no conv or norm weight
    set_train_mode(model)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_lora_wraps_the_backbone_and_the_head_is_found_under_peft():
    model = _build(VIT, "lora")
    inner = backbone_module(model)
    assert inner is not model.backbone.model and not hasattr(inner, "get_base_model")  # unwrapped
    names = mutable_names(model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    head = head_module(model)
    assert isinstance(head, nn.Linear) and head.out_features == 2
    assert all(p.requires_grad for p in head.parameters())
    assert model.head is head and not any(p.requires_grad for n, p in inner.named_parameters() if "lora_" not in n)


def test_the_seed_decides_the_head_and_not_the_random_backbone():
    one, two, other = _build(CNN, "lp"), _build(CNN, "lp"), _build(CNN, "lp", seed=7)
    assert torch.equal(head_module(one).weight, head_module(two).weight)
    assert not torch.equal(head_module(one).weight, head_module(other).weight)
    conv = "backbone.model.conv1.weight"
    assert torch.equal(one.state_dict()[conv], other.state_dict()[conv])  # stage 1's backbone either way


def test_gradient_checkpointing_where_there_is_none_is_one_line():
    from adapters import model as model_module

    class Bare(nn.Module):
        pass

    with pytest.raises(UsageError, match="--grad-ckpt: resnet18-tiny has no gradient checkpointing"):
        model_module._enable_grad_ckpt(Bare(), CNN)
