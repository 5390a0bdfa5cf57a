"""Dataset specs (``data_manifests/*.yaml``) and the builders that turn official metadata into a manifest.

A spec is declarative: where the data comes from, which metadata columns hold the image id, patient, center
and labels, how each label maps to 0/1, how the dataset is cross-validated and what counts were published.
Builders are small functions per *file layout*, registered in :data:`BUILDERS`:

- ``table``: one metadata row per image; the image path comes from a pattern over the row's fields
  (AIforCOVID, CoCross, the ieee8023 collection, the synthetic cohort);
- ``dicom_tree``: one metadata row per patient; images are found by walking DICOM folders and joined on the
  DICOM PatientID (TCIA's COVID-19-NY-SBU and COVID-19-AR).

More spec folders can be named in ``FEATCACHE_DATASETS`` (``os.pathsep``-separated); a spec there replaces a
built-in one of the same name, so a user can adapt a layout to their download without editing the toolkit.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.errors import InvalidDicomError

from featcache.errors import FeatcacheError, ManifestError, UsageError
from featcache.manifest import (
    BBOX_COLUMNS,
    DATA_ROOTS_VAR,
    REQUIRED_COLUMNS,
    Manifest,
    ValidationReport,
    data_roots,
    inside,
    validate,
    write_manifest,
)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data_manifests"
ENV_VAR = "FEATCACHE_DATASETS"
CV_SCHEMES = ("kfold", "loco")
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null"})
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
_FIELD = re.compile(r"\{([^{}]+)\}")
_SHOWN = 5


def _canon(raw: object) -> str:
    """Case-folded text of a metadata value; integral numbers lose their '.0' (Excel turns 1 into 1.0)."""
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text.casefold()
    return str(int(number)) if number.is_integer() else text.casefold()


@dataclass(frozen=True)
class TaskSpec:
    """One prognostic task: the manifest column is named ``key``; ``column`` is the official metadata's."""

    dataset: str  # "" for an ad-hoc task on a label column of one manifest (see task_for)
    key: str
    column: str
    classes: dict[str, int]  # class name (as written in the manifest) -> 0/1
    positive: str
    cv: str  # "kfold" | "loco"
    k: int  # folds; for loco the number of centers
    has_centers: bool
    outcome: str = ""
    # raw metadata value -> class name, where they differ (e.g. Death 0/1 -> ALIVE/DEATH)
    values: dict[str, str] = field(default_factory=dict)

    @property
    def negative(self) -> str:
        return next(name for name, code in self.classes.items() if code == 0)

    @functools.cached_property
    def _lookup(self) -> dict[str, str]:
        table = {_canon(name): name for name in self.classes}
        table.update({_canon(raw): name for raw, name in self.values.items()})
        return table

    def classify(self, raw: object) -> str | None:
        """Class name of a raw metadata value; '' when missing, None when it maps to no class."""
        if raw is None or str(raw).strip().casefold() in MISSING_VALUES:
            return ""
        return self._lookup.get(_canon(raw))


@dataclass(frozen=True)
class RowFilter:
    """Keep a metadata row only if ``column`` is one of ``values`` (``in:``) or contains ``contains``."""

    column: str
    values: tuple[str, ...] = ()
    contains: str = ""

    def keeps(self, value: str) -> bool:
        if self.values and value not in self.values:
            return False
        return not self.contains or self.contains in value

    def __str__(self) -> str:
        return (
            f"{self.column} not in {list(self.values)}"
            if self.values
            else f"{self.column} lacks {self.contains!r}"
        )


@dataclass(frozen=True)
class MetadataSpec:
    """Which metadata files to read and which of their columns hold ids, patients and centers."""

    files: tuple[str, ...]  # glob patterns under the data root (CSV)
    patient_column: str
    id_column: str = ""  # table layout: the image id; dicom_tree uses the DICOM SOPInstanceUID
    center_column: str = ""
    center: str = ""  # the center name when the dataset has a single site
    filters: tuple[RowFilter, ...] = ()
    bbox_columns: tuple[str, ...] = ()  # x0, y0, x1, y1 columns, copied to the manifest's bbox columns


@dataclass(frozen=True)
class ImagesSpec:
    """Where the images are and how a metadata row names its image file."""

    dirs: tuple[str, ...]  # glob patterns of image folders under the root ("." = the root)
    pattern: str = ""  # table layout: file inside an image folder, "{column}" filled from the row
    suffixes: tuple[str, ...] = ()  # what counts as an image file (default: the pattern's suffix)
    modalities: tuple[str, ...] = ()  # dicom_tree: DICOM Modality values kept (others skipped and counted)


@dataclass(frozen=True)
class DatasetSpec:
    """One ``data_manifests/<name>.yaml``: provenance, layout, tasks, CV scheme and published counts."""

    name: str
    title: str
    source: str
    url: str
    licence: str
    obtain: str
    layout: str
    metadata: MetadataSpec
    images: ImagesSpec
    tasks: dict[str, TaskSpec]
    cv: str
    k: int
    centers: tuple[str, ...]
    published: dict[str, Any]
    notes: str
    file: Path

    @property
    def has_centers(self) -> bool:
        return bool(self.metadata.center_column)

    def columns_needed(self) -> list[str]:
        """Metadata columns the builder reads; a file without them is refused up front."""
        md = self.metadata
        names = [md.id_column, md.patient_column, md.center_column, *md.bbox_columns]
        names += [f.column for f in md.filters] + [t.column for t in self.tasks.values()]
        names += _FIELD.findall(self.images.pattern)
        return list(dict.fromkeys(n for n in names if n))


# --- spec files ---------------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one YAML mapping; every fault names the spec file and key."""

    def __init__(self, raw: Any, file: Path, where: str = ""):
        if not isinstance(raw, dict):
            raise ManifestError(f"{file}: {where or 'spec'} must be a mapping")
        self.raw, self.file, self.where = raw, file, where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type = str, default: Any = ...) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise ManifestError(f"{self.file}: missing key {self._name(key)!r}")
            return default
        value = self.raw[key]
        if kind is str and isinstance(value, (int, float)):
            value = _scalar(value, self.file, self._name(key))
        if not isinstance(value, kind):
            raise ManifestError(f"{self.file}: {self._name(key)!r} must be a {kind.__name__}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        return tuple(_scalar(v, self.file, self._name(key)) for v in self.get(key, list, []))

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), self.file, self._name(key))


def _scalar(value: Any, file: Path, where: str) -> str:
    """A YAML scalar as text; unquoted yes/no/true/false/on/off would arrive as booleans, so refuse them."""
    if isinstance(value, bool):
        raise ManifestError(
            f"{file}: {where}: quote {str(value).lower()!r}-like words, YAML reads them as booleans"
        )
    return str(value)


def _parse_task(reader: _Reader, dataset: str, key: str, cv: str, k: int, has_centers: bool) -> TaskSpec:
    where = f"tasks.{key}"
    classes = {_scalar(name, reader.file, where): code for name, code in reader.get("classes", dict).items()}
    positive = reader.get("positive")
    if sorted(map(str, classes.values())) != ["0", "1"] or classes.get(positive) != 1:
        raise ManifestError(
            f"{reader.file}: task {key}: classes must map one class to 0 and {positive!r} to 1"
        )
    values = {
        _scalar(raw, reader.file, where): _scalar(name, reader.file, where)
        for raw, name in reader.get("values", dict, {}).items()
    }
    unknown = sorted(set(values.values()) - set(classes))
    if unknown:
        raise ManifestError(f"{reader.file}: task {key}: values map to unknown classes {unknown}")
    return TaskSpec(
        dataset=dataset,
        key=key,
        column=reader.get("column"),
        classes=classes,
        positive=positive,
        cv=cv,
        k=k,
        has_centers=has_centers,
        outcome=reader.get("outcome", str, ""),
        values=values,
    )


def _parse_spec(file: Path) -> DatasetSpec:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ManifestError(f"{file}: unreadable dataset spec ({err})".replace("\n", " ")) from None
    spec = _Reader(raw, file)
    name, layout = spec.get("name"), spec.get("layout")
    if layout not in BUILDERS:
        raise ManifestError(f"{file}: layout {layout!r} is not one of {sorted(BUILDERS)}")
    md, im, cv_raw = spec.sub("metadata"), spec.sub("images"), spec.sub("cv")
    filters = []
    for i, item in enumerate(md.get("filters", list, [])):
        f = _Reader(item, file, f"metadata.filters[{i}]")
        filters.append(RowFilter(f.get("column"), f.strings("in"), f.get("contains", str, "")))
    metadata = MetadataSpec(
        files=md.strings("files"),
        patient_column=md.get("patient_column"),
        id_column=md.get("id_column", str, ""),
        center_column=md.get("center_column", str, ""),
        center=md.get("center", str, ""),
        filters=tuple(filters),
        bbox_columns=md.strings("bbox_columns"),
    )
    if len(metadata.bbox_columns) not in (0, len(BBOX_COLUMNS)):
        raise ManifestError(f"{file}: metadata.bbox_columns must name four columns (x0, y0, x1, y1) or none")
    if not metadata.files or bool(metadata.center_column) == bool(metadata.center):
        raise ManifestError(f"{file}: metadata needs files and exactly one of center_column / center")
    if layout == "table" and not (metadata.id_column and im.get("pattern", str, "")):
        raise ManifestError(f"{file}: layout 'table' needs metadata.id_column and images.pattern")
    images = ImagesSpec(
        im.strings("dirs") or (".",),
        im.get("pattern", str, ""),
        tuple(s.lower() for s in im.strings("suffixes")),
        im.strings("modalities"),
    )
    centers = spec.strings("centers")
    scheme = cv_raw.get("scheme")
    if scheme not in CV_SCHEMES:
        raise ManifestError(f"{file}: cv.scheme {scheme!r} is not one of {list(CV_SCHEMES)}")
    if scheme == "loco" and not (metadata.center_column and centers):
        raise ManifestError(f"{file}: leave-one-center-out needs metadata.center_column and a centers list")
    k = len(centers) if scheme == "loco" else int(cv_raw.get("k", int, 5))
    tasks_raw = spec.sub("tasks")
    tasks = {
        str(key): _parse_task(
            tasks_raw.sub(str(key)), name, str(key), scheme, k, bool(metadata.center_column)
        )
        for key in tasks_raw.raw
    }
    return DatasetSpec(
        name=name,
        title=spec.get("title"),
        source=spec.get("source"),
        url=spec.get("url", str, ""),
        licence=spec.get("licence"),
        obtain=spec.get("obtain"),
        layout=layout,
        metadata=metadata,
        images=images,
        tasks=tasks,
        cv=scheme,
        k=k,
        centers=centers,
        published=spec.get("published", dict, {}),
        notes=spec.get("notes", str, ""),
        file=file,
    )


def spec_dirs() -> tuple[Path, ...]:
    """Folders searched for specs, first wins: FEATCACHE_DATASETS's, then the built-in data_manifests/."""
    extra = tuple(Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p)
    for folder in extra:
        if not folder.is_dir():
            raise ManifestError(f"{ENV_VAR} names {folder}, which is not a folder")
    return (*extra, BUILTIN_DIR)


@functools.lru_cache(maxsize=8)
def _registry(dirs: tuple[Path, ...]) -> dict[str, DatasetSpec]:
    specs: dict[str, DatasetSpec] = {}
    for folder in dirs:
        for file in sorted(folder.glob("*.yaml")):
            spec = _parse_spec(file)
            specs.setdefault(spec.name, spec)
    owner: dict[str, Path] = {}
    for spec in specs.values():
        for key in spec.tasks:
            if key in owner:
                raise ManifestError(f"task key {key!r} is defined in both {owner[key]} and {spec.file}")
            owner[key] = spec.file
    return dict(sorted(specs.items()))


def list_datasets() -> list[str]:
    return list(_registry(spec_dirs()))


def get_dataset(name: str) -> DatasetSpec:
    specs = _registry(spec_dirs())
    if name not in specs:
        raise ManifestError(f"unknown dataset {name!r}; known: {', '.join(specs)} (specs in {BUILTIN_DIR})")
    return specs[name]


def list_tasks() -> list[str]:
    """Task keys of the dataset specs (ad-hoc tasks are not listed: they belong to one manifest)."""
    return [key for spec in _registry(spec_dirs()).values() for key in spec.tasks]


def _spec_task(key: str) -> TaskSpec | None:
    return next((spec.tasks[key] for spec in _registry(spec_dirs()).values() if key in spec.tasks), None)


# Ad-hoc tasks made by `task_for` in this process; `get_task` finds them by name like the specs' tasks, so
# labels, splits, probes and records need no second path.
_ADHOC: dict[str, TaskSpec] = {}


def get_task(key: str) -> TaskSpec:
    """A dataset spec's task, or an ad-hoc one :func:`task_for` made in this process."""
    spec = _spec_task(key) or _ADHOC.get(key)
    if spec is None:
        raise ManifestError(
            f"unknown task {key!r} (dataset spec tasks: {', '.join(list_tasks())}); a two-class column {key!r} "
            f"of your manifest is a task once its positive class is declared: `featcache splits --task {key} "
            f"--positive VALUE` (the split file keeps it), `tasks: {{{key}: {{positive: VALUE}}}}` in study.yaml, "
            f"or a dataset YAML in a folder named by ${ENV_VAR}"
        )
    return spec


def task_for(manifest: Manifest, key: str, positive: str | None = None) -> TaskSpec:
    """The task ``key`` on ``manifest``, for every command that takes ``--task`` (and ``--positive``).

    Without ``positive``: a dataset spec's task, one already made in this process, or the one the task's split
    file records (its classes, written by ``featcache splits --positive``). With it: the spec's
    task if ``key`` is one and ``positive`` is its positive class, else an ad-hoc task on the manifest's column
    ``key``, which must hold exactly two values (empty cells are unlabelled): ``positive`` is class 1, the
    other class 0, cross-validated 5-fold by patient. The ad-hoc task is registered for this process, so
    :func:`get_task` and everything downstream (labels, splits, probes, records) find it by name.
    """
    spec = _spec_task(key)
    if spec is not None:
        if positive is None or positive == spec.positive:
            return spec
        raise UsageError(f"task {key} is defined in {get_dataset(spec.dataset).file} with positive class "
                         f"{spec.positive!r}, not {positive!r}; drop --positive, or name a column of your own")
    if positive is None:
        if key in _ADHOC:
            return _ADHOC[key]
        recorded = _split_classes(manifest, key)
        if recorded is None:
            return get_task(key)
        positive = recorded[1]
    _ADHOC[key] = adhoc_task(manifest, key, positive)
    return _ADHOC[key]


def _split_classes(manifest: Manifest, key: str) -> tuple[str, ...] | None:
    """The (negative, positive) classes the task's split file beside ``manifest`` records, if it has one: a task
    declared once (``featcache splits --task X --positive V``) is known from then on to every command."""
    from featcache.splits import read_splits, splits_path  # splits imports this module

    try:
        path = splits_path(manifest.path, key)
    except FeatcacheError:
        return None
    if not path.is_file():
        return None
    classes = read_splits(path).classes
    return classes if len(classes) == 2 else None


def adhoc_task(manifest: Manifest, column: str, positive: str) -> TaskSpec:
    """A task on a two-class label column of ``manifest`` (see :func:`task_for`); refused in one line when
    the column is a layout column, absent, or does not hold exactly two values, one of them ``positive``."""
    if column in (*REQUIRED_COLUMNS, *BBOX_COLUMNS):
        raise UsageError(f"{column!r} is a manifest layout column, not a label column")
    values = sorted({v for v in manifest.column(column) if v})
    if len(values) != 2 or positive not in values:
        shown = ", ".join(repr(v) for v in values[:_SHOWN]) + (" ..." if len(values) > _SHOWN else "")
        need = "exactly two values" if len(values) != 2 else f"the value {positive!r}"
        raise ManifestError(f"{manifest.path}: column {column!r} holds {len(values)} value(s) ({shown or 'none'}); "
                            f"a task with --positive {positive!r} needs {need} (empty cells are unlabelled)")
    negative = next(v for v in values if v != positive)
    centers = {c for c in manifest.column("center") if c} if "center" in manifest.columns else set()
    return TaskSpec(dataset="", key=column, column=column, classes={negative: 0, positive: 1}, positive=positive,
                    cv="kfold", k=5, has_centers=len(centers) > 1, outcome=f"{column} = {positive}")


# --- building -----------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """One metadata row and where it came from (``file:line``) for messages."""

    fields: dict[str, str]
    where: str


@dataclass
class _Image:
    image_id: str
    file: Path
    record: _Record


@dataclass
class _Listing:
    """What a layout builder found: images joined to their metadata row, and what did not join."""

    images: list[_Image]
    missing: list[str]  # listed in the metadata, no image found
    unlisted: list[Path]  # image files no metadata row names
    skipped: Counter  # reason -> rows or files left out on purpose


@dataclass
class BuildReport:
    """The result of :func:`build_manifest`: the manifest's own validation plus what did not join."""

    dataset: str
    manifest: Path
    root: Path
    validation: ValidationReport
    published: dict[str, Any]
    missing: list[str]
    unlisted: list[str]  # paths relative to the root
    skipped: dict[str, int]
    unmapped: dict[str, dict[str, int]]  # task -> raw value -> images written without a label

    def comparison(self) -> list[tuple[str, int, int | None]]:
        """Rows of (what, found, published) for images, patients, each task's classes and, where published,
        each center's classes."""
        v, pub = self.validation, self.published
        rows: list[tuple[str, int, int | None]] = [
            ("images", v.images, pub.get("images")),
            ("patients", v.patients, pub.get("patients")),
        ]
        for task, counts in v.tasks.items():
            published = pub.get("tasks", {}).get(task, {})
            rows += [(f"{task} {name}", n, published.get(name)) for name, n in counts.items()]
            rows.append((f"{task} no label", v.nan[task], None))
        task = pub.get("centers_task", "")
        for center, published in pub.get("centers", {}).items():
            found = v.by_center.get(task, {}).get(str(center), {})
            rows += [
                (f"{task} center {center} {name}", found.get(name, 0), n) for name, n in published.items()
            ]
        return rows


def _image_dirs(root: Path, patterns: Iterable[str]) -> list[Path]:
    dirs: list[Path] = []
    for pattern in patterns:
        dirs += [root] if pattern in (".", "") else sorted(root.glob(pattern))
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _scan(root: Path, patterns: Iterable[str], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Image files under the image folders, keyed by their path inside their folder (first folder wins)."""
    found: dict[str, Path] = {}
    for folder in _image_dirs(root, patterns):
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.startswith(".") and name.lower().endswith(suffixes):
                    path = Path(dirpath, name)
                    found.setdefault(path.relative_to(folder).as_posix(), path)
    return found


def _delimiter(text: str) -> str:
    """The header's delimiter: spreadsheets saved in some locales write ';' (or tabs) instead of ','."""
    header = text.split("\n", 1)[0]
    return max(",;\t", key=header.count)


def _read_metadata(spec: DatasetSpec, root: Path) -> list[_Record]:
    files = sorted({f for pattern in spec.metadata.files for f in root.glob(pattern) if f.is_file()})
    if not files:
        sheets = sorted(
            {
                p.name
                for pattern in spec.metadata.files
                for p in root.glob(str(Path(pattern).with_suffix(".xls*")))
            }
        )
        hint = f"; found {', '.join(sheets)}: save it as CSV (UTF-8)" if sheets else ""
        raise ManifestError(
            f"{root}: no metadata file matching {list(spec.metadata.files)} for {spec.name}{hint}"
        )
    needed = spec.columns_needed()
    records = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise ManifestError(f"{file}: cannot read metadata as UTF-8 text ({err})") from None
        reader = csv.DictReader(io.StringIO(text), delimiter=_delimiter(text))
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        lacking = [name for name in needed if name not in header]
        if lacking:
            raise ManifestError(
                f"{file}: no column(s) {lacking} for {spec.name} (columns: {', '.join(header)})"
            )
        for row in reader:
            fields = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}
            records.append(_Record(fields, f"{file.name}:{reader.line_num}"))
    return records


def _rejected(spec: DatasetSpec, record: _Record) -> str:
    """The first filter a row fails, as a reason to count; '' when the row is kept."""
    return next((str(f) for f in spec.metadata.filters if not f.keeps(record.fields[f.column])), "")


def _fill(pattern: str, fields: dict[str, str]) -> str:
    """``"{ImageFile}.dcm"`` -> ``"P_1_23.dcm"``; field names may hold spaces and dots, unlike str.format."""
    return _FIELD.sub(lambda match: fields[match.group(1)], pattern)


def _build_table(spec: DatasetSpec, root: Path, records: list[_Record]) -> _Listing:
    suffixes = spec.images.suffixes or (Path(spec.images.pattern).suffix.lower(),)
    files = _scan(root, spec.images.dirs, tuple(s for s in suffixes if s) or IMAGE_SUFFIXES)
    named: set[Path] = set()
    images, missing, skipped = [], [], Counter()
    for record in records:
        rel = _fill(spec.images.pattern, record.fields)
        file = files.get(rel)
        if file is not None:
            named.add(file)
        reason = _rejected(spec, record)
        if reason:
            skipped[reason] += 1
        elif file is None:
            missing.append(f"{record.fields[spec.metadata.id_column]} ({record.where}: {rel})")
        else:
            images.append(_Image(record.fields[spec.metadata.id_column], file, record))
    return _Listing(images, missing, [f for f in files.values() if f not in named], skipped)


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientID", "Modality", "SOPInstanceUID"]
        )
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


def _build_dicom_tree(spec: DatasetSpec, root: Path, records: list[_Record]) -> _Listing:
    column = spec.metadata.patient_column
    patients: dict[str, _Record] = {}
    left_out: set[str] = set()
    twice, skipped = [], Counter()
    for record in records:
        pid = record.fields[column]
        reason = _rejected(spec, record)
        if reason:
            skipped[reason] += 1
            left_out.add(pid)
        elif pid in patients:
            twice.append(f"{pid} ({patients[pid].where}, {record.where})")
        else:
            patients[pid] = record
    if twice:
        raise ManifestError(f"{spec.name}: patients listed more than once: {', '.join(twice[:_SHOWN])}")
    keep = set(spec.images.modalities)
    images, unlisted, seen = [], [], set()
    for rel, file in _scan(root, spec.images.dirs, spec.images.suffixes or (".dcm",)).items():
        header = _dicom_header(file)
        if header is None:
            skipped["unreadable DICOM"] += 1
            continue
        modality = str(header.get("Modality", ""))
        if keep and modality not in keep:
            skipped[f"modality {modality or '(none)'}"] += 1
            continue
        pid = str(header.get("PatientID", "")) or rel.split("/", 1)[0]
        record = patients.get(pid)
        if record is None:
            if pid not in left_out:
                unlisted.append(file)
            continue
        seen.add(pid)
        image_id = str(header.get("SOPInstanceUID", "")) or str(Path(rel).with_suffix(""))
        images.append(_Image(image_id, file, record))
    kinds = "/".join(spec.images.modalities) or "DICOM"
    missing = [f"{pid} ({r.where}: no {kinds} images)" for pid, r in patients.items() if pid not in seen]
    return _Listing(images, missing, unlisted, skipped)


BUILDERS: dict[str, Callable[[DatasetSpec, Path, list[_Record]], _Listing]] = {
    "table": _build_table,
    "dicom_tree": _build_dicom_tree,
}


def _canonical_rows(
    spec: DatasetSpec, images: list[_Image], base: Path
) -> tuple[list[dict], dict[str, Counter]]:
    """Manifest rows (paths relative to the manifest's folder) and, per task, raw values of no class."""
    md = spec.metadata
    unmapped: dict[str, Counter] = {key: Counter() for key in spec.tasks}
    rows = []
    for image in images:
        fields = image.record.fields
        row = {
            "image_id": image.image_id,
            "path": Path(os.path.relpath(image.file, base)).as_posix(),
            "patient_id": fields[md.patient_column],
            "center": fields[md.center_column] if md.center_column else md.center,
        }
        if md.bbox_columns:
            row.update(zip(BBOX_COLUMNS, (fields[c] for c in md.bbox_columns), strict=True))
        for key, task in spec.tasks.items():
            name = task.classify(fields[task.column])
            if name is None:
                unmapped[key][fields[task.column]] += 1
            row[key] = name or ""
        rows.append(row)
    return rows, unmapped


def build_manifest(dataset: str | DatasetSpec, root: str | Path, out: str | Path) -> BuildReport:
    """Read a dataset's official metadata and image folders under ``root`` and write the canonical manifest.

    Image paths are written relative to ``out``'s folder, so ``load_manifest(out)`` finds them without a root.
    Labels that map to no class are written empty and reported (``unmapped``), never guessed.
    """
    spec = get_dataset(dataset) if isinstance(dataset, str) else dataset
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a folder")
    if not inside(root, data_roots(out.parent)):
        raise ManifestError(f"{out}: write the manifest in {root} or a folder above it, so its image paths stay "
                            f"inside its folder (or list {root} in ${DATA_ROOTS_VAR})")
    listing = BUILDERS[spec.layout](spec, root, _read_metadata(spec, root))
    if not listing.images:
        raise ManifestError(
            f"{root}: no {spec.name} images found in {list(spec.images.dirs)} "
            f"({len(listing.missing)} listed images missing; see {spec.file.name} 'obtain')"
        )
    rows, unmapped = _canonical_rows(spec, listing.images, out.parent)
    # Checked under another name first, so a manifest with errors never replaces a good one at `out`.
    candidate = write_manifest(rows, out.with_name(f"{out.stem}.invalid{out.suffix}"))
    validation = validate(candidate, check_files=False)
    if validation.ok:
        os.replace(candidate, out)
    return BuildReport(
        dataset=spec.name,
        manifest=out if validation.ok else candidate,
        root=root,
        validation=validation,
        published=spec.published,
        missing=listing.missing,
        unlisted=sorted(Path(os.path.relpath(f, root)).as_posix() for f in listing.unlisted),
        skipped=dict(listing.skipped),
        unmapped={key: dict(c) for key, c in unmapped.items() if c},
    )
