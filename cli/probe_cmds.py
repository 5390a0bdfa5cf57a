"""`featcache probe`: logistic probes and few-shot grids on cached features, one run record per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, overload

import numpy as np
import typer
from rich import box
from rich.table import Table

from cli._common import check_choice
from cli._study import given, settings_line
from cli.console import console, plural, progress
from featcache import datasets
from featcache.errors import SplitError
from featcache.manifest import load_manifest
from featcache.metrics import Summary
from featcache.records import RunRecord, summarize_records


def _shots(text: str | None) -> tuple[int, ...]:
    if text is None:
        from featcache.splits import SHOTS

        return SHOTS
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of integers", param_hint="--shots") from None
    if not values or min(values) < 1:
        raise typer.BadParameter("give at least one k >= 1", param_hint="--shots")
    return values


@overload
def positive_floats(text: str, option: str) -> tuple[float, ...]: ...


@overload
def positive_floats(text: None, option: str) -> None: ...


def positive_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'1e-4,1e-2,1' -> (0.0001, 0.01, 1.0) for a list option (C grid, head LRs); None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of numbers", param_hint=option) from None
    if not values or min(values) <= 0 or not all(np.isfinite(values)):
        raise typer.BadParameter("give positive finite values", param_hint=option)
    return values


def _mean_std(summary: Summary, integer: bool = False) -> str:
    """``mean ± std`` (the mean alone for one value); counts such as epochs as integers (one decimal when
    averaged), scores with three decimals."""
    mean, std, n = summary
    if n == 0:
        return "–"
    if integer:
        return f"{mean:.0f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def _table(records: list[RunRecord], title: str) -> Table:
    """Mean ± std over folds (few-shot draws averaged within each fold first) per level; MCC at the held-out
    threshold (full data: cross-fit of train + val; few-shot: the fold's validation part); AP = average
    precision."""
    table = Table(title=title, box=box.SIMPLE_HEAD, caption="mean ± std over folds (draws averaged per fold); "
                  "MCC: threshold from held-out scores (full data: cross-fit of train + val; few-shot: the fold's "
                  "validation part); AP: average precision")
    for name in ("regime", "k", "runs", "MCC", "AP", "C (median)", "C rule"):
        table.add_column(name, justify="left" if name in ("regime", "C rule") else "right")
    for row in summarize_records(records, ("mcc", "mcc_val_thr", "average_precision")):
        level = [r for r in records if (r.regime, r.shots) == (row["regime"], row["shots"])]
        mcc = row["mcc_val_thr"]
        median_c = np.median([r.provenance.get("C", np.nan) for r in level])
        rules = ", ".join(sorted({str(r.provenance.get("C_rule")) for r in level}))
        k = "–" if row["shots"] is None else str(row["shots"])
        table.add_row(row["regime"], k, str(row["runs"]), _mean_std(mcc), _mean_std(row["average_precision"]),
                      f"{median_c:.3g}", rules)
    return table


def _nothing_ran(task: str, skipped: list[str]) -> str:
    """One line saying why a request ran no probe at all (every fold of every level skipped)."""
    if not skipped:
        return f"no probe ran for {task}: the split file holds no draws for the requested levels"
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return (f"no probe ran for {task}: every requested level was skipped in every fold ({skipped[0]}{more}); "
            "ask for a k the splits drew (`featcache splits` lists them)")


def probe(
    model: str = typer.Option(..., "--model", help="Backbone whose cached features to probe."),
    task: str = typer.Option(..., "--task", help="Task key, a label column of the manifest (e.g. AFC)."),
    positive: str | None = typer.Option(None, "--positive", help="Positive class of a two-class column of "
                                        "your own (default: the one its split file was made with)."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest; its splits must exist."),
    store: Path | None = typer.Option(None, "--store",
                                      help="Feature store (default: features.zarr beside the manifest)."),
    shots: str | None = typer.Option(None, "--shots", help="Few-shot k per class (default: 2,4,8,16,32)."),
    full: bool = typer.Option(False, "--full", help="Full-data probes instead of few-shot."),
    draws: int | None = typer.Option(None, "--draws", min=1,
                                     help="Draws per level (default: all persisted)."),
    per_center: bool = typer.Option(False, "--per-center", help="Use the k-per-class-per-center draws."),
    view: str = typer.Option("cls", "--view", help="Feature view of the store."),
    weights: Path | None = typer.Option(None, "--weights", help="Features extracted with these weights."),
    random_init: bool = typer.Option(False, "--random-init", help="Features extracted with random weights."),
    dtype: str | None = typer.Option(None, "--dtype", help="Features stored as float16 or float32."),
    select: str = typer.Option("mcc", "--select", help="Metric that chooses C: mcc (at 0.5) or average_precision "
                                                    "(alias pr_auc)."),
    solver: str = typer.Option("torch", "--solver", help="torch (batched Newton) or sklearn (reference)."),
    c_grid: str | None = typer.Option(None, "--c-grid", help="Values of C to choose from, comma-separated "
                                      "(default: 13 log-spaced values 1e-4..1e2)."),
    refit: bool = typer.Option(True, "--refit/--no-refit",
                               help="Full data: refit the chosen C on train+val, threshold from a cross-fit of "
                                    "train+val (default); or test the train-only model, threshold from validation."),
    device: str = typer.Option("auto", "--device", help="Torch solver device: auto, cpu, cuda, ..."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder of run records (one JSON per run)."),
) -> None:
    """Fit L2 logistic probes on cached features for every fold (and few-shot draw) of the persisted splits.

    Defaults, one per line:
    - features standardised on the training part only; balanced class weights;
    - C from 13 log-spaced values 1e-4..1e2 (--c-grid), chosen by --select; ties go to the lower
      validation log-loss, then the smaller C; a C at an edge of the grid is warned about;
    - full data: C chosen on the validation part, refitted on train+val, MCC threshold from 4-fold
      cross-fitted scores on train+val (--no-refit: the train-only model and its validation threshold);
    - few-shot: only the support set; C by 4-fold inner CV with >= 8 patients per class, else C = 1;
    - few-shot MCC threshold 0.5 (the balanced-weight decision point).
    Runs already recorded in --out are read back, not refitted.
    """
    if full and (shots is not None or (draws is not None and given("draws")) or per_center):
        raise typer.BadParameter("--full excludes --shots, --draws and --per-center", param_hint="--full")
    draws = None if full else draws  # a study grid's draws are for few-shot levels
    if (line := settings_line(("draws", "view", "select", "c_grid", "refit"))) is not None:
        console.print(line, markup=False, highlight=False)
    # torch and scikit-learn: load on use
    from featcache.probe import SELECT, SELECT_ALIASES, SOLVERS, ProbeOptions, run_probe

    if positive is not None:
        datasets.task_for(load_manifest(manifest), task, positive)
    grid = positive_floats(c_grid, "--c-grid")
    grid_option: dict[str, Any] = {"grid": grid} if grid else {}
    options = ProbeOptions(select=check_choice(SELECT_ALIASES.get(select.lower(), select), SELECT, "--select"),
                           solver=check_choice(solver, SOLVERS, "--solver"), refit=refit, device=device, **grid_option)
    with progress("probing levels", unit="level") as update:
        report = run_probe(manifest, task, model, store=store, full=full, shots=_shots(shots), draws=draws,
                           per_center=per_center, view=view, options=options, out=out,
                           progress=lambda level, done, total: update(done, total, status=level),
                           weights=weights, random_init=random_init, dtype=dtype)
    if not report.records:
        raise SplitError(_nothing_ran(task, report.skipped))
    for line in report.skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    for line in report.warnings:
        console.print(f"[yellow]warning[/] {line}", highlight=False)
    identities = {r.provenance.get("weights") for r in report.records}
    if identities & {"random-init", "tiny-random"}:
        console.print(f"[yellow]features from random weights ({', '.join(sorted(map(str, identities)))})[/]")
    console.print(_table(report.records, f"{task} · {model} · {view} · solver {solver} · select {select}"))
    console.print(f"wrote {plural(report.written, 'run record')} ({report.existing} already there) to {out}",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add `probe` to ``app``."""
    app.command("probe")(probe)
