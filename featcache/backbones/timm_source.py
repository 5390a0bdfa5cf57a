"""timm builder: ImageNet CNNs and any `timm:NAME`."""

from __future__ import annotations

from typing import Any, cast

import timm
import torch
from timm.models import register_model
from torch import nn

from ._loading import load_into
from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, PeftTargets, TinyVariant, WeightsSource

_TINY_VIT = {"embed_dim": 16, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}


@register_model
def featcache_tiny_vit(pretrained: bool = False, **kwargs) -> nn.Module:
    """A ViT-B/16-family model at a few thousand parameters, registered with timm so that wrappers which build
    by model name (open_clip's `TimmModel`) can build a tiny BiomedCLIP with the same module names."""
    return timm.create_model("vit_base_patch16_224", pretrained=False, **{**_TINY_VIT, **kwargs})


def build(spec: BackboneSpec, state: dict | None) -> nn.Module:
    model: Any = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.config)
    if state is not None:
        classifier = model.default_cfg.get("classifier", "fc")
        load_into(model, state, spec.name, ignore=(f"{classifier}.",))
    return model


def spec_for(name: str) -> BackboneSpec:
    """A spec for any timm model, read from timm's pretrained config (weights from its hub repo)."""
    arch = name.split(".")[0]
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        with torch.device("meta"):
            probe: Any = timm.create_model(arch, pretrained=False, num_classes=0)
    except (RuntimeError, ValueError) as err:
        from featcache.errors import WeightsError

        raise WeightsError(f"timm:{name}: unknown timm model ({err})") from None
    from .constants import HUB_FILES, TIMM_VIT_PEFT

    vit = hasattr(probe, "num_prefix_tokens")
    dim = probe.num_features
    hub = cfg.hf_hub_id if cfg is not None else None
    return BackboneSpec(
        name=f"timm:{name}", source="timm", arch=arch, family="timm_vit" if vit else "cnn",
        views={"cls": dim, "mean": dim} if vit else {"cls": dim},
        weights=WeightsSource(repo=hub.rstrip("/") if hub else None, files=HUB_FILES),
        peft=TIMM_VIT_PEFT if vit else PeftTargets(conv=("conv1",)),
        input_size=cfg.input_size[-1] if cfg is not None else 224,
        mean=cast("tuple[float, float, float]", tuple(cfg.mean)) if cfg is not None else IMAGENET_MEAN,
        std=cast("tuple[float, float, float]", tuple(cfg.std)) if cfg is not None else IMAGENET_STD,
        description=f"timm {name}",
        tiny=TinyVariant(config=_TINY_VIT, views={"cls": 16, "mean": 16}, input_size=32, arch="featcache_tiny_vit")
        if vit else None,
    )
