"""A study report from run records alone: Markdown tables and PNG figures (matplotlib, Agg).

What it shows and how it chooses, stated again at the top of every report:
- full data: per task x backbone x method, mean ± std over folds of image-level MCC (at the threshold chosen
  on held-out scores, where the run had one) and AP (average precision, the benchmark's PR-AUC), plus the 95 %
  patient-level bootstrap interval of the folds' pooled test predictions (MCC at each run's threshold, AP);
- gradient-trained runs: per group, the head LR with the lowest mean validation loss
  (`records.select_head_lr`); test data never chooses;
- few-shot: MCC at the validation threshold (as the tables) against k, median and interquartile range over
  backbones, folds and draws; runs of the old few-shot rule (support sets from train + val) are left out of the
  figure and counted in a line, never pooled with the current rule's;
- runs made with random weights are marked in every table and figure title.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from adapters.methods import HEAD_LRS, method_order
from adapters.plan import TrainSettings
from featcache.backbones.weights import RANDOM_INIT, TINY_RANDOM
from featcache.errors import FeatcacheError, RecordError
from featcache.fileio import atomic_write
from featcache.records import (
    PROBE_METHOD,
    RunRecord,
    load_records,
    options_label,
    pooled_interval,
    select_head_lr,
    summarize_records,
)
from featcache.splits import SUPPORT_FROM
from featcache.text import duration, plural
from study.studyfile import Study

RANDOM_MARK = "random weights"
FIGURE_DPI = 150
_MARKERS = "osD^vP*Xh<>p"


def is_random(record: RunRecord) -> bool:
    """Whether a run's backbone had random weights (random-init, or a tiny test variant)."""
    return record.provenance.get("weights") in (RANDOM_INIT, TINY_RANDOM) or record.identity in (RANDOM_INIT,
                                                                                                   TINY_RANDOM)


def _val_threshold(record: RunRecord) -> float | None:
    value = record.metrics.get("val_threshold")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def threshold(record: RunRecord) -> float:
    """The threshold behind `mcc`: the validation-chosen one where the run has it (full data and few-shot of
    both stages), else 0.5 (few-shot probes of earlier versions had no validation part)."""
    value = _val_threshold(record)
    return 0.5 if value is None else value


def mcc(record: RunRecord) -> float:
    """MCC at the validation threshold where the run has one, else at 0.5 (see `threshold`)."""
    value = record.metrics.get("mcc_val_thr") if _val_threshold(record) is not None else None
    if value is None or not math.isfinite(float(value)):
        value = record.metrics.get("mcc")
    return math.nan if value is None else float(value)


def at_half(records: Iterable[RunRecord]) -> int:
    """How many runs have no validation threshold, so `mcc` is at 0.5 for them."""
    return sum(_val_threshold(r) is None for r in records)


def _order(methods: Iterable[str]) -> list[str]:
    """Method variants in the table's order (the cached probe, then `adapters.methods.METHODS`), then others."""
    return sorted(set(methods), key=lambda v: (-1 if v == PROBE_METHOD else method_order(v), v))


NA = "n/a"  # a statistic that cannot be computed (one run has no spread; one class predicted has no MCC)


def _fmt(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return NA
    return f"{mean:.3f} ± {NA}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def one_class_called(records: Iterable[RunRecord]) -> bool:
    """Whether every test image of these runs was called the same class: MCC is then undefined (recorded as 0)."""
    calls = {bool(score >= threshold(r)) for r in records for score in r.test_scores}
    return len(calls) == 1


def _median_iqr(values: Sequence[float]) -> str:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return NA
    q1, med, q3 = np.percentile(finite, [25, 50, 75])
    return f"{med:.3f} ({q1:.3f}–{q3:.3f})"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


@dataclass
class Report:
    """What `write_report` made: the Markdown file, the figures, and notes on choices and gaps."""

    markdown: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0


# ---------------------------------------------------------------------------------------------------- tables


def full_table(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per task x backbone x method variant (full data, head LR already chosen): fold mean ± std of
    MCC and PR-AUC, and the pooled patient-level 95 % intervals."""
    rows = []
    for row in summarize_records(records, metrics=("average_precision",)):
        members = [r for r in records if (r.task, r.backbone, r.method) == (row["task"], row["backbone"],
                                                                            row["method"])
                   and r.regime == "full" and _options_match(r, row["options"])]
        values = np.array([math.nan if one_class_called([r]) else mcc(r) for r in members])
        finite = values[np.isfinite(values)]
        rows.append({
            "task": row["task"], "backbone": row["backbone"], "method": members[0].variant,
            "runs": row["runs"], "random": any(is_random(r) for r in members),
            "mcc_mean": float(finite.mean()) if finite.size else math.nan,
            "mcc_std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "ap_mean": row["average_precision"].mean, "ap_std": row["average_precision"].std,
            "pooled": pooled_interval(members, threshold=threshold),
            "pooled_one_class": one_class_called(members),
            "head_lr": members[0].options.get("head_lr"),
        })
    return rows


def _options_match(record: RunRecord, label: str) -> bool:
    return options_label(record.options) == label


def lp_path(record: RunRecord) -> str:
    """Which path trained a stage-2 run: ``features`` (LP on exact stored features) or ``images``."""
    return str(record.provenance.get("trained_on", "images"))


def compute_table(records: list[RunRecord]) -> tuple[list[list[str]], list[list[str]]]:
    """Wall time by stage (runs, of them with random weights, total, mean per run; stage 2 split by what it
    trained on), and per task x backbone the cost of the LP on images and on stored features against the
    cached probe, where the probe and either LP ran (same regime: full data)."""
    by_stage: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.wall_time_s is not None:
            by_stage["1 (cached probe)" if r.method == PROBE_METHOD else
                     "2 (LP on stored features)" if lp_path(r) == "features" else "2 (trained end to end)"].append(r)
    stages = []
    for name, members in sorted(by_stage.items()):
        total = sum(r.wall_time_s or 0.0 for r in members)  # members all have one
        stages.append([name, str(len(members)), str(sum(map(is_random, members))), duration(total),
                       duration(total / len(members))])
    pairs: dict[tuple[str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.regime == "full" and r.method in ("probe", "lp") and r.wall_time_s is not None:
            pairs[r.task, r.backbone]["probe" if r.method == "probe" else lp_path(r)].append(r)
    ratios = []
    for (task, backbone), runs in sorted(pairs.items()):
        if runs["probe"] and (runs["images"] or runs["features"]):
            mean = {m: float(np.mean([r.wall_time_s for r in runs[m]])) if runs[m] else None
                    for m in ("images", "features")}
            probe = float(np.mean([r.wall_time_s for r in runs["probe"]]))
            name = _backbone(backbone, [r for m in runs.values() for r in m])
            ratios.append([task, name, duration(probe),
                           *(duration(v) if (v := mean[m]) is not None else "–" for m in ("images", "features")),
                           *(_ratio(v / probe) if (v := mean[m]) is not None and probe > 0 else "–"
                             for m in ("images", "features"))])
    return stages, ratios


def _ratio(value: float) -> str:
    return f"{value:,.0f}×" if value >= 10 else f"{value:.2g}×"


def _backbone(name: str, records: Iterable[RunRecord]) -> str:
    """A backbone's table cell, marked where any of its runs had random weights."""
    return f"{name} *({RANDOM_MARK})*" if any(is_random(r) for r in records) else name


# --------------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9})
    return plt


def _title(text: str, records: Iterable[RunRecord]) -> str:
    return f"{text} ({RANDOM_MARK})" if any(is_random(r) for r in records) else text


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=FIGURE_DPI, bbox_inches="tight")
    tmp.replace(path)
    return path


def box_figure(task: str, records: list[RunRecord], path: Path) -> Path:
    """MCC of each method across backbones and folds, full data."""
    plt = _pyplot()
    methods = _order(r.variant for r in records)
    data = [[v for r in records if r.variant == m and math.isfinite(v := mcc(r))] for m in methods]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.75 * len(methods) + 2), 3.8))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), [f"{m}\nn={len(d)}" for m, d in zip(methods, data, strict=True)],
                  rotation=30 if len(methods) > 6 else 0)
    ax.axhline(0, color="0.7", linewidth=0.8, zorder=0)
    ax.set_xlabel("method")
    ax.set_ylabel("MCC (validation threshold)")
    backbones = len({r.backbone for r in records})
    ax.set_title(_title(f"{task}: MCC per method, full data\n{backbones} backbone(s) × folds", records))
    ax.text(0.99, 0.01, "line: median, triangle: mean; n: runs per box", transform=ax.transAxes, ha="right",
            va="bottom",
            fontsize=8, color="0.4")
    ax.grid(axis="y", alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def share_points(records: list[RunRecord]) -> tuple[list[tuple[str, str, float, float]], list[str]]:
    """(method, backbone, trainable share, mean MCC) per backbone x method. The cached probe trains D + 1
    parameters beside a frozen backbone, whose size its records carry; records that counted the probe alone take
    the backbone's total from a trained run of it, or are left out (with a note) where there is none."""
    totals = {r.backbone: r.total_params for r in records if r.method != PROBE_METHOD and r.total_params}
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[r.variant, r.backbone].append(r)
    points, missing = [], []
    for (method, backbone), members in sorted(groups.items()):
        first = members[0]
        total = first.total_params
        if method == PROBE_METHOD and (not total or total <= (first.trainable_params or 0)):  # older probe records
            total = totals.get(backbone)  # counted the probe alone: take the backbone's size from a trained run
        if not total or not first.trainable_params:
            missing.append(f"{method} on {backbone}")
            continue
        values = [v for r in members if math.isfinite(v := mcc(r))]
        if values:
            points.append((method, backbone, first.trainable_params / total, float(np.mean(values))))
    return points, missing


def share_figure(task: str, records: list[RunRecord], path: Path) -> tuple[Path | None, list[str]]:
    """Mean MCC over folds against the share of trainable parameters (log x), one marker per method."""
    points, missing = share_points(records)
    if not points:
        return None, missing
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for i, method in enumerate(_order(p[0] for p in points)):
        mine = [p for p in points if p[0] == method]
        ax.scatter([p[2] * 100 for p in mine], [p[3] for p in mine], marker=_MARKERS[i % len(_MARKERS)], s=45,
                   label=method)
        for _, backbone, share, value in mine:  # which backbone each point is
            ax.annotate(backbone, (share * 100, value), xytext=(4, 3), textcoords="offset points", fontsize=7,
                        color="0.35")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("MCC, mean over folds")
    ax.set_title(_title(f"{task}: MCC against trainable share, full data", records))
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    out = _save(fig, path)
    plt.close(fig)
    return out, missing


_REGIME_STYLE = {"fewshot": ("-", ""), "fewshot-center": ("--", " per center")}


def _quartiles(records: list[RunRecord]) -> list[tuple[int, float, float, float]]:
    """(k, q1, median, q3) of MCC over the runs of each k."""
    out = []
    for k in sorted({r.shots for r in records if r.shots is not None}):
        values = np.array([mcc(r) for r in records if r.shots == k])
        values = values[np.isfinite(values)]
        if values.size:
            out.append((k, *np.percentile(values, [25, 50, 75])))
    return out


def equal_runs(records: list[RunRecord]) -> bool:
    """Whether every backbone has as many runs (folds x draws) at each method x regime x k as the others: only
    then is a median over all backbones not weighted towards the backbones with more draws."""
    counts: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        counts[r.variant, r.regime, r.shots][r.backbone] += 1
    backbones = {r.backbone for r in records}
    return all(set(c) == backbones and len(set(c.values())) == 1 for c in counts.values())


def fewshot_table(records: list[RunRecord]) -> list[list[Any]]:
    """Per backbone x method x regime x k: runs, MCC and AP as median (IQR) over folds and draws."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[r.backbone, r.variant, r.regime, r.shots].append(r)
    methods = _order(r.variant for r in records)
    rows = []
    for (backbone, method, regime, k), members in sorted(groups.items(), key=lambda item: (
            item[0][0], methods.index(item[0][1]), item[0][2], item[0][3])):
        ap = [float(r.metrics.get("average_precision", math.nan)) for r in members]
        rows.append([_backbone(backbone, members), method, regime, k, len(members),
                     _median_iqr([mcc(r) for r in members]), _median_iqr(ap)])
    return rows


def fewshot_figure(task: str, records: list[RunRecord], path: Path) -> Path:
    """MCC at the validation threshold (`mcc`, as the tables) against k per method (dashed: k per class per
    center): median line and interquartile band (and bar) over draws and folds; the first panel pools every
    backbone, the others show one each. Runs without a validation threshold are at 0.5, and the title says how
    many."""
    plt = _pyplot()
    backbones = sorted({r.backbone for r in records})
    each = [(b, [r for r in records if r.backbone == b]) for b in backbones]
    panels = each if len(backbones) > 1 and not equal_runs(records) else \
        [("all backbones", records)] + (each if len(backbones) > 1 else [])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.3 * rows), squeeze=False, sharey=True)
    methods = _order(r.variant for r in records)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, (name, members) in zip(axes.flat, panels, strict=False):
        for method in methods:
            for regime, (style, suffix) in _REGIME_STYLE.items():
                stats = _quartiles([r for r in members if r.variant == method and r.regime == regime])
                if not stats:
                    continue
                k, q1, med, q3 = (np.array(c) for c in zip(*stats, strict=True))
                color = colors[method]
                ax.plot(k, med, marker="o", linestyle=style, color=color, label=f"{method}{suffix}")
                ax.fill_between(k, q1, q3, color=color, alpha=0.15, linewidth=0)
                ax.vlines(k, q1, q3, color=color, alpha=0.6, linewidth=1.5)
        ax.set_xscale("log", base=2)
        ticks = sorted({r.shots for r in members if r.shots is not None})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(name)
        ax.set_xlabel("k (images per class)")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("MCC at the validation threshold")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    half = at_half(records)
    fig.suptitle(_title(f"{task}: few-shot MCC (validation threshold) against k, median and interquartile range "
                        f"over folds and draws" + (f"; {half} runs without one at 0.5" if half else ""), records))
    labels: dict[str, Any] = {}  # every method and regime drawn in any panel, once
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), title="method", loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------- report


def write_report(results: str | Path, out: str | Path, study: Study | None = None) -> Report:
    """Read every record in ``results`` and write ``out/report.md`` with its figures in ``out/figures/``. With
    the ``study`` the records belong to, the report also has its name, its cohort and the levels it skipped."""
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise RecordError(f"{results}: no such records folder")
    files = len(list(results.glob("[!.]*.json")))
    everything = load_records(results)
    if not everything:
        raise RecordError(f"{results}: no run records (<run key>.json) in this folder")
    kept, choices = select_head_lr(everything)
    report = Report(out / "report.md", records=len(everything))
    figures = out / "figures"
    md = [f"# {study.name if study else 'Study report'}", "",
          f"Run records in {results.resolve()}, read {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every number "
          "below comes from these records" + (f" and the study file {study.path}." if study else "."), "",
          *_counts_section(files, everything, kept)]
    randoms = sorted({f"{r.backbone} ({r.provenance.get('weights') or r.identity})" for r in everything
                      if is_random(r)})
    if randoms:
        md += [f"**Random weights:** runs of {', '.join(randoms)} used random weights; their rows are marked "
               f"*{RANDOM_MARK}* and their figure titles say so. They test the pipeline, not the models.", ""]
    md += _protocol_section(everything, study)
    if study is not None:
        md += _skipped_section(study)
        md += _cohort_section(study, sorted({r.task for r in everything}))
    md += ["How to read it: metrics are image-level, as the benchmark reported them (records also hold "
           "patient-level ones: `featcache results`). MCC is at the threshold chosen on held-out scores of the "
           "tested model, in tables and figures, full data and few-shot (0.5 only where a run had none); AP is "
           f"average precision, the benchmark's PR-AUC. {NA}: a statistic that cannot be computed (a spread of one "
           "run; MCC where every test image was called one class). Gradient-trained runs keep, per task x "
           "backbone x method x regime, the head LR with the lowest mean validation loss; test data never "
           "chooses.", ""]
    if choices:
        md += ["<details><summary>Head-LR choices (by mean validation loss)</summary>", ""]
        md += [f"- {line}" for line in choices] + ["", "</details>", ""]
    full = [r for r in kept if r.regime == "full"]
    few = [r for r in kept if r.regime != "full"]
    for task in sorted({r.task for r in kept}):
        md += [f"## {task}", ""]
        mine = [r for r in full if r.task == task]
        if mine:
            md += _full_section(task, mine, figures, report)
        shots = [r for r in few if r.task == task and r.support_from == SUPPORT_FROM]
        if old := sum(r.task == task and r.support_from != SUPPORT_FROM for r in few):
            md += [f"{old} few-shot runs of {task} were made under the old rule (support sets drawn from train + "
                   "validation patients) and are left out: remake the splits (`featcache splits`) and rerun "
                   "them.", ""]
        if shots:
            md += _fewshot_section(task, shots, figures, report)
    md += _compute_section(everything)
    atomic_write(report.markdown, ("\n".join(md) + "\n").encode("utf-8"))
    return report


def _counts_section(files: int, everything: list[RunRecord], kept: list[RunRecord]) -> list[str]:
    """What was read and what was left out, and why: the numbers `featcache results` prints too."""
    lines = [f"**Records:** {files:,} record files read; {len(everything):,} distinct runs"]
    if files > len(everything):
        lines[0] += (f" ({files - len(everything):,} files are older copies of a run also recorded under its "
                     "current key, counted once)")
    dropped = len(everything) - len(kept)
    lines[0] += (f"; {len(kept):,} shown below" + (f", {dropped:,} left out: runs of head LRs not chosen on "
                                                   "validation loss" if dropped else "") +
                 f". `featcache results` counts the same {len(everything):,} runs (all in results.csv) and "
                 f"summarises the same {len(kept):,}.")
    return [*lines, ""]


def _protocol_section(records: list[RunRecord], study: Study | None) -> list[str]:
    """Settings of these runs that differ from the benchmark's protocol (docs: PROTOCOL.md), listed up front."""
    protocol = TrainSettings()
    trained = [r for r in records if r.method != PROBE_METHOD]
    lines = []
    for name in ("max_epochs", "patience", "warmup", "plateau_patience"):
        values = sorted({r.options[name] for r in trained if r.options.get(name) is not None})
        if values and values != [getattr(protocol, name)]:
            lines.append(f"{name.replace('_', ' ')}: {', '.join(map(str, values))} (protocol: "
                         f"{getattr(protocol, name)})")
    lrs = sorted({float(r.options["head_lr"]) for r in trained if "head_lr" in r.options})
    if lrs and lrs != sorted(HEAD_LRS):
        lines.append(f"head LRs tried: {', '.join(f'{v:g}' for v in lrs)} (protocol: "
                     f"{', '.join(f'{v:g}' for v in sorted(HEAD_LRS))})")
    for task in sorted({r.task for r in trained}):
        folds = _fold_count(task, records, study)
        used = sorted({r.fold for r in trained if r.task == task})
        if folds and len(used) < folds:
            lines.append(f"{task}: trained end to end on {plural(len(used), 'fold')} of {folds} "
                         f"({', '.join(used)}); probes on every fold")
    draws: dict[str, set[int]] = defaultdict(set)
    per_level: dict[tuple, int] = defaultdict(int)
    for r in records:
        if r.regime != "full":
            per_level[r.task, r.backbone, r.variant, r.regime, r.shots, r.fold, options_label(r.options)] += 1
    for (_, _, variant, *_), n in per_level.items():
        draws["cached probe" if variant == PROBE_METHOD else "trained"].add(n)
    if draws:
        shown = "; ".join(f"{stage} {', '.join(map(str, sorted(n)))}" for stage, n in sorted(draws.items()))
        lines.append(f"few-shot runs per fold and level (draws x head LRs): {shown} (the benchmark's draw count "
                     "is not public)")
    if not lines:
        return []
    return ["**Settings that differ from the benchmark's protocol:**", "", *[f"- {line}" for line in lines], ""]


def _fold_count(task: str, records: list[RunRecord], study: Study | None) -> int:
    """Folds of a task: its spec's where the study knows it, else the folds any run of it used."""
    if study is not None:
        try:
            return study.task_spec(task).k
        except FeatcacheError:
            pass
    return len({r.fold for r in records if r.task == task})


def _skipped_section(study: Study) -> list[str]:
    """The grid's levels that were not run: excluded by the grid, or impossible on this cohort."""
    from study.expand import expand
    from study.plan import runnable

    try:
        grid = study.grid()
        entries, excluded = expand(study, grid)
        _, impossible = runnable(study, grid, entries)
    except FeatcacheError as err:
        return [f"**Levels skipped:** not known ({err}).", ""]
    items = [*impossible, *excluded]
    if not items:
        return []
    by_reason: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_reason[item.reason].append(item.entry.label)
    lines = [f"**Levels skipped ({len(items)} of grid {grid.name}):**", ""]
    for reason, labels in by_reason.items():
        shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        lines.append(f"- {reason}: {shown}")
    return [*lines, ""]


def _cohort_section(study: Study, tasks: list[str]) -> list[str]:
    """Images, patients and positives per task and center, from the manifest (labels) and the split file."""
    from featcache.manifest import load_manifest

    rows = []
    for task in tasks:
        try:
            spec = study.task_spec(task)
            path = study.manifest_for(task)
            if path is None:  # no manifest for this task: nothing to describe
                continue
            manifest = load_manifest(path)
            ids, codes = manifest.labels(spec)
        except (FeatcacheError, TypeError):
            continue
        patients, centers = manifest.patients(ids), manifest.centers(ids)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, center in enumerate(centers):
            groups[center].append(i)
        for center, members in sorted(groups.items()) + [("all", list(range(len(ids))))]:
            pos = [i for i in members if codes[i] == 1]
            rows.append([task, center, len(members), len({patients[i] for i in members}), len(pos),
                         len({patients[i] for i in pos}), spec.positive])
    if not rows:
        return []
    return ["## Cohort", "", *_table(("task", "center", "images", "patients", "positive images",
                                       "positive patients", "positive class"), rows), "",
            "Labelled images of each task's manifest; splits are by patient.", ""]


def _fewshot_section(task: str, records: list[RunRecord], figures: Path, report: Report) -> list[str]:
    path = fewshot_figure(task, records, figures / f"{task}_fewshot.png")
    report.figures.append(path)
    lines = ["### Few-shot", "",
             *_table(("backbone", "method", "regime", "k", "runs", "MCC, median (IQR)",
                      "AP, median (IQR)"), fewshot_table(records)), "",
             "Runs: folds x draws of the level (the head LR chosen on validation loss); median and interquartile "
             "range over them. MCC at the validation threshold, as in the full-data table and the figure"
             + (f" ({half} runs without one: at 0.5)" if (half := at_half(records)) else "") + ".", "",
             f"![{task} few-shot]({path.relative_to(report.markdown.parent)})", ""]
    if len({r.backbone for r in records}) > 1 and not equal_runs(records):
        note = (f"{task}: the backbones have unequal numbers of few-shot runs, so no curve pools them; each "
                "backbone has its own panel.")
        report.notes.append(note)
        lines += [note, ""]
    return lines


def _full_section(task: str, records: list[RunRecord], figures: Path, report: Report) -> list[str]:
    rows = full_table(records)
    methods = _order(r["method"] for r in rows)
    rows.sort(key=lambda r: (r["backbone"], methods.index(r["method"])))
    table = []
    for r in rows:
        pooled = r["pooled"]
        ci = tuple(f"{pooled[m][0]:.3f} – {pooled[m][1]:.3f}" for m in ("mcc_ci", "average_precision_ci")) \
            if pooled else (NA, NA)
        if pooled and r["pooled_one_class"]:
            ci = (f"{NA} (one class called)", ci[1])
        lr = "–" if r["head_lr"] is None else f"{float(r['head_lr']):g}"
        name = f"{r['backbone']} *({RANDOM_MARK})*" if r["random"] else r["backbone"]
        table.append([name, r["method"], lr, r["runs"], _fmt(r["mcc_mean"], r["mcc_std"]),
                      _fmt(r["ap_mean"], r["ap_std"]), *ci])
    lines = ["### Full data", "", *_table(("backbone", "method", "head LR", "runs", "MCC (mean ± std)",
                                          "AP (mean ± std)", "MCC 95% CI", "AP 95% CI"), table), "",
             "Runs: one per fold. 95 % intervals: the folds' test predictions pooled (each image scored once, MCC "
             "at its run's threshold), 1,000 bootstrap resamples of patients.", ""]
    box = box_figure(task, records, figures / f"{task}_mcc_box.png")
    report.figures.append(box)
    lines += [f"![{task} MCC per method]({box.relative_to(report.markdown.parent)})", ""]
    share, missing = share_figure(task, records, figures / f"{task}_mcc_vs_trainable.png")
    if share is not None:
        report.figures.append(share)
        lines += [f"![{task} MCC against trainable share]({share.relative_to(report.markdown.parent)})", ""]
    if missing:
        note = (f"Left out of the trainable-share plot (no parameter count of the backbone in these records): "
                f"{', '.join(missing)}.")
        report.notes.append(f"{task}: {note}")
        lines += [note, ""]
    return lines


def _compute_section(records: list[RunRecord]) -> list[str]:
    stages, ratios = compute_table(records)
    lines = ["## Compute", "", *_table(("stage", "runs", f"with {RANDOM_MARK}", "wall time, total", "per run"),
                                       stages), "",
             "Cached-probe times are each run's share of a batched solve on stored features; extracting the "
             "features (once per backbone) is not in the records and not in these numbers.", ""]
    if ratios:
        lines += ["Cost of the benchmark's LP against the cached probe (full data, mean per run), through the "
                  "backbone every epoch (images) and on exact stored features (features: same numbers, each "
                  "run's share of one batched program, the extraction included):", "",
                  *_table(("task", "backbone", "cached probe", "LP, images", "LP, features", "images / probe",
                           "features / probe"), ratios), ""]
    return lines
