"""`featcache synth`, `featcache datasets` and `featcache manifest build|validate`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table

from cli._common import check_choice, new_app
from cli.console import console, plural
from featcache import builders, datasets, synth
from featcache.manifest import ValidationReport, validate

_SHOWN = 5


def synth_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for images/ and manifest.csv."),
    patients: int = typer.Option(60, "--patients", min=1),
    positive_rate: float = typer.Option(
        0.3, "--positive-rate", min=0.0, max=1.0, help="Share of DEATH patients."
    ),
    fmt: str = typer.Option("png", "--format", help="png (8-bit) | png16 | dicom."),
    centers: int = typer.Option(3, "--centers", min=1),
    size: int = typer.Option(256, "--size", min=32, help="Image side in pixels."),
    images: tuple[int, int] = typer.Option((1, 3), "--images-per-patient", min=1, help="MIN MAX images."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a synthetic chest-X-ray cohort (task SYN) with its manifest."""
    check_choice(fmt, synth.FORMATS, "--format")
    if centers > patients:  # combinations typer cannot check option by option
        raise typer.BadParameter(f"{centers} centers need at least as many patients (--patients {patients})",
                                 param_hint="--centers")
    if images[0] > images[1]:
        raise typer.BadParameter(f"MIN {images[0]} > MAX {images[1]}", param_hint="--images-per-patient")
    with console.status(f"drawing {plural(patients, 'patient')}"):
        path = synth.make_cohort(out, patients, positive_rate, images, centers, size, fmt, seed)
    _print_report(validate(path, tasks=[datasets.get_task("SYN")]))


def datasets_cmd() -> None:
    """List the dataset specs, their tasks and where each comes from (more specs: $FEATCACHE_DATASETS)."""
    table = Table(title="dataset specs")
    for name in ("dataset", "task", "outcome", "negative / positive", "cv"):
        table.add_column(name)
    specs = [datasets.get_dataset(name) for name in datasets.list_datasets()]
    for spec in specs:
        for i, task in enumerate(spec.tasks.values()):
            classes = f"{task.negative} / [bold]{task.positive}[/]"
            table.add_row(
                spec.name if i == 0 else "", task.key, task.outcome, classes, f"{task.cv} k={task.k}"
            )
    console.print(table)
    for spec in specs:
        console.print(f"{spec.name}: {spec.url or spec.title} ({spec.file})", highlight=False, soft_wrap=True)


def build(
    dataset: str = typer.Option(None, "--dataset", help="Dataset spec name (see `featcache datasets`)."),
    root: Path = typer.Option(None, "--root", help="Folder holding the release as downloaded (with --dataset)."),
    out: Path = typer.Option(..., "--out", help="Manifest to write (.csv); its summary goes beside it."),
    table: list[Path] = typer.Option([], "--table", help="The metadata table (CSV or Excel): your own cohort's, "
                                     "or the release's when the spec's file patterns find several."),
    images: Path = typer.Option(None, "--images", help="Own cohort: the folder of images."),
    image_col: str = typer.Option(None, "--image-col", help="Own cohort: column naming each image's file."),
    patient_col: str = typer.Option(None, "--patient-col", help="Own cohort: the patient id column."),
    label_col: str = typer.Option(None, "--label-col", help="Own cohort: the two-class label column."),
    positive: str = typer.Option(None, "--positive", help="Own cohort: the positive class's value."),
    center_col: str = typer.Option(None, "--center-col", help="Own cohort: the center column, if any."),
    task: str = typer.Option(None, "--task", help="Own cohort: the task's name (default: the label column)."),
    sheet: str = typer.Option("", "--sheet", help="Own cohort: the Excel sheet (default: the first with the "
                              "columns)."),
    views: str = typer.Option(None, "--views", help="frontal (laterals dropped) | all; default: the spec's."),
    per_patient: str = typer.Option(None, "--per-patient", help="first (one image per patient, the first "
                                    "study) | all; default: the spec's."),
    verbose: bool = typer.Option(False, "--verbose", help="List every missing and unmatched image."),
) -> None:
    """Write a manifest from a dataset's release as downloaded (--dataset, --root), or from a table and a
    folder of images of your own (--table, --images, --image-col, --patient-col, --label-col, --positive),
    with a summary beside it: counts per task and center against the published ones, and what was left out."""
    if views is not None:
        check_choice(views, datasets.VIEWS, "--views")
    if per_patient is not None:
        check_choice(per_patient, datasets.PER_PATIENT, "--per-patient")
    own = {"--images": images, "--image-col": image_col, "--patient-col": patient_col, "--label-col": label_col,
           "--positive": positive}
    if dataset is not None:
        given = [name for name, value in {**own, "--center-col": center_col, "--task": task}.items() if value]
        if given or root is None:
            raise typer.BadParameter(f"with --dataset give --root, not {', '.join(given)}" if given else
                                     "--dataset needs --root (the folder holding the download)",
                                     param_hint="--dataset")
        with console.status(f"reading {dataset} metadata and scanning images under {root}"):
            report = builders.build_manifest(dataset, root, out, tables=table, views=views,
                                             per_patient=per_patient)
    else:
        lacking = [name for name, value in own.items() if value is None] + ([] if len(table) == 1 else ["--table"])
        if lacking:
            raise typer.BadParameter(f"give --dataset and --root, or an own cohort's --table, --images, "
                                     f"--image-col, --patient-col, --label-col, --positive (missing: "
                                     f"{', '.join(lacking)})", param_hint="--dataset")
        cohort = builders.OwnCohort(table[0], images, image_col, patient_col, label_col, positive,
                                    center_col or "", task or "", sheet)
        with console.status(f"reading {table[0].name} and scanning images under {images}"):
            report = builders.build_own(cohort, out, views=views, per_patient=per_patient)
    _print_build(report, verbose)
    report.validation.raise_for_errors()


def _print_build(report: builders.BuildReport, verbose: bool) -> None:
    for name in report.tables:
        console.print(f"table: {name}", markup=False, highlight=False)
    for note in report.ignored + report.notes:
        console.print(f"  {note}", markup=False, highlight=False)
    table = Table(title=f"{report.dataset} -> {report.manifest}")
    columns: tuple[tuple[str, JustifyMethod], ...] = (("", "left"), ("found", "right"), ("published", "right"),
                                                      ("diff", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for what, found, published in report.comparison():
        diff = "" if published is None else "=" if published == found else f"{found - published:+d}"
        table.add_row(what, str(found), "–" if published is None else str(published), diff)
    console.print(table)
    cohort = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.cohort.items())
    console.print(f"cohort: {cohort}", highlight=False)
    for reason, n in sorted(report.skipped.items()):
        console.print(f"skipped {n}: {reason}", markup=False, highlight=False)
    if report.view_unknown:
        console.print(f"kept {plural(report.view_unknown, 'image')} whose view no header or column states",
                      highlight=False)
    shown = None if verbose else _SHOWN
    _print_list("listed in the metadata but missing", report.missing, shown)
    _print_list("images that match no patient", report.unlisted, shown)
    _print_report(report.validation, counts=False)
    if report.summary_path is not None:
        console.print(f"summary: {report.summary_path}", markup=False, highlight=False)


def validate_cmd(
    manifest: Path = typer.Argument(..., help="Manifest file (.csv, or .parquet with pyarrow)."),
    check_files: bool = typer.Option(
        True, "--check-files/--no-check-files", help="Check every image exists."
    ),
) -> None:
    """Check a manifest: duplicate or empty ids, missing files, paths outside its folder, labels outside a
    task's mapping, one patient with conflicting labels or in two centers. Exits non-zero when any is found."""
    report = validate(manifest, check_files=check_files, tasks=datasets.tasks_of(manifest))
    _print_report(report)
    report.raise_for_errors()


def _print_list(title: str, items: list[str], shown: int | None = _SHOWN) -> None:
    if not items:
        return
    console.print(f"[yellow]{title}: {len(items)}[/]")
    for item in items[:shown]:
        console.print(f"  {item}", markup=False, highlight=False)
    if shown is not None and len(items) > shown:
        console.print(f"  ... and {len(items) - shown} more (--verbose lists all)", highlight=False)


def _print_report(report: ValidationReport, counts: bool = True) -> None:
    if counts:
        console.print(f"{report.path}: {plural(report.images, 'image')}, {plural(report.patients, 'patient')}",
                      highlight=False)
        table = Table()
        for name in ("task", "class", "images"):
            table.add_column(name, justify="right" if name == "images" else "left")
        for task, classes in report.tasks.items():
            for name, n in classes.items():
                table.add_row(task, name, str(n))
            table.add_row(task, "no label", str(report.nan[task]))
        console.print(table)
        centers = ", ".join(f"{c} {n}" for c, n in report.centers.items())
        console.print(f"centers: {centers}", highlight=False)
    if report.extra_columns:
        console.print(f"other columns (kept, not tasks; a two-class one is a task with --task NAME --positive "
                      f"VALUE): {', '.join(report.extra_columns)}", highlight=False)
    for issue in report.errors:
        console.print(f"[red]error[/] {escape(str(issue))}", highlight=False)
    if report.ok:
        console.print("[green]valid[/]")


def register(app: typer.Typer) -> None:
    """Add `synth`, `datasets` and the `manifest` sub-app (`build`, `validate`) to ``app``."""
    app.command("synth")(synth_cmd)
    app.command("datasets")(datasets_cmd)
    sub = new_app("Canonical manifests: build one from a dataset's official metadata, or check one.")
    sub.command("build")(build)
    sub.command("validate")(validate_cmd)
    app.add_typer(sub, name="manifest")
