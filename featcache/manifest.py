"""The canonical manifest: one row per image, the common ground of both stages.

Columns: ``image_id``, ``path`` (relative to a data root), ``patient_id``, ``center``, optional
``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` (pixels, half-open, in the decoded image) and one column per task,
named by the task key, holding raw class names (empty = no label for that task). Every dataset builder writes
this layout and every later step reads only it, so a dataset's quirks end at :mod:`featcache.builders`.

Labels are read through a :class:`~featcache.tasks.TaskSpec` the caller passes (``m.labels(spec)``,
``validate(m, tasks=...)``): this module never looks a task up, so it imports no dataset spec.

Row numbers in messages are file lines: the header is line 1, the first image line 2.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import ManifestError
from featcache.fileio import atomic_write
from featcache.tasks import TaskSpec

REQUIRED_COLUMNS = ("image_id", "path", "patient_id", "center")
BBOX_COLUMNS = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
FIRST_LINE = 2  # file line of the first image row
DATA_ROOTS_VAR = "FEATCACHE_DATA_ROOTS"  # os.pathsep-separated folders images outside the manifest's may be in
_SHOWN = 5  # rows or ids quoted in one message before "... and N more"


def _quote(items: Sequence[Any], what: str) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOWN])
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{what} {shown}{more}"


class Manifest:
    """A loaded manifest: string columns in file order, an id index, and the file's digest."""

    def __init__(self, columns: dict[str, list[str]], path: Path, root: Path, digest: str):
        self.path = path
        self.root = root
        self._columns = columns
        self._digest = digest
        self._len = len(next(iter(columns.values()))) if columns else 0
        self._index: dict[str, int] = {}
        for i, image_id in enumerate(columns.get("image_id", ())):
            self._index.setdefault(image_id, i)  # duplicates are validate()'s to report

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"Manifest({self.path}, {len(self)} images, columns={list(self._columns)})"

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._columns)

    def column(self, name: str) -> list[str]:
        """One column's values in file order ('' where empty)."""
        if name not in self._columns:
            raise ManifestError(f"{self.path}: no column {name!r} (columns: {', '.join(self._columns)})")
        return self._columns[name]

    __getitem__ = column

    @property
    def rows(self) -> list[dict[str, str]]:
        """Rows as dicts, built on each access (the manifest itself is stored by column)."""
        names = list(self._columns)
        return [dict(zip(names, values, strict=True)) for values in zip(*self._columns.values(), strict=True)]

    @property
    def ids(self) -> list[str]:
        return self.column("image_id")

    def digest(self) -> str:
        """sha256 of the file's bytes: splits and stores record it to notice a changed manifest."""
        return self._digest

    def tasks(self, known: Iterable[str]) -> list[str]:
        """Columns of this manifest that name one of the ``known`` task keys, in file order."""
        known = set(known)
        return [name for name in self._columns if name in known]

    def line(self, image_id: str) -> int:
        """File line of an image's row."""
        return self._position(image_id) + FIRST_LINE

    def _position(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise ManifestError(f"{self.path}: no image_id {image_id!r}") from None

    def _pick(self, name: str, ids: Iterable[str]) -> list[str]:
        values = self.column(name)
        return [values[self._position(i)] for i in ids]

    def labels(self, task: TaskSpec) -> tuple[list[str], np.ndarray]:
        """Image ids labelled for ``task`` (its column ``task.key``) and their 0/1 codes (positive = 1);
        empty labels are left out."""
        classes = task.classes
        ids, codes, bad = [], [], []
        for i, (image_id, value) in enumerate(zip(self.ids, self.column(task.key), strict=True)):
            if not value:
                continue
            if value not in classes:
                bad.append(i + FIRST_LINE)
                continue
            ids.append(image_id)
            codes.append(classes[value])
        if bad:
            raise ManifestError(
                f"{self.path}: {task.key} labels outside {sorted(classes)} at {_quote(bad, 'rows')}"
            )
        return ids, np.asarray(codes, dtype=np.int8)

    def patients(self, ids: Iterable[str]) -> list[str]:
        return self._pick("patient_id", ids)

    def centers(self, ids: Iterable[str]) -> list[str]:
        return self._pick("center", ids)

    def abspath(self, image_id: str) -> Path:
        return self.root / self._pick("path", [image_id])[0]

    def bbox(self, image_id: str) -> tuple[int, int, int, int] | None:
        """The crop box (x0, y0, x1, y1), or None where the manifest has none for this image."""
        if not all(name in self._columns for name in BBOX_COLUMNS):
            return None
        i = self._position(image_id)
        try:
            return parse_bbox([self._columns[name][i] for name in BBOX_COLUMNS])
        except ValueError as err:
            raise ManifestError(f"{self.path}: row {i + FIRST_LINE} ({image_id}): {err}") from None


def parse_bbox(values: Sequence[str]) -> tuple[int, int, int, int] | None:
    """Four bbox cells -> (x0, y0, x1, y1) in whole pixels (``12`` or ``12.0``), None when all are empty;
    ValueError for a partial, fractional or empty box."""
    if not any(values):
        return None
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"bbox {list(values)} is not four numbers") from None
    if not all(n.is_integer() for n in numbers):
        raise ValueError(f"bbox {list(values)} is not whole pixels")
    x0, y0, x1, y1 = (int(n) for n in numbers)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ValueError(f"bbox {list(values)} needs 0 <= x0 < x1 and 0 <= y0 < y1")
    return x0, y0, x1, y1


# --- reading ------------------------------------------------------------------------------------------------


def load_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a manifest (CSV; Parquet with pyarrow installed); ``root`` defaults to the manifest's folder.

    Refused in one line: a row without an ``image_id`` (it would enter splits and draws as ''), and an image
    path that leaves the root (``../../x.png``, ``/etc/passwd``) unless it lies in a folder listed in
    ``$FEATCACHE_DATA_ROOTS`` (the opt-in for images kept apart from their manifest, e.g. read-only data)."""
    m = _read_manifest(path, root)
    if "image_id" in m.columns and (empty := [i + FIRST_LINE for i, v in enumerate(m.ids) if not v]):
        raise ManifestError(f"{m.path}: empty image_id at {_quote(empty, 'rows')}; every image needs an id")
    if outside := outside_rows(m):
        first = m.column("path")[outside[0]]
        raise ManifestError(
            f"{m.path}: image paths outside the manifest's folder {m.root} at "
            f"{_quote([i + FIRST_LINE for i in outside], 'rows')} (e.g. {first!r}); keep images under the "
            f"manifest's folder, or list their folder in ${DATA_ROOTS_VAR}"
        )
    return m


def data_roots(root: Path) -> tuple[str, ...]:
    """Folders image paths may point into: the manifest's root, then ``$FEATCACHE_DATA_ROOTS``'s."""
    extra = (p for p in os.environ.get(DATA_ROOTS_VAR, "").split(os.pathsep) if p)
    return tuple(os.path.abspath(p) for p in (os.fspath(root), *extra))


def inside(path: str | Path, roots: Sequence[str]) -> bool:
    """Whether ``path`` (absolute) lies in one of ``roots``, by its normalised text: a symlink a person put
    inside a root is theirs to trust; ``..`` and absolute paths are what a hostile manifest would use."""
    target = os.path.normpath(os.path.abspath(path))
    return any(target == r or target.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def outside_rows(m: Manifest) -> list[int]:
    """Positions of rows whose image path leaves the data roots (:func:`data_roots`)."""
    if "path" not in m.columns:
        return []
    roots, base = data_roots(m.root), os.path.abspath(m.root)
    return [i for i, rel in enumerate(m.column("path")) if rel and not inside(os.path.join(base, rel), roots)]


def _read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """The manifest as written, unchecked: :func:`validate` reports what :func:`load_manifest` refuses."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read manifest ({err.strerror})") from None
    columns = _parse_parquet(path) if path.suffix == ".parquet" else _parse_csv(path, data)
    root = Path(root) if root is not None else path.parent
    return Manifest(columns, path, root, hashlib.sha256(data).hexdigest())


def _parse_csv(path: Path, data: bytes) -> dict[str, list[str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start})") from None
    records = list(csv.reader(io.StringIO(text)))
    if not records or not records[0]:
        raise ManifestError(f"{path}: empty manifest (no header line)")
    header = [name.strip() for name in records[0]]
    twice = sorted(name for name, n in Counter(header).items() if n > 1)
    if twice:
        raise ManifestError(f"{path}: header repeats columns {twice}")
    body = records[1:]
    while body and not body[-1]:
        body.pop()  # trailing blank lines are harmless; inner ones would shift every reported line number
    blank = [i + FIRST_LINE for i, r in enumerate(body) if not r]
    if blank:
        raise ManifestError(f"{path}: blank {_quote(blank, 'rows')}; remove them")
    short = [i + FIRST_LINE for i, r in enumerate(body) if len(r) != len(header)]
    if short:
        raise ManifestError(f"{path}: {_quote(short, 'rows')} do not have {len(header)} fields")
    cells = zip(*body, strict=True) if body else ([] for _ in header)
    return {name: [v.strip() for v in values] for name, values in zip(header, cells, strict=True)}


def _parse_parquet(path: Path) -> dict[str, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ManifestError(
            f"{path}: reading Parquet needs pyarrow; install it or save the manifest as CSV"
        ) from None
    table = pq.read_table(path)
    return {name: [_text(v) for v in table.column(name).to_pylist()] for name in table.column_names}


# --- writing ------------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A cell's text: None and NaN become '', integral floats lose their '.0' (pixel boxes, 0/1 codes)."""
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def write_manifest(rows: Iterable[Mapping[str, object]], path: str | Path) -> Path:
    """Write rows atomically in a deterministic layout: rows sorted by image_id; required, bbox, then other
    columns in name order. Parquet when the suffix says so (needs pyarrow), CSV otherwise."""
    path = Path(path)
    table = sorted((dict(row) for row in rows), key=lambda row: _text(row.get("image_id")))
    names = set().union(*table) if table else set(REQUIRED_COLUMNS)
    lacking = [name for name in REQUIRED_COLUMNS if name not in names]
    if lacking:
        raise ManifestError(f"{path}: rows lack required columns {lacking}")
    fixed = (*REQUIRED_COLUMNS, *BBOX_COLUMNS)
    header = [*REQUIRED_COLUMNS, *(c for c in BBOX_COLUMNS if c in names), *sorted(names - set(fixed))]
    cells = [[_text(row.get(name)) for name in header] for row in table]
    if path.suffix == ".parquet":
        atomic_write(path, _parquet_bytes(path, header, cells))
        return path
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(cells)
    atomic_write(path, buffer.getvalue().encode("utf-8"))
    return path


def _parquet_bytes(path: Path, header: list[str], cells: list[list[str]]) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ManifestError(f"{path}: writing Parquet needs pyarrow; install it or use a .csv name") from None
    table = pa.table({name: [row[j] for row in cells] for j, name in enumerate(header)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# --- validation ---------------------------------------------------------------------------------------------


@dataclass
class Issue:
    """One kind of fault, with every file row (and image id) it touches."""

    kind: str
    message: str
    rows: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f" ({_quote(self.rows, 'rows')})" if self.rows else ""
        return f"{self.kind}: {self.message}{where}"


@dataclass
class ValidationReport:
    """What :func:`validate` found: errors, and counts a person checks against the published ones."""

    path: Path
    images: int
    patients: int
    centers: dict[str, int]
    tasks: dict[str, dict[str, int]]  # task -> class -> images
    nan: dict[str, int]  # task -> images without a label (left out of that task, not an error)
    by_center: dict[str, dict[str, dict[str, int]]]  # task -> center -> class -> images
    extra_columns: list[str]  # neither canonical nor a known task (kept, ignored)
    errors: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        if self.ok:
            tasks = ", ".join(self.tasks) or "none"
            return f"{self.path}: valid, {self.images} images, {self.patients} patients, tasks {tasks}"
        kinds = Counter(issue.kind for issue in self.errors)
        first = self.errors[0]
        n = len(self.errors)
        return f"{self.path}: {n} {'error' if n == 1 else 'errors'} ({', '.join(kinds)}); first: {first}"

    def raise_for_errors(self) -> None:
        if self.errors:
            raise ManifestError(self.summary())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def validate(
    manifest: Manifest | str | Path, check_files: bool = True, tasks: Iterable[TaskSpec] = ()
) -> ValidationReport:
    """Check a manifest against the canonical layout and the given task specs (a column named by a task's key
    is that task's labels); never raises for content faults."""
    m = manifest if isinstance(manifest, Manifest) else _read_manifest(manifest)
    errors: list[Issue] = []
    lacking = [name for name in REQUIRED_COLUMNS if name not in m.columns]
    if lacking:
        errors.append(Issue("missing_columns", f"required columns {lacking} are absent"))
    col = {name: m.column(name) if name in m.columns else [""] * len(m) for name in REQUIRED_COLUMNS}
    ids, patients, centers = col["image_id"], col["patient_id"], col["center"]

    for name in REQUIRED_COLUMNS:
        if name in m.columns:
            empty = [i for i, v in enumerate(col[name]) if not v]
            _add(errors, "empty_value", f"empty {name}", empty, ids)
    uses = Counter(ids)
    dup = [i for i, image_id in enumerate(ids) if image_id and uses[image_id] > 1]
    _add(errors, "duplicate_id", "image_id used by more than one row", dup, ids)
    _check_duplicate_paths(m, errors, ids)
    if check_files and "path" in m.columns:
        root = os.fspath(m.root)
        missing = [
            i for i, rel in enumerate(col["path"]) if rel and not os.path.isfile(os.path.join(root, rel))
        ]
        _add(errors, "missing_file", f"image files not found under {m.root}", missing, ids)
    _check_bbox(m, errors, ids)
    _add(errors, "path_outside_root", f"image paths outside the manifest's folder (allow a folder with "
         f"${DATA_ROOTS_VAR})", outside_rows(m), ids)

    two = _clashes(patients, centers, range(len(m)))
    _add(errors, "patient_in_two_centers", "a patient appears in more than one center", two, ids)

    specs = {spec.key: spec for spec in tasks}
    counts: dict[str, dict[str, int]] = {}
    nan: dict[str, int] = {}
    by_center: dict[str, dict[str, dict[str, int]]] = {}
    for task in m.tasks(specs):
        classes = specs[task].classes
        values = m.column(task)
        outside = [i for i, v in enumerate(values) if v and v not in classes]
        _add(errors, "label_outside_mapping", f"{task} values not in {sorted(classes)}", outside, ids)
        labelled = [i for i, v in enumerate(values) if v in classes]
        conflict = _clashes(patients, values, labelled)
        _add(errors, "conflicting_labels", f"one patient with different {task} labels", conflict, ids)
        counts[task] = {name: 0 for name in classes} | Counter(values[i] for i in labelled)
        nan[task] = sum(1 for v in values if not v)
        per_center: dict[str, Counter] = defaultdict(Counter)
        for i in labelled:
            per_center[centers[i]][values[i]] += 1
        by_center[task] = {c: dict(n) for c, n in sorted(per_center.items())}

    canonical = {*REQUIRED_COLUMNS, *BBOX_COLUMNS}
    return ValidationReport(
        path=m.path,
        images=len(m),
        patients=len({p for p in patients if p}),
        centers=dict(sorted(Counter(c for c in centers if c).items())),
        tasks=counts,
        nan=nan,
        by_center=by_center,
        extra_columns=[name for name in m.columns if name not in canonical and name not in specs],
        errors=errors,
    )


def _check_duplicate_paths(m: Manifest, errors: list[Issue], ids: Sequence[str]) -> None:
    """One file under two rows (copied rows, or two ids/patients for one image) could put the same image in
    train and test; normalised paths (``a/./b.png`` is ``a/b.png``) must be unique."""
    if "path" not in m.columns:
        return
    paths = [os.path.normpath(rel) if rel else "" for rel in m.column("path")]
    uses = Counter(paths)
    dup = [i for i, rel in enumerate(paths) if rel and uses[rel] > 1]
    _add(errors, "duplicate_path", "one image file named by more than one row", dup, ids)


def _clashes(keys: Sequence[str], values: Sequence[str], positions: Iterable[int]) -> list[int]:
    """Positions (in order) whose key is seen with more than one value: a patient in two centers, or with
    two labels. One pass and a dict, no per-key lists, so 10^5 rows stay fast."""
    positions = list(positions)
    first: dict[str, str] = {}
    clashing = {keys[i] for i in positions if first.setdefault(keys[i], values[i]) != values[i]}
    return [i for i in positions if keys[i] in clashing] if clashing else []


def _add(errors: list[Issue], kind: str, message: str, positions: list[int], ids: Sequence[str]) -> None:
    if positions:
        rows = [i + FIRST_LINE for i in positions]
        shown = [ids[i] for i in positions]
        errors.append(Issue(kind, f"{message}: {_quote(shown, 'ids')}", rows, shown))


def _check_bbox(m: Manifest, errors: list[Issue], ids: Sequence[str]) -> None:
    present = [name for name in BBOX_COLUMNS if name in m.columns]
    if not present:
        return
    if len(present) < len(BBOX_COLUMNS):
        lacking = [name for name in BBOX_COLUMNS if name not in present]
        errors.append(Issue("missing_columns", f"bbox columns {lacking} are absent (give all four or none)"))
        return
    bad = []
    for i, values in enumerate(zip(*(m.column(name) for name in BBOX_COLUMNS), strict=True)):
        try:
            parse_bbox(values)
        except ValueError:
            bad.append(i)
    _add(errors, "bad_bbox", "bbox not four integers with 0 <= x0 < x1, 0 <= y0 < y1", bad, ids)
