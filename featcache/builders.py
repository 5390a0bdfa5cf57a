"""Builders: a dataset's release, as its publisher ships it, becomes the canonical manifest and a summary.

Two layouts, chosen by the spec (:mod:`featcache.datasets`):

- ``table``: metadata rows name their image file (or folder of images) through ``images.patterns`` (AIforCOVID,
  CoCross, the ieee8023 collection, the synthetic cohort, a cohort of one's own);
- ``dicom_tree``: one metadata row per patient; images are found by walking the DICOM folders and joined on
  the DICOM PatientID (TCIA's COVID-19-NY-SBU and COVID-19-AR).

Both then keep the benchmark's cohort: radiographs (CT and other modalities dropped), frontal views (laterals
dropped; an unknown view kept and counted), images with a label, and one image per patient (the first study)
or all of them, as the spec says. Every image left out is counted by reason, and the summary written beside the
manifest sets each task's counts against the published ones.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from featcache.datasets import DatasetSpec, get_dataset, own_dataset, own_spec_path, write_own_spec
from featcache.errors import ManifestError, UsageError
from featcache.fileio import atomic_write
from featcache.manifest import (
    BBOX_COLUMNS,
    DATA_ROOTS_VAR,
    ValidationReport,
    data_roots,
    inside,
    validate,
    write_manifest,
)
from featcache.tables import Table, find_tables, read_table
from featcache.tasks import TaskSpec, canon, is_missing

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
NOT_FRONTAL, CT, NO_LABEL, NO_FILE, UNREADABLE, DUPLICATE = (
    "not frontal", "CT", "no label", "no file", "unreadable", "duplicate")
LATER = "later image of a patient (one per patient)"
_FIELD = re.compile(r"\{([^{}]+)\}")
_SHOWN = 5
_DICOM_TAGS = ["PatientID", "Modality", "SOPInstanceUID", "ViewPosition", "SeriesDescription", "StudyDescription",
               "StudyDate", "StudyTime", "SeriesNumber", "InstanceNumber"]


# --- views ----------------------------------------------------------------------------------------------------

_LATERAL_VALUES = {"L", "LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
_FRONTAL_WORDS = {"PA", "AP", "FRONTAL"}
_LATERAL_WORDS = {"LAT", "LATERAL", "LL", "RL"}


def _words(text: object) -> list[str]:
    return re.findall(r"[A-Z0-9]+", str(text or "").upper())


def view_of(value: object, *descriptions: object) -> str:
    """'frontal', 'lateral' or '' (unknown) from a view value (DICOM ViewPosition, a table's view column:
    PA, AP, AP Supine, AP erect, L, LL, ...), else from free-text descriptions (SeriesDescription, then
    StudyDescription), where a text naming both views (a "PA AND LAT" study) says nothing."""
    words = _words(value)
    if words and words[0] in ("PA", "AP", "FRONTAL"):
        return "frontal"
    if " ".join(words) in _LATERAL_VALUES:
        return "lateral"
    for text in descriptions:
        found = set(_words(text))
        lateral, frontal = bool(found & _LATERAL_WORDS), bool(found & _FRONTAL_WORDS)
        if lateral != frontal:
            return "lateral" if lateral else "frontal"
    return ""


def _modality_reason(value: str) -> str:
    return CT if canon(value) == "ct" else f"modality {value or '(none)'}"


# --- what a build reads and finds ----------------------------------------------------------------------------


@dataclass
class _Record:
    """One metadata row (or one patient's rows) and where it came from (``file:line``) for messages."""

    fields: dict[str, str]
    where: str
    labels: dict[str, str]  # task -> class name ('' = no label)


@dataclass
class _Image:
    image_id: str
    file: Path
    record: _Record
    order: tuple = ()  # sorts a patient's images, first study first
    view: str = ""


@dataclass
class _Listing:
    """What a layout builder found: images joined to their metadata row, and what did not join."""

    images: list[_Image]
    missing: list[str]  # listed in the metadata, no image found
    unlisted: list[Path]  # image files no metadata row names
    skipped: Counter = field(default_factory=Counter)


@dataclass
class BuildReport:
    """The result of a build: the manifest's own validation, the cohort's counts and what was left out."""

    dataset: str
    manifest: Path
    root: Path
    validation: ValidationReport
    published: dict[str, Any]
    missing: list[str]
    unlisted: list[str]  # paths relative to the root
    skipped: dict[str, int]
    tasks: dict[str, dict[str, Any]]  # task -> images, patients, positives, negatives, centers
    tables: list[str] = field(default_factory=list)  # the metadata tables read
    ignored: list[str] = field(default_factory=list)  # files beside them left aside, and why
    notes: list[str] = field(default_factory=list)  # columns read under another spelling, duplicated columns
    view_unknown: int = 0  # images kept whose view no header or column states
    cohort: dict[str, str] = field(default_factory=dict)  # views, per_patient
    summary_path: Path | None = None

    def comparison(self) -> list[tuple[str, int, int | None]]:
        """Rows of (what, found, published): images and patients, then per task its images, patients and
        classes, and per center where the spec publishes them."""
        v, pub = self.validation, self.published
        rows: list[tuple[str, int, int | None]] = [
            ("images", v.images, pub.get("images")),
            ("patients", v.patients, pub.get("patients")),
        ]
        for task, counts in self.tasks.items():
            published = pub.get("tasks", {}).get(task, {})
            rows += [(f"{task} images", counts["images"], published.get("images")),
                     (f"{task} patients", counts["patients"], published.get("patients"))]
            rows += [(f"{task} {name}", n, published.get(name)) for name, n in counts["classes"].items()]
            by_center = {str(c): n for c, n in pub.get("centers", {}).items()} if task == pub.get("centers_task") \
                else {}
            found = v.by_center.get(task, {})
            if len(found) > 1 or by_center:
                for center in sorted({*found, *by_center}):
                    rows += [(f"{task} center {center} {name}", found.get(center, {}).get(name, 0),
                              by_center.get(center, {}).get(name)) for name in counts["classes"]]
        return rows

    def summary(self) -> dict[str, Any]:
        """What the JSON beside the manifest holds."""
        return {
            "dataset": self.dataset,
            "manifest": str(self.manifest),
            "tables": self.tables,
            "ignored": self.ignored,
            "notes": self.notes,
            "cohort": self.cohort,
            "images": self.validation.images,
            "patients": self.validation.patients,
            "tasks": self.tasks,
            "published": self.published,
            "comparison": [{"what": w, "found": f, "published": p, "difference": None if p is None else f - p}
                           for w, f, p in self.comparison()],
            "skipped": self.skipped,
            "view_unknown_kept": self.view_unknown,
            "missing": len(self.missing),
            "unmatched_images": len(self.unlisted),
        }


# --- metadata -----------------------------------------------------------------------------------------------


def _glob(root: Path, patterns: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        if pattern in (".", ""):
            found.append(root)
        elif Path(pattern).is_absolute():
            found += [Path(pattern)] if Path(pattern).exists() else []
        else:
            found += sorted(root.glob(pattern))
    return list(dict.fromkeys(found))


def _read_tables(spec: DatasetSpec, root: Path, tables: list[Path] | None) -> tuple[list[Table], list[str]]:
    files = tables or [f for f in _glob(root, spec.metadata.files) if f.is_file()]
    if not files:
        raise ManifestError(f"{root}: no metadata table matching {list(spec.metadata.files)} for {spec.name} "
                            f"(see `obtain:` in {spec.file.name}; or name the file with --table)")
    for file in files:
        if not file.is_file():
            raise ManifestError(f"{file}: no such table")
    return find_tables(files, spec.columns_needed(), spec.metadata.sheet, spec.metadata.several, spec.name)


def _rejected(spec: DatasetSpec, fields: dict[str, str]) -> str:
    """Why a metadata row is left out ('' when kept): a modality that is not kept, or a failed filter."""
    md, keep = spec.metadata, spec.images.modalities
    if md.modality_column and keep and canon(fields[md.modality_column]) not in {canon(m) for m in keep}:
        return _modality_reason(fields[md.modality_column])
    return next((str(f) for f in md.filters if not f.keeps(fields[f.column])), "")


def _records(spec: DatasetSpec, tables: list[Table], skipped: Counter) -> tuple[list[_Record], list[_Record]]:
    """Kept metadata rows with their labels, and the rows left out on purpose (their images are listed, not
    unmatched); a label value outside a task's mapping is refused, naming its rows."""
    records, rejected, bad = [], [], []
    for table in tables:
        for i, fields in enumerate(table.rows):
            if reason := _rejected(spec, fields):
                skipped[reason] += 1
                rejected.append(_Record(fields, table.where(i), {}))
                continue
            labels = {}
            for key, task in spec.tasks.items():
                name = task.classify(fields[task.column])
                if name is None:
                    bad.append(f"{table.where(i)} {task.column}={fields[task.column]!r}")
                labels[key] = name or ""
            records.append(_Record(fields, table.where(i), labels))
    if bad:
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        accepted = "; ".join(f"{key}: {task.mapping()}" for key, task in spec.tasks.items())
        raise ManifestError(f"label values outside the mapping of {spec.file.name} ({accepted}): "
                            f"{', '.join(bad[:_SHOWN])}{more}; add them under tasks.<key>.values (\"\" = no label)")
    return (_per_patient(spec, records) if spec.metadata.longitudinal else records), rejected


def _per_patient(spec: DatasetSpec, records: list[_Record]) -> list[_Record]:
    """One record per patient of a longitudinal table: its first row, each label the first non-empty one;
    patients whose rows disagree on a label are refused in one line."""
    column = spec.metadata.patient_column
    first: dict[str, _Record] = {}
    clash: dict[str, set[str]] = defaultdict(set)
    for record in records:
        pid = record.fields[column]
        kept = first.setdefault(pid, _Record(dict(record.fields), record.where, dict(record.labels)))
        for key, name in record.labels.items():
            if name and not kept.labels[key]:
                kept.labels[key] = name
            elif name and kept.labels[key] != name:
                clash[pid].add(key)
    if clash:
        ids = sorted(clash)
        more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
        tasks = sorted(set().union(*clash.values()))
        raise ManifestError(f"{spec.name}: {len(ids)} patients whose rows disagree on {', '.join(tasks)}: "
                            f"{', '.join(ids[:_SHOWN])}{more}")
    return list(first.values())


# --- layouts ------------------------------------------------------------------------------------------------


def _scan(dirs: list[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Image files under the image folders, keyed by their path inside their folder (first folder wins)."""
    found: dict[str, Path] = {}
    for folder in dirs:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.startswith(".") and name.lower().endswith(suffixes):
                    path = Path(dirpath, name)
                    found.setdefault(path.relative_to(folder).as_posix(), path)
    return found


def _fill(pattern: str, fields: dict[str, str]) -> str:
    """``"{ImageFile}.dcm"`` -> ``"P_1_23.dcm"``; field names may hold spaces and dots, unlike str.format."""
    return _FIELD.sub(lambda match: fields[match.group(1)], pattern)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


class _Index:
    """Files by path, by path without suffix, and by folder: a pattern may name a file, omit its suffix
    (``P_42`` for ``P_42.dcm``) or name a folder holding a patient's images."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.stems: dict[str, list[str]] = defaultdict(list)
        self.folders: dict[str, list[str]] = defaultdict(list)
        for rel in files:
            self.stems[str(Path(rel).with_suffix(""))].append(rel)
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                self.folders["/".join(parts[:depth])].append(rel)

    def find(self, rel: str) -> tuple[list[str], bool]:
        """The files ``rel`` names, and whether it named a folder."""
        rel = rel.strip("/")
        if rel in self.files:
            return [rel], False
        if len(self.stems.get(rel, [])) == 1:
            return self.stems[rel], False
        return self.folders.get(rel, []), True


def _build_table(spec: DatasetSpec, root: Path, records: list[_Record], rejected: list[_Record]) -> _Listing:
    im, md = spec.images, spec.metadata
    suffixes = im.suffixes or tuple(s for s in (Path(p).suffix.lower() for p in im.patterns) if s) or IMAGE_SUFFIXES
    index = _Index(_scan([d for d in _glob(root, im.dirs) if d.is_dir()], suffixes))
    named: set[str] = set()
    images, missing = [], []
    for n, record in enumerate(records):
        tried = [_fill(p, record.fields) for p in im.patterns]
        found, folder = next((hits for rel in tried if (hits := index.find(rel))[0]), ([], False))
        if not found:
            missing.append(f"{record.fields[md.id_column]} ({record.where}: {tried[0]})")
            continue
        view = view_of(record.fields[md.view_column]) if md.view_column else ""
        order = _number(record.fields[md.order_column]) if md.order_column else 0.0
        base = record.fields[md.id_column]
        for rel in found:
            image_id = f"{base}/{Path(rel).with_suffix('').name}" if folder else base
            images.append(_Image(image_id, index.files[rel], record, (order, n, rel), view))
        named.update(found)
    for record in rejected:
        named.update(next((files for p in im.patterns if (files := index.find(_fill(p, record.fields))[0])), []))
    unlisted = [path for rel, path in index.files.items() if rel not in named]
    return _Listing(images, missing, unlisted)


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError):
        return None


def _tag(header: pydicom.Dataset, name: str) -> str:
    return str(header.get(name, "") or "").strip()


def _build_dicom_tree(spec: DatasetSpec, root: Path, records: list[_Record], rejected: list[_Record]) -> _Listing:
    column = spec.metadata.patient_column
    left_out = {record.fields[column] for record in rejected}
    patients: dict[str, _Record] = {}
    twice = []
    for record in records:
        pid = record.fields[column]
        if pid in patients:
            twice.append(f"{pid} ({patients[pid].where}, {record.where})")
        patients.setdefault(pid, record)
    if twice:
        raise ManifestError(f"{spec.name}: patients listed more than once: {', '.join(twice[:_SHOWN])} (a table "
                            "with several rows per patient needs `longitudinal: true` in its spec)")
    keep = {canon(m) for m in spec.images.modalities}
    images, seen = [], set()
    unlisted: list[Path] = []
    skipped: Counter[str] = Counter()
    dirs = [d for d in _glob(root, spec.images.dirs) if d.is_dir()]
    for rel, file in _scan(dirs, spec.images.suffixes or (".dcm",)).items():
        header = _dicom_header(file)
        if header is None:
            skipped[UNREADABLE] += 1
            continue
        modality = _tag(header, "Modality")
        if keep and canon(modality) not in keep:
            skipped[_modality_reason(modality)] += 1
            continue
        pid = _tag(header, "PatientID") or rel.split("/", 1)[0]
        listed = patients.get(pid)
        if listed is None:
            if pid not in left_out:
                unlisted.append(file)
            continue
        seen.add(pid)
        image_id = _tag(header, "SOPInstanceUID") or str(Path(rel).with_suffix(""))
        order = (_tag(header, "StudyDate") or "99999999", _tag(header, "StudyTime"),
                 _number(_tag(header, "SeriesNumber")), _number(_tag(header, "InstanceNumber")), rel)
        view = view_of(_tag(header, "ViewPosition"), _tag(header, "SeriesDescription"),
                       _tag(header, "StudyDescription"))
        images.append(_Image(image_id, file, listed, order, view))
    kinds = "/".join(spec.images.modalities) or "DICOM"
    missing = [f"{pid} ({r.where}: no {kinds} images)" for pid, r in patients.items() if pid not in seen]
    return _Listing(images, missing, unlisted, skipped)


LAYOUT_BUILDERS: dict[str, Callable[[DatasetSpec, Path, list[_Record], list[_Record]], _Listing]] = {
    "table": _build_table,
    "dicom_tree": _build_dicom_tree,
}


# --- the cohort ---------------------------------------------------------------------------------------------


def _cohort(spec: DatasetSpec, images: list[_Image], views: str, per_patient: str,
            skipped: Counter) -> tuple[list[_Image], int]:
    """The benchmark's cohort: frontal views (unknown kept and counted), labelled, no file or id twice, and
    one image per patient (the first study) where asked. Returns the images and how many had no known view."""
    kept, unknown, files, ids = [], 0, set(), set()
    for image in images:
        if views == "frontal" and image.view == "lateral":
            skipped[NOT_FRONTAL] += 1
        elif not any(image.record.labels.values()):
            skipped[NO_LABEL] += 1
        elif image.file in files or image.image_id in ids:
            skipped[DUPLICATE] += 1
        else:
            files.add(image.file)
            ids.add(image.image_id)
            unknown += views == "frontal" and not image.view
            kept.append(image)
    if per_patient == "first":
        column = spec.metadata.patient_column
        first: dict[str, _Image] = {}
        for image in sorted(kept, key=lambda i: i.order):
            if first.setdefault(image.record.fields[column], image) is not image:
                skipped[LATER] += 1
        kept = [i for i in kept if first[i.record.fields[column]] is i]
    return kept, unknown


def _rows(spec: DatasetSpec, images: list[_Image], base: Path) -> list[dict]:
    """Manifest rows (paths relative to the manifest's folder)."""
    md = spec.metadata
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
        row.update(image.record.labels)
        rows.append(row)
    return rows


def _task_counts(rows: list[dict], tasks: Iterable[TaskSpec]) -> dict[str, dict[str, Any]]:
    """Per task: labelled images, patients, positives and negatives, overall and per center."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        labelled = [r for r in rows if r[task.key]]
        centers: dict[str, dict[str, int]] = {}
        for center in sorted({r["center"] for r in labelled}):
            mine = [r for r in labelled if r["center"] == center]
            pos = sum(r[task.key] == task.positive for r in mine)
            centers[center] = {"images": len(mine), "positives": pos, "negatives": len(mine) - pos}
        positives = sum(r[task.key] == task.positive for r in labelled)
        out[task.key] = {
            "images": len(labelled),
            "patients": len({r["patient_id"] for r in labelled}),
            "positives": positives,
            "negatives": len(labelled) - positives,
            "positive": task.positive,
            "negative": task.negative,
            "classes": {name: sum(r[task.key] == name for r in labelled) for name in task.classes},
            "centers": centers,
        }
    return out


def summary_path(manifest: Path) -> Path:
    """The build summary beside a manifest: ``manifest.csv`` -> ``manifest.summary.json``."""
    return manifest.with_name(f"{manifest.stem}.summary.json")


def build_manifest(dataset: str | DatasetSpec, root: str | Path, out: str | Path, *,
                   tables: Iterable[str | Path] = (), views: str | None = None,
                   per_patient: str | None = None) -> BuildReport:
    """Read a dataset's release under ``root`` (metadata tables as shipped, image folders) and write the
    canonical manifest at ``out`` with its summary beside it (:func:`summary_path`).

    ``tables`` names the metadata file(s) instead of the spec's patterns; ``views`` ("frontal" | "all") and
    ``per_patient`` ("first" | "all") override the spec's cohort. Image paths are written relative to ``out``'s
    folder. A manifest with layout errors is written as ``<out>.invalid`` for inspection, never at ``out``.
    """
    spec = get_dataset(dataset) if isinstance(dataset, str) else dataset
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a folder")
    if not inside(root, data_roots(out.parent)):
        raise ManifestError(f"{out}: write the manifest in {root} or a folder above it, so its image paths stay "
                            f"inside its folder (or list {root} in ${DATA_ROOTS_VAR})")
    views = views or spec.images.views
    per_patient = per_patient or spec.images.per_patient
    found, ignored = _read_tables(spec, root, [Path(t) for t in tables] or None)
    skipped: Counter = Counter()
    records, rejected = _records(spec, found, skipped)
    listing = LAYOUT_BUILDERS[spec.layout](spec, root, records, rejected)
    skipped.update(listing.skipped)
    if listing.missing:
        skipped[NO_FILE] += len(listing.missing)
    images, unknown = _cohort(spec, listing.images, views, per_patient, skipped)
    if not images:
        raise ManifestError(f"{root}: no {spec.name} images kept from {list(spec.images.dirs)} "
                            f"({len(listing.missing)} listed images missing, skipped: {dict(skipped) or 'none'}; "
                            f"see `obtain:` in {spec.file.name})")
    rows = _rows(spec, images, out.parent)
    # Checked under another name first, so a manifest with errors never replaces a good one at `out`.
    candidate = write_manifest(rows, out.with_name(f"{out.stem}.invalid{out.suffix}"))
    validation = validate(candidate, check_files=False, tasks=spec.tasks.values())
    report = BuildReport(
        dataset=spec.name,
        manifest=candidate,
        root=root,
        validation=validation,
        published=spec.published,
        missing=listing.missing,
        unlisted=sorted(Path(os.path.relpath(f, root)).as_posix() for f in listing.unlisted),
        skipped=dict(skipped),
        tasks=_task_counts(rows, spec.tasks.values()),
        tables=[str(t.file) + (f" (sheet {t.sheet})" if t.sheet else "") for t in found],
        ignored=ignored,
        notes=[note for t in found for note in t.notes],
        view_unknown=unknown,
        cohort={"views": views, "per_patient": per_patient},
    )
    if validation.ok:
        os.replace(candidate, out)
        report.manifest, report.validation.path = out, out
        report.summary_path = summary_path(out)
        atomic_write(report.summary_path, json.dumps(report.summary(), indent=1).encode("utf-8"))
    return report


# --- a cohort of one's own ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnCohort:
    """``featcache manifest build --table FILE --images DIR ...``: one table, one image folder, one task."""

    table: Path
    images: Path
    image_col: str
    patient_col: str
    label_col: str
    positive: str
    center_col: str = ""
    task: str = ""  # default: the label column's name
    sheet: str = ""

    @property
    def key(self) -> str:
        return self.task or self.label_col


def _relative(path: Path, root: Path) -> str:
    path = path.resolve()
    return path.relative_to(root.resolve()).as_posix() if inside(path, (str(root.resolve()),)) else str(path)


def own_spec(cohort: OwnCohort, out: Path) -> dict[str, Any]:
    """The dataset spec (as its YAML mapping) of an own cohort whose manifest is ``out``: the label column must
    hold exactly two values, one of them ``positive``."""
    columns = [c for c in (cohort.image_col, cohort.patient_col, cohort.label_col, cohort.center_col) if c]
    table = read_table(cohort.table, columns, cohort.sheet)
    spelled = {canon(r[cohort.label_col]): r[cohort.label_col] for r in reversed(table.rows)
               if not is_missing(r[cohort.label_col])}  # canonical value -> its first spelling
    values = sorted(spelled)
    positive = canon(cohort.positive)
    if len(values) != 2 or positive not in values:
        need = "exactly two values" if len(values) != 2 else f"the value {cohort.positive!r}"
        shown = ", ".join(repr(spelled[v]) for v in values[:_SHOWN]) + (" ..." if len(values) > _SHOWN else "")
        raise ManifestError(f"{cohort.table}: column {cohort.label_col!r} holds {len(values)} value(s) "
                            f"({shown or 'none'}); a task with --positive {cohort.positive!r} needs {need}")
    negative = next(v for v in values if v != positive)
    neg, pos = spelled[negative], spelled[positive]
    root = out.parent
    metadata: dict[str, Any] = {"files": [_relative(cohort.table, root)], "id_column": cohort.image_col,
                                "patient_column": cohort.patient_col}
    metadata |= {"center_column": cohort.center_col} if cohort.center_col else {"center": "all"}
    if cohort.sheet:
        metadata["sheet"] = cohort.sheet
    return {
        "name": cohort.key,
        "title": f"{cohort.key} (a cohort of one's own)",
        "source": f"{cohort.table.name}, {cohort.label_col} = {pos}",
        "licence": "the owner's",
        "obtain": f"featcache manifest build --table {cohort.table} --images {cohort.images} --image-col "
                  f"{cohort.image_col!r} --patient-col {cohort.patient_col!r} --label-col {cohort.label_col!r} "
                  f"--positive {pos!r} --task {cohort.key} --out {out}",
        "layout": "table",
        "metadata": metadata,
        "images": {"dirs": [_relative(cohort.images, root)], "patterns": [f"{{{cohort.image_col}}}"],
                   "suffixes": list(IMAGE_SUFFIXES), "views": "all", "per_patient": "all"},
        "cv": {"scheme": "kfold", "k": 5},
        "tasks": {cohort.key: {"outcome": f"{cohort.label_col} = {pos}", "column": cohort.label_col,
                               "classes": {neg: 0, pos: 1}, "positive": pos}},
    }


def build_own(cohort: OwnCohort, out: str | Path, *, views: str | None = None,
              per_patient: str | None = None) -> BuildReport:
    """Build an own cohort's manifest at ``out`` and, once it is valid, write its task's spec beside it
    (``<task>.dataset.yaml``), which every command taking ``--task`` with this manifest then reads."""
    out = Path(out)
    for path, what in ((cohort.table, "table"), (cohort.images, "image folder")):
        if not path.exists():
            raise UsageError(f"{path}: no such {what}")
    if not inside(cohort.images.resolve(), data_roots(out.parent.resolve())):
        raise ManifestError(f"{out}: write the manifest in {cohort.images} or a folder above it, so its image "
                            f"paths stay inside its folder (or list {cohort.images} in ${DATA_ROOTS_VAR})")
    raw = own_spec(cohort, out)
    file = own_spec_path(out, cohort.key)
    spec = own_dataset(raw, file)  # checked before anything is written
    report = build_manifest(spec, out.parent, out, tables=[cohort.table], views=views, per_patient=per_patient)
    if report.validation.ok:
        write_own_spec(raw, file)
    return report
