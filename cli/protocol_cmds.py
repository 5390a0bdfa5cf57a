"""`featcache splits` (folds, validation parts, few-shot draws) and `featcache results` (records -> CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cli._common import console, plural
from featcache.errors import FeatcacheError
from featcache.manifest import load_manifest
from featcache.records import gather, load_records, summarize_records, write_summary

if TYPE_CHECKING:
    from featcache import splits as splits_lib


def _ints(text: str, option: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8); '' -> () (no few-shot draws)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of integers", param_hint=option
        ) from None


def _part(row: dict) -> str:
    return f"{row['images']}/{row['patients']}/{row['positives']}"


def _skipped(made: splits_lib.Splits) -> dict[tuple[str, int], dict[str, str]]:
    """(kind, k) -> {fold: reason}: one line per skipped level instead of one per fold."""
    out: dict[tuple[str, int], dict[str, str]] = {}
    for fold in made.folds:
        for kind, levels in fold.skipped.items():
            for shot, reason in levels.items():
                out.setdefault((kind, shot), {})[fold.name] = reason
    return dict(sorted(out.items()))


def _mean_std(summary) -> str:
    mean, std, n = summary
    if n == 0:
        return "–"
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f}±{std:.3f}"


def splits(
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest (CSV)."),
    task: str = typer.Option(
        ..., "--task", help="Task key, a label column of the manifest (e.g. AFC, NY_icu)."
    ),
    k: int | None = typer.Option(None, "--k", help="Folds for k-fold (default: the task spec's, 5)."),
    scheme: str = typer.Option("auto", "--scheme", help="auto (from the task spec) | kfold | loco."),
    val_fraction: float | None = typer.Option(
        None,
        "--val-fraction",
        help="Share of each class's training patients held out for validation "
        "(default: 0.15 k-fold, 0.10 leave-one-center-out).",
    ),
    shots: str = typer.Option("2,4,8,16,32", "--shots", help="Few-shot k per class; '' for none."),
    center_shots: str = typer.Option("2,4,8,16", "--center-shots", help="Per-center few-shot k per class."),
    per_center: bool | None = typer.Option(
        None, "--per-center/--no-per-center", help="Per-center draws (default: when the dataset has centers)."
    ),
    draws: int = typer.Option(100, "--draws", help="Seeded draws per few-shot level."),
    seed: int = typer.Option(42, "--seed"),
) -> None:
    """Compute a task's patient-level folds, validation parts and few-shot draws; save beside the manifest."""
    from featcache import splits as splits_lib  # scikit-learn: imported only by the commands that need it

    made = splits_lib.build_splits(
        manifest,
        task,
        scheme=scheme,
        k=k,
        val_fraction=val_fraction,
        shots=_ints(shots, "--shots"),
        center_shots=_ints(center_shots, "--center-shots"),
        draws=draws,
        seed=seed,
        per_center=per_center,
    )
    path = splits_lib.save_splits(made, manifest)
    m = load_manifest(manifest)
    ids, y = m.labels(task)
    rows = splits_lib.describe(made, ids, y, m.patients(ids))

    table = Table(
        title=f"{task}: {made.scheme}, seed {made.seed}, val fraction {made.val_fraction:g}",
        caption="cells: images/patients/positives",
        box=box.SIMPLE_HEAD,
    )
    for name in ("fold", "train", "val", "test", "few-shot k", "per-center k"):
        table.add_column(name, justify="right" if name in ("train", "val", "test") else "left")
    for fold in made.folds:
        parts = {row["part"]: _part(row) for row in rows if row["fold"] == fold.name}
        drawn = [",".join(map(str, levels)) or "–" for levels in (fold.fewshot, fold.fewshot_center)]
        table.add_row(fold.name, parts["train"], parts["val"], parts["test"], *drawn)
    console.print(table)
    for (kind, shot), reasons in _skipped(made).items():
        folds = ", ".join(reasons)
        first, why = next(iter(reasons.items()))
        console.print(f"[yellow]skipped[/] {kind} k={shot} in {folds} ({first}: {why})", highlight=False)
    console.print(f"{plural(made.draws, 'draw')} per few-shot level; wrote {path}", highlight=False)


def results(
    folder: Path = typer.Argument(..., help="Folder of run records (<run key>.json)."),
    out: Path | None = typer.Option(None, "--out", help="CSV to write (default: FOLDER/results.csv)."),
) -> None:
    """Gather run records into one tidy CSV and print mean ± std of MCC and PR-AUC per configuration."""
    if not folder.is_dir():
        raise typer.BadParameter(f"{folder} is not a folder", param_hint="FOLDER")
    records = load_records(folder)
    if not records:
        raise FeatcacheError(f"{folder}: no run records (<run key>.json) in this folder")
    path = gather(folder, out if out is not None else folder / "results.csv")
    summary = summarize_records(records, metrics=("mcc_val_thr", "mcc", "pr_auc"), pooled=True)
    variants = _option_variants(summary)
    shared = [n for n in ("task", "backbone", "method") if len({row[n] for row in summary}) == 1]
    title = " · ".join([str(folder), *(str(summary[0][n]) for n in shared), plural(len(records), "run")])
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = [n for n in ("task", "backbone", "method") if n not in shared]
    for name in (*columns, "regime"):
        table.add_column(name, no_wrap=True)
    for name in ("runs", "MCC@val", "MCC@0.5", "PR-AUC"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in summary:
        variant = variants.get((row["task"], row["backbone"], row["method"], row["options"]))
        cells = {"task": row["task"], "backbone": row["backbone"],
                 "method": f"{row['method']} #{variant}" if variant else row["method"]}
        regime = row["regime"] if row["shots"] is None else f"{row['regime']} k={row['shots']}"
        table.add_row(*(cells[n] for n in columns), regime, str(row["runs"]),
                      *(_mean_std(row[m]) for m in ("mcc_val_thr", "mcc", "pr_auc")))
    console.print(table)
    legend = {(key[2], n): key[3] for key, n in variants.items()}
    for (method, n), options in sorted(legend.items()):
        console.print(f"[dim]{escape(method)} #{n}: {escape(options)}[/]", highlight=False)
    console.print("[dim]MCC@val: threshold chosen on the validation part (full data); MCC@0.5: fixed threshold[/]")
    for row in summary:
        if pooled := row["pooled"]:
            name = " · ".join(str(row[n]) for n in ("task", "backbone", "method", "regime"))
            intervals = ", ".join(f"{label} {pooled[m]:.3f} [{pooled[m + '_ci'][0]:.3f}, {pooled[m + '_ci'][1]:.3f}]"
                                  for m, label in (("mcc", "MCC@0.5"), ("pr_auc", "PR-AUC")))
            console.print(f"{name}: pooled over {plural(row['runs'], 'fold')} ({plural(pooled['n'], 'image')}, "
                          f"{plural(pooled['patients'], 'patient')}), 95% bootstrap CI over patients: {intervals}",
                          highlight=False)
    summary_path = write_summary(summary, path.with_name(f"{path.stem}_summary.csv"))
    console.print(f"wrote {path} (one row per run) and {summary_path} (one row per configuration)",
                  highlight=False)


def _option_variants(summary: list[dict]) -> dict[tuple, int]:
    """Number the option sets of a method only where one task/backbone/method ran with several, so the
    table stays narrow and the legend below it says what each number means."""
    seen: dict[tuple, list[str]] = {}
    for row in summary:
        options = seen.setdefault((row["task"], row["backbone"], row["method"]), [])
        if row["options"] not in options:
            options.append(row["options"])
    return {(*key, opt): i + 1 for key, options in seen.items() if len(options) > 1 for i, opt in enumerate(options)}


def register(app: typer.Typer) -> None:
    """Add `splits` and `results` to ``app``."""
    app.command("splits")(splits)
    app.command("results")(results)
