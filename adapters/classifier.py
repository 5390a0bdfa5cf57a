"""A backbone with a task head: the one model every stage-2 method trains."""

from __future__ import annotations

import torch
from torch import nn

from featcache.backbones import Backbone


class Classifier(nn.Module):
    """`backbone` + a linear head giving `n_out` logits. Backbones that declare a head slot (`spec.head`, a
    CNN's `fc`/`classifier`) get the head there, as in the benchmark, so IA3 can scale its input; others get a
    Linear on their head view."""

    def __init__(self, backbone: Backbone, n_out: int = 1):
        super().__init__()
        spec = backbone.spec
        self.backbone = backbone
        self.head_view = spec.head_view
        self.base_fingerprint: str | None = None  # set by `adapters.model.build_classifier` for random bases
        head = nn.Linear(backbone.view_dims[spec.head_view], n_out)
        if spec.head:
            parent, _, attr = spec.head.rpartition(".")
            setattr(backbone.model.get_submodule(parent) if parent else backbone.model, attr, head)
            self.head = None
        else:
            self.head = head

    def head_parameters(self) -> list[nn.Parameter]:
        """The task head's own weight and bias, wherever it sits (its own attribute, or the backbone's head
        slot, also once peft has wrapped the backbone and prefixed its module names). Not an adapter's tensors
        in the slot: IA3 on a CNN scales the head's input (`fc`), and that vector is an adapter parameter like
        every other IA3 vector, trained at the adapter LR (1e-4), not at the head LR."""
        if self.head is not None:
            return list(self.head.parameters())
        inner = self.backbone.model
        slot = (inner.get_base_model() if hasattr(inner, "get_base_model") else inner).get_submodule(
            self.backbone.spec.head)
        return list(getattr(slot, "base_layer", slot).parameters())  # peft keeps the wrapped Linear there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.backbone.model(x)
        return self.head(self.backbone(x)[self.head_view])
