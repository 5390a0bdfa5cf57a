"""open_clip builder: BiomedCLIP's vision tower and any `open_clip:NAME[/TAG]` vision tower.

BiomedCLIP is built as open_clip's own `TimmModel` (timm ViT trunk + linear projection), so its checkpoint's
`visual.*` keys load as they are and PEFT sees timm's module names (`attn.qkv`, `mlp.fc1/fc2`)."""

from __future__ import annotations

from typing import Any

import open_clip
from open_clip.timm_model import TimmModel
from torch import nn

from featcache.errors import WeightsError

from ._loading import load_into, strip_prefix
from .constants import OPEN_CLIP_FILES, TIMM_VIT_PEFT
from .spec import CLIP_MEAN, CLIP_STD, BackboneSpec, PeftTargets, WeightsSource
from .timm_source import featcache_tiny_vit  # noqa: F401  (registers the tiny trunk with timm)


def _timm_tower(spec: BackboneSpec) -> nn.Module:
    cfg = spec.config
    return TimmModel(spec.arch, embed_dim=cfg["embed_dim"], image_size=spec.input_size, pool=cfg.get("pool", ""),
                     proj=cfg.get("proj", "linear"), proj_bias=cfg.get("proj_bias", False))


def build(spec: BackboneSpec, state: dict | None) -> nn.Module:
    if spec.family == "timm_vit":
        tower = _timm_tower(spec)
    else:
        tower = open_clip.create_model(spec.arch, pretrained=None, load_weights=False).visual
        tower.output_tokens = True
    if state is not None:
        visual = strip_prefix(state, "visual.")
        load_into(tower, visual or state, spec.name)
    return tower


def spec_for(ident: str) -> BackboneSpec:
    """`NAME` or `NAME/TAG` of open_clip's model list; ViT towers only (open_clip's own or a timm trunk)."""
    name, _, tag = ident.partition("/")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise WeightsError(f"open_clip:{ident}: unknown open_clip model (see open_clip.list_models())")
    vision = cfg["vision_cfg"]
    pre = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    repo = (pre.get("hf_hub") or "").rstrip("/") or None
    common: dict[str, Any] = dict(weights=WeightsSource(repo=repo, files=OPEN_CLIP_FILES),
                  mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
                  input_size=int(vision.get("image_size", 224)), description=f"open_clip {ident} vision tower")
    if "timm_model_name" in vision:
        from .timm_source import spec_for as timm_spec

        dim = timm_spec(vision["timm_model_name"]).views["cls"]
        return BackboneSpec(name=f"open_clip:{ident}", source="open_clip", arch=vision["timm_model_name"],
                            family="timm_vit", views={"cls": dim, "mean": dim, "proj": cfg["embed_dim"]},
                            config={"embed_dim": cfg["embed_dim"], "pool": vision.get("timm_pool", ""),
                                    "proj": vision.get("timm_proj", "linear")},
                            peft=TIMM_VIT_PEFT,
                            **common)
    if isinstance(vision.get("layers"), (list, tuple)):
        raise WeightsError(f"open_clip:{ident}: ResNet towers are not supported; use timm:resnet50 or medclip-resnet")
    return BackboneSpec(name=f"open_clip:{ident}", source="open_clip", arch=name, family="open_clip",
                        views={"proj": cfg["embed_dim"], "mean": vision["width"]}, head_view="proj",
                        peft=PeftTargets(attention=("out_proj",), mlp=("c_fc", "c_proj"),
                                         feedforward=("c_fc", "c_proj")), **common)
