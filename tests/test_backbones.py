"""Backbone registry: every entry builds tiny offline, views have their declared shapes, PEFT target names match
real modules, weights load from files / folders / the HF cache, MedCLIP's key layout maps, pickles are refused."""

from __future__ import annotations

import socket
from unittest.mock import patch

import pytest
import torch
from safetensors.torch import save_file

from featcache.backbones import (
    BACKBONES,
    build_backbone,
    count_parameters,
    get_spec,
    locate,
    match_targets,
    weights_identity,
)
from featcache.errors import FeatcacheError, WeightsError

NAMES = list(BACKBONES)
BENCHMARK_ELEVEN = ["resnet18", "resnet50", "densenet121", "dinov2-s", "dinov2-b", "dinov2-l", "clip-l", "biomedclip",
                    "pubmedclip", "medclip-vit", "medclip-resnet"]


def _images(spec, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.channels, spec.input_size, spec.input_size, generator=gen)


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built")


def _no_network(*args, **kwargs):
    raise AssertionError("the network was tried")


def _features(backbone, x):
    with torch.inference_mode():
        return backbone(x)


def test_registry_holds_the_benchmark_eleven():
    assert sorted(NAMES) == sorted(BENCHMARK_ELEVEN)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_variant_builds_with_declared_views(name):
    backbone = build_backbone(f"{name}-tiny")
    trainable, total = count_parameters(backbone)
    assert total < 50_000, f"tiny {name} has {total} parameters"
    out = _features(backbone, _images(backbone.spec))
    assert set(out) == set(get_spec(name).views), "tiny keeps the real views"
    for view, tensor in out.items():
        assert tensor.shape == (2, backbone.view_dims[view])
        assert torch.isfinite(tensor).all()
    assert backbone.weights_id == "tiny-random" and backbone.random_weights


@pytest.mark.parametrize("name", NAMES)
def test_peft_target_names_match_modules(name):
    spec = get_spec(name)
    model = build_backbone(f"{name}-tiny").model
    matches = match_targets(model, spec.peft.all_names())
    assert spec.peft.all_names(), f"{name} declares no PEFT targets"
    assert all(matches.values()), {k: v for k, v in matches.items() if not v}
    if spec.head is not None:
        assert dict(model.named_modules()).get(spec.head) is not None


def test_tiny_builds_are_seeded():
    a, b = build_backbone("dinov2-s-tiny"), build_backbone("dinov2-s-tiny")
    x = _images(a.spec)
    assert torch.equal(_features(a, x)["cls"], _features(b, x)["cls"])


@pytest.mark.parametrize("name", ["resnet18", "dinov2-s"])
def test_real_size_random_init(name):
    spec = get_spec(name)
    backbone = build_backbone(name, random_init=True)
    assert backbone.weights_id == "random-init"
    out = _features(backbone, _images(spec, n=1))
    assert {k: v.shape[-1] for k, v in out.items()} == dict(spec.views)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("resnet18", "dinov2-s")])
def test_real_size_random_init_slow(name):
    spec = get_spec(name)
    out = _features(build_backbone(name, random_init=True), _images(spec, n=1))
    assert {k: v.shape[-1] for k, v in out.items()} == dict(spec.views)
    matches = match_targets(build_backbone(name, random_init=True).model, spec.peft.all_names())
    assert all(matches.values())


def test_missing_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.nn.Module, "__init__", _no_model)
    with pytest.raises(WeightsError) as err:
        build_backbone("dinov2-s")
    message = str(err.value)
    assert "facebook/dinov2-small/model.safetensors" in message and "--weights" in message
    assert "\n" not in message
    with pytest.raises(WeightsError, match="medclip-vit-pretrained.zip"):
        locate(get_spec("medclip-vit"))


def test_weights_from_file_and_folder(tmp_path):
    source = build_backbone("resnet18-tiny", seed=7)
    file = tmp_path / "w" / "model.safetensors"
    file.parent.mkdir()
    save_file(source.model.state_dict(), str(file))
    x = _images(source.spec)
    for where in (file, file.parent):
        loaded = build_backbone("resnet18-tiny", weights=where)
        assert loaded.weights_id.startswith("sha256:") and not loaded.random_weights
        assert torch.allclose(_features(loaded, x)["cls"], _features(source, x)["cls"])
    with pytest.raises(WeightsError, match="not both"):
        weights_identity(get_spec("resnet18"), weights=file, random_init=True)


def test_weights_from_hf_cache_carry_the_revision(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--timm--resnet18.tv_in1k"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    weights = build_backbone("resnet18", random_init=True, seed=3).model.state_dict()
    save_file(weights, str(snapshot / "model.safetensors"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "none"))
    assert weights_identity(get_spec("resnet18")) == "hf:timm/resnet18.tv_in1k@abc123/model.safetensors"
    assert build_backbone("resnet18").weights_id.endswith("@abc123/model.safetensors")


def test_old_transformers_keys_are_renamed_on_load(tmp_path):
    """DINOv2 checkpoints on the hub predate transformers 5's q_proj names; its own renaming must apply."""
    source = build_backbone("dinov2-s-tiny", seed=5)
    renames = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
               "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    state = {}
    for key, value in source.model.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = value
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = build_backbone("dinov2-s-tiny", weights=tmp_path / "model.safetensors")
    x = _images(source.spec)
    assert torch.allclose(_features(loaded, x)["cls"], _features(source, x)["cls"], atol=1e-6)


def _medclip_swin_layout(state: dict) -> dict:
    """Write a Swin state dict the way MedCLIP's release (transformers 4.x Swin) names it."""
    renames = [("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
               ("attention.v_proj", "attention.self.value"), ("attention.o_proj", "attention.output.dense"),
               ("attention.relative_position_bias.relative_position_bias_table",
                "attention.self.relative_position_bias_table"),
               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
    out = {}
    for key, value in state.items():
        for new, old in renames:
            key = key.replace(new, old)
        out[key] = value
    return out


def _medclip_release(model_state: dict, projection: dict) -> dict:
    state = {f"vision_model.model.{k}": v for k, v in model_state.items()}
    state.update({f"vision_model.projection_head.{k}": v for k, v in projection.items()})
    state["text_model.model.embeddings.word_embeddings.weight"] = torch.zeros(4, 2)  # the text tower is ignored
    state["logit_scale"] = torch.tensor(4.6)
    return state


def test_medclip_release_checkpoints_load(tmp_path):
    swin = build_backbone("medclip-vit-tiny", seed=11)
    swin_state = {k: v for k, v in swin.model.model.state_dict().items() if "relative_position_index" not in k}
    torch.save(_medclip_release(_medclip_swin_layout(swin_state), swin.model.projection_head.state_dict()),
               tmp_path / "pytorch_model.bin")
    loaded = build_backbone("medclip-vit-tiny", weights=tmp_path)
    x = _images(swin.spec)
    for view in ("cls", "proj"):
        assert torch.allclose(_features(loaded, x)[view], _features(swin, x)[view], atol=1e-6)

    resnet = build_backbone("medclip-resnet-tiny", seed=12)
    release = tmp_path / "resnet"
    release.mkdir()
    torch.save(_medclip_release(resnet.model.state_dict(), {}), release / "pytorch_model.bin")
    loaded = build_backbone("medclip-resnet-tiny", weights=release)
    x = _images(resnet.spec)
    assert torch.allclose(_features(loaded, x)["proj"], _features(resnet, x)["proj"], atol=1e-6)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    save_file({"vision_model.model.nothing": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="does not fit"):
        build_backbone("medclip-resnet-tiny", weights=tmp_path / "model.safetensors")


@pytest.mark.parametrize("name", ["resnet18-tiny", "dinov2-s-tiny", "biomedclip-tiny"])
def test_wrong_shape_weights_are_one_line_naming_file_and_tensor(tmp_path, name):
    """timm, transformers and open_clip each raise a long per-tensor report; we name the first tensor."""
    state = build_backbone(name, seed=1).model.state_dict()
    key = next(k for k, v in state.items() if v.ndim >= 2)
    state[key] = torch.zeros(*(s + 1 for s in state[key].shape))
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError) as err:
        build_backbone(name, weights=path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "has shape (" in message and key.split(".")[-1] in message


class _Payload:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_executable_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        build_backbone("resnet18-tiny", weights=path)
    assert "ran code" not in capsys.readouterr().out


def test_names_by_library_id():
    assert get_spec("timm:resnet34").views == {"cls": 512}
    vit = get_spec("timm:vit_small_patch16_224-tiny")
    out = _features(build_backbone(vit), _images(vit))
    assert set(out) == {"cls", "mean"}
    with pytest.raises(FeatcacheError, match="unknown backbone"):
        get_spec("resnet19")
    with patch.object(socket.socket, "connect", _no_network):
        with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
            get_spec("hf:nobody/nothing")


HEAVY = ("torch", "torchvision", "timm", "transformers", "open_clip", "peft", "sklearn")


def test_cli_fails_fast_on_missing_weights(synth_cohort, tmp_path):
    """`featcache extract` on a backbone without weights: one line naming the files, non-zero, and neither torch
    nor any model library imported (so it cannot have built a model; the time it takes is in benchmarks/)."""
    import os
    import subprocess
    import sys

    manifest = synth_cohort(patients=4, size=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "FEATCACHE_WEIGHTS": str(tmp_path / "weights")}
    child = ("import atexit, sys\n"
             f"atexit.register(lambda: print('imported:', *[m for m in {HEAVY!r} if m in sys.modules]))\n"
             f"sys.argv = ['featcache', 'extract', '--model', 'dinov2-s', '--manifest', {str(manifest)!r}]\n"
             "from cli.featcache_app import main\nmain()")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "facebook/dinov2-small/model.safetensors" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stdout.strip() == "imported:", done.stdout


def test_hf_id_from_the_local_cache(tmp_path, monkeypatch):
    """`hf:ORG/NAME` reads config.json (and preprocessor_config.json) from the cache, then loads its weights."""
    import json

    from transformers import Dinov2Config, Dinov2Model

    repo = tmp_path / "hub" / "models--someone--tiny-dinov2"
    snapshot = repo / "snapshots" / "rev1"
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                          image_size=28)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "none"))
    spec = get_spec("hf:someone/tiny-dinov2")
    assert spec.family == "hf_vit" and spec.views == {"cls": 16, "mean": 16} and spec.mean == (0.5, 0.5, 0.5)
    backbone = build_backbone(spec)
    assert backbone.weights_id == "hf:someone/tiny-dinov2@rev1/model.safetensors"
    reference = Dinov2Model.from_pretrained(snapshot).eval()
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(_features(backbone, x)["cls"], reference(pixel_values=x).last_hidden_state[:, 0], atol=1e-6)


@pytest.mark.slow
def test_open_clip_id_random_init():
    spec = get_spec("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert spec.weights.repo and spec.views == {"proj": 512, "mean": 768}
    out = _features(build_backbone(spec, random_init=True), _images(spec, n=1))
    assert {k: v.shape[-1] for k, v in out.items()} == dict(spec.views)
