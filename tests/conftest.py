"""Shared test fixtures: synthetic cohorts built once per session, and the small gray-PNG cohort of the store
tests.

``synth_cohort(**arguments)`` returns the manifest of a `featcache.synth.make_cohort` cohort (task SYN), with
persisted splits when ``draws`` is given. Tests asking for the same arguments share one cohort, which they must
treat as read-only: a test (or module fixture) that writes next to the manifest (splits, features, records, an
edited manifest) passes ``to=<folder>`` and gets its own copy there. At the end of the session every shared
cohort is checked unchanged, so a test that writes into one fails loudly instead of leaking into the next.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featcache.splits import build_splits, save_splits
from featcache.synth import TASK, make_cohort

MODEL = "dinov2-s-tiny"  # builds instantly offline; two views (cls, mean), 16-dim features

SynthCohort = Callable[..., Path]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynthCohort]:
    """``synth_cohort(patients=.., size=.., seed=.., centers=.., images_per_patient=.., positive_rate=..,
    draws=None, shots=None, to=None)``: the manifest path of a shared synthetic cohort (with SYN splits of
    ``draws`` draws per level, at ``shots`` or the default levels, when ``draws`` is given); with ``to``, a
    private copy in that folder (which must not exist yet)."""
    built: dict[tuple[Any, ...], Path] = {}
    pristine: dict[Path, dict[str, tuple[int, int]]] = {}

    def get(*, to: Path | None = None, draws: int | None = None, shots: tuple[int, ...] | None = None,
            **arguments: Any) -> Path:
        key = (tuple(sorted(arguments.items())), draws, shots)
        if key not in built:
            manifest = make_cohort(tmp_path_factory.mktemp("synth"), **arguments)
            if draws is not None:
                levels = {} if shots is None else {"shots": shots}
                save_splits(build_splits(manifest, TASK, draws=draws, **levels), manifest)
            built[key] = manifest
            pristine[manifest] = _snapshot(manifest.parent)
        manifest = built[key]
        if to is None:
            return manifest
        shutil.copytree(manifest.parent, to, dirs_exist_ok=True)
        return Path(to) / manifest.name

    yield get
    changed = {str(m.parent): sorted(set(now.items()) ^ set(before.items()))[:3]
               for m, before in pristine.items() if (now := _snapshot(m.parent)) != before}
    assert not changed, f"a test wrote into shared synthetic cohorts {changed}; pass to=tmp_path for a copy"


def write_cohort(folder: Path, n: int, *, bbox: dict[int, tuple[int, int, int, int]] | None = None,
                 broken: tuple[int, ...] = ()) -> Path:
    """``n`` small random gray PNGs (image i is the same whatever ``n``; broken ones are not images) and their
    canonical manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    bbox = bbox or {}
    header = "image_id,path,patient_id,center,bbox_x0,bbox_y0,bbox_x1,bbox_y1"
    lines = [header]
    for i in range(n):
        name = f"img{i:03d}.png"
        if i in broken:
            content = b"not an image"
        else:
            buffer = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 256, (40, 48), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, format="PNG")
            content = buffer.getvalue()
        if not (folder / name).is_file() or (folder / name).read_bytes() != content:
            (folder / name).write_bytes(content)  # an unchanged image keeps its file (and modification time)
        box = ",".join(map(str, bbox[i])) if i in bbox else ",,,"
        lines.append(f"id{i:03d},{name},p{i // 2},C{i % 2},{box}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
