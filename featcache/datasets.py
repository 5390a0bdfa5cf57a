"""Dataset specs (``data_manifests/*.yaml``): provenance, layout, tasks, CV scheme and published counts.

A spec is declarative: where the data comes from and what to download, which metadata columns hold the image
id, patient, center, view and labels, how each label maps to 0/1, which images the benchmark's cohort keeps
(frontal radiographs; one image per patient or all) and what counts were published. The builders that turn a
release into a manifest read these specs (:mod:`featcache.builders`); this module imports no builder.

Specs are found in, first wins: the folders named in ``FEATCACHE_DATASETS`` (``os.pathsep``-separated; a spec
there replaces a built-in one of the same name), then the shipped ``data_manifests/`` (:func:`data_dir`). A
cohort of one's own (``featcache manifest build --table ...``) writes its spec beside its manifest as
``<task>.dataset.yaml``; :func:`task_for` reads it from there.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from featcache.errors import ManifestError, UsageError
from featcache.fileio import atomic_write
from featcache.manifest import BBOX_COLUMNS, REQUIRED_COLUMNS, Manifest
from featcache.tasks import CV_SCHEMES, TaskSpec, recorded_classes

ENV_VAR = "FEATCACHE_DATASETS"
LAYOUTS = ("table", "dicom_tree")
VIEWS = ("frontal", "all")
PER_PATIENT = ("first", "all")
OWN_SUFFIX = ".dataset.yaml"  # an own cohort's spec, beside its manifest
_SHOWN = 5
_FIELD = re.compile(r"\{([^{}]+)\}")


def data_dir() -> Path:
    """The shipped data folder (dataset specs, ``grids/``): the ``data_manifests`` package of an installed
    wheel, or the repository's top-level folder of the same name in a checkout. The one lookup for both."""
    try:
        return Path(str(importlib.resources.files("data_manifests")))
    except ModuleNotFoundError:  # an editable install made before the folder became a package
        return Path(__file__).resolve().parent.parent / "data_manifests"


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
    """Which metadata tables to read and which of their columns hold ids, patients, centers and views."""

    files: tuple[str, ...]  # glob patterns under the data root (CSV or Excel), or absolute paths
    patient_column: str
    id_column: str = ""  # table layout: the image id; dicom_tree uses the DICOM SOPInstanceUID
    center_column: str = ""
    center: str = ""  # the center name when the dataset has a single site (or the table does not say)
    filters: tuple[RowFilter, ...] = ()
    bbox_columns: tuple[str, ...] = ()  # x0, y0, x1, y1 columns, copied to the manifest's bbox columns
    sheet: str = ""  # Excel: the sheet holding the table (default: the first sheet with the columns)
    several: bool = False  # the release splits its table over several files (read them all)
    longitudinal: bool = False  # several rows per patient: one label per patient (the first non-empty)
    view_column: str = ""  # table layout: the radiograph's view (PA, AP, L, ...)
    modality_column: str = ""  # table layout: the modality (X-ray, CT)
    order_column: str = ""  # table layout: orders a patient's images (e.g. days since admission)


@dataclass(frozen=True)
class ImagesSpec:
    """Where the images are, how a metadata row names its image(s), and which images the cohort keeps."""

    dirs: tuple[str, ...]  # glob patterns of image folders under the root ("." = the root)
    patterns: tuple[str, ...] = ()  # table layout: "{column}" filled from the row; first that exists wins
    suffixes: tuple[str, ...] = ()  # what counts as an image file (default: the patterns' suffixes)
    modalities: tuple[str, ...] = ()  # DICOM Modality (or modality column) values kept; others counted
    views: str = "frontal"  # "frontal": laterals dropped and counted; "all"
    per_patient: str = "all"  # "first": one image per patient (the first study); "all"
    per_patient_why: str = ""  # why the benchmark's cohort keeps what it keeps


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
        """Metadata columns the builder reads; a table without them is not the metadata table."""
        md = self.metadata
        names = [md.id_column, md.patient_column, md.center_column, *md.bbox_columns, md.view_column,
                 md.modality_column, md.order_column]
        names += [f.column for f in md.filters] + [t.column for t in self.tasks.values()]
        names += [name for pattern in self.images.patterns for name in _FIELD.findall(pattern)]
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
    unknown = sorted(set(values.values()) - set(classes) - {""})  # "" = explicitly no label
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


def _choice(reader: _Reader, key: str, choices: tuple[str, ...], default: str) -> str:
    value = reader.get(key, str, default)
    if value not in choices:
        raise ManifestError(f"{reader.file}: {reader._name(key)} {value!r} is not one of {list(choices)}")
    return value


def _parse_spec(file: Path) -> DatasetSpec:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ManifestError(f"{file}: unreadable dataset spec ({err})".replace("\n", " ")) from None
    return parse_spec(raw, file)


def _parse_metadata(md: _Reader) -> MetadataSpec:
    file = md.file
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
        sheet=md.get("sheet", str, ""),
        several=md.get("several", bool, False),
        longitudinal=md.get("longitudinal", bool, False),
        view_column=md.get("view_column", str, ""),
        modality_column=md.get("modality_column", str, ""),
        order_column=md.get("order_column", str, ""),
    )
    if len(metadata.bbox_columns) not in (0, len(BBOX_COLUMNS)):
        raise ManifestError(f"{file}: metadata.bbox_columns must name four columns (x0, y0, x1, y1) or none")
    if not metadata.files or bool(metadata.center_column) == bool(metadata.center):
        raise ManifestError(f"{file}: metadata needs files and exactly one of center_column / center")
    return metadata


def _parse_images(im: _Reader) -> ImagesSpec:
    one = im.get("pattern", str, "")
    return ImagesSpec(
        dirs=im.strings("dirs") or (".",),
        patterns=im.strings("patterns") or ((one,) if one else ()),
        suffixes=tuple(s.lower() for s in im.strings("suffixes")),
        modalities=im.strings("modalities"),
        views=_choice(im, "views", VIEWS, "frontal"),
        per_patient=_choice(im, "per_patient", PER_PATIENT, "all"),
        per_patient_why=im.get("per_patient_why", str, ""),
    )


def parse_spec(raw: Any, file: Path) -> DatasetSpec:
    """A dataset spec from its YAML mapping; every fault names ``file`` and the key."""
    spec = _Reader(raw, file)
    name, layout = spec.get("name"), spec.get("layout")
    if layout not in LAYOUTS:
        raise ManifestError(f"{file}: layout {layout!r} is not one of {list(LAYOUTS)}")
    metadata, images = _parse_metadata(spec.sub("metadata")), _parse_images(spec.sub("images"))
    if layout == "table" and not (metadata.id_column and images.patterns):
        raise ManifestError(f"{file}: layout 'table' needs metadata.id_column and images.pattern(s)")
    centers, cv_raw = spec.strings("centers"), spec.sub("cv")
    scheme = cv_raw.get("scheme")
    if scheme not in CV_SCHEMES:
        raise ManifestError(f"{file}: cv.scheme {scheme!r} is not one of {list(CV_SCHEMES)}")
    if scheme == "loco" and not (metadata.center_column and centers):
        raise ManifestError(f"{file}: leave-one-center-out needs metadata.center_column and a centers list")
    k = len(centers) if scheme == "loco" else int(cv_raw.get("k", int, 5))
    tasks_raw = spec.sub("tasks")
    tasks = {str(key): _parse_task(tasks_raw.sub(str(key)), name, str(key), scheme, k, bool(metadata.center_column))
             for key in tasks_raw.raw}
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
    return (*extra, data_dir())


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
        raise ManifestError(f"unknown dataset {name!r}; known: {', '.join(specs)} (specs in {data_dir()})")
    return specs[name]


def list_tasks() -> list[str]:
    """Task keys of the dataset specs (ad-hoc tasks are not listed: they belong to one manifest)."""
    return [key for spec in _registry(spec_dirs()).values() for key in spec.tasks]


def _spec_task(key: str) -> TaskSpec | None:
    return next((spec.tasks[key] for spec in _registry(spec_dirs()).values() if key in spec.tasks), None)


# Ad-hoc and own-cohort tasks `task_for` made or read in this process; `get_task` finds them by name like the
# specs' tasks, so labels, splits, probes and records need no second path.
_ADHOC: dict[str, TaskSpec] = {}


def own_spec_path(manifest: str | Path, task: str) -> Path:
    """Where an own cohort's spec lies: beside its manifest, named for its task."""
    return Path(manifest).parent / f"{task}{OWN_SUFFIX}"


def own_dataset(raw: dict[str, Any], file: Path) -> DatasetSpec:
    """An own cohort's spec (see :func:`parse_spec`), refused when a task key is a dataset spec's."""
    spec = parse_spec(raw, file)
    for key in spec.tasks:
        if (taken := _spec_task(key)) is not None:
            raise UsageError(f"task {key!r} belongs to dataset spec {get_dataset(taken.dataset).file}; name "
                             "yours otherwise (--task NAME)")
    return spec


def write_own_spec(raw: dict[str, Any], file: Path) -> DatasetSpec:
    """Check an own cohort's spec (:func:`own_dataset`) and write it as YAML, atomically."""
    spec = own_dataset(raw, file)
    text = "# A cohort of one's own, written by `featcache manifest build --table ...`; edit freely.\n"
    atomic_write(file, (text + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)).encode("utf-8"))
    return spec


def _own_tasks(file: Path) -> dict[str, TaskSpec]:
    """The tasks of an own cohort's spec, with dataset '' like an ad-hoc task's, so a split file made for one
    records its classes."""
    return {key: replace(task, dataset="") for key, task in _parse_spec(file).tasks.items()}


def _own_task(manifest: str | Path, key: str) -> tuple[TaskSpec, Path] | None:
    """The task ``key`` of an own cohort's spec beside ``manifest`` (``<key>.dataset.yaml``), with its file."""
    file = own_spec_path(manifest, key)
    if not file.is_file():
        return None
    tasks = _own_tasks(file)
    if key not in tasks:
        raise ManifestError(f"{file}: defines tasks {list(tasks)}, not {key!r}")
    return tasks[key], file


def tasks_of(manifest: str | Path | Manifest) -> list[TaskSpec]:
    """Every task a manifest's columns may hold: the dataset specs' and those of own cohort specs beside it."""
    folder = Path(manifest.path if isinstance(manifest, Manifest) else manifest).parent
    found = {key: spec.tasks[key] for spec in _registry(spec_dirs()).values() for key in spec.tasks}
    for file in sorted(folder.glob(f"*{OWN_SUFFIX}")):
        for key, task in _own_tasks(file).items():
            found.setdefault(key, task)
    return list(found.values())


def get_task(key: str) -> TaskSpec:
    """A dataset spec's task, or an ad-hoc one :func:`task_for` made in this process."""
    spec = _spec_task(key) or _ADHOC.get(key)
    if spec is None:
        raise ManifestError(
            f"unknown task {key!r} (dataset spec tasks: {', '.join(list_tasks())}); a two-class column {key!r} "
            f"of your manifest is a task once its positive class is declared: `featcache splits --task {key} "
            f"--positive VALUE` (the split file keeps it), `tasks: {{{key}: {{positive: VALUE}}}}` in study.yaml, "
            f"`featcache manifest build --table ... --task {key}`, or a dataset YAML in a folder named by "
            f"${ENV_VAR}"
        )
    return spec


def task_for(manifest: Manifest, key: str, positive: str | None = None) -> TaskSpec:
    """The task ``key`` on ``manifest``, for every command that takes ``--task`` (and ``--positive``).

    Without ``positive``: a dataset spec's task, an own cohort's (``<key>.dataset.yaml`` beside the manifest,
    written by ``manifest build --table``), one already made in this process, or the one the task's split file
    records (its classes, written by ``featcache splits --positive``). With it: the same if ``key`` is one and
    ``positive`` is its positive class, else an ad-hoc task on the manifest's column
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
    if (own := _own_task(manifest.path, key)) is not None:
        task, file = own
        if positive is not None and positive != task.positive:
            raise UsageError(f"task {key} is defined in {file} with positive class {task.positive!r}, not "
                             f"{positive!r}; drop --positive, or edit that file and rebuild the splits")
        _ADHOC[key] = task
        return task
    if positive is None:
        if key in _ADHOC:
            return _ADHOC[key]
        recorded = recorded_classes(manifest.path, key)
        if recorded is None:
            return get_task(key)
        positive = recorded[1]
    _ADHOC[key] = adhoc_task(manifest, key, positive)
    return _ADHOC[key]


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


