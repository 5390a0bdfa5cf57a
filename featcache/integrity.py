"""Row checksums: a row flagged `written` is trusted only while its stored bytes still hash to what was recorded.

Each group holds a ``checksum`` array (N, K) uint64 whose column k is the digest of row i of array
``columns[k]`` (the identity arrays, then the data arrays). A chunk write computes the digests from the values
it writes and stores them in the same pass, just before the ``written`` flags. A chunk that was deleted (zarr
then returns fill values), truncated or replaced by garbage (it fails to decode), or whose ``image_id`` was
lost, no longer matches: ``featcache extract``/``pixels`` recompute such rows and readers refuse them.

The digest is a keyed linear hash of the row's 64-bit words (each word times its own odd constant, summed
mod 2^64) finished by the splitmix64 mixer: a change of any single word always changes it, and other damage
escapes with probability ~2^-64. It guards against damage, not against an adversary; it is vectorised numpy,
so checking a chunk costs about as much as copying it once more after decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.errors import StoreError

if TYPE_CHECKING:
    from featcache.store import RowGroup

IDENTITY_COLUMNS = ("image_id", "path", "bbox", "stamp", "skip_reason")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def digest_columns(data_names: Sequence[str]) -> tuple[str, ...]:
    """The arrays a group's ``checksum`` covers, in column order: identity first, then data by name."""
    return (*IDENTITY_COLUMNS, *sorted(data_names))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=32)
def _weights(n: int) -> np.ndarray:
    """One odd constant per word position, the same for every n (a prefix of a fixed sequence)."""
    return _mix(np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN) | np.uint64(1)


def _words(values: np.ndarray) -> np.ndarray:
    """Rows as (R, W) uint64 words, zero-padded; a string (one per row in every string array here) as its
    UTF-32 code points, so the padding numpy adds never counts."""
    rows = values.shape[0]
    if values.dtype.kind in "OTU":
        text = np.ascontiguousarray(values.tolist() if values.dtype.kind != "U" else values, dtype=str)
        return text.reshape(rows, -1).view(np.uint32).reshape(rows, -1).astype(np.uint64)
    raw = np.ascontiguousarray(values).reshape(rows, -1).view(np.uint8)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((rows, pad), dtype=np.uint8)], axis=1)
    return raw.view(np.uint64)


def row_digests(values: np.ndarray) -> np.ndarray:
    """One uint64 digest per row (first axis) of ``values``; never 0, the fill of an unwritten checksum."""
    values = np.asarray(values)
    if values.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    words = _words(values)
    total = (words * _weights(words.shape[1])).sum(axis=1, dtype=np.uint64) if words.shape[1] else \
        np.zeros(values.shape[0], dtype=np.uint64)
    digest = _mix(total + _GOLDEN)
    digest[digest == 0] = 1
    return digest


# --------------------------------------------------------------------------------------------- verification

WINDOW_BYTES = 64 << 20  # rows verified per read: bounded memory whatever the store's size


@dataclass
class Verdict:
    """What a full check of one group found: rows flagged written that cannot be trusted, chunks that do not
    decode (by array), arrays whose metadata is damaged."""

    where: str
    rows: int
    written: int
    bad: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    unreadable: dict[str, list[int]] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    unflagged: int = 0  # rows whose `written` flags cannot be read (their array or chunk is damaged)

    @property
    def ok(self) -> bool:
        return not (len(self.bad) or self.unreadable or self.damaged)

    def describe(self) -> str:
        """One line: what is wrong and what the next extract recomputes."""
        if self.ok:
            return f"ok: {self.written} written rows verified"
        parts = [f"{name} {why}" for name, why in self.damaged.items()]
        parts += [f"{name}: {len(chunks)} chunk(s) do not decode" for name, chunks in self.unreadable.items()]
        if len(self.bad):
            parts.append(f"{len(self.bad)} written rows fail their checksums (rows {row_ranges(self.bad)})")
        if self.unflagged:
            parts.append(f"written flags of {self.unflagged} rows lost")
        return f"{'; '.join(parts)}; next extract (or pixels) recomputes {len(self.bad) + self.unflagged} rows"


def row_ranges(rows: np.ndarray, limit: int = 4) -> str:
    """Sorted rows as compact ranges: ``0-63, 128-130``."""
    rows = np.unique(rows)
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = [f"{p[0]}-{p[-1]}" if len(p) > 1 else f"{p[0]}" for p in np.split(rows, cuts)]
    return ", ".join(parts[:limit]) + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def verify(group: RowGroup) -> Verdict:
    """Check every chunk of a group: decode it and compare each written row with its recorded digests."""
    verdict = Verdict(group.where, group.n_rows, 0, damaged=dict(group.damaged))
    row_bytes = max(int(np.prod(a.tail, dtype=np.int64)) * 8 for a in group.layout.values())
    step = max(1, WINDOW_BYTES // max(1, row_bytes * group.chunk_rows))
    bad = []
    for first in range(0, group.n_chunks, step):
        chunks = range(first, min(first + step, group.n_chunks))
        written = _read_span(group, "written", chunks, verdict.unreadable)
        if written is None:  # no flags, nothing trusted: every row is computed again
            verdict.unflagged = group.n_rows
            break
        verdict.written += int(written.sum())
        verdict.unflagged += sum(len(range(group.n_rows)[group.chunk_slice(c)])
                                 for c in verdict.unreadable.get("written", []) if c in chunks)
        sums = _read_span(group, "checksum", chunks, verdict.unreadable)
        suspect = np.ones(len(written), dtype=bool) if sums is None else np.zeros(len(written), dtype=bool)
        for k, name in enumerate(group.columns):
            values = None if sums is None else _read_span(group, name, chunks, verdict.unreadable)
            suspect |= True if values is None or sums is None else row_digests(values) != sums[:, k]
        bad.append(np.flatnonzero(written & suspect) + first * group.chunk_rows)
    verdict.bad = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
    return verdict


def _read_span(group: RowGroup, name: str, chunks: range, unreadable: dict[str, list[int]]
               ) -> np.ndarray | None:
    """The rows of ``chunks`` in one read, else chunk by chunk with the fill value where one fails to
    decode (noted in ``unreadable``); None for a damaged array."""
    if name not in group.arrays:
        return None
    span = slice(group.chunk_slice(chunks[0]).start, group.chunk_slice(chunks[-1]).stop)
    try:
        return group.read(name, span)
    except StoreError:
        pass
    blocks = []
    for chunk in chunks:
        block = group.read_block(name, chunk)
        if block is None:
            unreadable.setdefault(name, []).append(chunk)
            rows = group.chunk_slice(chunk)
            block = np.full((rows.stop - rows.start, *group.layout[name].tail), group.layout[name].fill_value,
                            dtype=group.arrays[name].dtype if group.arrays[name].dtype.kind != "T" else str)
        blocks.append(block)
    return np.concatenate(blocks)


def repair(group: RowGroup, verdict: Verdict,
           hold: Callable[[Sequence[int]], AbstractContextManager[Any]]) -> None:
    """Make a verdict's findings recomputable: delete chunk files that do not decode (reads then see fill
    values, and writes no longer trip on them) and clear the `written` flags of rows that fail. ``hold``
    claims the chunks concerned, so no other process is writing them meanwhile. Caller holds the group lock."""
    for name, chunks in verdict.unreadable.items():
        with hold(chunks):
            for chunk in chunks:
                group.chunk_file(name, chunk).unlink(missing_ok=True)
    for chunk in np.unique(verdict.bad // group.chunk_rows).tolist():
        with hold([chunk]):
            flags = group.read_block("written", chunk)
            if flags is None:
                continue
            start = group.chunk_slice(chunk).start
            flags[verdict.bad[verdict.bad // group.chunk_rows == chunk] - start] = False
            group.arrays["written"][group.chunk_slice(chunk)] = flags
