"""Image input: DICOM and Pillow decoding, crop, resize/normalise, bad input, and `featcache show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from featcache.errors import ImageError
from featcache.imaging import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    decode,
    describe,
    load_gray,
    load_image,
    prepare_gray,
    quantize,
    to_model_input,
)

REPO = Path(__file__).resolve().parents[1]
LUMA = np.array([0.299, 0.587, 0.114])


def _ramp(height: int = 24, width: int = 32, top: int = 255) -> np.ndarray:
    """A 2-D ramp covering 0..top, so every test image has real contrast and a known orientation."""
    ramp = np.linspace(0, top, height * width).reshape(height, width)
    return np.round(ramp).astype(np.uint16 if top > 255 else np.uint8)


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                 pixel_data: bool = True, **elements: object) -> Path:
    """A minimal valid DICOM file (explicit VR little endian, with preamble) holding ``pixels``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(pixels, photometric, bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if not pixel_data:
        del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- the real chest radiograph


@pytest.fixture(scope="module")
def rg1() -> Path:
    return Path(get_testdata_file("RG1_UNCI.dcm", download=False))


@pytest.fixture(scope="module")
def rg1_decoded(rg1: Path) -> np.ndarray:
    return decode(rg1)


def test_rg1_is_monochrome1_16_bit(rg1: Path) -> None:
    info = describe(rg1)
    assert (info["photometric"], info["bits_allocated"], info["bits_stored"]) == ("MONOCHROME1", 16, 15)
    assert (info["width"], info["height"]) == (1841, 1955)


def test_rg1_air_is_dark(rg1_decoded: np.ndarray) -> None:
    image = rg1_decoded
    assert image.dtype == np.float32 and image.shape == (1955, 1841)
    assert 0.0 <= image.min() < image.max() <= 1.0
    height, width = image.shape
    border = np.ones_like(image, dtype=bool)  # the outer 5% frame: air around the patient (and shutters)
    border[height // 20: -(height // 20), width // 20: -(width // 20)] = False
    centre = image[2 * height // 5: 3 * height // 5, 2 * width // 5: 3 * width // 5]  # mediastinum, spine
    assert image[border].mean() < centre.mean() - 0.05


def test_rg1_matches_independent_computation(rg1: Path, rg1_decoded: np.ndarray) -> None:
    # PS3.3 C.11.2.1.2.1 linear window written out by hand on pydicom's stored values (no rescale in this
    # file; the window's output range is the 15-bit range, so scaling to [0, 1] cancels it), then the
    # MONOCHROME1 inversion: 1 - y.
    ds = pydicom.dcmread(rg1)
    stored = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    y = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(rg1_decoded, 1.0 - y, atol=1e-5)


def test_load_image_shapes_and_normalisation(rg1: Path) -> None:
    pre = Preprocess(size=48, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    gray = load_gray(rg1, 48)
    assert gray.shape == (48, 48) and gray.dtype == torch.float32
    assert gray.min().item() == 0.0 and gray.max().item() == 1.0
    x = load_image(rg1, pre)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(x[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c], gray)
    one = load_image(rg1, Preprocess(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels=1))
    assert one.shape == (1, 48, 48)
    torch.testing.assert_close(one[0], (gray - 0.5) / 0.25)


# --------------------------------------------------------------------------- Pillow round trips


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg"])
def test_8_bit_gray_round_trip(tmp_path: Path, suffix: str) -> None:
    pixels = _ramp()
    path = tmp_path / f"gray{suffix}"
    Image.fromarray(pixels).save(path, quality=95)  # quality: JPEG only
    atol = 3 / 255 if suffix == ".jpg" else 1e-6
    np.testing.assert_allclose(decode(path), pixels / 255.0, atol=atol)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_gray_round_trip(tmp_path: Path, suffix: str) -> None:
    pixels = _ramp(top=65535)
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(pixels).save(path)  # uint16 -> mode "I;16"
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_allclose(decode(path), pixels / 65535.0, atol=1e-6)


COLOUR_FILES = [("RGB", ".png"), ("RGB", ".tif"), ("RGB", ".jpg"), ("RGBA", ".png"), ("RGBA", ".tif")]


@pytest.mark.parametrize(("mode", "suffix"), COLOUR_FILES)
def test_colour_becomes_luminance_and_alpha_is_dropped(tmp_path: Path, mode: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    rgb = np.stack([_ramp(), _ramp()[::-1], np.full((24, 32), 90, np.uint8)], axis=-1)
    alpha = rng.integers(0, 256, (24, 32, 1), dtype=np.uint8)
    pixels = np.concatenate([rgb, alpha], axis=-1) if mode == "RGBA" else rgb
    path = tmp_path / f"colour{suffix}"
    Image.fromarray(pixels).save(path, quality=95)  # quality: JPEG only
    assert Image.open(path).mode == mode
    atol = 4 / 255 if suffix == ".jpg" else 1e-5
    np.testing.assert_allclose(decode(path), rgb @ LUMA / 255.0, atol=atol)


def test_other_pillow_modes(tmp_path: Path) -> None:
    pixels = _ramp()
    la = np.stack([pixels, np.zeros_like(pixels)], axis=-1)
    Image.fromarray(la).save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    np.testing.assert_allclose(decode(tmp_path / "la.png"), pixels / 255.0, atol=1e-6)

    Image.fromarray(pixels).convert("P").save(tmp_path / "p.png")  # gray palette: exact
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_allclose(decode(tmp_path / "p.png"), pixels / 255.0, atol=1e-5)

    wide = _ramp(top=65535).astype(np.int32)
    Image.fromarray(wide).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    np.testing.assert_allclose(decode(tmp_path / "i32.tif"), wide / 65535.0, atol=1e-6)

    floats = np.linspace(-2.0, 6.0, 24 * 32, dtype=np.float32).reshape(24, 32)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_allclose(decode(tmp_path / "f.tif"), (floats + 2.0) / 8.0, atol=1e-6)


def test_32_bit_values_beyond_16_bits_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "i32.tif"
    Image.fromarray(np.full((8, 8), 70_000, np.int32)).save(path)
    with pytest.raises(ImageError, match="16-bit range") as err:
        decode(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- DICOM maths


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    stored = _ramp(top=4095)
    path = _write_dicom(tmp_path / "mono2.dcm", stored, RescaleSlope=2, RescaleIntercept=-100,
                        WindowCenter=3000, WindowWidth=4001)
    # modality: v = 2 x - 100; window output range = rescaled 12-bit range [-100, 8090]; scaled to [0, 1]
    v = stored * 2.0 - 100.0
    expected = np.clip((v - 2999.5) / 4000.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(decode(path), expected, atol=1e-6)
    assert describe(path)["voi"] == "window center 3000.0, width 4001.0"


def test_dicom_rescale_without_window_uses_bit_depth(tmp_path: Path) -> None:
    stored = _ramp(top=1000)  # far below the 12-bit ceiling: scaling is by depth, not by the data's max
    path = _write_dicom(tmp_path / "rescale.dcm", stored, RescaleSlope=0.5, RescaleIntercept=10)
    np.testing.assert_allclose(decode(path), stored / 4095.0, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    stored = _ramp(top=4095)
    lut = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    path = _write_dicom(tmp_path / "voilut.dcm", stored, VOILUTSequence=[item])
    np.testing.assert_allclose(decode(path), lut[stored] / 65535.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted_and_signed_range(tmp_path: Path) -> None:
    stored = _ramp(top=1023)
    mono1 = _write_dicom(tmp_path / "mono1.dcm", stored, "MONOCHROME1", bits_stored=10)
    np.testing.assert_allclose(decode(mono1), 1.0 - stored / 1023.0, atol=1e-6)
    signed = (stored.astype(np.int16) - 512)
    path = _write_dicom(tmp_path / "signed.dcm", signed, bits_stored=10)
    np.testing.assert_allclose(decode(path), (signed + 512) / 1023.0, atol=1e-6)


def test_dicom_multiframe_gives_first_frame_and_preamble_detects_dicom(tmp_path: Path) -> None:
    frames = np.stack([_ramp(top=4095), np.zeros((24, 32), np.uint16)])
    path = _write_dicom(tmp_path / "frames.bin", frames)  # no DICOM suffix: found by its 'DICM' preamble
    assert describe(path)["frames"] == 2
    np.testing.assert_allclose(decode(path), frames[0] / 4095.0, atol=1e-6)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_dicom_colour_becomes_luminance(tmp_path: Path, photometric: str) -> None:
    rgb = np.stack([_ramp(), _ramp()[::-1], np.full((24, 32), 90, np.uint8)], axis=-1)
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    path = _write_dicom(tmp_path / "colour.dcm", stored, photometric, bits_stored=8)
    np.testing.assert_allclose(decode(path), rgb @ LUMA / 255.0, atol=2 / 255)


# --------------------------------------------------------------------------- crop, intensity, tensors


def test_crop_to_bbox(tmp_path: Path) -> None:
    pixels = _ramp()
    path = tmp_path / "gray.png"
    Image.fromarray(pixels).save(path)
    gray = load_gray(path, 10, bbox=(4, 2, 14, 12), intensity="none")  # a 10x10 box: resize is the identity
    torch.testing.assert_close(gray, torch.from_numpy(pixels[2:12, 4:14] / 255.0).float())
    with pytest.raises(ImageError, match=r"\(0, 0, 33, 10\) is empty or outside the 32x24") as err:
        load_gray(path, 10, bbox=(0, 0, 33, 10))
    assert str(path) in str(err.value)
    with pytest.raises(ImageError, match="empty or outside"):
        load_gray(path, 10, bbox=(5, 5, 5, 9))


def test_intensity_minmax_and_none() -> None:
    image = np.linspace(0.2, 0.6, 64 * 64, dtype=np.float32).reshape(64, 64)
    minmax = prepare_gray(image, 16)
    assert minmax.min().item() == 0.0 and minmax.max().item() == 1.0
    kept = prepare_gray(image, 16, intensity="none")
    assert 0.2 <= kept.min().item() < kept.max().item() <= 0.6
    lo, hi = kept.min(), kept.max()
    torch.testing.assert_close(minmax, (kept - lo) / (hi - lo))
    with pytest.raises(ImageError, match="constant image"):
        prepare_gray(np.full((8, 8), 0.3, np.float32), 4, source="blank.png")


def test_to_model_input_accepts_uint8_and_batches() -> None:
    pre = Preprocess(8, IMAGENET_MEAN, IMAGENET_STD)
    gray = torch.rand(2, 8, 8)
    codes = quantize(gray)
    assert codes.dtype == torch.uint8 and torch.equal(codes, (gray * 255).round().to(torch.uint8))
    batch = to_model_input(codes, pre)
    assert batch.shape == (2, 3, 8, 8)
    torch.testing.assert_close(batch[1], to_model_input(codes[1].float() / 255, pre))
    with pytest.raises(ValueError, match="H = W = 8"):
        to_model_input(torch.rand(9, 9), pre)


def test_preprocess_spec() -> None:
    pre = Preprocess(size=224, mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25), channels=1)
    d = pre.to_dict()
    assert json.loads(json.dumps(d)) == d and Preprocess(**d) == pre
    assert d == {"size": 224, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 1, "intensity": "minmax"}
    assert hash(pre) == hash(Preprocess(224, (0.5,) * 3, (0.25,) * 3, 1))
    for bad in ({"size": 0}, {"std": (1, 0, 1)}, {"channels": 2}, {"intensity": "zscore"}, {"mean": (0.5,)}):
        with pytest.raises(ValueError):
            Preprocess(**{"size": 8, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **bad})


# --------------------------------------------------------------------------- bad input


def _truncated(tmp_path: Path, suffix: str) -> Path:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad input -> (file, words its message must contain)."""
    empty = tmp_path / "empty.png"
    empty.touch()
    text = tmp_path / "notes.png"
    text.write_text("patient notes, not pixels\n")
    fake_dicom = tmp_path / "fake.dcm"
    fake_dicom.write_text("not a dicom file\n")
    ramp = _ramp(top=4095)
    cut_dicom = _write_dicom(tmp_path / "cut.dcm", ramp)
    cut_dicom.write_bytes(cut_dicom.read_bytes()[:-200])
    return {
        "missing": (tmp_path / "absent.png", "file not found"),
        "zero-byte": (empty, "empty file"),
        "truncated png": (_truncated(tmp_path, ".png"), "truncated or corrupt"),
        "truncated jpeg": (_truncated(tmp_path, ".jpg"), "truncated or corrupt"),
        "truncated dicom": (cut_dicom, "cannot decode DICOM pixel data"),
        "non-image": (text, "not an image file"),
        "non-dicom .dcm": (fake_dicom, "not a DICOM file"),
        "no pixel data": (_write_dicom(tmp_path / "nopixels.dcm", ramp, pixel_data=False), "no pixel data"),
        "palette": (_write_dicom(tmp_path / "palette.dcm", _ramp(), "PALETTE COLOR", bits_stored=8),
                    "unsupported photometric interpretation 'PALETTE COLOR'"),
    }


BAD_KINDS = ["missing", "zero-byte", "truncated png", "truncated jpeg", "truncated dicom", "non-image",
             "non-dicom .dcm", "no pixel data", "palette"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_names_file_and_reason(tmp_path: Path, kind: str) -> None:
    path, reason = _bad_files(tmp_path)[kind]
    with pytest.raises(ImageError) as err:
        load_image(path, Preprocess(16, IMAGENET_MEAN, IMAGENET_STD))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message
    assert err.value.path == str(path)


def test_truncated_jpeg2000_dicom_says_truncated_without_a_warning(tmp_path: Path) -> None:
    """pydicom warns and drops cut encapsulated pixel data; the reason must be the cut, not 'no pixel data'."""
    import warnings

    data = Path(get_testdata_file("MR_small_jp2klossless.dcm", download=False)).read_bytes()
    path = tmp_path / "cut_j2k.dcm"
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any leaked pydicom warning fails the test
        with pytest.raises(ImageError, match="truncated DICOM") as err:
            decode(path)
    assert str(err.value).startswith(f"{path}: ") and "no pixel data" not in str(err.value)


# --------------------------------------------------------------------------- featcache show


def test_show_writes_the_preview_the_model_sees(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.featcache_app import app

    path = tmp_path / "scan.dcm"
    _write_dicom(path, _ramp(top=4095), "MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    out = tmp_path / "preview.png"
    args = ["show", str(path), "--size", "16", "--bbox", "2,2,30,22", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "MONOCHROME1" in result.output and "(16, 16)" in result.output
    preview = np.asarray(Image.open(out))
    assert preview.dtype == np.uint8 and preview.shape == (16, 16)
    np.testing.assert_array_equal(preview, quantize(load_gray(path, 16, bbox=(2, 2, 30, 22))).numpy())


def test_show_bad_file_is_one_line_on_stderr(tmp_path: Path) -> None:
    empty = tmp_path / "empty scan.dcm"
    empty.touch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "60"}  # narrow terminal: the line must not wrap
    proc = subprocess.run([sys.executable, "-m", "cli.featcache_app", "show", str(empty)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [f"error: {empty}: empty file (0 bytes)"]
    assert "Traceback" not in proc.stderr + proc.stdout
