"""Content-keyed zarr v3 stores: a group per backbone and full preprocessing spec, written a chunk at a time.

Layout (documented for plain-zarr readers in the README)::

    <store>/<backbone>/<key>/     key = first 16 hex digits of sha256(canonical JSON of the spec)
        <view>        (N, D)  float16|float32, chunks (R, D)    one array per feature view
        image_id      (N,)    string                            row order of every array
        path, bbox    (N,), (N, 4)                              the input of each row (bbox -1 = no crop)
        stamp         (N, 2)                                    file size and mtime when embedded
        written       (N,)    bool                              set only after the row's chunk is on disk
        skip_reason   (N,)    string                            why an image was skipped ("" = embedded)
        attrs: kind, spec, spec_sha256, layout

Every array is chunked along rows only, with the same R rows per chunk, and written one whole chunk at a time:
ranks that own disjoint chunks never touch the same file, and a chunk's `written` flags go to disk after its
data (zarr's local store writes each chunk file atomically, temp file then rename), so a killed run loses at
most its unfinished chunks. A group whose attributes disagree with its key is refused, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import featcache
from featcache.errors import ManifestError, StoreError
from featcache.manifest import Manifest, load_manifest

LAYOUT_VERSION = 1
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


_ROW_LAYOUT = {  # `written` last in creation order: see create_or_open
    "image_id": DataArray((), str, (), ""),
    "path": DataArray((), str, (), ""),
    "bbox": DataArray((4,), "int64", ("corner",), -1),
    "stamp": DataArray((2,), "int64", ("size_mtime",), -1),
    "skip_reason": DataArray((), str, (), ""),
    "written": DataArray((), "bool", (), False),
}
ROW_ARRAYS = tuple(_ROW_LAYOUT)


@dataclass(frozen=True)
class SyncReport:
    index: np.ndarray  # store row of each manifest row
    added: int
    changed: list[str]


# --------------------------------------------------------------------------------------------- groups


def open_root(store: str | Path, mode: str = "a") -> zarr.Group:
    """The store's root group; refuses a non-empty folder that is not a zarr v3 store."""
    path = Path(store)
    if mode == "r" and not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: no store here (no zarr.json); run `featcache extract` or `pixels` first")
    if path.is_dir() and not (path / "zarr.json").exists() and any(path.iterdir()):
        raise StoreError(f"{path}: folder exists and is not a zarr store; refusing to write into it")
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise StoreError(f"{path}: not a readable zarr v3 store ({err})") from None


class RowGroup:
    """One keyed group: per-row identity arrays plus data arrays, all chunked by the same R rows."""

    def __init__(self, group: zarr.Group, where: str):
        self.group = group
        self.where = where
        attrs = dict(group.attrs)
        spec = attrs.get("spec")
        if not isinstance(spec, dict) or attrs.get("spec_sha256") != spec_sha256(spec):
            raise StoreError(f"{where}: attributes missing or not matching their spec hash; refusing it")
        if not group.path.endswith(spec_sha256(spec)[:KEY_LENGTH]):
            raise StoreError(f"{where}: group name does not match the hash of its spec; refusing to use it")
        self.spec: dict[str, Any] = spec
        self.arrays: dict[str, zarr.Array] = {name: group[name] for name in group.array_keys()}
        missing = [name for name in ROW_ARRAYS if name not in self.arrays]
        if missing:
            raise StoreError(f"{where}: incomplete group, arrays {missing} missing")

    # ---- creation / opening

    @classmethod
    def create_or_open(cls, store: str | Path, prefix: str, spec: Mapping[str, Any],
                       data: Mapping[str, DataArray], chunk_rows: int = DEFAULT_CHUNK_ROWS) -> RowGroup:
        """Open the group keyed by ``spec`` under ``prefix``, creating it (and the store) when absent."""
        root = open_root(store, "a")
        name = group_name(prefix, spec)
        where = f"{store}/{name}"
        existing = cls._maybe_open(root, name, where)
        if existing is not None:
            if existing.spec != json.loads(canonical_json(spec)):
                raise StoreError(f"{where}: holds another spec under this key; refusing to reuse it")
            return existing
        group = root.require_group(name)
        for key, array in {**data, **_ROW_LAYOUT}.items():
            inner = 1 if array.sharded else chunk_rows
            group.create_array(key, shape=(0, *array.tail), chunks=(inner, *array.tail),
                               shards=(chunk_rows, *array.tail) if array.sharded else None,
                               dtype=array.dtype, fill_value=array.fill_value,
                               dimension_names=("row", *array.dims), overwrite=True)
        # Attributes last: a group without them (a creation killed half-way) is recreated above, never used.
        spec_json = json.loads(canonical_json(spec))
        group.attrs.update({"kind": spec_json["kind"], "spec": spec_json, "spec_sha256": spec_sha256(spec),
                            "layout": LAYOUT_VERSION})
        return cls(group, where)

    @classmethod
    def _maybe_open(cls, root: zarr.Group, name: str, where: str) -> RowGroup | None:
        try:
            group = root[name]
        except KeyError:
            return None
        if not isinstance(group, zarr.Group):
            raise StoreError(f"{where}: is an array, not a feature group")
        if "spec" not in group.attrs:
            return None  # creation was interrupted before it finished; safe to redo
        return cls(group, where)

    @classmethod
    def open(cls, store: str | Path, name: str, mode: str = "r", missing: str | None = None) -> RowGroup:
        """Open group ``name``; ``missing`` replaces the message when the store or the group is absent (a
        group built under another spec is still refused with its own message)."""
        where = f"{store}/{name}"
        if missing and not (Path(store) / "zarr.json").is_file():
            raise StoreError(missing)
        group = cls._maybe_open(open_root(store, mode), name, where)
        if group is None:
            raise StoreError(missing or f"{where}: no finished group here")
        return group

    # ---- reading

    @property
    def name(self) -> str:
        return self.group.path

    @property
    def kind(self) -> str:
        return str(self.spec["kind"])

    @property
    def chunk_rows(self) -> int:
        return int(self.arrays["written"].chunks[0])

    @property
    def n_rows(self) -> int:
        return int(self.arrays["image_id"].shape[0])

    @property
    def data_names(self) -> list[str]:
        return [name for name in self.arrays if name not in ROW_ARRAYS]

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        array = self.arrays[name]
        if rows is None:
            values = array[:]
        elif isinstance(rows, slice):
            values = array[rows]
        else:
            values = array.get_orthogonal_selection(np.asarray(rows, dtype=np.int64))
        return np.asarray(values.tolist(), dtype=str) if array.dtype.kind == "T" else np.asarray(values)

    def locate(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Store row of each id, -1 where the store has no row for it."""
        position = {image_id: row for row, image_id in enumerate(self.read("image_id").tolist()) if image_id}
        return np.asarray([position.get(i, -1) for i in np.asarray(image_ids, dtype=str).tolist()],
                          dtype=np.int64)

    def chunk_slice(self, chunk: int) -> slice:
        start = chunk * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_rows))

    # ---- writing (rank 0 alone syncs; any rank writes the chunks it owns)

    def sync(self, rows: Rows) -> SyncReport:
        """Give every manifest row a store row: new ids fill free slots (rows a killed sync left empty), then
        append. Rows whose path or crop changed lose their `written` flag before their new input is recorded,
        so a kill in between re-embeds them and never keeps stale ones."""
        index = self.locate(rows.image_id)
        known = np.flatnonzero(index >= 0)
        differs = (self.read("path", index[known]) != rows.path[known]) | np.any(
            self.read("bbox", index[known]) != rows.bbox[known], axis=1)
        if rows.stamp is not None:  # a file replaced under the same name is a changed input too
            differs |= np.any(self.read("stamp", index[known]) != rows.stamp[known], axis=1)
        changed = known[differs]
        if len(changed):
            self._set_rows("written", index[changed], False)
            self._set_rows("skip_reason", index[changed], "")
        new = np.flatnonzero(index < 0)
        free = np.flatnonzero(self.read("image_id") == "")
        slots = np.concatenate([free[: len(new)], self.n_rows + np.arange(max(0, len(new) - len(free)))])
        index[new] = slots.astype(np.int64)
        size = max(self.n_rows, int(slots.max()) + 1 if len(slots) else 0)
        for array in self.arrays.values():
            if array.shape[0] != size:
                array.resize((size, *array.shape[1:]))
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
        """Write the rows of one chunk as one whole-chunk write per array; `written` goes last."""
        span = self.chunk_slice(chunk)
        local = np.asarray(rows, dtype=np.int64) - span.start
        whole = len(local) == span.stop - span.start
        for name, block in values.items():
            self._write_block(name, span, local, block, whole)
        self._write_block("skip_reason", span, local, np.asarray(reasons, dtype=str), whole)
        self._write_block("written", span, local, np.ones(len(local), dtype=bool), whole)

    def _write_block(self, name: str, span: slice, local: np.ndarray, block: np.ndarray, whole: bool) -> None:
        array = self.arrays[name]
        if not whole:  # rows added to a chunk that already holds others: merge, still one write
            merged = self.read(name, span)
            merged[local] = block
            block = merged
        array[span] = block

    # ---- summaries

    def summary(self) -> dict[str, Any]:
        written = self.read("written")
        skipped = self.read("skip_reason") != ""
        return {"group": self.name, "kind": self.kind, "model": self.spec.get("model", ""),
                "rows": self.n_rows, "written": int(written.sum()), "skipped": int((written & skipped).sum()),
                "arrays": {n: list(self.arrays[n].shape) for n in self.data_names},
                "dtype": self.spec.get("dtype", ""), "weights": self.spec.get("weights", ""),
                "featcache": self.spec.get("featcache", "")}

    def skipped(self) -> dict[str, str]:
        """image_id -> reason for every row skipped under ``--on-error skip``."""
        reasons = self.read("skip_reason")
        rows = np.flatnonzero((reasons != "") & self.read("written"))
        return dict(zip(self.read("image_id", rows).tolist(), reasons[rows].tolist(), strict=True))


def list_groups(store: str | Path, kind: str | None = None) -> list[RowGroup]:
    """Every finished group of the store (optionally of one kind), in name order."""
    root = open_root(store, "r")
    found = []
    for prefix, parent in sorted(root.groups()):
        for key, _ in sorted(parent.groups()):
            group = RowGroup._maybe_open(root, f"{prefix}/{key}", f"{store}/{prefix}/{key}")
            if group is not None and (kind is None or group.kind == kind):
                found.append(group)
    return found


# --------------------------------------------------------------------------------------------- reading API


def find_feature_group(store: str | Path, model: str, view: str = "cls", *, weights: str | Path | None = None,
                       random_init: bool = False, dtype: str | None = None, precision: str | None = None,
                       image_ids: Sequence[str] | None = None) -> RowGroup:
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
    groups = [g for g in list_groups(store, "features") if g.spec.get("model") == bspec.name
              and view in g.spec.get("views", {})
              and all(value is None or g.spec.get(key) == value for key, value in wanted.items())]
    if not groups:
        raise StoreError(f"{store}: no {bspec.name} features with view {view!r}"
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


def _holds(group: RowGroup, image_ids: Sequence[str]) -> bool:
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
    reasons = group.read("skip_reason", index) if len(index) else np.zeros(0, dtype=str)
    failed = reasons != ""
    if failed.any() and skipped == "raise":
        raise StoreError(f"{group.where}: {int(failed.sum())} requested images were skipped at extraction "
                         f"(e.g. {group.read('image_id', index[failed][:3]).tolist()})")
    index = index[~failed]
    ids = group.read("image_id", index) if len(index) else np.zeros(0, dtype=str)
    features = group.read(view, index) if len(index) else np.zeros((0, group.arrays[view].shape[1]))
    return ids, features.astype(np.float32)


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
        with h5py.File(tmp, "w") as h5:
            h5.attrs["featcache"] = featcache.__version__
            h5.attrs["layout"] = LAYOUT_VERSION
            for group in groups:
                _export_group(h5.create_group(group.name), group)
        os.replace(tmp, to)
    finally:
        tmp.unlink(missing_ok=True)
    return [g.name for g in groups]


def _export_group(out: Any, group: RowGroup) -> None:
    import h5py

    out.attrs["kind"] = group.kind
    out.attrs["spec"] = canonical_json(group.spec)
    out.attrs["spec_sha256"] = spec_sha256(group.spec)
    for name, array in group.arrays.items():
        text = array.dtype.kind == "T"
        dtype = h5py.string_dtype() if text else array.dtype
        rows = max(1, min(array.shape[0], group.chunk_rows))
        dset = out.create_dataset(name, shape=array.shape, dtype=dtype, chunks=(rows, *array.shape[1:])
                                  if array.shape[0] else None)
        dset.attrs["dims"] = json.dumps(list(array.metadata.dimension_names or ()))
        for start in range(0, array.shape[0], group.chunk_rows):
            block = group.read(name, slice(start, start + group.chunk_rows))
            dset[start:start + len(block)] = block.astype(object) if text else block
