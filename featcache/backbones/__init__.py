"""Backbones: one registry of specs, one builder per source (timm, hf, open_clip, medclip), one feature API.

The registry, specs and weight lookup import no deep-learning library, so commands that only need to know a
model (or to fail fast on missing weights) start in well under a second; building one imports torch."""

from .registry import ALIASES, BACKBONES, canonical_name, get_spec, list_backbones
from .spec import BackboneSpec, PeftTargets, TinyVariant, WeightsSource
from .weights import WeightsLocation, download_hint, load_state_dict, locate, weights_identity

_BUILD = ("Backbone", "build_backbone", "count_parameters", "match_targets")

__all__ = [
    "ALIASES", "BACKBONES", "Backbone", "BackboneSpec", "PeftTargets", "TinyVariant", "WeightsLocation",
    "WeightsSource", "build_backbone", "canonical_name", "count_parameters", "download_hint", "get_spec",
    "list_backbones", "load_state_dict", "locate", "match_targets", "weights_identity",
]


def __getattr__(name: str):
    if name in _BUILD:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
