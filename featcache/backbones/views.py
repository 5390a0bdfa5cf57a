"""How each family's outputs become named feature views. `cls` is the class token or pooled output; `mean`
averages the patch tokens (prefix tokens excluded); `proj` is a vision-language model's projected embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Views = dict[str, torch.Tensor]
Model = Any  # a library's module: its methods (forward_features, forward_head, ...) are not nn.Module's


def cnn_views(model: Model, x: torch.Tensor) -> Views:
    """timm CNNs: `cls` is the global-average-pooled last feature map; `proj` runs the classifier slot, which
    MedCLIP's ResNet uses as its image projection."""
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return {"cls": pooled, "proj": model.get_classifier()(pooled)}


def timm_vit_views(model: Model, x: torch.Tensor) -> Views:
    """timm ViTs, bare or inside open_clip's `TimmModel` (trunk + projection head, as BiomedCLIP)."""
    trunk: Model = getattr(model, "trunk", model)
    tokens = trunk.forward_features(x)
    cls = trunk.forward_head(tokens, pre_logits=True)
    views = {"cls": cls, "mean": tokens[:, trunk.num_prefix_tokens:].mean(1)}
    if trunk is not model:
        views["proj"] = model.head(cls)
    return views


def hf_vit_views(model: Model, x: torch.Tensor) -> Views:
    """transformers ViTs with a class token first and optional register tokens (DINOv2)."""
    hidden = model(pixel_values=x).last_hidden_state
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return {"cls": hidden[:, 0], "mean": hidden[:, prefix:].mean(1)}


def clip_views(model: Model, x: torch.Tensor) -> Views:
    """transformers CLIP vision towers: `cls` is the post-layernormed class token (CLIP's pooled output)."""
    out = model(pixel_values=x)
    tower: Model = getattr(model, "vision_model", model)  # transformers 4 nests the tower; 5 does not
    tokens = tower.post_layernorm(out.last_hidden_state[:, 1:])
    return {"cls": out.pooler_output, "mean": tokens.mean(1)}


def swin_views(model: Model, x: torch.Tensor) -> Views:
    """Swin has no class token: `cls` is its pooled output (mean of the final-normed tokens, what MedCLIP
    embeds), `mean` the mean of the last stage's tokens before that norm; `proj` MedCLIP's projection."""
    projection = getattr(model, "projection_head", None)
    out = model(pixel_values=x, output_hidden_states=True)
    views = {"cls": out.pooler_output, "mean": out.hidden_states[-1].mean(1)}
    if projection is not None:
        views["proj"] = projection(out.pooler_output)
    return views


def open_clip_views(model: Model, x: torch.Tensor) -> Views:
    """open_clip's own ViT towers, built with `output_tokens=True`: projected embedding and token mean."""
    pooled, tokens = model(x)
    return {"proj": pooled, "mean": tokens.mean(1)}


EXTRACTORS: dict[str, Callable[[nn.Module, torch.Tensor], Views]] = {
    "cnn": cnn_views,
    "timm_vit": timm_vit_views,
    "hf_vit": hf_vit_views,
    "clip": clip_views,
    "swin": swin_views,
    "open_clip": open_clip_views,
}
