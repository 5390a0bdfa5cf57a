"""`BackboneSpec`: everything the toolkit knows about one backbone, in one frozen record (timm-style)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# MedCLIP normalises its replicated grayscale input with one mean/std measured on its pretraining X-rays.
MEDCLIP_MEAN = (0.5862785803043838,) * 3
MEDCLIP_STD = (0.27950088968644304,) * 3

SOURCES = ("timm", "hf", "open_clip", "medclip")
FAMILIES = ("cnn", "timm_vit", "hf_vit", "clip", "swin", "open_clip")


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights live. `repo` is a Hugging Face hub repo; `files` are alternatives (first found
    wins); `url` is for weights that are not on the hub (MedCLIP's release archives)."""

    repo: str | None = None
    files: tuple[str, ...] = ()
    url: str | None = None


@dataclass(frozen=True)
class PeftTargets:
    """Module-name suffixes (peft's `target_modules` convention) grouped by what they are, so each PEFT method
    picks its sets: LoRA attention(+mlp), VeRA `same_shape` Linear layers, IA3 targets with `feedforward`
    scaled on their input, CNN methods `conv`."""

    attention: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()
    feedforward: tuple[str, ...] = ()
    same_shape: tuple[str, ...] = ()
    conv: tuple[str, ...] = ()

    def all_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.attention + self.mlp + self.feedforward + self.same_shape + self.conv))

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in ("attention", "mlp", "feedforward", "same_shape", "conv")}


@dataclass(frozen=True)
class TinyVariant:
    """A few-thousand-parameter build of the same family and module names, for tests and offline smoke runs."""

    config: Mapping[str, Any]
    views: Mapping[str, int]
    input_size: int
    arch: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone. `arch` + `config` tell the `source` builder what to build; `family` tells how feature
    views are read from its outputs; `views` maps each view name to its dimension."""

    name: str
    source: str
    arch: str
    family: str
    views: Mapping[str, int]
    weights: WeightsSource = WeightsSource()
    peft: PeftTargets = PeftTargets()
    config: Mapping[str, Any] = field(default_factory=dict)
    head: str | None = None
    head_view: str = "cls"
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: int = 3
    intensity: str = "minmax"
    description: str = ""
    tiny: TinyVariant | None = None
    is_tiny: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"{self.name}: unknown source {self.source!r}; one of {SOURCES}")
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; one of {FAMILIES}")
        if self.head_view not in self.views:
            raise ValueError(f"{self.name}: head view {self.head_view!r} not among views {tuple(self.views)}")

    @property
    def preprocess(self):
        """The image-input settings of this backbone (one path from file to tensor, both stages)."""
        from featcache.imaging import Preprocess

        return Preprocess(size=self.input_size, mean=tuple(self.mean), std=tuple(self.std),
                          channels=self.channels, intensity=self.intensity)

    def as_tiny(self) -> BackboneSpec:
        if self.tiny is None:
            raise ValueError(f"{self.name} has no tiny variant")
        return replace(self, name=f"{self.name}-tiny", arch=self.tiny.arch or self.arch,
                       config=dict(self.tiny.config), views=dict(self.tiny.views),
                       input_size=self.tiny.input_size, weights=WeightsSource(), tiny=None, is_tiny=True)
