"""`featcache init`, `featcache study plan|run` and `featcache report`: a study as one folder."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from cli._common import new_app
from cli.console import console, plural
from featcache.errors import StudyError
from featcache.text import duration
from study.grid import shipped_grids
from study.studyfile import Study, find_study, load_study, write_study


def _study() -> Study:
    path = find_study()
    if path is None:
        raise StudyError(f"no study.yaml in {Path.cwd()} or above it; write one with `featcache init`")
    return load_study(path)


def init(
    manifest: str | None = typer.Option(None, "--manifest", help="Manifest of the study (relative to here)."),
    task: list[str] = typer.Option([], "--task", help="Task key; repeat for several."),
    positive: list[str] = typer.Option([], "--positive", help="Positive class of a --task that is a two-class "
                                       "column of your own manifest (one per --task, in order)."),
    model: str | None = typer.Option(None, "--model", help="Default backbone of single commands."),
    grid: str = typer.Option("smoke", "--grid", help=f"Grid: {', '.join(shipped_grids())}, or a grid file."),
    weights: list[str] = typer.Option([], "--weights", help="BACKBONE=PATH or BACKBONE=random-init; repeat."),
    force: bool = typer.Option(False, "--force", help="Replace an existing study.yaml."),
) -> None:
    """Write a commented study.yaml here: every command run in this folder or below takes its defaults from it."""
    policy = {}
    for item in weights:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"{item!r}: give BACKBONE=PATH or BACKBONE=random-init", param_hint="--weights")
        policy[name.strip()] = value.strip()
    if positive and len(positive) != len(task):
        raise typer.BadParameter(f"{len(positive)} --positive for {len(task)} --task; give one per task, in order",
                                 param_hint="--positive")
    positives = dict(zip(task, positive, strict=True)) if positive else {}
    if manifest and Path(manifest).is_file():  # a column or class that is not there: one line now, not later
        from featcache import datasets
        from featcache.manifest import load_manifest

        loaded = load_manifest(manifest)
        for key in task:
            datasets.task_for(loaded, key, positives.get(key))
    path = write_study(Path.cwd(), manifest=manifest, tasks=tuple(task), model=model, grid=grid, weights=policy,
                       positives=positives, force=force)
    console.print(f"wrote {path}; edit it, then `featcache study plan`", highlight=False)


def plan_cmd(
    only: str | None = typer.Option(None, "--only", help="Filter: FIELD=GLOB[,FIELD=GLOB] over stage, backbone, "
                                                        "task, method, rank, regime, k (alternatives with |)."),
    excluded: bool = typer.Option(False, "--excluded", help="List every excluded entry, not one line per reason."),
) -> None:
    """Print the grid's runs per stage and method, what already has a record, and the cost of the rest
    (from the wall times measured in existing records)."""
    from study.expand import expand, parse_only
    from study.plan import estimate, plan, runnable
    study = _study()
    grid = study.grid()
    entries, left_out = expand(study, grid, parse_only(only))
    with console.status("matching the grid against the records"):
        entries, impossible = runnable(study, grid, entries)
        rows = plan(study, grid, entries)
        costs = estimate(rows, study.runs)
    title = f"{study.name} · grid {grid.name} · {len(entries)} entries · records in {study.runs}"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for name in ("stage", "method", "entries", "runs", "recorded", "missing", "est. time", "packed"):
        table.add_column(name, justify="left" if name in ("stage", "method") else "right", no_wrap=True)
    groups: dict[tuple[int, str], list] = defaultdict(list)
    for row in rows:
        groups[row.entry.stage, row.entry.variant].append(row)
    totals: dict[int, float] = defaultdict(float)
    packed_totals: dict[int, float] = defaultdict(float)
    unmeasured: dict[int, list[str]] = defaultdict(list)
    unpacked: dict[int, list[str]] = defaultdict(list)
    for (stage, method), members in sorted(groups.items()):
        time, known, missing = _cost([costs[r.entry].seconds for r in members])
        totals[stage] += known
        if missing:
            unmeasured[stage].append(method)
        packed, known_packed, missing_packed = _cost([costs[r.entry].packed for r in members])
        packed_totals[stage] += known_packed
        if missing_packed:
            unpacked[stage].append(method)
        table.add_row(str(stage), method, str(len(members)), f"{sum(r.planned for r in members):,}",
                      f"{sum(r.recorded for r in members):,}", f"{sum(r.missing for r in members):,}", time,
                      packed if stage == 2 else "")
    console.print(table)
    for stage in sorted({r.entry.stage for r in rows}):
        mine = [r for r in rows if r.entry.stage == stage]
        cost = f"about {duration(totals[stage])} by the run times measured in the records"
        if unmeasured[stage]:
            cost += f", plus {', '.join(unmeasured[stage])} (no run measured yet)"
        console.print(f"stage {stage}: {sum(r.planned for r in mine):,} runs, {sum(r.recorded for r in mine):,} "
                      f"recorded, {sum(r.missing for r in mine):,} to run; {cost}"
                      f"{' (feature extraction not included)' if stage == 1 else ''}", highlight=False)
        if stage == 2 and packed_totals[stage]:
            console.print(f"stage 2 device-hours: {totals[stage] / 3600:,.1f} one at a time, "
                          f"{packed_totals[stage] / 3600:,.1f} packed (`adapters train --pack`)"
                          + (f"; not measured: {', '.join(unpacked[stage])}" if unpacked[stage] else ""),
                          highlight=False)
    inexact = [r for r in rows if not r.exact]
    if inexact:
        console.print(f"{len(inexact)} entries counted from the task specs, not from exact run keys (`study run` "
                      f"makes splits and features first), e.g. {inexact[0].entry.label}: {inexact[0].note}",
                      markup=False, highlight=False)
    _print_excluded(left_out, excluded)
    _print_excluded(impossible, excluded, "levels that cannot run, excluded")


def _cost(seconds: list[float | None]) -> tuple[str, float, bool]:
    """A column's text, the known seconds, and whether some entry has no measured time."""
    known = sum(s for s in seconds if s is not None)
    missing = any(s is None for s in seconds)
    return ("≥ " + duration(known) if known else "unknown") if missing else duration(known), known, missing


def _print_excluded(left_out: list, every: bool, what: str = "entries excluded") -> None:
    if not left_out:
        return
    if every:
        for item in left_out:
            console.print(f"excluded {item.entry.label}: {item.reason}", markup=False, highlight=False)
        return
    by_reason: dict[str, list] = defaultdict(list)
    for item in left_out:
        by_reason[item.reason].append(item.entry)
    console.print(f"{len(left_out)} {what} (--excluded lists each):", highlight=False)
    for reason, members in by_reason.items():
        what = " · ".join(_span(label, [getattr(e, attr) for e in members]) for label, attr in
                          (("methods", "variant"), ("backbones", "backbone"), ("tasks", "task"), ("levels", "level")))
        console.print(f"  {len(members)} ({what}): {reason}", markup=False, highlight=False)


def _span(label: str, values: list[str]) -> str:
    """``3 methods`` or the values themselves where there are at most two."""
    distinct = sorted(set(values))
    return ", ".join(distinct) if len(distinct) <= 2 else f"{len(distinct)} {label}"


def run_cmd(
    only: str | None = typer.Option(None, "--only", help="Filter as in `study plan`."),
    executor: str = typer.Option("inline", "--executor", help="inline (here, one after another), local "
                                 "(submitit LocalExecutor: subprocesses), slurm (submitit job arrays)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for submitted jobs and report them; "
                                                             "--no-wait returns once they are submitted."),
    keep_going: bool = typer.Option(True, "--keep-going/--stop-on-error",
                                    help="An entry that fails is listed at the end and the others run (exit "
                                         "status 1 if any failed); --stop-on-error stops at the first."),
) -> None:
    """Run what the grid lacks: per backbone, extract once then every probe; then every training entry. Runs
    already recorded are skipped, so a killed study restarted runs only the missing keys. Few-shot levels that
    no fold can draw are excluded (listed at the end), not errors."""
    from study.expand import expand, parse_only
    from study.plan import plan, runnable
    from study.runner import ensure_splits, execute, make_batches
    study = _study()
    grid = study.grid()
    entries, left_out = expand(study, grid, parse_only(only))
    for line in ensure_splits(study, grid, {e.task for e in entries}):
        console.print(line, highlight=False)
    with console.status("matching the grid against the records"):
        entries, impossible = runnable(study, grid, entries)
        rows = plan(study, grid, entries)
    batches = make_batches(rows, int(study.executor.get("runs_per_task", 1)))
    done = sum(r.planned for r in rows if r.exact and r.missing == 0)
    console.print(f"{plural(len(entries), 'entry', 'entries')} ({len(left_out)} excluded by the grid, "
                  f"{len(impossible)} cannot run); {plural(len(batches), 'batch', 'batches')} to run, "
                  f"{done:,} runs already recorded", highlight=False)

    def progress(i: int, n: int, result, batch) -> None:
        if result is None:
            console.print(f"[{i + 1}/{n}] {batch.label}", markup=False, highlight=False)
            return
        failed = f", {len(result.failed)} failed" if result.failed else ""
        console.print(f"    wrote {result.written}, {result.existing} already recorded, "
                      f"{plural(len(result.skipped), 'level')} skipped{failed}, {result.seconds:.1f} s",
                      highlight=False)
        for note in result.notes:
            console.print(f"    {note}", markup=False, highlight=False)

    results, jobs = execute(batches, study, grid, executor=executor, wait=wait, keep_going=keep_going,
                            progress=progress)
    if jobs:
        console.print(f"submitted {len(jobs)} {executor} jobs ({', '.join(jobs[:5])}{' ...' if len(jobs) > 5 else ''});"
                      f" logs in {study.root / 'jobs'}", highlight=False)
    for result in results:
        for line in result.skipped:
            console.print(f"[yellow]skipped[/] {line}", highlight=False)
    if results:
        written = sum(r.written for r in results)
        console.print(f"wrote {plural(written, 'run record')} to {study.runs}; `featcache report` summarises "
                      "them", highlight=False)
    for item in impossible:
        console.print(f"not run (cannot run) {item.entry.label}: {item.reason}", markup=False, highlight=False)
    failed = [line for r in results for line in r.failed]
    if failed:
        console.print(f"{plural(len(failed), 'entry', 'entries')} failed; the others ran:", highlight=False)
        for line in failed:
            console.print(f"  failed {line}", markup=False, highlight=False)
        raise typer.Exit(1)


def report(
    results: Path = typer.Option(Path("runs"), "--results", help="Folder of run records."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for report.md and figures/."),
) -> None:
    """Write a Markdown report with PNG figures from the records alone: tables (head LR chosen on validation
    loss, patient-level 95 % intervals), box plots, MCC against trainable share, few-shot curves, compute."""
    from study.report import write_report

    found = find_study()
    study = load_study(found) if found is not None else None
    if study is not None and study.runs is not None and Path(results).resolve() != study.runs:
        study = None  # records of elsewhere: the study's cohort and grid say nothing about them
    made = write_report(results, out, study)
    for note in made.notes:
        console.print(f"[dim]{note}[/]", highlight=False)
    console.print(f"wrote {made.markdown} ({made.records} records, {len(made.figures)} figures in "
                  f"{made.markdown.parent / 'figures'})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `init`, `report` and the `study` sub-app (`plan`, `run`)."""
    app.command("init")(init)
    app.command("report")(report)
    sub = new_app("The study's grid: what it holds and what is recorded (plan), and running what is missing.")
    sub.command("plan")(plan_cmd)
    sub.command("run")(run_cmd)
    app.add_typer(sub, name="study")
