"""MedCLIP builder: its Swin-T and ResNet-50 vision encoders, without the unmaintained `medclip` package.

MedCLIP's release archives hold one `pytorch_model.bin` for the whole CLIP model. Its vision keys are
`vision_model.model.*` (a transformers Swin, or a torchvision ResNet-50 whose `fc` is a bias-free 512-d
projection) and `vision_model.projection_head.weight` (Swin only). The modules below mirror that layout, so
the mapping is a prefix strip; transformers renames the old Swin attention keys on load."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from featcache.errors import WeightsError

from ._loading import load_into, strip_prefix
from .hf_source import build_config, load_pretrained, model_class
from .spec import BackboneSpec

VISION_PREFIX = "vision_model."


class MedCLIPSwin(nn.Module):
    """MedCLIP's `MedCLIPVisionModelViT`: a Swin `model` and a bias-free `projection_head`."""

    def __init__(self, model: Any, projection_dim: int):
        super().__init__()
        self.model = model
        self.projection_head = nn.Linear(model.config.hidden_size, projection_dim, bias=False)

    def forward(self, **kwargs):
        """The Swin outputs; the projection is applied by the feature views, which need both."""
        return self.model(**kwargs)


def _vision_state(state: dict, name: str) -> dict:
    vision = strip_prefix(state, VISION_PREFIX)
    if not vision:
        raise WeightsError(f"checkpoint does not fit {name}: no {VISION_PREFIX}* keys (is it a MedCLIP release?)")
    return vision


def _swin(spec: BackboneSpec, state: dict | None) -> nn.Module:
    options = {k: v for k, v in spec.config.items() if k != "projection_dim"}
    config = build_config("swin", options)
    cls = model_class(config)
    if state is None:
        return MedCLIPSwin(cls(config), spec.config["projection_dim"])
    vision = _vision_state(state, spec.name)
    swin = load_pretrained(cls, config, strip_prefix(vision, "model."), spec.name)
    model = MedCLIPSwin(swin, spec.config["projection_dim"])
    load_into(model.projection_head, strip_prefix(vision, "projection_head."), spec.name)
    return model


def _resnet(spec: BackboneSpec, state: dict | None) -> nn.Module:
    options = {k: v for k, v in spec.config.items() if k != "projection_dim"}
    model: Any = timm.create_model(spec.arch, pretrained=False, num_classes=0, **options)
    model.fc = nn.Linear(model.num_features, spec.config["projection_dim"], bias=False)
    if state is not None:
        load_into(model, strip_prefix(_vision_state(state, spec.name), "model."), spec.name)
    return model


def build(spec: BackboneSpec, state: dict | None) -> nn.Module:
    return _swin(spec, state) if spec.family == "swin" else _resnet(spec, state)
