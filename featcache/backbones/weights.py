"""Finding and safely loading pretrained weights, offline: the Hugging Face cache, a local directory, a file.

Nothing here touches the network: a missing file is reported at once, with what to download and where,
instead of a hub call that retries for a minute offline. Pickles are read with `weights_only=True`, so a
checkpoint that would execute code is refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import WeightsError

from .spec import BackboneSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
RANDOM_INIT = "random-init"
TINY_RANDOM = "tiny-random"


def weights_root() -> Path:
    """Where `featcache weights` tells people to put files that are not on the hub (one folder per backbone)."""
    return Path(os.environ.get("FEATCACHE_WEIGHTS", Path.home() / ".cache" / "featcache" / "weights"))


@dataclass(frozen=True)
class WeightsLocation:
    path: Path
    identity: str
    where: str  # "hf-cache" | "local" | "argument"


def _from_hf_cache(repo: str, files: tuple[str, ...]) -> WeightsLocation | None:
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            revision = Path(hit).parent.name
            return WeightsLocation(Path(hit), f"hf:{repo}@{revision}/{name}", "hf-cache")
    return None


def _in_dir(folder: Path, files: tuple[str, ...]) -> Path | None:
    for name in files:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return found[0] if len(found) == 1 else None


def file_checksum(path: Path) -> str:
    """sha256 of a weights file, memoised by (path, size, mtime) so reruns stay instant."""
    stat = path.stat()
    memo = weights_root().parent / "checksums.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=0))
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only home only costs a recomputation next time
    return f"sha256:{known[key]}"


def _from_argument(spec: BackboneSpec, weights: str | Path) -> WeightsLocation:
    path = Path(weights).expanduser()
    if path.is_dir():
        found = _in_dir(path, spec.weights.files)
        if found is None:
            wanted = ", ".join(spec.weights.files) or "one weights file"
            raise WeightsError(f"{path}: no weights file for {spec.name} in this folder (looked for {wanted})")
        path = found
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found for {spec.name}")
    return WeightsLocation(path, file_checksum(path), "argument")


def download_hint(spec: BackboneSpec) -> str:
    """One line telling a person how to provide the weights of `spec`."""
    src = spec.weights
    local = weights_root() / spec.name
    if src.repo:
        files = " ".join(src.files[:1])
        return (f"download on a connected machine with `hf download {src.repo} {files}` and copy the Hugging Face "
                f"cache (~/.cache/huggingface/hub), or put the file in {local}/, or pass --weights PATH")
    if src.url:
        return f"download {src.url}, unpack it into {local}/ (or pass --weights PATH)"
    return "pass --weights PATH"


def locate(spec: BackboneSpec, weights: str | Path | None = None) -> WeightsLocation:
    """Find the weights of `spec`: an explicit path, then `weights_root()/<name>/`, then the HF cache."""
    if weights is not None:
        return _from_argument(spec, weights)
    local = weights_root() / spec.name
    if local.is_dir() and (found := _in_dir(local, spec.weights.files)) is not None:
        return WeightsLocation(found, file_checksum(found), "local")
    if spec.weights.repo and (hit := _from_hf_cache(spec.weights.repo, spec.weights.files)) is not None:
        return hit
    names = ", ".join(f"{spec.weights.repo}/{f}" if spec.weights.repo else f for f in spec.weights.files)
    raise WeightsError(f"weights for {spec.name} not found ({names or 'no known source'}); {download_hint(spec)}; "
                       "or use --random-init")


def weights_identity(spec: BackboneSpec, weights: str | Path | None = None, random_init: bool = False) -> str:
    """What identifies the numbers a backbone will compute (revision or checksum), without loading a model."""
    if weights is not None and random_init:
        raise WeightsError(f"{spec.name}: give --weights or --random-init, not both")
    if weights is None and spec.is_tiny:
        return TINY_RANDOM
    if weights is None and random_init:
        return RANDOM_INIT
    return locate(spec, weights).identity


def load_state_dict(path: Path) -> dict:
    """Read a checkpoint without executing code: safetensors, or `torch.load(weights_only=True)`."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path}: refused, the checkpoint holds code or objects beyond tensors "
                           f"(weights-only load failed: {str(err).splitlines()[0]})") from None
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is one clear error
        raise WeightsError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict (found {type(state).__name__})")
    return state
