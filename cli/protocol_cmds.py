"""`featcache splits` (folds, validation parts, few-shot draws) and `featcache results` (records -> CSV)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cli.console import console, plural
from featcache import datasets
from featcache.errors import FeatcacheError
from featcache.manifest import load_manifest
from featcache.records import (
    load_records,
    options_label,
    select_head_lr,
    summarize_records,
    write_results,
    write_summary,
)
from featcache.splits import OLD_SUPPORT_FROM

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
    positive: str | None = typer.Option(
        None, "--positive", help="For a two-class column of your own (e.g. --task died --positive 1): its "
        "positive class; no dataset spec needed."
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

    spec = datasets.task_for(load_manifest(manifest), task, positive)
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
    ids, y = m.labels(spec)
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
    console.print(f"wrote {path}: {plural(len(made.folds), 'fold')}; {_drawn(made)}", highlight=False)


def _drawn(made: splits_lib.Splits) -> str:
    """What was really drawn: the levels present in at least one fold, never the levels only asked for."""
    said = []
    for kind, label in (("fewshot", "few-shot"), ("fewshot_center", "per-center few-shot")):
        levels = sorted({k for fold in made.folds for k in getattr(fold, kind)})
        if levels:
            said.append(f"{label} k={','.join(map(str, levels))} ({made.draws} draws each)")
    return "; ".join(said) or "no few-shot draws"


METRIC_LABELS = {"mcc_val_thr": "MCC@val", "mcc": "MCC@0.5", "average_precision": "AP",
                 "pr_auc_trapezoid": "PR trapz"}
LEVELS = ("image", "patient")


def results(
    folder: Path = typer.Argument(..., help="Folder of run records (<run key>.json)."),
    out: Path | None = typer.Option(None, "--out", help="CSV to write (default: FOLDER/results.csv)."),
    level: str = typer.Option("image", "--level",
                              help="Metrics shown: image (each image counts, as the benchmark reported) or "
                                   "patient (a patient's score = mean of its images'). Both go to the CSVs."),
    trapezoid: bool = typer.Option(False, "--pr-trapezoid",
                                   help="Show the trapezoid PR area instead of average precision, for comparison "
                                        "with papers that used it (both are in the CSVs)."),
    head_lr: bool = typer.Option(True, "--select-head-lr/--all-head-lrs",
                                 help="Runs with a head LR: summarise only the head LR with the lowest mean "
                                      "validation loss per configuration (the CSV keeps every run)."),
) -> None:
    """Gather run records into one tidy CSV and print mean ± std over folds of MCC and average precision per
    configuration (few-shot: draws averaged within each fold first)."""
    if not folder.is_dir():
        raise typer.BadParameter(f"{folder} is not a folder", param_hint="FOLDER")
    if level not in LEVELS:
        raise typer.BadParameter(f"{level!r}: choose from {', '.join(LEVELS)}", param_hint="--level")
    records = load_records(folder)
    if not records:
        raise FeatcacheError(f"{folder}: no run records (<run key>.json) in this folder")
    kept, notes = select_head_lr(records) if head_lr else (records, [])
    path = write_results(records, out if out is not None else folder / "results.csv",
                         selected={r.key for r in kept} if head_lr else None)
    names = tuple(METRIC_LABELS)
    summary = summarize_records(kept, metrics=(*names, *(f"patient_{n}" for n in names)), pooled=True)
    shown = [n for n in names if n != ("average_precision" if trapezoid else "pr_auc_trapezoid")]
    prefix = "patient_" if level == "patient" else ""
    console.print(_results_table(f"{folder} · {level} level", summary, [prefix + n for n in shown], len(kept)))
    for line in _variant_legend(summary, kept):
        console.print(f"[dim]{escape(line)}[/]", highlight=False)
    console.print(f"[dim]{_key_line(summary, shown, level)}[/]", highlight=False)
    for line in notes:
        console.print(f"selected {line}", highlight=False)
    for line in _edge_lines(kept):
        console.print(f"[yellow]warning[/] {line}", highlight=False)
    for row in summary:
        if pooled := row["pooled"]:
            name = " · ".join(str(row[n]) for n in ("task", "backbone", "method", "regime"))
            intervals = ", ".join(f"{label} {pooled[m]:.3f} [{pooled[m + '_ci'][0]:.3f}, {pooled[m + '_ci'][1]:.3f}]"
                                  for m, label in (("mcc", "MCC@0.5"), ("average_precision", "AP")))
            console.print(f"{name}: pooled over {plural(row['runs'], 'fold')} ({plural(pooled['n'], 'image')}, "
                          f"{plural(pooled['patients'], 'patient')}), 95% bootstrap CI over patients: {intervals}",
                          highlight=False)
    summary_path = write_summary(summary, path.with_name(f"{path.stem}_summary.csv"))
    console.print(f"wrote {path} (one row per run) and {summary_path} (one row per configuration)",
                  highlight=False)


KEYS = {
    "fewshot": "few-shot draws averaged within each fold first; draw sd: MCC@0.5 std over the draws of a fold "
               "(mean over folds); drawn: fewest distinct patients per class (positive/negative) the draws of a "
               "fold came from",
    "mcc_val_thr": "MCC@val: threshold chosen on held-out scores of the tested model (few-shot: the fold's "
                   "validation part)",
    "old_rule": "old rule: few-shot runs whose support sets were drawn from train + validation patients, shown "
                "apart; remake the splits (`featcache splits`) and rerun them",
    "average_precision": "AP: average precision",
    "pr_auc_trapezoid": "PR trapz: trapezoid area under the precision-recall curve",
}


def _key_line(summary: list[dict], shown: list[str], level: str) -> str:
    """What the table's numbers are, for the columns it has."""
    scope = "a patient's score = mean of its images' scores" if level == "patient" else "each image counts"
    parts = [f"{level} level ({scope}); mean ± std over folds"]
    if any(row["shots"] is not None for row in summary):
        parts.append(KEYS["fewshot"])
    if any(row["support_from"] == OLD_SUPPORT_FROM for row in summary):
        parts.append(KEYS["old_rule"])
    parts += [KEYS[name] for name in shown if name in KEYS]
    return "; ".join(parts)


def _results_table(where: str, summary: list[dict], metrics: list[str], runs: int) -> Table:
    """One row per configuration: the columns that vary, the level, runs, metrics, draw spread, drawn."""
    variants = _option_variants(summary)
    shared = [n for n in ("task", "backbone", "method") if len({row[n] for row in summary}) == 1]
    title = " · ".join([where, *(str(summary[0][n]) for n in shared), plural(runs, "run")])
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    columns = [n for n in ("task", "backbone", "method") if n not in shared or (n == "method" and variants)]
    fewshot = any(row["shots"] is not None for row in summary)
    metrics = [m for m in metrics if any(row[m].n for row in summary)]  # e.g. no MCC@val in few-shot only
    mcc = next((m for m in metrics if m.removeprefix("patient_") == "mcc"), None)
    for name in (*columns, "regime"):
        table.add_column(name, no_wrap=True)
    headers = ["runs", *(METRIC_LABELS[m.removeprefix("patient_")] for m in metrics)]
    for name in headers + (["draw sd", "drawn"] if fewshot else []):
        table.add_column(name, justify="right", no_wrap=True)
    for row in summary:
        variant = variants.get((row["task"], row["backbone"], row["method"], row["options"]))
        cells = {"task": row["task"], "backbone": row["backbone"],
                 "method": f"{row['method']} #{variant}" if variant else row["method"]}
        regime = row["regime"] if row["shots"] is None else f"{row['regime']} k={row['shots']}"
        regime += " (old rule)" if row["support_from"] == OLD_SUPPORT_FROM else ""
        extra = []
        if fewshot:
            spread = row[f"{mcc}_draw_std"] if mcc else float("nan")
            drawn = row["drawn_patients"]
            extra = [f"{spread:.3f}" if math.isfinite(spread) else "–",
                     f"{drawn['positive']}/{drawn['negative']}" if drawn else "–"]
        table.add_row(*(cells[n] for n in columns), regime, str(row["runs"]),
                      *(_mean_std(row[m]) for m in metrics), *extra)
    return table


def _edge_lines(records: list) -> list[str]:
    """Per configuration, how many runs chose a C at an edge of the probe's grid."""
    counts: dict[str, list[int]] = {}
    for r in records:
        if r.provenance.get("C_rule") in ("validation", "inner-cv"):
            level = r.regime if r.shots is None else f"{r.regime} k={r.shots}"
            tally = counts.setdefault(f"{r.task} · {r.backbone} · {r.method} · {level}", [0, 0])
            tally[0] += r.provenance.get("C_edge") is not None
            tally[1] += 1
    return [f"{name}: C at an edge of the grid in {hit} of {n} runs; the best C may lie beyond it"
            for name, (hit, n) in counts.items() if hit]


def _variant_legend(summary: list[dict], records: list) -> list[str]:
    """One line per numbered option set: only the options in which the sets of one method differ
    ("–" where a set lacks one, e.g. records of an older version), so the legend stays readable."""
    variants = _option_variants(summary)
    options = {options_label(r.options): r.options for r in records}
    sets: dict[tuple, list[tuple[int, dict]]] = {}
    for (task, backbone, method, label), n in variants.items():
        sets.setdefault((task, backbone, method), []).append((n, options[label]))
    lines = {}
    for (_, _, method), numbered in sets.items():
        names = sorted({k for _, o in numbered for k in o})
        differ = [k for k in names if len({options_label({k: o.get(k, "–")}) for _, o in numbered}) > 1]
        for n, o in numbered:
            lines[(method, n)] = options_label({k: o.get(k, "–") for k in differ})
    return [f"{method} #{n}: {text}" for (method, n), text in sorted(lines.items())]


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
