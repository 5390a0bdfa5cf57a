"""`featcache extract`, `pixels`, `export` and `stores`: fill, inspect and hand over the keyed zarr stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from cli._common import check_choice, rank0
from cli.console import console, plural, progress
from featcache.backbones import get_spec
from featcache.store import DEFAULT_CHUNK_ROWS, FEATURE_DTYPES, ON_ERROR, export_hdf5, feature_spec, list_groups

if TYPE_CHECKING:
    from featcache.extract import ExtractResult

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _report(result: ExtractResult, pixels: bool = False) -> None:
    if not rank0():
        return
    work = plural(result.embedded, "image") + " decoded" if pixels else plural(result.embedded, "row") + " computed"
    loaded = "" if pixels else "; model loaded" if result.model_loaded else "; no model loaded"
    console.print(f"{result.store}/{result.group}: {plural(result.rows, 'image')}, {work} "
                  f"({plural(result.added, 'new row')}, {plural(len(result.changed), 'changed input')}{loaded}) "
                  f"in {result.seconds:.1f} s", highlight=False)
    if result.skipped:
        table = Table(title=f"{plural(len(result.skipped), 'image')} skipped (recorded in the store's "
                            "skip_reason)")
        table.add_column("image_id")
        table.add_column("reason", overflow="fold")
        for image_id, reason in result.skipped.items():
            table.add_row(image_id, reason)
        console.print(table)


def extract(
    model: str = typer.Option(..., "--model", help="Backbone (`featcache models`), or timm:/hf:/open_clip:."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest (CSV)."),
    store: Path | None = typer.Option(None, "--store", help="Zarr store (default: features.zarr beside "
                                                            "the manifest)."),
    views: str | None = typer.Option(None, "--views", help="Comma-separated feature views (default: all)."),
    weights: Path | None = typer.Option(None, "--weights", help="Weights file or folder."),
    random_init: bool = typer.Option(False, "--random-init", help="Real architecture, random weights."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", min=0, help="DataLoader decoding workers."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32."),
    on_error: str = typer.Option("fail", "--on-error", help="fail, or skip (record unreadable images)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    chunk_rows: int = typer.Option(DEFAULT_CHUNK_ROWS, "--chunk-rows", min=1,
                                   help="Rows per chunk of a new store (the unit of writing and resuming)."),
    retry_skipped: bool = typer.Option(False, "--retry-skipped", help="Embed earlier skipped images again."),
) -> None:
    """Embed every image of a manifest once per frozen backbone; reruns compute only what is missing.

    Under `torchrun --nproc-per-node N --no-python featcache extract ...` each rank takes a share."""
    check_choice(on_error, ON_ERROR, "--on-error")
    check_choice(dtype, FEATURE_DTYPES, "--dtype")
    if random_init and weights is not None:
        raise typer.BadParameter("--weights and --random-init exclude each other")
    view_list = [v.strip() for v in views.split(",")] if views else None
    spec = get_spec(model)  # resolved once: the check below and the extraction use the same spec
    feature_spec(spec, weights=weights, random_init=random_init, views=view_list, dtype=dtype)  # fail fast
    if random_init and rank0():
        console.print("[yellow]random-init: real architecture with random weights (recorded in the store "
                      "spec)[/]")
    from featcache.extract import extract_features

    with progress("embedding", enabled=rank0(), unit="image") as hook:
        result = extract_features(manifest, spec, store=store, weights=weights, random_init=random_init,
                                  views=view_list, dtype=dtype,
                                  batch_size=batch_size, num_workers=workers, on_error=on_error,
                                  device=device, chunk_rows=chunk_rows, retry_skipped=retry_skipped,
                                  progress=hook)
    _report(result)


def pixels(
    model: str = typer.Option(..., "--model", help="Backbone whose input size and intensity rule to use."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest (CSV)."),
    store: Path | None = typer.Option(None, "--store", help="Zarr store (default: pixels.zarr beside the "
                                                            "manifest)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", min=0, help="DataLoader decoding workers."),
    on_error: str = typer.Option("fail", "--on-error", help="fail, or skip (record unreadable images)."),
    chunk_rows: int = typer.Option(64, "--chunk-rows", min=1, help="Rows per shard of a new cache."),
) -> None:
    """Decode, crop and resize every image once into a uint8 pixel cache that stage-2 epochs read."""
    check_choice(on_error, ON_ERROR, "--on-error")
    from featcache.pixels import cache_pixels

    with progress("decoding", enabled=rank0(), unit="image") as hook:
        result = cache_pixels(manifest, model, store=store, batch_size=batch_size, num_workers=workers,
                              on_error=on_error, chunk_rows=chunk_rows, progress=hook)
    _report(result, pixels=True)


def export(
    store: Path = typer.Option(..., "--store", help="Feature store to export."),
    to: Path = typer.Option(..., "--to", help="HDF5 file to write."),
    model: str | None = typer.Option(None, "--model", help="Only this backbone's groups (default: all)."),
) -> None:
    """Copy feature groups to one HDF5 file (same hierarchy; spec as JSON in attributes)."""
    names = export_hdf5(store, to, model)
    console.print(f"wrote {to}: {', '.join(names)}", highlight=False)


def stores(
    store: Path = typer.Option(..., "--store", help="Zarr store to list."),
    verify: bool = typer.Option(False, "--verify", help="Decode every chunk and check every written row "
                                                        "against its checksums; exit 1 if anything fails."),
) -> None:
    """List a store's groups: backbone, key, rows written and skipped, arrays, weights. With --verify, also
    check every chunk and say what the next extract (or pixels) would recompute."""
    from featcache.integrity import verify as verify_group

    problems: list[str] = []
    groups = list_groups(store, problems=problems)
    table = Table(title=str(store))
    for column in ("group", "kind", "rows", "written", "skipped", "arrays", "weights", "version"):
        table.add_column(column, overflow="fold")
    for group in groups:
        info = group.summary()
        arrays = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in info["arrays"].items())
        counts = (str(info[k]) for k in ("rows", "written", "skipped"))
        table.add_row(info["group"], info["kind"], *counts, arrays, info["weights"] or "-", info["featcache"])
    console.print(table)
    verdicts = [verify_group(group) for group in groups] if verify else []
    for verdict in verdicts:
        console.print(f"{verdict.where}: {verdict.describe()}", highlight=False, markup=False, soft_wrap=True)
    for problem in problems:
        console.print(f"refused: {problem}", highlight=False, markup=False, soft_wrap=True)
    if verify and (problems or not all(v.ok for v in verdicts)):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `extract`, `pixels`, `export` and `stores`."""
    app.command("extract")(extract)
    app.command("pixels")(pixels)
    app.command("export")(export)
    app.command("stores")(stores)
