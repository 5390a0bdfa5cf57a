"""`featcache show`: put one image through the toolkit's input path and save what the model sees."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cli._common import check_choice
from cli.console import console

if TYPE_CHECKING:
    from featcache import imaging


def register(app: typer.Typer) -> None:
    """Add ``show`` to ``app``."""
    app.command("show")(show)


def show(
    image: Path = typer.Argument(..., help="Image file: DICOM, PNG, JPEG, TIFF."),
    size: int = typer.Option(224, min=1, help="Square side the image is resized to."),
    bbox: str | None = typer.Option(None, help="Crop box 'x0,y0,x1,y1' (pixels, half-open)."),
    intensity: str = typer.Option("minmax", help="'minmax' (per-image, the benchmark's) or 'none'."),
    out: Path | None = typer.Option(None, help="Preview PNG (default: ./<IMAGE stem>.preview.png)."),
) -> None:
    """Decode IMAGE as the models see it: print its header and value ranges, write an 8-bit preview PNG."""
    from featcache import imaging

    box = _parse_bbox(bbox)
    check_choice(intensity, imaging.INTENSITIES, "--intensity")
    info = imaging.describe(image)
    decoded = imaging.decode(image)
    gray = imaging.prepare_gray(decoded, size, box, intensity, source=image)
    preview = imaging.save_png(gray, out or Path(f"{image.stem}.preview.png"))

    lines = [("file", str(image)), *((key, str(value)) for key, value in info.items())]
    lines += [
        ("decoded", f"{decoded.shape[1]} x {decoded.shape[0]} (W x H), "
                    f"range [{decoded.min():.4f}, {decoded.max():.4f}] (air dark)"),
        ("crop", "none" if box is None else str(box)),
        ("model sees", f"{tuple(gray.shape)} gray, intensity {intensity}, "
                       f"range [{gray.min():.4f}, {gray.max():.4f}]"),
        ("preview", str(preview)),
    ]
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        console.print(f"{key:<{width}}  {value}", markup=False, highlight=False, soft_wrap=True)


def _parse_bbox(text: str | None) -> imaging.BBox | None:
    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (int(part) for part in text.split(","))
    except ValueError:
        message = f"expected four integers x0,y0,x1,y1, got {text!r}"
        raise typer.BadParameter(message, param_hint="--bbox") from None
    return x0, y0, x1, y1
