"""transformers builder: DINOv2, CLIP vision towers, and any `hf:ORG/NAME` vision model in the local cache.

The architecture comes from the spec's config (so `--random-init` and tiny variants need no download); weights
go through `from_pretrained(None, config=..., state_dict=...)`, which applies transformers' own renaming of
older checkpoints (e.g. `attention.attention.query` -> `attention.q_proj` in transformers 5)."""

from __future__ import annotations

import json
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig

from featcache.errors import WeightsError

from ._loading import check_fit, check_shapes
from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, WeightsSource

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

FAMILY_BY_TYPE = {"dinov2": "hf_vit", "dinov2_with_registers": "hf_vit", "vit": "hf_vit", "clip_vision_model": "clip",
                  "swin": "swin"}


def model_class(config: Any) -> Any:
    return transformers.MODEL_MAPPING[type(config)]


def build_config(model_type: str, options: dict):
    return AutoConfig.for_model(model_type, **options)


def load_pretrained(cls: Any, config: Any, state: dict, name: str) -> nn.Module:
    """Weights through transformers' loader (key renames included), refusing a checkpoint that misses any."""
    # ignore_mismatched_sizes: transformers then lists wrong-shape tensors instead of raising a long report.
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                      dtype=torch.float32, ignore_mismatched_sizes=True)
    check_shapes(name, list(info.get("mismatched_keys", ())))
    check_fit(name, info["missing_keys"], info["unexpected_keys"])
    return model


def build(spec: BackboneSpec, state: dict | None) -> nn.Module:
    config = build_config(spec.arch, dict(spec.config))
    cls = model_class(config)
    return cls(config) if state is None else load_pretrained(cls, config, state, spec.name)


def spec_for(repo: str) -> BackboneSpec:
    """A spec for a transformers vision model whose config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, "config.json")
    if not isinstance(hit, str):
        raise WeightsError(f"hf:{repo}: config.json not in the local Hugging Face cache; download the repo with "
                           f"`hf download {repo}` on a connected machine and copy ~/.cache/huggingface/hub")
    raw = json.loads(open(hit).read())
    if raw.get("model_type") == "clip":
        raw = {**raw.get("vision_config", {}), "model_type": "clip_vision_model"}
    model_type = raw.pop("model_type", None)
    family = FAMILY_BY_TYPE.get(model_type)
    if family is None:
        raise WeightsError(f"hf:{repo}: model type {model_type!r} is not supported (one of {sorted(FAMILY_BY_TYPE)})")
    options = {k: v for k, v in raw.items() if not k.startswith(("_", "architectures", "transformers_version"))}
    config = build_config(model_type, options)
    dim = config.hidden_size
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = try_to_load_from_cache(repo, "preprocessor_config.json")
    if isinstance(pre, str):
        pcfg = json.loads(open(pre).read())
        mean, std = tuple(pcfg.get("image_mean", mean)), tuple(pcfg.get("image_std", std))
    from .constants import CLIP_PEFT, HF_VIT_PEFT, HUB_FILES, SWIN_PEFT

    return BackboneSpec(
        name=f"hf:{repo}", source="hf", arch=model_type, family=family, views={"cls": dim, "mean": dim},
        config=options, weights=WeightsSource(repo=repo, files=HUB_FILES),
        peft={"swin": SWIN_PEFT, "clip": CLIP_PEFT}.get(family, HF_VIT_PEFT), mean=mean, std=std,
        input_size=int(getattr(config, "image_size", 224)) if family != "hf_vit" else 224,
        description=f"transformers {model_type} from {repo}",
    )
