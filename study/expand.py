"""A study's grid as entries: one backbone x task x method (x rank) x regime x k each, standing for every fold
(x draw x head LR) run of that level; `--only` filters and the grid's `exclude` rules, and the entries that
cannot run, each with its reason (never dropped silently)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch

from adapters.methods import METHODS, RANKED, target_modules
from featcache.backbones import get_spec
from featcache.datasets import get_task
from featcache.errors import FeatcacheError, UsageError
from featcache.records import PROBE_METHOD, method_variant
from study.grid import FIELDS, Grid
from study.studyfile import Study


@dataclass(frozen=True, order=True)
class Entry:
    """One level of the grid: every fold (x draw x head LR) run of it."""

    backbone: str
    task: str
    method: str
    rank: int | None
    regime: str  # full | fewshot | fewshot-center
    shots: int | None

    @property
    def stage(self) -> int:
        return 1 if self.method == PROBE_METHOD else 2

    @property
    def variant(self) -> str:
        return method_variant(self.method, self.rank)

    @property
    def level(self) -> str:
        return self.regime if self.shots is None else f"{self.regime} k={self.shots}"

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.task} · {self.variant} · {self.level}"

    def fields(self) -> dict[str, str]:
        values = (self.stage, self.backbone, self.task, self.variant, self.rank, self.regime, self.shots)
        return {k: "" if v is None else str(v) for k, v in zip(FIELDS, values, strict=True)}


@dataclass(frozen=True)
class Excluded:
    entry: Entry
    reason: str


# ------------------------------------------------------------------------------------------------- expansion


def parse_only(expr: str | None) -> dict[str, str]:
    """``--only`` text, e.g. ``backbone=resnet*,method=lora|bitfit,regime=full`` -> {field: patterns}."""
    if not expr:
        return {}
    terms: dict[str, str] = {}
    for term in expr.split(","):
        name, sep, pattern = term.partition("=")
        name = name.strip()
        if not sep or name not in FIELDS or not pattern.strip():
            raise UsageError(f"--only {expr!r}: each term is FIELD=PATTERN with FIELD one of {', '.join(FIELDS)} "
                             "(patterns: fnmatch globs, alternatives split by |)")
        terms[name] = pattern.strip()
    return terms


def matches(entry: Entry, terms: dict[str, str]) -> bool:
    """Whether ``entry`` meets every term; a method pattern matches the method or its ranked variant."""
    values = entry.fields()
    for name, pattern in terms.items():
        candidates = [values[name]] + ([entry.method] if name == "method" else [])
        if not any(fnmatch(c, alt) for c in candidates for alt in pattern.split("|")):
            return False
    return True


def method_excluded(backbone: str, method: str) -> str | None:
    """Why ``method`` cannot run on ``backbone`` (stage 2's target table), or None."""
    if method == PROBE_METHOD:
        return None
    spec = get_spec(backbone)
    try:
        target_modules(spec, METHODS[method])
    except FeatcacheError as err:  # its message says what to use instead
        return str(err)
    return None


def _levels(study: Study, grid: Grid, task: str) -> Iterable[tuple[str, int | None, str | None]]:
    """(regime, k, why not) per level of a task; per-center levels are listed only to be excluded where the
    dataset has no centers."""
    spec = study.task_spec(task)
    if grid.full:
        yield "full", None, None
    for k in grid.shots:
        yield "fewshot", k, None
    for k in grid.center_shots:
        why = None if spec.has_centers else f"{spec.dataset} has no centers: no per-center few-shot"
        yield "fewshot-center", k, why


def expand(study: Study, grid: Grid, only: dict[str, str] | None = None) -> tuple[list[Entry], list[Excluded]]:
    """Every entry of the grid (filtered by ``only``), and those that cannot run, each with its reason."""
    entries: list[Entry] = []
    excluded: list[Excluded] = []
    reasons = {(b, m): method_excluded(b, m) for b in grid.backbones for m in grid.methods}
    for task in study.grid_tasks(grid):
        levels = list(_levels(study, grid, task))
        for backbone in grid.backbones:
            for method in grid.methods:
                for rank in grid.ranks if method in RANKED else (None,):
                    for regime, k, why_level in levels:
                        entry = Entry(backbone, task, method, rank, regime, k)
                        if only and not matches(entry, only):
                            continue
                        why = reasons[backbone, method] or why_level or _user_exclusion(grid, entry)
                        if why:
                            excluded.append(Excluded(entry, why))
                        else:
                            entries.append(entry)
    return entries, excluded


def _user_exclusion(grid: Grid, entry: Entry) -> str | None:
    for rule in grid.exclude:
        if matches(entry, rule.match):
            return rule.reason
    return None


def expected_runs(entry: Entry, grid: Grid) -> int:
    """Runs (records) of an entry from the task's fold count and the grid; the plan's count before splits
    exist (levels a small cohort cannot draw are fewer in practice)."""
    folds = get_task(entry.task).k
    if entry.stage == 1:
        return folds * (1 if entry.shots is None else grid.draws)
    folds = len(grid.train_folds) if grid.train_folds else folds
    draws = 1 if entry.shots is None else grid.train_draws
    return folds * draws * len(grid.head_lrs)
