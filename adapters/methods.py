"""The adaptation methods: the one table that knows a method, and how a method makes a classifier trainable.

A `Method` says everything about itself that the CLI, the grid, planning, training, artefacts and the report
need: its name and order, whether it is ranked (and its ranks and default rank), its backbone LR, which
`PeftTargets` sets of a backbone spec it adapts (the registry stays the only place that knows module names),
the peft config it builds, whether it merges into the backbone, and what a run folder saves. LoRA, VeRA and IA3
are peft's; BitFit (biases only), FFT (everything) and LP (nothing, head only) are freezing rules, since peft
has no tuner for them. Settings follow the benchmark (Ruffini et al. 2025): LoRA alpha 1 and dropout 0.1, VeRA
dropout 0.1, backbone LR 1e-5 for FFT and 1e-4 otherwise, head LRs {1e-2, 1e-3, 1e-4}, ranks {4, 8, 16}.

Importing this module is cheap: peft is imported only when a config is built for a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featcache.backbones import BackboneSpec
from featcache.errors import UsageError

if TYPE_CHECKING:
    from adapters.classifier import Classifier

HEAD_LRS = (1e-2, 1e-3, 1e-4)  # the head-LR grid: one run (and record) each
RANKS = (4, 8, 16)  # the benchmark's LoRA/VeRA ranks
DEFAULT_RANK = 8


ADAPTER_DROPOUT = 0.1  # LoRA and VeRA dropout, the benchmark's; `TrainSettings.adapter_dropout` overrides it


def _lora(targets: list[str], _ff: list[str], r: int, dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=1, lora_dropout=dropout, target_modules=targets)


def _vera(targets: list[str], _ff: list[str], r: int, dropout: float) -> Any:
    from peft import VeraConfig

    return VeraConfig(r=r, vera_dropout=dropout, target_modules=targets)


def _ia3(targets: list[str], feedforward: list[str], _r: int, _dropout: float) -> Any:
    from peft import IA3Config

    return IA3Config(target_modules=targets, feedforward_modules=feedforward)


@dataclass(frozen=True)
class Method:
    """One adaptation method. ``trains``: ``adapter`` (peft), ``all``, ``bias`` or ``none`` (head only);
    ``saves``: what its run folder holds besides the head (``adapter``: peft's files, ``weights``: the
    changed backbone tensors, ``nothing``)."""

    name: str
    description: str
    trains: str
    backbone_lr: float | None = None
    sets: tuple[str, ...] = ()
    config: Callable[[list[str], list[str], int, float], Any] | None = None
    ranked: bool = False
    mergeable: bool = False
    dropout: bool = False  # whether the adapter has a dropout (LoRA, VeRA)

    @property
    def peft(self) -> bool:
        """Whether peft wraps the backbone (else a freezing rule)."""
        return self.config is not None

    @property
    def ranks(self) -> tuple[int, ...]:
        return RANKS if self.ranked else ()

    @property
    def saves(self) -> str:
        return "adapter" if self.peft else "weights" if self.trains in ("all", "bias") else "nothing"

    def rank_for(self, rank: int | None) -> int | None:
        """The rank a run uses: the given one (>= 1) or the default for ranked methods; refused elsewhere."""
        if not self.ranked:
            if rank is not None:
                raise UsageError(f"--rank applies to {' and '.join(RANKED)} only, not to {self.name}")
            return None
        rank = DEFAULT_RANK if rank is None else rank
        if rank < 1:
            raise UsageError(f"--rank must be at least 1 (the benchmark used {', '.join(map(str, RANKS))})")
        return rank

    def variant(self, rank: int | None) -> str:
        """``lora-r8`` for a ranked method, the name otherwise: how tables and figures name a run's method."""
        return self.name if rank is None else f"{self.name}-r{rank}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lp", "linear probe: frozen backbone, trained head", "none"),
    Method("fft", "full fine-tuning", "all", 1e-5),
    Method("lora", "LoRA on attention (+ MLP where the benchmark did) or conv1", "adapter", 1e-4,
           ("attention", "mlp", "conv"), _lora, ranked=True, mergeable=True, dropout=True),
    Method("vera", "VeRA on Linear layers sharing one random projection pair", "adapter", 1e-4, ("same_shape",),
           _vera, ranked=True, mergeable=True, dropout=True),
    Method("bitfit", "BitFit: biases only", "bias", 1e-4),
    Method("ia3", "IA3: learned rescaling of attention and feed-forward activations", "adapter", 1e-4,
           ("attention", "feedforward", "conv"), _ia3, mergeable=True),
)}
RANKED = tuple(name for name, m in METHODS.items() if m.ranked)
# What a method's sets are called in messages: the spec's field names are internal words.
_SET_WORDS = {"attention": "attention", "mlp": "MLP", "conv": "conv", "feedforward": "feed-forward",
              "same_shape": "square Linear"}


def get_method(name: str | Method) -> Method:
    """The method of a name (a `Method` passes through): one line naming the choices for an unknown one."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name]


def method_order(name: str) -> int:
    """A method's (or variant's, ``lora-r8``) place in the table, for tables and figures; unknown names last."""
    base = name.split("-r")[0]
    return list(METHODS).index(base) if base in METHODS else len(METHODS)


def target_modules(spec: BackboneSpec, method: Method) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) of `method` on `spec`, from the registry's named sets."""
    names = [n for s in method.sets for n in getattr(spec.peft, s)]
    targets = list(dict.fromkeys(names))
    feedforward = [n for n in spec.peft.feedforward if n in targets]
    if method.peft and not targets:
        kinds = " or ".join(_SET_WORDS.get(s, s) for s in method.sets)
        raise UsageError(f"{method.name} does not apply to {spec.name}: it has no {kinds} layers for "
                         f"{method.name} to adapt; use {_alternatives(spec, method)} instead")
    return targets, feedforward


def _alternatives(spec: BackboneSpec, method: Method) -> str:
    """The parameter-efficient methods that do apply to ``spec``, adapters first, as text."""
    names = [m.name for m in METHODS.values() if m.peft and m is not method
             and any(getattr(spec.peft, s) for s in m.sets)] + ["bitfit"]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def apply_method(classifier: Classifier, method: Method | str, rank: int | None = None,
                 dropout: float | None = None) -> Classifier:
    """Make `classifier` trainable the way `method` says, in place; its head always trains. peft methods wrap
    the backbone's module (`get_peft_model`: VeRA keeps shared state on its tuner); ``dropout`` is LoRA's and
    VeRA's (None: the benchmark's 0.1). Every configured target name must match a module: peft itself only
    checks that one does."""
    method = get_method(method)
    rank = method.rank_for(rank)
    spec, model = classifier.backbone.spec, classifier.backbone.model
    if method.config is None:
        for param_name, param in classifier.backbone.named_parameters():
            param.requires_grad = method.trains == "all" or (method.trains == "bias" and param_name.endswith("bias"))
    else:
        from peft import get_peft_model

        from featcache.backbones import match_targets

        targets, feedforward = target_modules(spec, method)
        unmatched = [n for n, paths in match_targets(model, tuple(targets)).items() if not paths]
        if unmatched:
            raise UsageError(f"{spec.name}: {method.name} targets match no module: {', '.join(unmatched)}")
        config = method.config(targets, feedforward, rank or 0, ADAPTER_DROPOUT if dropout is None else dropout)
        classifier.backbone.model = get_peft_model(model, config)
    for param in classifier.head_parameters():
        param.requires_grad = True
    return classifier
