"""Putting a state dict into a module, loudly: a checkpoint that does not fit is an error, not a warning."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from featcache.errors import WeightsError


def strip_prefix(state: dict, prefix: str) -> dict:
    """Keys under `prefix`, with it removed (e.g. `visual.` of an open_clip checkpoint)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_fit(name: str, missing: Iterable[str], unexpected: Iterable[str] = (), allow_unexpected: bool = True):
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or (unexpected and not allow_unexpected):
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeightsError(f"checkpoint does not fit {name}: {len(missing)} missing, {len(unexpected)} "
                           f"unexpected keys ({detail})")


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def check_shapes(name: str, mismatched: list[tuple[str, Iterable[int], Iterable[int]]]) -> None:
    """Refuse tensors whose shape differs from the architecture's, naming the first (key, file, model)
    instead of torch's one line per tensor (58 lines for a ResNet-50 file given to a ResNet-18)."""
    if mismatched:
        key, found, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise WeightsError(f"checkpoint does not fit {name}: tensor {key} has shape {_shape(found)}, the "
                           f"architecture expects {_shape(expected)}{more}; are these weights of another model?")


def load_into(module: nn.Module, state: dict, name: str, ignore: tuple[str, ...] = ()) -> None:
    """`load_state_dict` that refuses a checkpoint missing any weight (keys starting with `ignore` excepted)
    or holding a tensor of another shape."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    own = module.state_dict()
    check_shapes(name, [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)])
    result = module.load_state_dict(state, strict=False)
    check_fit(name, [k for k in result.missing_keys if not k.startswith(ignore or ("\0",))],
              result.unexpected_keys, allow_unexpected=False)
