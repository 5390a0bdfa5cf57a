"""The backbone table: the single place that knows a model. Adding a backbone = adding one entry here.

Names are the benchmark's (Ruffini et al. 2025). Any other model works by id: `timm:NAME`, `hf:ORG/NAME`,
`open_clip:NAME[/PRETRAINED_TAG]`; a `-tiny` suffix gives the few-thousand-parameter random variant."""

from __future__ import annotations

from .constants import (
    CLIP_PEFT,
    DENSENET_PEFT,
    HF_VIT_PEFT,
    HUB_FILES,
    MEDCLIP_URL,
    OPEN_CLIP_FILES,
    RESNET_PEFT,
    SWIN_PEFT,
    TIMM_VIT_PEFT,
)
from .spec import (
    CLIP_MEAN,
    CLIP_STD,
    MEDCLIP_MEAN,
    MEDCLIP_STD,
    BackboneSpec,
    PeftTargets,
    TinyVariant,
    WeightsSource,
)

# zero_init_last=False: timm zero-inits each block's last norm, which leaves a random tiny net near-constant.
_TINY_RESNET = {"layers": (1, 1, 1, 1), "channels": (4, 8, 8, 16), "stem_width": 4, "zero_init_last": False}
_TINY_HF_VIT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}


def _timm_cnn(name: str, dim: int, peft: PeftTargets, head: str, tiny: dict, tiny_dim: int) -> BackboneSpec:
    return BackboneSpec(
        name=name, source="timm", arch=name, family="cnn", views={"cls": dim},
        weights=WeightsSource(repo=f"timm/{name}.tv_in1k", files=HUB_FILES), peft=peft, head=head,
        description=f"{name}, ImageNet-1k (torchvision weights via timm)",
        tiny=TinyVariant(config=tiny, views={"cls": tiny_dim}, input_size=32),
    )


def _dinov2(size: str, repo: str, dim: int, layers: int, heads: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"dinov2-{size}", source="hf", arch="dinov2", family="hf_vit", views={"cls": dim, "mean": dim},
        config={"hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads, "patch_size": 14,
                "image_size": 518},
        weights=WeightsSource(repo=repo, files=HUB_FILES), peft=HF_VIT_PEFT,
        description=f"DINOv2 ViT-{size.upper()}/14 (self-supervised, LVD-142M)",
        tiny=TinyVariant(config={**_TINY_HF_VIT, "mlp_ratio": 2, "patch_size": 14, "image_size": 28},
                         views={"cls": 16, "mean": 16}, input_size=28),
    )


def _clip(name: str, repo: str, dim: int, layers: int, heads: int, patch: int, about: str) -> BackboneSpec:
    return BackboneSpec(
        name=name, source="hf", arch="clip_vision_model", family="clip", views={"cls": dim, "mean": dim},
        config={"hidden_size": dim, "intermediate_size": 4 * dim, "num_hidden_layers": layers,
                "num_attention_heads": heads, "patch_size": patch, "image_size": 224},
        weights=WeightsSource(repo=repo, files=HUB_FILES), peft=CLIP_PEFT, mean=CLIP_MEAN, std=CLIP_STD,
        description=about,
        tiny=TinyVariant(config={**_TINY_HF_VIT, "intermediate_size": 32, "patch_size": 8, "image_size": 32},
                         views={"cls": 16, "mean": 16}, input_size=32),
    )


BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    _timm_cnn("resnet18", 512, RESNET_PEFT, "fc", _TINY_RESNET, 16),
    _timm_cnn("resnet50", 2048, RESNET_PEFT, "fc", _TINY_RESNET, 64),
    _timm_cnn("densenet121", 1024, DENSENET_PEFT, "classifier",
              {"growth_rate": 4, "block_config": (1, 1, 1, 1), "bn_size": 2}, 8),
    _dinov2("s", "facebook/dinov2-small", 384, 12, 6),
    _dinov2("b", "facebook/dinov2-base", 768, 12, 12),
    _dinov2("l", "facebook/dinov2-large", 1024, 24, 16),
    _clip("clip-l", "openai/clip-vit-large-patch14", 1024, 24, 16, 14, "OpenAI CLIP ViT-L/14 vision tower"),
    _clip("pubmedclip", "flaviagiammarino/pubmed-clip-vit-base-patch32", 768, 12, 12, 32,  # ships .bin
          "PubMedCLIP: CLIP ViT-B/32 vision tower fine-tuned on ROCO"),
    BackboneSpec(
        name="biomedclip", source="open_clip", arch="vit_base_patch16_224", family="timm_vit",
        views={"cls": 768, "mean": 768, "proj": 512}, config={"embed_dim": 512, "pool": "", "proj": "linear"},
        weights=WeightsSource(repo="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                              files=OPEN_CLIP_FILES),
        peft=TIMM_VIT_PEFT, mean=CLIP_MEAN, std=CLIP_STD,
        description="BiomedCLIP ViT-B/16 vision tower (open_clip, timm trunk; PMC-15M)",
        tiny=TinyVariant(arch="featcache_tiny_vit", config={"embed_dim": 8, "pool": "", "proj": "linear"},
                         views={"cls": 16, "mean": 16, "proj": 8}, input_size=32),
    ),
    BackboneSpec(
        name="medclip-vit", source="medclip", arch="swin", family="swin",
        views={"cls": 768, "mean": 768, "proj": 512}, config={"projection_dim": 512},
        weights=WeightsSource(url=MEDCLIP_URL.format("medclip-vit"), files=("pytorch_model.bin",)),
        peft=SWIN_PEFT, mean=MEDCLIP_MEAN, std=MEDCLIP_STD,
        description="MedCLIP vision encoder: Swin-T (swin-tiny-patch4-window7-224) + 512-d projection",
        tiny=TinyVariant(config={"projection_dim": 8, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2],
                                 "window_size": 7, "image_size": 56},
                         views={"cls": 16, "mean": 16, "proj": 8}, input_size=56),
    ),
    BackboneSpec(
        name="medclip-resnet", source="medclip", arch="resnet50", family="cnn",
        views={"cls": 2048, "proj": 512}, config={"projection_dim": 512},
        weights=WeightsSource(url=MEDCLIP_URL.format("medclip-resnet"), files=("pytorch_model.bin",)),
        peft=PeftTargets(conv=("conv1",)), mean=MEDCLIP_MEAN, std=MEDCLIP_STD,
        description="MedCLIP vision encoder: ResNet-50 + 512-d projection (its `fc`)",
        tiny=TinyVariant(config={"projection_dim": 8, **_TINY_RESNET}, views={"cls": 64, "proj": 8},
                         input_size=32),
    ),
)}


# Names people say for a backbone -> its registry name. MedCLIP's default vision encoder is the Swin one.
ALIASES: dict[str, str] = {"medclip": "medclip-vit"}


def list_backbones() -> list[str]:
    return list(BACKBONES)


def canonical_name(name: str) -> str:
    """The registry name behind an alias (``medclip`` -> ``medclip-vit``, ``medclip-tiny`` ->
    ``medclip-vit-tiny``); any other name is returned as given."""
    base, tiny = (name[: -len("-tiny")], "-tiny") if name.endswith("-tiny") else (name, "")
    return ALIASES.get(base, base) + tiny


def get_spec(name: str) -> BackboneSpec:
    """Resolve a backbone name: a table entry or an alias of one (`ALIASES`), `timm:`/`hf:`/`open_clip:` ids,
    `-tiny` variants of either."""
    from featcache.errors import UsageError

    name = canonical_name(name)
    base, tiny = (name[: -len("-tiny")], True) if name.endswith("-tiny") else (name, False)
    prefix, _, ident = base.partition(":")
    if base in BACKBONES:
        spec = BACKBONES[base]
    elif ident and prefix in ("timm", "hf", "open_clip"):
        from . import hf_source, open_clip_source, timm_source

        spec = {"timm": timm_source, "hf": hf_source, "open_clip": open_clip_source}[prefix].spec_for(ident)
    else:
        raise UsageError(f"unknown backbone {name!r}: one of {', '.join(BACKBONES)}, or timm:NAME, hf:ORG/NAME, "
                             "open_clip:NAME (add -tiny for the tiny random variant)")
    if tiny and spec.tiny is None:
        raise UsageError(f"{base} has no tiny variant")
    return spec.as_tiny() if tiny else spec
