"""`build_backbone`: spec + weights -> a `Backbone` that maps images to named feature views."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import torch
from torch import nn

from featcache.errors import WeightsError

from .registry import get_spec
from .spec import BackboneSpec
from .views import EXTRACTORS
from .weights import RANDOM_INIT, TINY_RANDOM, load_state_dict, locate, weights_identity


def _builder(source: str):
    """The `build(spec, state)` of a source, imported on first use (each pulls in its own library)."""
    return import_module(f"{__package__}.{source}_source").build


class Backbone(nn.Module):
    """One vision tower behind one API: `backbone(x) -> {view: (B, D)}`. `model` is the library's own module,
    so PEFT methods target its module names directly."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_id = weights_id
        self.view_dims = dict(spec.views)
        self._extract = EXTRACTORS[spec.family]

    @property
    def random_weights(self) -> bool:
        return self.weights_id in (RANDOM_INIT, TINY_RANDOM)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        views = self._extract(self.model, x)
        return {name: views[name] for name in self.spec.views}


def build_backbone(name: str | BackboneSpec, weights: str | Path | None = None, random_init: bool = False,
                   seed: int = 0) -> Backbone:
    """Build a backbone in eval mode. Weights: `weights` (file or folder) if given, else found offline (see
    `weights.locate`); `random_init` and `-tiny` variants use seeded random weights, so two builds compute the
    same features."""
    spec = get_spec(name) if isinstance(name, str) else name
    state, path, weights_id = None, None, weights_identity(spec, weights, random_init)
    if weights is not None or not (spec.is_tiny or random_init):
        path = locate(spec, weights).path
        state = load_state_dict(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = _builder(spec.source)(spec, state)
        except WeightsError as err:  # the builders know the architecture, only this knows the file
            raise WeightsError(f"{path}: {err}" if path is not None else str(err)) from None
    return Backbone(spec, model.eval(), weights_id)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def match_targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Module paths each target name matches under peft's rule (the full path or its last dotted parts):
    peft raises only when no name matches at all, so every configured name is checked here."""
    paths = [path for path, _ in model.named_modules() if path]
    return {name: [p for p in paths if p == name or p.endswith(f".{name}")] for name in names}
