"""The adaptation methods as one table over peft and freezing rules.

Each method names the `PeftTargets` sets of a backbone spec it adapts, so the registry stays the only place
that knows module names. LoRA, VeRA and IA3 are peft's; BitFit (biases only), FFT (everything) and LP
(nothing, head only) are freezing rules, since peft has no tuner for them. Settings follow the benchmark
(Ruffini et al. 2025): LoRA alpha 1 and dropout 0.1, VeRA dropout 0.1, backbone LR 1e-5 for FFT, 1e-4 otherwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peft import IA3Config, LoraConfig, PeftConfig, VeraConfig, get_peft_model

from adapters.classifier import Classifier
from featcache.backbones import BackboneSpec, match_targets
from featcache.errors import UsageError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    trains: str  # "adapter" | "all" | "bias" | "none"
    backbone_lr: float | None = None
    sets: tuple[str, ...] = ()
    config: Callable[[list[str], list[str], int], PeftConfig] | None = None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lp", "linear probe: frozen backbone, trained head", "none"),
    Method("fft", "full fine-tuning", "all", 1e-5),
    Method("bitfit", "BitFit: biases only", "bias", 1e-4),
    Method("lora", "LoRA on attention (+ MLP where the benchmark did) or conv1", "adapter", 1e-4,
           ("attention", "mlp", "conv"),
           lambda targets, _ff, r: LoraConfig(r=r, lora_alpha=1, lora_dropout=0.1, target_modules=targets)),
    Method("vera", "VeRA on Linear layers sharing one random projection pair", "adapter", 1e-4, ("same_shape",),
           lambda targets, _ff, r: VeraConfig(r=r, vera_dropout=0.1, target_modules=targets)),
    Method("ia3", "IA3: learned rescaling of attention and feed-forward activations", "adapter", 1e-4,
           ("attention", "feedforward", "conv"),
           lambda targets, ff, _r: IA3Config(target_modules=targets, feedforward_modules=ff)),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name]


def target_modules(spec: BackboneSpec, method: Method) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) of `method` on `spec`, from the registry's named sets."""
    names = [n for s in method.sets for n in getattr(spec.peft, s)]
    targets = list(dict.fromkeys(names))
    feedforward = [n for n in spec.peft.feedforward if n in targets]
    if method.config is not None and not targets:
        raise UsageError(f"{method.name} does not apply to {spec.name}: it declares no "
                         f"{'/'.join(method.sets)} modules; use {_alternatives(spec, method)} instead")
    return targets, feedforward


def _alternatives(spec: BackboneSpec, method: Method) -> str:
    """The parameter-efficient methods that do apply to ``spec``, adapters first, as text."""
    names = [m.name for m in METHODS.values() if m.config is not None and m is not method
             and any(getattr(spec.peft, s) for s in m.sets)] + ["bitfit"]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def apply_method(classifier: Classifier, name: str, r: int = 8) -> Classifier:
    """Make `classifier` trainable the way method `name` says, in place; its head always trains. peft methods
    wrap the backbone's module (`get_peft_model`: VeRA keeps shared state on its tuner). Every configured target
    name must match a module: peft itself only checks that one does."""
    method = get_method(name)
    if r < 1:
        raise UsageError(f"rank must be >= 1 (the LoRA/VeRA rank), got {r}")
    spec, model = classifier.backbone.spec, classifier.backbone.model
    if method.config is None:
        for param_name, param in classifier.backbone.named_parameters():
            param.requires_grad = method.trains == "all" or (method.trains == "bias" and param_name.endswith("bias"))
    else:
        targets, feedforward = target_modules(spec, method)
        unmatched = [n for n, paths in match_targets(model, tuple(targets)).items() if not paths]
        if unmatched:
            raise UsageError(f"{spec.name}: {method.name} targets match no module: {', '.join(unmatched)}")
        classifier.backbone.model = get_peft_model(model, method.config(targets, feedforward, r))
    for param in classifier.head_parameters():
        param.requires_grad = True
    return classifier
