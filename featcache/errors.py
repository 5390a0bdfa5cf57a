"""Typed errors. Each names the file or row at fault; the CLI prints ``str(err)`` as one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class FeatcacheError(Exception):
    """Base of every error the toolkit raises on purpose (bad input, missing weights, refused stores)."""

    exit_code = 2


class UsageError(FeatcacheError):
    """An unknown name or an option that does not apply: backbone, method, task, view."""


class ImageError(FeatcacheError):
    """An image file that cannot be turned into a tensor."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(FeatcacheError):
    """Weights missing, unreadable, unsafe (executable pickle) or not matching the architecture."""


class ManifestError(FeatcacheError):
    """A manifest or dataset spec that breaks the canonical layout; names file and rows."""


class SplitError(FeatcacheError):
    """Splits that cannot be made or do not match their manifest."""


class RecordError(FeatcacheError):
    """A run record file that is not one (malformed JSON, missing fields)."""


class StoreError(FeatcacheError):
    """A feature/pixel store that is missing, incomplete, or built under another spec."""


class WriteError(FeatcacheError):
    """A file or store that cannot be written: read-only folder, disk full, file size limit."""


class StudyError(FeatcacheError):
    """A study file or grid that is malformed or names something unknown; names the file and key."""
