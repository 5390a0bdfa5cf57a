"""`featcache models` and `featcache weights`: what the registry knows and which weights are on this machine."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.console import console
from featcache.backbones import ALIASES, BACKBONES, locate
from featcache.backbones.weights import weights_root
from featcache.errors import WeightsError


def models() -> None:
    """List the backbones of the registry: source, views and dimensions, input, PEFT target names."""
    table = Table(title="Backbones (also: timm:NAME, hf:ORG/NAME, open_clip:NAME; add -tiny for a tiny random variant)")
    for col in ("name", "source", "views", "input", "PEFT targets", "about"):
        table.add_column(col, no_wrap=col == "name")
    for spec in BACKBONES.values():
        views = ", ".join(f"{v}:{d}" for v, d in spec.views.items())
        aliases = [alias for alias, name in ALIASES.items() if name == spec.name]
        named = f"{spec.name}\n(alias: {', '.join(aliases)})" if aliases else spec.name
        table.add_row(named, spec.source, views, str(spec.input_size), " ".join(spec.peft.all_names()),
                      spec.description)
    console.print(table)


def weights() -> None:
    """Show, for each backbone, whether its weights are on this machine (where) or what to download."""
    table = Table(title="Pretrained weights (looked up offline)")
    for col in ("backbone", "status", "download", "found at"):
        table.add_column(col, overflow="fold")
    for spec in BACKBONES.values():
        source = f"hf: {spec.weights.repo} ({spec.weights.files[0]})" if spec.weights.repo else spec.weights.url
        try:
            location = locate(spec)
            table.add_row(spec.name, "[green]found[/]", source, f"{location.path} ({location.where})")
        except WeightsError:
            table.add_row(spec.name, "[red]missing[/]", source, "")
    console.print(table)
    console.print(f"Provide weights by any of: the Hugging Face cache (`hf download REPO FILE` on a connected "
                  f"machine, then copy ~/.cache/huggingface/hub); a folder {weights_root()}/<backbone>/ "
                  "(set FEATCACHE_WEIGHTS to move it; MedCLIP: unpack its release zip there); or --weights PATH "
                  "on any command. --random-init runs the real architecture with random weights.")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("weights")(weights)
