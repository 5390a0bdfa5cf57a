"""`adapters`: stage 2, gradient-based adaptation of the shared backbones."""

from __future__ import annotations

import copy

import typer
from rich.table import Table

from adapters.methods import DEFAULT_RANK, RANKED
from cli import train_cmds
from cli._common import new_app, run_app
from cli.console import console
from cli.train_cmds import lr_text
from featcache.backbones import get_spec
from featcache.errors import FeatcacheError

app = new_app("Stage 2: fine-tune backbones end to end (FFT, LoRA, VeRA, BitFit, IA3) on the shared protocol.",
              name="adapters")


@app.command("methods")
def methods(
    model: str = typer.Option(..., "--model", help="Backbone name (add -tiny for the tiny random variant)."),
    rank: int = typer.Option(DEFAULT_RANK, "--rank", min=1, help=f"{'/'.join(RANKED)} rank."),
) -> None:
    """Show what each method trains on MODEL: the modules it targets and its trainable parameters (the head
    counted as one logit, D + 1, as in run records and the stage-1 probe).

    Needs no weights: the architecture is built on PyTorch's meta device (shapes only, no memory, nothing read)."""
    spec = get_spec(model)
    import torch

    from adapters.classifier import Classifier
    from adapters.methods import METHODS, apply_method, target_modules
    from adapters.model import counted_parameters
    from featcache.backbones import build_backbone, match_targets

    meta = torch.device("meta")
    with meta:
        base = Classifier(build_backbone(spec, random_init=True), n_out=2)  # as training builds it
    table = Table(title=f"Adaptation methods on {spec.name} (architecture only: counts do not depend on weights)")
    for col in ("method", "targets", "modules", "trainable", "% of total", "backbone LR"):
        table.add_column(col)
    notes: list[str] = []
    for method in METHODS.values():
        try:
            targets = target_modules(spec, method)[0]
        except FeatcacheError as err:  # a method that does not apply to this backbone is shown as such
            table.add_row(method.name, "n/a", "-", "-", "-", "-")
            notes.append(str(err))
            continue
        with meta:
            adapted = apply_method(copy.deepcopy(base), method, rank if method.ranked else None)
            trainable, total = counted_parameters(adapted)
        modules = sum(len(v) for v in match_targets(base.backbone.model, tuple(targets)).values())
        what = " ".join(targets) or {"none": "head only", "all": "everything", "bias": "biases"}[method.trains]
        table.add_row(method.name, what, str(modules) if targets else "-", f"{trainable:,}",
                      f"{100 * trainable / total:.3f}", lr_text(method.backbone_lr) if method.backbone_lr else "-")
    console.print(table)
    for note in notes:
        console.print(f"[dim]n/a: {note}[/]", highlight=False)


train_cmds.register(app)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
