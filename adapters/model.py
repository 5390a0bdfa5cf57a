"""Building the classifier a run trains, and which of its modules and tensors training changes.

One rule decides both what runs in eval mode and what a checkpoint holds: modules whose parameters are all
frozen run in eval mode (a frozen backbone's batch-norm statistics and dropout stay fixed: LP and LoRA on a CNN
do not drift its statistics), and so does batch norm unless all its parameters train (FFT): BitFit trains the
batch-norm biases on the backbone's own running statistics, so it changes biases only, as it declares, and its
numbers do not depend on how a batch is split into micro-batches or processes. The trainable parameters and the
buffers of modules in train mode are mutable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from adapters.classifier import Classifier
from adapters.methods import Method, apply_method
from featcache.backbones import BackboneSpec, build_backbone, count_parameters
from featcache.errors import UsageError


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that run in eval mode (see module doc): those with parameters or buffers, none of them
    trainable, and batch norm with a frozen parameter (BitFit's frozen scale beside its trained bias)."""
    found = []
    for module in model.modules():
        trains = [p.requires_grad for p in module.parameters()]
        buffers = list(module.buffers())
        if (trains or buffers) and not any(trains):
            found.append(module)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not all(trains):
            found.append(module)
    return found


def set_train_mode(model: nn.Module, frozen: list[nn.Module] | None = None) -> None:
    """Train mode, except the frozen modules (found once per run by the trainer, else here)."""
    model.train()
    for module in frozen_modules(model) if frozen is None else frozen:
        module.eval()


def mutable_names(model: nn.Module) -> list[str]:
    """State-dict names that training can change: trainable parameters and the buffers of modules in train
    mode (batch-norm statistics). Checkpoints and the best-epoch copy hold only these."""
    set_train_mode(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix, module in model.named_modules():
        if module.training:
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers(recurse=False)]
    saved = set(model.state_dict())  # non-persistent buffers (position ids) are not state
    return sorted(n for n in set(names) if n in saved)


def _enable_grad_ckpt(model: Any, spec: BackboneSpec) -> None:  # a library's module (transformers, timm)
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise UsageError(f"--grad-ckpt: {spec.name} has no gradient checkpointing")


def build_classifier(spec: BackboneSpec, method: Method, rank: int | None, *, weights: str | Path | None = None,
                     random_init: bool = False, seed: int = 42, grad_ckpt: bool = False,
                     dropout: float | None = None) -> Classifier:
    """Backbone + two-logit head, adapted by ``method`` (``dropout``: LoRA's/VeRA's, None for the benchmark's);
    the head and adapters are initialised from ``seed`` (the backbone's random weights, where it has them, are
    the same as stage 1's)."""
    backbone = build_backbone(spec, weights=weights, random_init=random_init)
    fingerprint = base_fingerprint(backbone.model) if backbone.random_weights else None
    if grad_ckpt:
        _enable_grad_ckpt(backbone.model, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = Classifier(backbone, n_out=2)
        classifier.base_fingerprint = fingerprint
        return apply_method(classifier, method, rank, dropout)


def base_fingerprint(module: nn.Module) -> str:
    """sha256 of a backbone's weights, by name: what identifies a random-init base, which is rebuilt from its
    seed rather than saved (a run records it; loading a run onto a rebuilt base compares it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def counted_parameters(model: Classifier) -> tuple[int, int]:
    """(trainable, total) parameters with the head counted as ONE logit, ``D + 1``: a two-logit softmax head has
    one logit's freedom (only the logits' difference matters) and the stage-1 probe is one logit, so LP on
    features, LP end to end and every method's head count alike in `adapters methods`, records and figures."""
    trainable, total = count_parameters(model)
    head = head_module(model)
    extra = (head.out_features - 1) * (head.in_features + 1)
    return trainable - extra, total - extra


def head_module(model: Classifier) -> nn.Linear:
    """The head Linear, in its own attribute or in the backbone's head slot (also under peft's prefixes)."""
    if model.head is not None:
        return model.head
    return cast(nn.Linear, backbone_module(model).get_submodule(model.backbone.spec.head))  # Classifier put it


def backbone_module(model: Classifier) -> nn.Module:
    """The backbone's own module, under peft's wrapper where there is one."""
    inner = model.backbone.model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner
