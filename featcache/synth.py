"""A synthetic chest-X-ray cohort for tests, the demo and install checks.

Images are drawn with numpy: body soft tissue, dark lung fields, rib arcs, a bright mediastinum and heart,
detector vignetting and noise. Opacities (bright blobs and lower-zone haze inside the lungs) grow with a
per-patient extent that tracks the outcome, so even random-network features carry some signal. Each patient
has several images (pose jitter, PA or AP), and each center its own intensity offset, contrast and noise;
DICOM centers alternate MONOCHROME2 / MONOCHROME1 so decoders meet inverted, 12-bit-in-16 data. The cohort is
written with its canonical manifest (task ``SYN``: ALIVE / DEATH, lung bounding boxes in the bbox columns).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from featcache.fileio import atomic_write
from featcache.manifest import BBOX_COLUMNS, write_manifest

TASK = "SYN"
CLASSES = ("ALIVE", "DEATH")
FORMATS = ("png", "png16", "dicom")
SUFFIX = {"png": ".png", "png16": ".png", "dicom": ".dcm"}
_UID_SEED = "featcache-synth"


@dataclass(frozen=True)
class CenterStyle:
    """How one center's scanner renders the same chest."""

    name: str
    offset: float
    gain: float
    gamma: float
    noise: float
    monochrome1: bool  # DICOM only: stored inverted


@dataclass(frozen=True)
class Patient:
    """Anatomy and disease fixed per patient; images vary only by pose, view and small opacity jitter."""

    patient_id: str
    label: int
    center: CenterStyle
    extent: float  # 0..1 opacity burden
    lung: tuple[float, float]  # half width, half height
    heart: float  # half width
    blobs: np.ndarray  # (n, 4): cx, cy, sigma, amplitude


def _soft_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, edge: float):
    """1 inside the ellipse, 0 outside, with a smooth rim ``edge`` wide (no convolution needed)."""
    r = np.hypot((x - cx) / ax, (y - cy) / ay)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def _patient(i: int, label: int, center: CenterStyle, rng: np.random.Generator) -> Patient:
    extent = rng.uniform(0.45, 1.0) if label else rng.uniform(0.0, 0.55)
    n = 1 + rng.poisson(1 + 8 * extent)
    side = rng.choice([-1.0, 1.0], n)
    blobs = np.stack(
        [
            side * (0.40 + rng.uniform(-0.14, 0.14, n)),
            rng.uniform(-0.40, 0.45, n),
            rng.uniform(0.05, 0.12, n) * (0.7 + extent),
            rng.uniform(0.15, 0.30, n),
        ],
        axis=1,
    ).astype(np.float32)
    lung = (rng.uniform(0.25, 0.30), rng.uniform(0.52, 0.62))
    return Patient(f"P{i + 1:04d}", label, center, float(extent), lung, rng.uniform(0.26, 0.32), blobs)


def render(
    p: Patient, size: int, view: str, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One radiograph of ``p`` (float32 HxW in [0, 1], air dark) and its lung box (x0, y0, x1, y1)."""
    t = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle, scale = float(rng.normal(0.0, 0.04)), float(rng.uniform(0.93, 1.05))
    dx, dy = (float(v) for v in rng.normal(0.0, 0.03, 2))
    c, s = np.cos(angle), np.sin(angle)
    x = (c * (t[None, :] - dx) + s * (t[:, None] - dy)) / scale
    y = (-s * (t[None, :] - dx) + c * (t[:, None] - dy)) / scale

    body = _soft_ellipse(x, y, 0.0, 0.05, 0.92, 1.15, 0.04)
    lungs = np.maximum(
        _soft_ellipse(x, y, -0.40, -0.05, *p.lung, 0.05), _soft_ellipse(x, y, 0.40, -0.05, *p.lung, 0.05)
    )
    thorax = _soft_ellipse(x, y, 0.0, -0.05, 0.80, 0.72, 0.05)
    ribs = np.clip(np.cos(2 * np.pi * 5.0 * (y - 0.30 * x**2)), 0.0, 1.0) ** 2
    spine = np.exp(-((x / 0.09) ** 2)) * thorax
    heart = _soft_ellipse(x, y, 0.12, 0.28, p.heart * (1.15 if view == "AP" else 1.0), 0.25, 0.06)

    # Isotropic blobs survive the rigid pose, so draw them separably in image coordinates: one small matmul.
    bx, by, sigma, amp = p.blobs.T + rng.normal(0.0, 0.02, p.blobs.T.shape) * [[1], [1], [0], [0]]
    amp = amp * rng.uniform(0.85, 1.15, amp.shape)
    u, v = dx + scale * (c * bx - s * by), dy + scale * (s * bx + c * by)
    width = 2 * (sigma * scale) ** 2
    gx = np.exp(-((t[None, :] - u[:, None]) ** 2) / width[:, None])
    gy = np.exp(-((t[None, :] - v[:, None]) ** 2) / width[:, None]) * amp[:, None]
    blobs = (gy.T @ gx).astype(np.float32)
    haze = p.extent / (1.0 + np.exp(-(y - 0.15) / 0.12))

    img = 0.04 + 0.42 * body - 0.30 * lungs + 0.07 * ribs * thorax + 0.22 * spine + 0.20 * heart
    img = img + lungs * (0.40 * np.clip(blobs, 0.0, 1.0) + 0.25 * haze)
    img = img * (1.0 - 0.1 * (x**2 + y**2))
    style = p.center
    img = style.gain * np.clip(img, 0.0, 1.0) ** style.gamma + style.offset
    img = img + style.noise * rng.standard_normal(img.shape, dtype=np.float32)

    rows, cols = np.flatnonzero((lungs > 0.5).any(axis=1)), np.flatnonzero((lungs > 0.5).any(axis=0))
    bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return np.clip(img, 0.0, 1.0).astype(np.float32), bbox


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    *,
    patient_id: str,
    image_id: str,
    center: str = "",
    monochrome1: bool = False,
    modality: str = "DX",
    view: str = "PA",
    bits_stored: int = 12,
) -> Path:
    """Save a [0, 1] image as a DICOM radiograph (16-bit words, ``bits_stored`` used) that pydicom reads back.

    UIDs derive from the ids, so the same cohort gives the same files. MONOCHROME1 stores inverted values
    (bright air), as some CR systems do.
    """
    top = (1 << bits_stored) - 1
    values = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    if monochrome1:
        values = top - values
    sop = generate_uid(entropy_srcs=[_UID_SEED, image_id])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[_UID_SEED, patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[_UID_SEED, image_id, "series"])
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.InstitutionName = center
    ds.set_pixel_data(
        values, "MONOCHROME1" if monochrome1 else "MONOCHROME2", bits_stored, generate_instance_uid=False
    )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return atomic_write(path, buffer.getvalue())


def _save(path: Path, image: np.ndarray, fmt: str, p: Patient, image_id: str, view: str) -> None:
    if fmt == "dicom":
        write_dicom(
            path,
            image,
            patient_id=p.patient_id,
            image_id=image_id,
            center=p.center.name,
            monochrome1=p.center.monochrome1,
            view=view,
        )
    else:
        depth = np.uint8 if fmt == "png" else np.uint16
        buffer = io.BytesIO()
        Image.fromarray(np.round(image * np.iinfo(depth).max).astype(depth)).save(buffer, "PNG", compress_level=1)
        atomic_write(path, buffer.getvalue())


def _styles(centers: int, rng: np.random.Generator) -> list[CenterStyle]:
    return [
        CenterStyle(
            f"C{c + 1}",
            offset=rng.uniform(-0.06, 0.08),
            gain=rng.uniform(0.80, 1.05),
            gamma=rng.uniform(0.80, 1.25),
            noise=rng.uniform(0.01, 0.04),
            monochrome1=c % 2 == 1,
        )
        for c in range(centers)
    ]


def _assign(patients: int, positive_rate: float, centers: int, rng: np.random.Generator):
    """Exactly round(patients * rate) positives; each class dealt round-robin over centers."""
    labels = np.zeros(patients, dtype=int)
    labels[rng.permutation(patients)[: round(patients * positive_rate)]] = 1
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == k)) for k in (1, 0)])
    center = np.empty(patients, dtype=int)
    center[order] = np.arange(patients) % centers
    return labels, center


def make_cohort(
    out: str | Path,
    patients: int = 60,
    positive_rate: float = 0.3,
    images_per_patient: tuple[int, int] = (1, 3),
    centers: int = 3,
    size: int = 256,
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Write ``out/images/<center>/<patient>/<image>`` and ``out/manifest.csv``; return the manifest's path.

    ``fmt``: "png" (8-bit), "png16" (16-bit) or "dicom". The same arguments give the same files.
    """
    lo, hi = images_per_patient
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    if not (patients >= 1 and 1 <= centers <= patients and 0.0 <= positive_rate <= 1.0 and 1 <= lo <= hi):
        raise ValueError("need patients >= centers >= 1, 0 <= positive_rate <= 1 and 1 <= min <= max images")
    if size < 32:
        raise ValueError(f"size {size} is too small to draw a chest (min 32)")
    out = Path(out)
    streams = np.random.SeedSequence(seed).spawn(patients + 1)
    rng = np.random.default_rng(streams[0])
    styles = _styles(centers, rng)
    labels, where = _assign(patients, positive_rate, centers, rng)
    rows = []
    for i in range(patients):
        prng = np.random.default_rng(streams[i + 1])
        p = _patient(i, int(labels[i]), styles[where[i]], prng)
        folder = out / "images" / p.center.name / p.patient_id
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(int(prng.integers(lo, hi + 1))):
            view = "PA" if prng.random() < 0.6 else "AP"
            image, bbox = render(p, size, view, prng)
            image_id = f"{p.patient_id}_{j + 1}"
            path = folder / f"{image_id}{SUFFIX[fmt]}"
            _save(path, image, fmt, p, image_id, view)
            rows.append(
                {
                    "image_id": image_id,
                    "path": path.relative_to(out).as_posix(),
                    "patient_id": p.patient_id,
                    "center": p.center.name,
                    "view": view,
                    TASK: CLASSES[p.label],
                    **dict(zip(BBOX_COLUMNS, bbox, strict=True)),
                }
            )
    return write_manifest(rows, out / "manifest.csv")
