"""`featcache synth`, `featcache datasets` and `featcache manifest build|validate`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cli._common import check_choice, new_app
from cli.console import console, plural
from featcache import datasets, synth
from featcache.manifest import ValidationReport, validate

_SHOWN = 20


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
    _print_report(validate(path))


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
    dataset: str = typer.Option(..., "--dataset", help="Dataset spec name (see `featcache datasets`)."),
    root: Path = typer.Option(..., "--root", help="Folder holding the official metadata and images."),
    out: Path = typer.Option(..., "--out", help="Manifest to write (.csv)."),
) -> None:
    """Write a dataset's canonical manifest; print counts beside the published ones and what did not join."""
    with console.status(f"reading {dataset} metadata and scanning images under {root}"):
        report = datasets.build_manifest(dataset, root, out)
    table = Table(title=f"{report.dataset} -> {report.manifest}")
    for name, justify in (("", "left"), ("found", "right"), ("published", "right")):
        table.add_column(name, justify=justify)
    for what, found, published in report.comparison():
        flag = "" if published is None or published == found else " [yellow]≠[/]"
        table.add_row(what, f"{found}{flag}", "–" if published is None else str(published))
    console.print(table)
    for reason, n in report.skipped.items():
        console.print(f"skipped {n}: {reason}", highlight=False)
    for task, values in report.unmapped.items():
        shown = ", ".join(f"{value!r} x{n}" for value, n in values.items())
        console.print(
            f"[yellow]{task}: values outside the mapping, written without label:[/] {escape(shown)}"
        )
    _print_list("listed in the metadata but missing", report.missing)
    _print_list("images present but unlisted", report.unlisted)
    _print_report(report.validation, counts=False)
    report.validation.raise_for_errors()


def validate_cmd(
    manifest: Path = typer.Argument(..., help="Manifest file (.csv, or .parquet with pyarrow)."),
    check_files: bool = typer.Option(
        True, "--check-files/--no-check-files", help="Check every image exists."
    ),
) -> None:
    """Check a manifest: duplicate or empty ids, missing files, paths outside its folder, labels outside a
    task's mapping, one patient with conflicting labels or in two centers. Exits non-zero when any is found."""
    report = validate(manifest, check_files=check_files)
    _print_report(report)
    report.raise_for_errors()


def _print_list(title: str, items: list[str]) -> None:
    if not items:
        return
    console.print(f"[yellow]{title}: {len(items)}[/]")
    for item in items[:_SHOWN]:
        console.print(f"  {item}", markup=False, highlight=False)
    if len(items) > _SHOWN:
        console.print(f"  ... and {len(items) - _SHOWN} more", highlight=False)


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
