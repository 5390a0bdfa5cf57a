"""`adapters train`, `predict` and `export`: end-to-end runs on the shared protocol, and what they produced."""

from __future__ import annotations

import csv
import io
import sys
from contextlib import ExitStack
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from adapters.methods import DEFAULT_RANK, HEAD_LRS, METHODS, RANKED, RANKS, get_method
from cli._common import rank0
from cli._study import given, grid_train_extras, settings_line
from cli.console import Update, console, err_console, plural, progress
from cli.probe_cmds import _mean_std, _shots, positive_floats
from featcache.fileio import atomic_write

_SETTINGS = ("fold", "draws", "head_lr", "max_epochs", "patience", "warmup", "plateau_patience", "batch_size",
             "accumulate", "seed", "backbone_lr", "augment")  # what `settings_line` accounts for


def lr_text(lr: float) -> str:
    """A learning rate as people write it: 1e-4, not 0.0001 or 1e-04."""
    return f"{lr:.0e}".replace("e-0", "e-")


_HEAD_LRS = ",".join(lr_text(lr) for lr in HEAD_LRS)  # 1e-2,1e-3,1e-4

class _EpochLines:
    """Per-epoch progress of each run through the shared `progress` helper (a bar on a terminal; off a terminal
    a plain line at most every few seconds): the run's name on a line of its own, then epochs done of the epoch
    limit with the validation loss and the best epoch, so each line fits 80 columns. Quiet under ``--quiet`` and
    on ranks other than 0."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and rank0()
        self.stack = ExitStack()
        self.label: str | None = None
        self.update: Update | None = None

    def __call__(self, label: str, done: int, total: int, status: str) -> None:
        if not self.enabled:
            return
        if label != self.label:
            self.stack.close()
            console.print(f"{label}:", highlight=False, markup=False)
            self.update = self.stack.enter_context(progress("  epoch", total, unit="epoch"))
            self.label = label
        assert self.update is not None  # set on the first call (a label is never None)
        self.update(done, total, status=status)
        if status.startswith("done"):
            self.stack.close()
            self.label = None
            if console.is_terminal:  # the bar disappears; the plain log already has this line
                console.print(f"  {status}", highlight=False, markup=False)

    def inputs(self, done: int, total: int) -> None:
        """Images decoded (or, on the features path, embedded) before training: a bar of their own."""
        self("preparing inputs", done, total, "done" if done >= total else "")

    def close(self) -> None:
        self.stack.close()


def _folds(text: str) -> list[str] | None:
    """``--fold``: None for all, else the comma-separated fold names."""
    return None if text.strip() == "all" else [f.strip() for f in text.split(",") if f.strip()]


def train(
    method: str = typer.Option(..., "--method", help=f"One of {', '.join(METHODS)}."),
    model: str = typer.Option(..., "--model", help="Backbone (`featcache models`; -tiny for the tiny variant)."),
    task: str = typer.Option(..., "--task", help="Task key, a label column of the manifest (e.g. AFC)."),
    manifest: Path = typer.Option(..., "--manifest", help="Canonical manifest; its splits must exist."),
    positive: str | None = typer.Option(None, "--positive", help="Positive class of a two-class column of your "
                                                                 "own (as for `featcache splits`)."),
    rank: int | None = typer.Option(None, "--rank", help=f"{'/'.join(RANKED)} rank (default {DEFAULT_RANK}; "
                                                         f"benchmark: {', '.join(map(str, RANKS))})."),
    fold: str = typer.Option("all", "--fold", help="Fold name(s), comma-separated (fold0, center-A, ...), or all."),
    full: bool = typer.Option(False, "--full", help="Full data (the default when --shots is not given)."),
    shots: str | None = typer.Option(None, "--shots", help="Few-shot k per class, e.g. 16 or 2,4,8."),
    draws: int | None = typer.Option(None, "--draws", min=1, help="Draws per few-shot level (default 10)."),
    per_center: bool = typer.Option(False, "--per-center", help="Use the k-per-class-per-center draws."),
    head_lr: str = typer.Option(_HEAD_LRS, "--head-lr", help="Head LR grid; each value is a run."),
    backbone_lr: float | None = typer.Option(None, "--backbone-lr",
                                             help="Backbone/adapter LR (default: FFT 1e-5, PEFT 1e-4)."),
    max_epochs: int = typer.Option(1000, "--max-epochs", min=1, help="Epoch limit."),
    patience: int = typer.Option(100, "--patience", min=1, help="Early stop after this many consecutive "
                                                                "epochs without a strictly lower validation "
                                                                "loss (warm-up counts)."),
    warmup: int = typer.Option(50, "--warmup", min=0, help="Linear LR warm-up epochs."),
    plateau_patience: int = typer.Option(25, "--plateau-patience", min=1,
                                         help="PyTorch ReduceLROnPlateau after warm-up: LR x0.1 (floor 1e-8) on "
                                              "the (N+1)-th consecutive epoch whose loss is not below its best "
                                              "x (1 - 1e-4); the count restarts after a cut."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                          help="Images per step (default per task: 128 AFC/NY, 64 CoCross, "
                                               "32 CAR and others)."),
    accumulate: int = typer.Option(1, "--accumulate", min=1,
                                   help="Split each batch into this many micro-batches: same result, less "
                                        "memory, except where batch norm trains (fft on a CNN: statistics per "
                                        "micro-batch; said in one line)."),
    seed: int = typer.Option(42, "--seed", help="Seed of head/adapter init, dropout and batch order."),
    augment: bool = typer.Option(False, "--augment", help="Random flips and small affine jitter (off: the "
                                                          "benchmark's setting)."),
    grad_ckpt: bool = typer.Option(False, "--grad-ckpt", help="Gradient checkpointing (large ViTs on a GPU)."),
    checkpoint_every: float = typer.Option(60.0, "--checkpoint-every", min=0.0,
                                           help="Seconds between resumable checkpoints (0: every epoch)."),
    adapter_dropout: float | None = typer.Option(None, "--adapter-dropout", min=0.0, max=0.99,
                                                 help="LoRA/VeRA dropout (default 0.1, the benchmark's; 0 lets "
                                                      "--pack be exact)."),
    pack: int = typer.Option(1, "--pack", min=1, help="Train this many runs together in one batched pass "
                                                      "(same records; halves itself when out of GPU memory)."),
    weights: Path | None = typer.Option(None, "--weights", help="Weights file or folder."),
    random_init: bool = typer.Option(False, "--random-init", help="Real architecture, random weights."),
    pixels: Path | None = typer.Option(None, "--pixels", help="Pixel cache (default: pixels.zarr beside the "
                                                              "manifest when it holds this input size)."),
    inputs: str = typer.Option("auto", "--from", help="lp only: features (the head on exact stored features, "
                                                      "same numbers) or images (through the backbone every "
                                                      "epoch); auto: features unless --augment."),
    features: Path | None = typer.Option(None, "--features", help="Feature store of --from features (default: "
                                                                  "features.zarr beside the manifest)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder of run records (one JSON + folder per run)."),
    quiet: bool = typer.Option(False, "--quiet", help="No per-epoch progress."),
) -> None:
    """Train MODEL end to end with one method on every fold (and few-shot draw), one record per head LR.

    Defaults, one per line (the benchmark's):
    - class-weighted cross-entropy; Adam; head LR grid 1e-2,1e-3,1e-4, one run each;
    - backbone LR 1e-5 (fft) or 1e-4 (lora, vera, bitfit, ia3); lp trains the head only;
    - up to 1000 epochs; 50 warm-up epochs; LR x0.1 (floor 1e-8) on the 26th epoch without a loss below the
      plateau's best x (1 - 1e-4), counted after warm-up (PyTorch ReduceLROnPlateau);
    - early stop after 100 epochs without a strictly lower validation loss; the best epoch's weights are tested;
    - MCC threshold from the same model's validation scores;
    - few-shot: trains on the support set (from the fold's train part); validates on the fold's whole
      validation part; folds whose validation part cannot validate are skipped;
    - frozen modules and BitFit's batch norm stay in eval mode; no augmentation; seed 42.
    lp without --augment trains every run's head at once on exact stored features (--from).
    Recorded runs in --out are read back; an interrupted run resumes from its last checkpoint.
    Scale out with `torchrun --nproc-per-node N --no-python adapters train ...` (rank 0 writes); equal to one
    process except where batch norm trains (fft on a CNN) without CUDA's synchronised batch norm. Or pack
    many small runs into one pass with --pack N (exact where no dropout or training batch norm is active).
    `featcache results` picks the head LR by mean validation loss.
    """
    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}: choose from {', '.join(METHODS)}", param_hint="--method")
    if full and (shots is not None or (draws is not None and given("draws")) or per_center):
        raise typer.BadParameter("--full excludes --shots, --draws and --per-center", param_hint="--full")
    if random_init and weights is not None:
        raise typer.BadParameter("--weights and --random-init exclude each other")
    from featcache.backbones import get_spec, weights_identity

    weights_identity(get_spec(model), weights, random_init)  # missing weights: one line, before torch loads
    from adapters.plan import TrainSettings
    from adapters.train import run_train

    settings = TrainSettings(max_epochs=max_epochs, patience=patience, warmup=warmup,
                             plateau_patience=plateau_patience, batch_size=batch_size, accumulate=accumulate,
                             seed=seed, backbone_lr=backbone_lr, augment=augment, grad_ckpt=grad_ckpt,
                             checkpoint_every_s=checkpoint_every, adapter_dropout=adapter_dropout, pack=pack,
                             **grid_train_extras())
    if rank0() and (line := settings_line(_SETTINGS)) is not None:
        console.print(line, markup=False, highlight=False)
    if random_init and rank0():
        console.print("[yellow]random-init: real architecture with random weights (recorded in each run)[/]")
    lines = _EpochLines(quiet)
    try:
        report = run_train(manifest, task, model, method=get_method(method), rank=rank, full=shots is None,
                           shots=_shots(shots) if shots is not None else (), draws=draws, per_center=per_center,
                           folds=_folds(fold), head_lrs=positive_floats(head_lr, "--head-lr"),
                           settings=settings, weights=weights, random_init=random_init, pixels=pixels, out=out,
                           device=device, progress=lines, load_progress=lines.inputs, positive=positive,
                           inputs=inputs, features=features,
                           note=lambda line: console.print(f"[yellow]note[/] {line}", highlight=False)
                           if rank0() else None)
    finally:
        lines.close()
    if not rank0():
        return
    for line in report.skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    for line in report.notes:
        console.print(f"[yellow]note[/] {line}", highlight=False)
    console.print(_table(report.records, f"{task} · {model} · {method}"))
    console.print(f"wrote {plural(report.written, 'run record')} ({report.existing} already there) to {out}",
                  highlight=False)


def _table(records, title: str) -> Table:
    """Mean ± std over folds (and draws) per level and head LR, with the validation loss that selects it."""
    from featcache.metrics import summarize

    table = Table(title=title, box=box.SIMPLE_HEAD, caption="MCC at the validation threshold; pick the head LR\n"
                  "by validation loss (`featcache results`), never by test scores")
    for name in ("regime", "k", "head LR", "runs", "val loss", "MCC", "AP", "best epoch", "trainable %"):
        table.add_column(name, justify="left" if name == "regime" else "right")
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r.regime, r.shots or 0, r.options.get("head_lr")), []).append(r)
    for (regime, k, lr), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        share = 100 * runs[0].trainable_params / runs[0].total_params
        table.add_row(regime, str(k or "–"), f"{lr:g}", str(len(runs)),
                      _mean_std(summarize([r.training.get("val_loss") for r in runs])),
                      _mean_std(summarize([r.metrics.get("mcc_val_thr") for r in runs])),
                      _mean_std(summarize([r.metrics.get("average_precision") for r in runs])),
                      _mean_std(summarize([r.training.get("best_epoch") for r in runs]), integer=True), f"{share:.3f}")
    return table


def predict(
    run: Path = typer.Option(..., "--run", help="A run folder (RUNS/<key>) or its record RUNS/<key>.json."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest of the images to score."),
    out: Path | None = typer.Option(None, "--out", help="CSV to write (default: print)."),
    exclude_seen: bool = typer.Option(False, "--exclude-seen", help="Leave out the images the run trained or "
                                                                    "validated on."),
    weights: Path | None = typer.Option(None, "--weights", help="Backbone weights (default: as trained)."),
    pixels: Path | None = typer.Option(None, "--pixels", help="Pixel cache (default: beside the manifest)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
) -> None:
    """Score images with a trained run: the probability of the positive class per image, in a column named
    after that class (score_<class>). Warns when it scores images the run trained or validated on."""
    from adapters.artifacts import predict as score

    with ExitStack() as stack:
        bars: dict[str, Update] = {}

        def follow(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                stack.close()
                bars.clear()
                bars[stage] = stack.enter_context(progress(stage, total, unit="image", out=err_console))
            bars[stage](done, total)

        made = score(run, manifest, weights=weights, pixels=pixels, device=device, exclude_seen=exclude_seen,
                     progress=follow)
    _say_seen(made, exclude_seen)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(made.rows[0]) if made.rows else ["image_id", made.column],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(made.rows)
    if out is None:
        sys.stdout.write(buffer.getvalue())
        return
    atomic_write(out, buffer.getvalue().encode("utf-8"))
    err_console.print(f"scored {plural(len(made.rows), 'image')} → {out} ({made.column}: probability of "
                      f"{made.column.removeprefix('score_')})", highlight=False, markup=False)


def _say_seen(made, excluded: bool) -> None:
    """One line on stderr about scored images the run had seen (never silent: they flatter its scores)."""
    if made.seen is None:
        err_console.print("note: this run folder does not list its training images; cannot tell whether any "
                          "scored image was seen in training", markup=False, highlight=False)
        return
    train, val = made.seen["train"], made.seen["val"]
    if excluded and made.dropped:
        err_console.print(f"left out {plural(made.dropped, 'image')} the run trained ({train}) or validated "
                          f"({val}) on", markup=False, highlight=False)
    elif train or val:
        err_console.print(f"warning: {plural(train + val, 'image')} seen in training ({train} train, {val} val), "
                          "see --exclude-seen", markup=False, highlight=False)


def export(
    run: Path = typer.Option(..., "--run", help="A run folder (RUNS/<key>) or its record."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    merge: bool = typer.Option(False, "--merge", help="Fold LoRA/IA3/VeRA into the backbone and write it for its "
                                                      "own library (timm, transformers), with the head, the "
                                                      "input rules and a plain predict.py."),
    weights: Path | None = typer.Option(None, "--weights", help="Backbone weights (default: as trained)."),
) -> None:
    """Hand over a trained run: the adapter as saved, or with --merge a model its library loads by itself."""
    from adapters.artifacts import export_merged

    folder = export_merged(run, out, merge, weights)
    console.print(f"exported {run} → {folder}{' (merged; see predict.py there)' if merge else ''}",
                  highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add `train`, `predict` and `export` to ``app``."""
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("export")(export)
