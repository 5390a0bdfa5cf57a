"""Image input: the one path from an image file to a model-ready tensor, shared by both stages.

``decode`` turns a file (PNG, JPEG, TIFF, ... through Pillow; DICOM through pydicom) into a float32 gray image
in [0, 1] with air dark. ``prepare_gray`` crops it, resizes it to a square and normalises its intensity;
``to_model_input`` applies a backbone's mean/std and channel count. Feature extraction and fine-tuning both go
through ``load_gray``/``load_image``, so an LP-from-cache result and a fine-tuning result see the same pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from featcache.errors import ImageError
from featcache.fileio import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTENSITIES = ("minmax", "none")
DICOM_SUFFIXES = (".dcm", ".dicom")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's RGB -> L
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_TRUNCATED = "End of file reached before delimiter"  # pydicom's words for cut encapsulated data
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")  # pydicom hands the YBR ones back as RGB

BBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Preprocess:
    """How a gray X-ray becomes a backbone's input. Part of every store key, so any change re-embeds.

    ``intensity`` is ``"minmax"`` (per-image min-max to [0, 1], the benchmark's normalisation) or ``"none"``
    (keep the decoded [0, 1] values). ``channels`` is 1 or 3; the gray image is replicated to fill them.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: int = 3
    intensity: str = "minmax"

    def __post_init__(self) -> None:
        # Specs come from YAML/JSON too: coerce lists to float tuples so equal specs hash and serialise equal.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.size < 1:
            raise ValueError(f"Preprocess.size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocess needs 3 means and 3 positive stds, got {self.mean}, {self.std}")
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocess.channels must be 1 or 3, got {self.channels}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"Preprocess.intensity must be one of {INTENSITIES}, got {self.intensity!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists, not tuples); ``Preprocess(**d)`` rebuilds an equal spec."""
        d = asdict(self)
        return {**d, "mean": list(d["mean"]), "std": list(d["std"])}


# --------------------------------------------------------------------------------------------- decoding


def decode(path: str | Path) -> np.ndarray:
    """Decode one image file to a float32 ``(H, W)`` array in [0, 1], air dark.

    DICOM (``.dcm``/``.dicom`` suffix or a ``DICM`` preamble): modality LUT or rescale slope/intercept, then
    VOI LUT or window when present, scaled by the output range that ``BitsStored`` implies; MONOCHROME1 is
    inverted so air is dark; RGB/YBR become luminance. Multi-frame DICOMs give their first frame.
    Anything else goes through Pillow (first frame, EXIF orientation applied): colour becomes luminance, alpha
    is dropped, 8-bit is divided by 255 and 16-bit by 65535; stored intensities are taken as is (air dark).
    Bad input raises ``ImageError`` naming the file and the reason.
    """
    path = Path(path)
    _check_file(path)
    image = _decode_dicom(path) if _is_dicom(path) else _decode_pillow(path)
    if not np.isfinite(image).all():
        raise ImageError(path, "non-finite pixel values (NaN or inf)")
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(path, "file not found")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def _one_line(exc: BaseException) -> str:
    """A library's exception as one line (the CLI prints errors as single lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Pillow ----------------------------------------------------------------------------------------------


def _decode_pillow(path: Path) -> np.ndarray:
    # A corrupt file can make a parser raise nearly anything (OSError, SyntaxError, struct.error, ...);
    # the try covers only the library calls, so our own bugs still surface.
    try:
        with Image.open(path) as im:
            im.load()  # Pillow decodes lazily: force it so a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image file (neither DICOM nor a format Pillow can identify)") from None
    except Exception as exc:
        raise ImageError(path, f"truncated or corrupt image data ({_one_line(exc)})") from None
    return _pillow_to_gray(path, im)


def _pillow_to_gray(path: Path, im: Image.Image) -> np.ndarray:
    """Pillow image -> float gray in [0, 1], scaled by the bit depth of its mode."""
    if im.mode in ("L", "LA"):
        return np.asarray(im.getchannel(0), dtype=np.float32) / 255.0
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode == "I":
        # 32-bit container; in practice 16-bit scans (e.g. some TIFF/PNG writers). Anything wider is refused.
        values = np.asarray(im, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(path, "32-bit integer pixels outside the 16-bit range are not supported")
        return values.astype(np.float32) / 65535.0
    if im.mode == "F":
        return _float_to_unit(np.asarray(im, dtype=np.float32))
    try:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # RGB, RGBA (alpha dropped), P, CMYK, 1, ...
    except ValueError:
        raise ImageError(path, f"unsupported image mode {im.mode!r}") from None
    return rgb @ _LUMA / 255.0


def _float_to_unit(values: np.ndarray) -> np.ndarray:
    """Float pixels have no bit depth: keep them if already in [0, 1], else min-max them."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return values
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


# DICOM -----------------------------------------------------------------------------------------------


def _decode_dicom(path: Path) -> np.ndarray:
    ds = _read_dicom(path)
    if "PixelData" not in ds:
        raise ImageError(path, "DICOM file has no pixel data (PixelData element missing)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in _MONOCHROME:
        return _dicom_monochrome(path, ds, photometric)
    if photometric in _COLOUR:
        rgb = _dicom_frame(path, ds).astype(np.float32)
        return rgb @ _LUMA / float(2 ** int(ds.BitsStored) - 1)
    supported = ", ".join(_MONOCHROME + _COLOUR)
    raise ImageError(path, f"unsupported photometric interpretation {photometric!r} (supported: {supported})")


def _read_dicom(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    # pydicom only warns when encapsulated (JPEG, JPEG 2000) pixel data ends early, then drops the element,
    # which would read as "no pixel data": that warning is the real reason, so it becomes the error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            raise ImageError(path, "not a DICOM file (no 'DICM' preamble and file meta header)") from None
        except Exception as exc:  # corrupt headers raise anything from EOFError to struct.error
            raise ImageError(path, f"cannot read DICOM ({_one_line(exc)})") from None
    for w in caught:
        if _TRUNCATED in str(w.message):
            raise ImageError(path, "truncated DICOM: the file ends inside its (compressed) pixel data")
    for w in caught:  # anything else pydicom had to say still reaches the caller's warning filters
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def _dicom_frame(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The stored values of the first frame (RGB for colour data; pydicom converts YBR)."""
    try:
        return pixel_array(ds, index=0)
    except Exception as exc:  # truncated data, missing codec for a compressed transfer syntax, ...
        raise ImageError(path, f"cannot decode DICOM pixel data ({_one_line(exc)})") from None


def _dicom_monochrome(path: Path, ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    """Stored values -> modality LUT/rescale -> VOI LUT/window -> [0, 1] by output range -> air dark."""
    frame = _dicom_frame(path, ds)
    try:
        values = apply_voi_lut(apply_modality_lut(frame, ds), ds)
    except Exception as exc:  # e.g. a window width < 1, an unsupported VOI LUT function or LUT depth
        raise ImageError(path, f"cannot apply the DICOM modality/VOI transform ({_one_line(exc)})") from None
    lo, hi = _dicom_output_range(ds)
    gray = (values.astype(np.float64) - lo) / (hi - lo)
    return 1.0 - gray if photometric == "MONOCHROME1" else gray


def _dicom_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The value range after modality and VOI transforms, as pydicom produces it.

    A VOI LUT outputs ``[0, 2**bits - 1]`` with bits from its descriptor; a window outputs the modality output
    range (PS3.3 C.11.2.1.2), which is also the range when no VOI transform is present.
    """
    voi_bits = _lut_bits(ds.get("VOILUTSequence"))
    if voi_bits is not None:
        return 0.0, float(2**voi_bits - 1)
    modality_bits = _lut_bits(ds.get("ModalityLUTSequence"))
    if modality_bits is not None:
        return 0.0, float(2**modality_bits - 1)
    bits = int(ds.BitsStored)
    signed = bool(ds.get("PixelRepresentation", 0))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return float(lo), float(hi)


def _lut_bits(sequence: Any) -> int | None:
    """Bits per entry of a LUT sequence that pydicom would apply, else None."""
    if not sequence:
        return None
    item = sequence[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return int(item.LUTDescriptor[2])


# --------------------------------------------------------------------------------------------- header info


def describe(path: str | Path) -> dict[str, Any]:
    """What the file header says (format, size, mode or photometric, bit depth): for people, not models.

    Reads headers only; call ``decode`` for pixels. Raises ``ImageError`` like ``decode``.
    """
    path = Path(path)
    _check_file(path)
    if _is_dicom(path):
        return _describe_dicom(_read_dicom(path, stop_before_pixels=True))
    try:
        with Image.open(path) as im:
            return {"format": im.format, "width": im.width, "height": im.height, "mode": im.mode,
                    "frames": getattr(im, "n_frames", 1)}
    except Exception:
        raise ImageError(path, "not an image file (neither DICOM nor a format Pillow can identify)") from None


def _describe_dicom(ds: pydicom.Dataset) -> dict[str, Any]:
    info: dict[str, Any] = {
        "format": "DICOM", "width": ds.get("Columns"), "height": ds.get("Rows"),
        "photometric": ds.get("PhotometricInterpretation"), "bits_stored": ds.get("BitsStored"),
        "bits_allocated": ds.get("BitsAllocated"), "signed": bool(ds.get("PixelRepresentation", 0)),
        "frames": int(ds.get("NumberOfFrames", 1) or 1), "modality": ds.get("Modality"),
    }
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        info["rescale"] = f"slope {ds.RescaleSlope}, intercept {ds.RescaleIntercept}"
    if ds.get("VOILUTSequence"):
        info["voi"] = "VOI LUT"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        info["voi"] = f"window center {ds.WindowCenter}, width {ds.WindowWidth}"
    return {k: v for k, v in info.items() if v is not None}


# --------------------------------------------------------------------------------------------- geometry


def crop(image: np.ndarray, bbox: BBox, source: str | Path = "<array>") -> np.ndarray:
    """Crop ``(H, W)`` to the half-open box ``(x0, y0, x1, y1)``; a box off the image or empty is an error."""
    height, width = image.shape
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ImageError(source, f"bbox (x0, y0, x1, y1) = {tuple(bbox)} is empty or outside the "
                                 f"{width}x{height} image")
    return image[y0:y1, x0:x1]


# --------------------------------------------------------------------------------------------- tensors


def prepare_gray(image: np.ndarray, size: int, bbox: BBox | None = None, intensity: str = "minmax",
                 source: str | Path = "<array>") -> torch.Tensor:
    """Decoded ``(H, W)`` image in [0, 1] -> crop -> resize to ``(size, size)`` -> intensity, as a tensor.

    ``source`` only names the image in errors. Min-max runs after the antialiased resize: the model's input
    then spans exactly [0, 1], and a few hot pixels or burned-in labels, averaged away, cannot set the range.
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    if bbox is not None:
        image = crop(image, bbox, source)
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    gray = F.interpolate(pixels[None, None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0]
    if intensity == "minmax":
        lo, hi = gray.min(), gray.max()
        if hi <= lo:
            raise ImageError(source, "constant image (all pixels equal): min-max normalisation is undefined")
        gray = (gray - lo) / (hi - lo)
    return gray.clamp_(0.0, 1.0)


def load_gray(path: str | Path, size: int, bbox: BBox | None = None,
              intensity: str = "minmax") -> torch.Tensor:
    """Image file -> float ``(size, size)`` tensor in [0, 1]: ``decode`` then ``prepare_gray``."""
    return prepare_gray(decode(path), size, bbox, intensity, source=path)


def quantize(gray: torch.Tensor) -> torch.Tensor:
    """Gray in [0, 1] -> uint8 ``round(gray * 255)``, the compact form a pixel cache stores."""
    return (gray.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def save_png(gray: torch.Tensor, path: str | Path) -> Path:
    """Write gray ``(H, W)`` in [0, 1] as an 8-bit PNG a person can open; atomic (temp file + rename)."""
    buffer = io.BytesIO()
    Image.fromarray(quantize(gray).cpu().numpy()).save(buffer, format="PNG")
    return atomic_write(path, buffer.getvalue())


def to_model_input(gray: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Gray ``(H, W)``/``(B, H, W)``, float in [0, 1] or uint8 0..255 -> ``(C, H, W)``/``(B, C, H, W)``.

    Normalises each replicated channel by the backbone's mean/std (the first pair when ``channels == 1``).
    """
    if gray.ndim not in (2, 3) or tuple(gray.shape[-2:]) != (pre.size, pre.size):
        raise ValueError(f"expected gray of shape (H, W) or (B, H, W) with H = W = {pre.size}, "
                         f"got {tuple(gray.shape)}")
    x = gray.float() / 255.0 if gray.dtype == torch.uint8 else gray.float()
    mean = torch.tensor(pre.mean[: pre.channels], dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(pre.std[: pre.channels], dtype=x.dtype, device=x.device)[:, None, None]
    return (x.unsqueeze(-3) - mean) / std


def load_image(path: str | Path, pre: Preprocess, bbox: BBox | None = None) -> torch.Tensor:
    """Image file -> model-ready ``(C, size, size)`` float tensor, preprocessed as ``pre`` says."""
    return to_model_input(load_gray(path, pre.size, bbox, pre.intensity), pre)


class GrayDecoder:
    """Picklable decode step for DataLoader workers: file -> cropped, normalised, resized gray, as float in
    [0, 1] or, for the pixel cache, ``quantized`` to uint8."""

    def __init__(self, size: int, intensity: str, quantized: bool = False):
        self.size, self.intensity, self.quantized = size, intensity, quantized

    def __call__(self, path: Path, bbox: tuple[int, int, int, int] | None) -> torch.Tensor:
        gray = load_gray(path, self.size, bbox, self.intensity)
        return quantize(gray) if self.quantized else gray
