"""Content-keyed zarr v3 stores: a group per backbone and full preprocessing spec, written a chunk at a time.

Layout (documented for plain-zarr readers in the README)::

    <store>/<backbone>/<key>/     key = first 16 hex digits of sha256(canonical JSON of the spec)
        <view>        (N, D)  float16|float32, chunks (R, D)    one array per feature view
        image_id      (N,)    string                            row order of every array
        path, bbox    (N,), (N, 4)                              the input of each row (bbox -1 = no crop)
        stamp         (N, 2)                                    file size and mtime when embedded
        skip_reason   (N,)    string                            why an image was skipped ("" = embedded)
        checksum      (N, K)  uint64                            digest of the row in each array (integrity.py)
        written       (N,)    bool                              set only after the row's chunk is on disk
        attrs: kind, spec, spec_sha256, layout, chunk_rows, checksum_columns

Every array is chunked along rows only, with the same R rows per chunk, and written one whole chunk at a time:
ranks that own disjoint chunks never touch the same file, and a chunk's `written` flags go to disk after its
data and checksums (zarr's local store writes each chunk file atomically, temp file then rename), so a killed
run loses at most its unfinished chunks. A group whose attributes disagree with its key is refused, never
reused. A `written` row is trusted only while its checksums match (see `featcache.integrity`): writers
recompute the rows that fail, readers refuse them in one line. Independent processes serialise their row
bookkeeping and claim chunks through `featcache.locks`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr

import featcache
from featcache.errors import ManifestError, StoreError
from featcache.fileio import atomic_write, write_errors
from featcache.integrity import IDENTITY_COLUMNS, digest_columns, row_digests, row_ranges
from featcache.manifest import Manifest, load_manifest


def _stop_zarr_io() -> None:
    """Stop zarr's IO thread at exit, waiting for it. zarr 3's own exit hook waits only 0.2 s for the thread,
    then closes its event loop anyway: on a loaded machine the loop is still running and the exit prints
    "RuntimeError: Cannot close a running event loop" after a run that succeeded. Registered after zarr's hook,
    this runs first (atexit is last-in, first-out) and leaves zarr nothing to close."""
    from zarr.core import sync

    loop, thread = sync.loop[0], sync.iothread[0]
    if loop is None:
        return
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout=60)
    if not loop.is_running():
        loop.close()
        sync.loop[0] = sync.iothread[0] = None


atexit.register(_stop_zarr_io)

LAYOUT_VERSION = 2  # 2: checksum array
KEY_LENGTH = 16
DEFAULT_CHUNK_ROWS = 256
FEATURE_DTYPES = ("float16", "float32")
ON_ERROR = ("fail", "skip")  # what extraction does with an unreadable image
CROP_RULE = "manifest bbox (x0, y0, x1, y1), half-open, decoded pixels; crop, then intensity, then resize"
NO_BBOX = (-1, -1, -1, -1)
NO_STAMP = (-1, -1)


# --------------------------------------------------------------------------------------------- keys


def default_store(manifest_path: str | Path, kind: str = "features") -> Path:
    """Where a manifest's stores live unless told otherwise: `features.zarr` / `pixels.zarr` beside it."""
    return Path(manifest_path).parent / f"{kind}.zarr"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: equal specs give equal bytes, hence equal keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_sha256(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def safe_name(name: str) -> str:
    """A backbone name as a portable folder name (`hf:org/model` -> `hf_org_model`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"


def group_name(prefix: str, spec: Mapping[str, Any]) -> str:
    return f"{safe_name(prefix)}/{spec_sha256(spec)[:KEY_LENGTH]}"


def feature_spec(model: Any, *, weights: str | Path | None = None, random_init: bool = False,
                 views: Sequence[str] | None = None, dtype: str = "float16", precision: str = "float32"
                 ) -> dict[str, Any]:
    """The full spec that keys a feature group; cheap (weights are identified, never loaded).

    ``model`` is a backbone name or ``BackboneSpec``; ``views`` defaults to all of its views; ``precision`` is
    how the forward pass ran (``float32``, or ``bf16-autocast`` on a GPU), since it changes the numbers.
    """
    from featcache.backbones import get_spec, weights_identity

    bspec = get_spec(model) if isinstance(model, str) else model
    chosen = tuple(views) if views else tuple(bspec.views)
    unknown = [v for v in chosen if v not in bspec.views]
    if unknown:
        raise StoreError(f"{bspec.name}: unknown feature view(s) {unknown}; it has {list(bspec.views)}")
    reserved = [v for v in chosen if v in ROW_ARRAYS]
    if reserved:
        raise StoreError(f"{bspec.name}: view name(s) {reserved} collide with the store's row arrays")
    if dtype not in FEATURE_DTYPES:
        raise StoreError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    return {
        "kind": "features",
        "model": bspec.name,
        "source": bspec.source,
        "arch": bspec.arch,
        "family": bspec.family,
        "config": json.loads(json.dumps(dict(bspec.config), default=repr)),
        "weights": weights_identity(bspec, weights, random_init),
        "preprocess": bspec.preprocess.to_dict(),
        "crop": CROP_RULE,
        "views": {v: int(bspec.views[v]) for v in chosen},
        "dtype": dtype,
        "precision": precision,
        "featcache": featcache.__version__,
        "layout": LAYOUT_VERSION,
    }


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Rows:
    """What defines each image's input: its id, its path relative to the manifest root and its crop box."""

    image_id: np.ndarray  # (n,) str
    path: np.ndarray  # (n,) str
    bbox: np.ndarray  # (n, 4) int64, NO_BBOX where the image is not cropped
    stamp: np.ndarray | None = None  # (n, 2) int64 file size and mtime (ns) when extracting; NO_STAMP if absent

    def __post_init__(self) -> None:
        counts = Counter(self.image_id.tolist())
        dups = sorted(i for i, n in counts.items() if n > 1)
        if dups:
            raise ManifestError(f"duplicate image_id(s) {dups[:5]}: a store row needs a unique id")
        if "" in counts:
            raise ManifestError("empty image_id: a store row needs a non-empty id")

    @classmethod
    def build(cls, image_ids: Iterable[str], paths: Iterable[str], bboxes: Iterable[Sequence[int] | None]
              ) -> Rows:
        boxes = [NO_BBOX if b is None else tuple(int(v) for v in b) for b in bboxes]
        return cls(np.asarray(list(image_ids), dtype=str), np.asarray(list(paths), dtype=str),
                   np.asarray(boxes, dtype=np.int64).reshape(-1, 4))

    def __len__(self) -> int:
        return len(self.image_id)

    def bbox_of(self, i: int) -> tuple[int, int, int, int] | None:
        box = tuple(int(v) for v in self.bbox[i])
        return None if box == NO_BBOX else box  # type: ignore[return-value]


@dataclass(frozen=True)
class DataArray:
    """A per-row data array: the shape of one row, its dtype, its dimension names (after `row`)."""

    tail: tuple[int, ...]
    dtype: Any  # a numpy dtype name, or `str` for variable-length strings
    dims: tuple[str, ...]
    fill_value: Any = 0
    sharded: bool = False  # one inner chunk per row inside each R-row shard: cheap random row reads


_ROW_LAYOUT = {  # creation (and resize) order; `written` last: see create_or_open and RowGroup.n_rows
    "image_id": DataArray((), str, (), ""),
    "path": DataArray((), str, (), ""),
    "bbox": DataArray((4,), "int64", ("corner",), -1),
    "stamp": DataArray((2,), "int64", ("size_mtime",), -1),
    "skip_reason": DataArray((), str, (), ""),
    "checksum": DataArray((0,), "uint64", ("column",), 0),  # one column per digested array, set per group
    "written": DataArray((), "bool", (), False),
}
ROW_ARRAYS = tuple(_ROW_LAYOUT)
WHY_REBUILD = "`featcache extract` (or `featcache pixels`) recomputes it; `featcache stores --verify` lists all damage"


@dataclass(frozen=True)
class SyncReport:
    index: np.ndarray  # store row of each manifest row
    added: int
    changed: list[str]


def group_layout(spec: Mapping[str, Any]) -> dict[str, DataArray]:
    """Every array of a group built under ``spec``: its data arrays first, then the row arrays."""
    if spec.get("kind") == "features":
        data = {v: DataArray((int(dim),), str(spec["dtype"]), (f"{v}_dim",), float("nan"))
                for v, dim in dict(spec["views"]).items()}
    elif spec.get("kind") == "pixels":
        size = int(spec["size"])
        data = {"pixels": DataArray((size, size), "uint8", ("y", "x"), 0, sharded=True)}
    else:
        raise StoreError(f"unknown group kind {spec.get('kind')!r}")
    checksum = replace(_ROW_LAYOUT["checksum"], tail=(len(digest_columns(list(data))),))
    return {**data, **_ROW_LAYOUT, "checksum": checksum}


def _layout_problem(array: Any, layout: DataArray, chunk_rows: int) -> str | None:
    """Why ``array``'s metadata differs from the layout its group promises, or None."""
    if not isinstance(array, zarr.Array):
        return "is not an array"
    inner = 1 if layout.sharded else chunk_rows
    text = array.dtype.kind == "T"
    if (layout.dtype is str) != text or (not text and np.dtype(layout.dtype) != array.dtype):
        return f"has dtype {array.dtype}, expected {'string' if layout.dtype is str else layout.dtype}"
    if tuple(array.shape[1:]) != layout.tail:
        return f"has row shape {tuple(array.shape[1:])}, expected {layout.tail}"
    if tuple(array.chunks) != (inner, *layout.tail):
        return f"has chunks {tuple(array.chunks)}, expected {(inner, *layout.tail)}"
    shards = array.shards
    if (shards is not None) != layout.sharded or (shards is not None and shards[0] != chunk_rows):
        return f"has shards {shards}, expected {(chunk_rows, *layout.tail) if layout.sharded else None}"
    fill = array.fill_value
    same = (fill != fill and layout.fill_value != layout.fill_value) or fill == layout.fill_value
    return None if same else f"has fill value {fill!r}, expected {layout.fill_value!r}"


# --------------------------------------------------------------------------------------------- groups


Mode = Literal["r", "r+", "a", "w", "w-"]  # zarr's access modes


def _store_root(group: zarr.Group) -> str:
    """The folder of a group's local store (zarr types the store as any kind; ours is always a LocalStore)."""
    return str(cast(Any, group.store).root)


def open_root(store: str | Path, mode: Mode = "a") -> zarr.Group:
    """The store's root group; refuses a non-empty folder that is not a zarr v3 store."""
    path = Path(store)
    if mode == "r" and not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: no store here (no zarr.json); run `featcache extract` or `pixels` first")
    if path.is_dir() and not (path / "zarr.json").exists() and any(path.iterdir()):
        raise StoreError(f"{path}: folder exists and is not a zarr store; refusing to write into it")
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        raise StoreError(f"{path}: not a readable zarr v3 store ({err})") from None


class RowGroup:
    """One keyed group: per-row identity arrays plus data arrays, all chunked by the same R rows.

    Opening never fails on a damaged array: ``damaged`` maps each missing array, or one whose metadata no
    longer matches the group's layout, to the reason; readers refuse those arrays in one line and a writer
    (``rebuild_damaged``) recreates them empty, which the checksums then turn into rows to recompute."""

    def __init__(self, group: zarr.Group, where: str):
        self.group = group
        self.where = where
        attrs = dict(group.attrs)
        spec = attrs.get("spec")
        if not isinstance(spec, dict) or attrs.get("spec_sha256") != spec_sha256(spec):
            raise StoreError(f"{where}: attributes missing or not matching their spec hash; refusing it")
        if not group.path.endswith(spec_sha256(spec)[:KEY_LENGTH]):
            raise StoreError(f"{where}: group name does not match the hash of its spec; refusing to use it")
        if spec.get("layout") != LAYOUT_VERSION:
            raise StoreError(f"{where}: store layout {spec.get('layout')} from an older featcache (this one "
                             f"reads layout {LAYOUT_VERSION}); extract again, it makes a new group")
        chunk_rows = attrs.get("chunk_rows")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise StoreError(f"{where}: attribute chunk_rows missing or invalid ({chunk_rows!r}); refusing it")
        self.spec: dict[str, Any] = spec
        self.chunk_rows = chunk_rows
        self.layout = group_layout(spec)
        self.columns = digest_columns([n for n in self.layout if n not in ROW_ARRAYS])
        self.refresh()

    def refresh(self) -> None:
        """(Re)read every array's metadata: another process may have grown the group since it was opened.
        The new view replaces the old one at once (the writer thread refreshes while the main thread reads)."""
        arrays: dict[str, zarr.Array] = {}
        damaged: dict[str, str] = {}
        for name, layout in self.layout.items():
            try:
                array = self.group[name]
            except KeyError:
                damaged[name] = "is missing"
                continue
            except Exception as err:  # noqa: BLE001 - any unparsable zarr.json is damage, reported in one line
                damaged[name] = f"has unreadable metadata ({type(err).__name__}: {err})"
                continue
            if not isinstance(array, zarr.Array):
                damaged[name] = "is a group, not an array"
                continue
            problem = _layout_problem(array, layout, self.chunk_rows)
            if problem is None:
                arrays[name] = array
            else:
                damaged[name] = problem
        if "checksum" in arrays and arrays["checksum"].attrs.get("columns") != list(self.columns):
            damaged["checksum"] = f"columns differ from {list(self.columns)}"
        # `written` is resized last, so a group another process is growing shows its old size until done
        sizes = [a.shape[0] for n, a in arrays.items() if n not in damaged]
        n_rows = int(arrays["written"].shape[0] if "written" in arrays and "written" not in damaged
                     else max(sizes, default=0))
        for name, array in arrays.items():
            if array.shape[0] < n_rows:
                damaged[name] = f"has {array.shape[0]} rows, the group {n_rows}"
        self.arrays = {n: a for n, a in arrays.items() if n not in damaged}
        self.damaged, self.n_rows = damaged, n_rows

    # ---- creation / opening

    @classmethod
    def create_or_open(cls, store: str | Path, prefix: str, spec: Mapping[str, Any],
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> RowGroup:
        """Open the group keyed by ``spec`` under ``prefix``, creating it (and the store) when absent and
        rebuilding damaged metadata. Writers call it holding the group's lock (`featcache.locks`)."""
        root = open_root(store, "a")
        name = group_name(prefix, spec)
        where = f"{store}/{name}"
        try:
            existing = cls._maybe_open(root, name, where)
        except _Unreadable:
            existing = cls._rewrite_attributes(root, name, where, spec)
        if existing is not None:
            if existing.spec != json.loads(canonical_json(spec)):
                raise StoreError(f"{where}: holds another spec under this key; refusing to reuse it")
            existing.rebuild_damaged()
            return existing
        group = root.require_group(name)
        layout = group_layout(spec)
        columns = digest_columns([n for n in layout if n not in ROW_ARRAYS])
        for key, array in layout.items():
            _create(group, key, array, 0, chunk_rows, columns)
        # Attributes last: a group without them (a creation killed half-way) is recreated above, never used.
        _set_attributes(group, spec, chunk_rows)
        return cls(group, where)

    @classmethod
    def _rewrite_attributes(cls, root: zarr.Group, name: str, where: str, spec: Mapping[str, Any]
                            ) -> RowGroup | None:
        """A group whose zarr.json no longer parses, opened by a writer with the spec that hashes to its
        name: write fresh group metadata (chunk rows read off an intact array); its arrays are then checked
        like any others."""
        folder = Path(_store_root(root)) / name
        chunk_rows = _chunk_rows_of(folder)
        if chunk_rows is None:
            shutil.rmtree(folder)
            return None
        atomic_write(folder / "zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        group = cast(zarr.Group, root[name])  # just written as a group
        _set_attributes(group, spec, chunk_rows)
        return cls(group, where)

    @classmethod
    def _maybe_open(cls, root: zarr.Group, name: str, where: str) -> RowGroup | None:
        try:
            group = root[name]
        except KeyError:
            return None
        except Exception as err:  # noqa: BLE001 - an unparsable zarr.json, whatever zarr raises for it
            raise _Unreadable(f"{where}: group metadata (zarr.json) unreadable ({type(err).__name__}: {err}); "
                              "`featcache extract` (or `pixels`) rewrites it") from None
        if not isinstance(group, zarr.Group):
            raise StoreError(f"{where}: is an array, not a feature group")
        if "spec" not in group.attrs:
            return None  # creation was interrupted before it finished; safe to redo
        return cls(group, where)

    @classmethod
    def open(cls, store: str | Path, name: str, mode: Mode = "r", missing: str | None = None) -> RowGroup:
        """Open group ``name``; ``missing`` replaces the message when the store or the group is absent (a
        group built under another spec is still refused with its own message)."""
        where = f"{store}/{name}"
        if missing and not (Path(store) / "zarr.json").is_file():
            raise StoreError(missing)
        group = cls._maybe_open(open_root(store, mode), name, where)
        if group is None:
            raise StoreError(missing or f"{where}: no finished group here")
        return group

    def rebuild_damaged(self) -> None:
        """Recreate every damaged array empty at the group's size (a writer's repair): its rows then fail
        their checksums, or lose their ids or `written` flags, and are recomputed."""
        for name in list(self.damaged):
            _create(self.group, name, self.layout[name], self.n_rows, self.chunk_rows, columns=self.columns)
        if self.damaged:
            self.refresh()

    # ---- reading

    @property
    def name(self) -> str:
        return self.group.path

    @property
    def kind(self) -> str:
        return str(self.spec["kind"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def data_names(self) -> list[str]:
        return [name for name in self.layout if name not in ROW_ARRAYS]

    def require(self, *names: str) -> None:
        """Refuse, in one line, to read arrays that are damaged."""
        bad = [f"{n} {self.damaged[n]}" for n in names if n in self.damaged]
        if bad:
            raise StoreError(f"{self.where}: array {'; '.join(bad)}; {WHY_REBUILD}")

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one array (all rows by default); a chunk that does not decode is refused in one line
        naming its rows."""
        self.require(name)
        array = self.arrays[name]
        rows = slice(0, self.n_rows) if rows is None else rows
        try:
            if isinstance(rows, slice):
                values = array[rows]
            else:
                values = array.get_orthogonal_selection(np.asarray(rows, dtype=np.int64))
        except Exception as err:  # noqa: BLE001 - a codec's error for damaged bytes, whatever its type
            raise StoreError(self._unreadable(name, rows, err)) from None
        return _plain(values, array)

    def read_block(self, name: str, chunk: int) -> np.ndarray | None:
        """One chunk of an array, or None when its array is damaged or the chunk does not decode."""
        array = self.arrays.get(name)
        if array is None:
            return None
        try:
            return _plain(array[self.chunk_slice(chunk)], array)
        except Exception:  # noqa: BLE001 - "does it decode?" is the question; any failure answers no
            return None

    def read_checked(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``read`` for rows flagged written, refusing any whose bytes no longer match their checksum."""
        rows = np.asarray(rows, dtype=np.int64)
        values = self.read(name, rows)
        stored = self.read("checksum", rows)[:, self.columns.index(name)] if len(rows) else np.zeros(0)
        bad = rows[row_digests(values) != stored]
        if len(bad):
            raise StoreError(f"{self.where}: {len(bad)} written rows of {name} fail their checksum (rows "
                             f"{row_ranges(bad)}); {WHY_REBUILD}")
        return values

    def _unreadable(self, name: str, rows: slice | np.ndarray, err: Exception) -> str:
        wanted = np.arange(self.n_rows)[rows] if isinstance(rows, slice) else np.asarray(rows)
        chunks = np.unique(wanted // self.chunk_rows)
        broken = [c for c in chunks.tolist() if self.read_block(name, c) is None]
        spans = ", ".join(f"{self.chunk_slice(c).start}-{self.chunk_slice(c).stop - 1}" for c in broken)
        return (f"{self.where}/{name}: chunk of rows {spans or '?'} does not decode ({type(err).__name__}: "
                f"{str(err)[:120]}); {WHY_REBUILD}")

    def locate(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Store row of each id, -1 where the store has no row for it."""
        position = {image_id: row for row, image_id in enumerate(self.read("image_id").tolist()) if image_id}
        return np.asarray([position.get(i, -1) for i in np.asarray(image_ids, dtype=str).tolist()],
                          dtype=np.int64)

    def chunk_slice(self, chunk: int) -> slice:
        start = chunk * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_rows))

    def chunk_file(self, name: str, chunk: int) -> Path:
        """Where the chunk (or shard) holding rows of ``chunk`` lives on disk."""
        array = self.arrays[name]
        key = array.metadata.encode_chunk_key((chunk, *([0] * (array.ndim - 1))))
        return Path(_store_root(self.group)) / self.group.path / name / key

    # ---- writing (the group lock serialises sync; any rank writes the chunks it holds)

    def sync(self, rows: Rows, hold: Callable[[Sequence[int]], AbstractContextManager[Any]] | None = None
             ) -> SyncReport:
        """Give every manifest row a store row: new ids fill free slots (rows a killed sync left empty, or
        whose id was lost), then append. New rows and rows whose path or crop changed lose their `written`
        flag before their new input is recorded, so a kill in between re-embeds them and never keeps stale
        ones. ``hold(chunks)`` holds a chunk's claim while its flags change."""
        index = self.locate(rows.image_id)
        known = np.flatnonzero(index >= 0)
        differs = (self.read("path", index[known]) != rows.path[known]) | np.any(
            self.read("bbox", index[known]) != rows.bbox[known], axis=1)
        if rows.stamp is not None:  # a file replaced under the same name is a changed input too
            differs |= np.any(self.read("stamp", index[known]) != rows.stamp[known], axis=1)
        changed = known[differs]
        new = np.flatnonzero(index < 0)
        free = np.flatnonzero(self.read("image_id") == "")
        slots = np.concatenate([free[: len(new)], self.n_rows + np.arange(max(0, len(new) - len(free)))])
        index[new] = slots.astype(np.int64)
        size = max(self.n_rows, int(slots.max()) + 1 if len(slots) else 0)
        for array in self.arrays.values():  # `written` last: readers size the group by it
            if array.shape[0] != size:
                array.resize((size, *array.shape[1:]))
        self.n_rows = size
        reset = np.concatenate([index[changed], slots]).astype(np.int64)
        for chunk in np.unique(reset // self.chunk_rows).tolist():  # one claim at a time: few open files
            mine = reset[reset // self.chunk_rows == chunk]
            with hold([chunk]) if hold else nullcontext():
                self._set_rows("written", mine, False)
                self._set_rows("skip_reason", mine, "")
        fix = np.concatenate([new, changed])
        if len(fix):
            self._set_rows("path", index[fix], rows.path[fix])
            self._set_rows("bbox", index[fix], rows.bbox[fix])
            if rows.stamp is not None:
                self._set_rows("stamp", index[fix], rows.stamp[fix])
            self._set_rows("image_id", index[new], rows.image_id[new])
        return SyncReport(index, len(new), rows.image_id[changed].tolist())

    def _set_rows(self, name: str, rows: np.ndarray, values: Any) -> None:
        if len(rows):
            self.arrays[name].set_orthogonal_selection(np.asarray(rows, dtype=np.int64), values)

    def write_chunk(self, chunk: int, rows: np.ndarray, values: Mapping[str, np.ndarray],
                    reasons: np.ndarray) -> None:
        """Write the rows of one chunk as one whole-chunk write per array: data, skip reasons, then the
        digests of what was written (identity included), and the `written` flags last. The caller holds
        the chunk's claim; metadata is re-read first, since another process may have grown the group."""
        self.refresh()
        self.require(*self.layout)
        span = self.chunk_slice(chunk)
        local = np.asarray(rows, dtype=np.int64) - span.start
        digests = self.read_block("checksum", chunk)
        digests = np.zeros((span.stop - span.start, len(self.columns)), np.uint64) if digests is None else digests
        blocks = {**values, "skip_reason": np.asarray(reasons, dtype=str)}
        for name, block in blocks.items():
            block = self._write_block(name, chunk, local, block)
            digests[local, self.columns.index(name)] = row_digests(block[local])
        for name in IDENTITY_COLUMNS:
            if name not in blocks:
                digests[local, self.columns.index(name)] = row_digests(self.read(name, span)[local])
        self._write_block("checksum", chunk, np.arange(len(digests)), digests)
        self._write_block("written", chunk, local, np.ones(len(local), dtype=bool))

    def _write_block(self, name: str, chunk: int, local: np.ndarray, block: np.ndarray) -> np.ndarray:
        """Write rows ``local`` of a chunk, merged with the rows it already holds; returns the whole block."""
        array, span = self.arrays[name], self.chunk_slice(chunk)
        block = np.asarray(block, dtype=str if array.dtype.kind == "T" else array.dtype)
        if len(local) != span.stop - span.start:  # rows added to a chunk that already holds others
            merged = self.read_block(name, chunk)
            if merged is None:  # undecodable: its other rows fail their checksums and are recomputed
                merged = np.full((span.stop - span.start, *array.shape[1:]), self.layout[name].fill_value,
                                 dtype=block.dtype)
            merged[local] = block
            block = merged
        array[span] = block
        return block

    # ---- summaries

    def summary(self) -> dict[str, Any]:
        """Counts as flagged (`featcache stores`); "?" where the flags themselves are damaged."""
        try:
            written = self.read("written")
            skipped: Any = int((written & (self.read("skip_reason") != "")).sum())
            flagged: Any = int(written.sum())
        except StoreError:
            flagged = skipped = "?"
        return {"group": self.name, "kind": self.kind, "model": self.spec.get("model", ""),
                "rows": self.n_rows, "written": flagged, "skipped": skipped,
                "arrays": {n: [self.n_rows, *self.layout[n].tail] for n in self.data_names},
                "dtype": self.spec.get("dtype", ""), "weights": self.spec.get("weights", ""),
                "featcache": self.spec.get("featcache", "")}

    def skipped(self) -> dict[str, str]:
        """image_id -> reason for every row skipped under ``--on-error skip``."""
        reasons = self.read("skip_reason")
        rows = np.flatnonzero((reasons != "") & self.read("written"))
        return dict(zip(self.read("image_id", rows).tolist(), reasons[rows].tolist(), strict=True))


class _Unreadable(StoreError):
    """A group whose own zarr.json does not parse."""


def _plain(values: Any, array: zarr.Array) -> np.ndarray:
    return np.asarray(values.tolist(), dtype=str) if array.dtype.kind == "T" else np.asarray(values)


def _create(group: zarr.Group, key: str, array: DataArray, rows: int, chunk_rows: int,
            columns: Sequence[str]) -> None:
    inner = 1 if array.sharded else chunk_rows
    created = group.create_array(key, shape=(rows, *array.tail), chunks=(inner, *array.tail),
                                 shards=(chunk_rows, *array.tail) if array.sharded else None,
                                 dtype=array.dtype, fill_value=array.fill_value,
                                 dimension_names=("row", *array.dims), overwrite=True)
    if key == "checksum":
        created.attrs["columns"] = list(columns)


def _set_attributes(group: zarr.Group, spec: Mapping[str, Any], chunk_rows: int) -> None:
    spec_json = json.loads(canonical_json(spec))
    group.attrs.update({"kind": spec_json["kind"], "spec": spec_json, "spec_sha256": spec_sha256(spec),
                        "layout": LAYOUT_VERSION, "chunk_rows": chunk_rows})


def _chunk_rows_of(folder: Path) -> int | None:
    """Rows per chunk read off the first intact row array of a group folder (None: none intact)."""
    for name in ROW_ARRAYS:
        try:
            meta = json.loads((folder / name / "zarr.json").read_text())
            return int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (ValueError, KeyError, TypeError, IndexError, OSError):
            continue
    return None


def list_groups(store: str | Path, kind: str | None = None, problems: list[str] | None = None
                ) -> list[RowGroup]:
    """Every finished group of the store (optionally of one kind), in name order. A group that cannot be
    opened raises, or with ``problems`` given, is described there and left out."""
    root = open_root(store, "r")
    found = []
    folders = sorted(p for p in Path(store).glob("*/*") if (p / "zarr.json").is_file())
    for folder in folders:
        name = f"{folder.parent.name}/{folder.name}"
        try:
            group = RowGroup._maybe_open(root, name, f"{store}/{name}")
        except StoreError as err:
            if problems is None:
                raise
            problems.append(str(err))
            continue
        if group is not None and (kind is None or group.kind == kind):
            found.append(group)
    return found


# --------------------------------------------------------------------------------------------- reading API


def find_feature_group(store: str | Path, model: str, view: str = "cls", *, weights: str | Path | None = None,
                       random_init: bool = False, dtype: str | None = None, precision: str | None = None,
                       image_ids: Sequence[str] | np.ndarray | None = None) -> RowGroup:
    """Locate the feature group of ``model`` holding ``view``, without loading any model.

    Candidates are the groups of that backbone with that view and, when given, that weights identity
    (``weights`` path or ``random_init``), ``dtype`` and ``precision``. If several remain, those of this
    toolkit version are preferred, then those holding every one of ``image_ids``; still several is an error
    that lists them, so a notebook never silently picks one.
    """
    from featcache.backbones import get_spec, weights_identity

    bspec = get_spec(model)
    wanted: dict[str, Any] = {"dtype": dtype, "precision": precision,
                              "weights": weights_identity(bspec, weights, random_init)
                              if (weights is not None or random_init) else None}
    problems: list[str] = []
    groups = [g for g in list_groups(store, "features", problems) if g.spec.get("model") == bspec.name
              and view in g.spec.get("views", {})
              and all(value is None or g.spec.get(key) == value for key, value in wanted.items())]
    if not groups:
        damaged = [p for p in problems if f"/{safe_name(bspec.name)}/" in p]
        raise StoreError(damaged[0] if damaged else f"{store}: no {bspec.name} features with view {view!r}"
                         f"{_describe(wanted)}; run `featcache extract --model {bspec.name} ...` first")
    if len(groups) > 1:
        current = [g for g in groups if g.spec.get("featcache") == featcache.__version__]
        groups = current or groups
    if len(groups) > 1 and image_ids is not None:
        full = [g for g in groups if _holds(g, image_ids)]
        groups = full or groups
    if len(groups) > 1:
        options = "; ".join(f"{g.name} ({', '.join(f'{k}={g.spec.get(k)}' for k in wanted)})" for g in groups)
        raise StoreError(f"{store}: several {bspec.name} groups match, choose by weights/dtype/precision: "
                         f"{options}")
    return groups[0]


def _describe(wanted: Mapping[str, Any]) -> str:
    given = [f"{k}={v}" for k, v in wanted.items() if v is not None]
    return f" ({', '.join(given)})" if given else ""


def _manifest_path(manifest: Any) -> str:
    if isinstance(manifest, (str, Path)):
        return str(manifest)
    return str(manifest.path) if isinstance(manifest, Manifest) else "MANIFEST"


def _holds(group: RowGroup, image_ids: Sequence[str] | np.ndarray) -> bool:
    rows = group.locate(image_ids)
    return bool((rows >= 0).all() and group.read("written")[rows].all())


def load_features(store: str | Path, model: str, manifest: Any = None, view: str = "cls", *,
                  weights: str | Path | None = None, random_init: bool = False, dtype: str | None = None,
                  precision: str | None = None, skipped: str = "drop", group: RowGroup | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cached features as numpy: ``(image_ids, X)`` with ``X`` float32 of shape ``(n, D)``, row i of image i.

    ``manifest`` (a path, a ``Manifest`` or a sequence of image ids) selects and orders the rows; every one of
    its images must be embedded, else ``StoreError`` says how many are missing and which command fills them.
    A given manifest is also checked against each row's stored path and crop, so stale features never pass.
    Without it, all embedded rows come back in store order. ``skipped`` images (``--on-error skip``) are
    dropped from the result by default (their ids are then absent), or ``"raise"``. The group is found by
    ``find_feature_group`` (same selectors) unless a caller that already found it passes ``group``; no model
    is loaded.
    """
    if skipped not in ("drop", "raise"):
        raise ValueError(f"skipped must be 'drop' or 'raise', got {skipped!r}")
    rows_in = rows_of(manifest)
    ids_in = None if rows_in is None else rows_in.image_id
    group = group or find_feature_group(store, model, view, weights=weights, random_init=random_init,
                                        dtype=dtype, precision=precision, image_ids=ids_in)
    group.require(view, "checksum")
    written = group.read("written")
    if ids_in is None:
        index = np.flatnonzero(written)
    else:
        index = group.locate(ids_in)
        missing = (index < 0) | ~written[np.maximum(index, 0)]
        if missing.any():
            raise StoreError(f"{group.where}: {int(missing.sum())} of {len(index)} images not embedded "
                             f"(e.g. {ids_in[missing][:3].tolist()}); run `featcache extract --model "
                             f"{group.spec['model']} --manifest {_manifest_path(manifest)} --store {store}` "
                             "to fill them")
        if isinstance(rows_in, Rows) and rows_in.path.size:
            check_inputs(group, index, rows_in)
    reasons = group.read_checked("skip_reason", index)
    failed = reasons != ""
    if failed.any() and skipped == "raise":
        raise StoreError(f"{group.where}: {int(failed.sum())} requested images were skipped at extraction "
                         f"(e.g. {group.read('image_id', index[failed][:3]).tolist()})")
    index = index[~failed]
    ids = group.read_checked("image_id", index)
    return ids, group.read_checked(view, index).astype(np.float32)


def rows_of(manifest: Any) -> Rows | None:
    """A manifest path or object -> its Rows; Rows as they are; a plain id sequence -> Rows with ids only."""
    if manifest is None or isinstance(manifest, Rows):
        return manifest
    if isinstance(manifest, (str, Path)):
        manifest = load_manifest(manifest)
    if isinstance(manifest, Manifest):
        return manifest_rows(manifest)
    ids = np.asarray(list(manifest), dtype=str)
    return Rows(ids, np.zeros(0, dtype=str), np.zeros((0, 4), dtype=np.int64))


def manifest_rows(manifest: Manifest, stamp: bool = False) -> Rows:
    """The store identity of each manifest image: id, path relative to the manifest root, crop box, and with
    ``stamp`` the file's size and modification time (extraction compares them; readers of a store, whose
    images may live elsewhere by then, do not)."""
    rows = Rows.build(manifest.ids, manifest.column("path"), (manifest.bbox(i) for i in manifest.ids))
    if not stamp:
        return rows
    stamps = [_stamp(manifest.root / path) for path in rows.path]
    return replace(rows, stamp=np.array(stamps, dtype=np.int64).reshape(-1, 2))


def _stamp(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except OSError:
        return NO_STAMP  # a missing file fails (or is skipped) when decoded, with its own message
    return info.st_size, info.st_mtime_ns


def check_inputs(group: RowGroup, index: np.ndarray, rows: Rows) -> None:
    """Refuse rows whose stored path or crop differs from the manifest's: their contents are stale."""
    stale = (group.read("path", index) != rows.path) | np.any(group.read("bbox", index) != rows.bbox, axis=1)
    if stale.any():
        raise StoreError(f"{group.where}: {int(stale.sum())} images changed path or crop since extraction "
                         f"(e.g. {rows.image_id[stale][:3].tolist()}); rerun `featcache extract` to re-embed")


# --------------------------------------------------------------------------------------------- export


def export_hdf5(store: str | Path, to: str | Path, model: str | None = None) -> list[str]:
    """Copy every feature group (or those of ``model``) to HDF5 with the same hierarchy and arrays; the spec
    goes in each group's attributes as JSON. Copies chunk by chunk, writes a temp file then renames it."""
    import h5py

    groups = list_groups(store, "features")
    if model is not None:
        groups = [g for g in groups if g.spec.get("model") == model]
    if not groups:
        raise StoreError(f"{store}: no feature groups{f' for {model}' if model else ''} to export")
    to = Path(to)
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    try:
        with write_errors(to), h5py.File(tmp, "w") as h5:
            h5.attrs["featcache"] = featcache.__version__
            h5.attrs["layout"] = LAYOUT_VERSION
            for group in groups:
                _export_group(h5.create_group(group.name), group)
        with write_errors(to):
            os.replace(tmp, to)
    finally:
        tmp.unlink(missing_ok=True)
    return [g.name for g in groups]


def _export_group(out: Any, group: RowGroup) -> None:
    import h5py

    group.require(*group.layout)
    out.attrs["kind"] = group.kind
    out.attrs["spec"] = canonical_json(group.spec)
    out.attrs["spec_sha256"] = spec_sha256(group.spec)
    for name, array in group.arrays.items():
        text = array.dtype.kind == "T"
        dtype = h5py.string_dtype() if text else array.dtype
        rows = max(1, min(array.shape[0], group.chunk_rows))
        dset = out.create_dataset(name, shape=array.shape, dtype=dtype, chunks=(rows, *array.shape[1:])
                                  if array.shape[0] else None)
        dset.attrs["dims"] = json.dumps(list(getattr(array.metadata, "dimension_names", None) or ()))
        for start in range(0, array.shape[0], group.chunk_rows):
            block = group.read(name, slice(start, start + group.chunk_rows))
            dset[start:start + len(block)] = block.astype(object) if text else block
