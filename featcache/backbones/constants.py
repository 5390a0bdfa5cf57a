"""Constants the registry and the per-source builders share: hub file names and the PEFT target sets of each
architecture family. They sit below the registry so a source module can use them without importing the table."""

from __future__ import annotations

from .spec import PeftTargets

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
MEDCLIP_URL = "https://storage.googleapis.com/pytrial/{}-pretrained.zip"

# CNN methods adapt the 3x3/1x1 `conv1` of every block; IA3 scales the input of the classifier slot.
RESNET_PEFT = PeftTargets(conv=("conv1",), feedforward=("fc",))
DENSENET_PEFT = PeftTargets(conv=("conv1",), feedforward=("classifier",))
# transformers 5 names (DINOv2, CLIP, Swin): q_proj/k_proj/v_proj/o_proj attention, mlp.fc1/fc2.
HF_VIT_PEFT = PeftTargets(attention=("q_proj", "k_proj", "v_proj"), mlp=("fc1", "fc2"),
                           feedforward=("fc1", "fc2"), same_shape=("q_proj", "k_proj", "v_proj"))
# CLIP towers: LoRA/VeRA on q, k, v only; IA3 also scales the MLP (the benchmark's configs).
CLIP_PEFT = PeftTargets(attention=("q_proj", "k_proj", "v_proj"), feedforward=("fc1", "fc2"),
                        same_shape=("q_proj", "k_proj", "v_proj"))
SWIN_PEFT = PeftTargets(attention=("q_proj", "k_proj", "v_proj", "o_proj"), mlp=("fc1", "fc2"),
                         feedforward=("fc1", "fc2"), same_shape=("q_proj", "k_proj", "v_proj"))
TIMM_VIT_PEFT = PeftTargets(attention=("qkv",), mlp=("fc1", "fc2"), feedforward=("fc1", "fc2"),
                             same_shape=("qkv",))
