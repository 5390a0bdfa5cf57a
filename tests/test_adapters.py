"""Every method applies to every backbone it declares targets for, trains what it says and nothing else."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from adapters.classifier import Classifier
from adapters.methods import METHODS, apply_method, target_modules
from cli.adapters_app import app
from featcache.backbones import BACKBONES, build_backbone, count_parameters, get_spec
from featcache.errors import FeatcacheError

CASES = [(b, m) for b in BACKBONES for m in METHODS]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_method_trains_what_it_says(name, method):
    spec = get_spec(f"{name}-tiny")
    try:
        target_modules(spec, METHODS[method])
    except FeatcacheError:
        assert method == "vera" and not spec.peft.same_shape  # VeRA wraps Linear layers only: not CNNs
        return
    model = apply_method(Classifier(build_backbone(spec)), method)
    trainable, total = count_parameters(model)
    head = sum(p.numel() for p in model.head_parameters())
    assert 0 < head <= trainable <= total
    if method == "lp":
        assert trainable == head
    if method == "fft":
        assert trainable == total
    else:
        assert trainable < total
    head_ids = {id(p) for p in model.head_parameters()}
    others = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in head_ids]
    marker = {"bitfit": "bias", "lora": "lora_", "vera": "vera_lambda", "ia3": "ia3_l"}.get(method)
    if method == "lp":
        assert others == []
    elif marker:  # only the method's own parameters train beside the head
        assert others and all(marker in name for name in others), others[:5]
    x = torch.randn(2, spec.channels, spec.input_size, spec.input_size)
    model(x).pow(2).mean().backward()
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {pname} got a gradient"
    assert all(p.grad is not None for p in model.head_parameters())
    if marker:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if marker in n)


def test_unmatched_target_name_is_an_error():
    from dataclasses import replace

    from featcache.backbones import PeftTargets

    spec = replace(get_spec("dinov2-s-tiny"), peft=PeftTargets(attention=("q_proj", "query")))
    with pytest.raises(FeatcacheError, match="match no module: query"):
        apply_method(Classifier(build_backbone(spec)), "lora")


def test_cli_methods_table():
    result = CliRunner().invoke(app, ["methods", "--model", "dinov2-s-tiny"])
    assert result.exit_code == 0, result.output
    for method in METHODS:
        assert method in result.output
