"""A prognostic task: which manifest column holds it, its two classes and how raw metadata values map to them.

The lowest layer of the data side: :mod:`featcache.manifest` reads labels through a :class:`TaskSpec` it is
given, :mod:`featcache.datasets` makes them from dataset specs (or a manifest's own column), and nothing here
imports either, so the two never import each other.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import SplitError

CV_SCHEMES = ("kfold", "loco")
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null"})


def canon(raw: object) -> str:
    """Case-folded text of a metadata value; integral numbers lose their '.0' (Excel turns 1 into 1.0)."""
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text.casefold()
    return str(int(number)) if number.is_integer() else text.casefold()


def is_missing(raw: object) -> bool:
    """Whether a metadata cell means "no value" (empty, NA, NaN, None, null)."""
    return raw is None or str(raw).strip().casefold() in MISSING_VALUES


@dataclass(frozen=True)
class TaskSpec:
    """One prognostic task: the manifest column is named ``key``; ``column`` is the official metadata's."""

    dataset: str  # "" for an ad-hoc task on a label column of one manifest (see datasets.task_for)
    key: str
    column: str
    classes: dict[str, int]  # class name (as written in the manifest) -> 0/1
    positive: str
    cv: str = "kfold"  # "kfold" | "loco"
    k: int = 5  # folds; for loco the number of centers
    has_centers: bool = False
    outcome: str = ""
    # raw metadata value -> class name, where they differ (e.g. Death 0/1 -> ALIVE/DEATH); "" = no label
    values: dict[str, str] = field(default_factory=dict)

    @property
    def negative(self) -> str:
        return next(name for name, code in self.classes.items() if code == 0)

    @functools.cached_property
    def _lookup(self) -> dict[str, str]:
        table = {canon(name): name for name in self.classes}
        table.update({canon(raw): name for raw, name in self.values.items()})
        return table

    def classify(self, raw: object) -> str | None:
        """Class name of a raw metadata value; '' when missing (or mapped to no label), None when unknown."""
        if is_missing(raw):
            return ""
        return self._lookup.get(canon(raw))

    def mapping(self) -> str:
        """The accepted raw values, for messages: ``MILD, SEVERE`` or ``0 -> ALIVE, 1 -> DEATH, ...``."""
        shown = [*self.classes, *(f"{raw} -> {name or '(no label)'}" for raw, name in self.values.items())]
        return ", ".join(shown)


def splits_path(manifest_path: str | Path, task: str) -> Path:
    """``<manifest dir>/<manifest stem>.splits/<task>.json``: where a task's split file sits (`featcache.splits`)."""
    if not task or any(sep in task for sep in ("/", "\\")) or task.startswith("."):
        raise SplitError(f"task key {task!r} cannot name a split file")
    manifest_path = Path(manifest_path)
    return manifest_path.parent / f"{manifest_path.stem}.splits" / f"{task}.json"


def recorded_classes(manifest_path: str | Path, task: str) -> tuple[str, str] | None:
    """The (negative, positive) classes ``task``'s split file beside the manifest records, if there is a readable
    one: a task declared once (``featcache splits --task X --positive V``) is known from then on. Only the
    classes are read here; loading the splits checks the whole file (and refuses a damaged one)."""
    try:
        data = json.loads(splits_path(manifest_path, task).read_text(encoding="utf-8"))
    except (SplitError, OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    classes = data.get("classes") if isinstance(data, dict) else None
    if isinstance(classes, list) and len(classes) == 2 and all(isinstance(c, str) for c in classes):
        return classes[0], classes[1]
    return None
