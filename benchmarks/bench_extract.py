"""Feature cache benchmark: ratios measured side by side in one run (a script, not a test).

1. extraction throughput (decode in workers + forward + zarr writes) against a bare ``model(x)`` loop over
   pre-made tensors, same model, batch size and threads (goal >= 0.9x);
2. a rerun on the complete store (goal: ~2 s beyond start-up; no model built);
3. a shuffled epoch read from the pixel cache against one decoding the source files (goal >= 3x);
4. peak RSS of an extraction at N and 10 N images, each in a fresh process (goal: flat);
5. what the row checksums cost: a checked read of a feature view against a plain one, a full verification
   (what every extract does before resuming) against a plain read of every array, and the digests of a pixel
   epoch against the epoch itself (goal: small ratios).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_extract.py [--images 256] [--sources 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featcache.backbones import build_backbone, get_spec  # noqa: E402
from featcache.extract import extract_features  # noqa: E402
from featcache.imaging import load_image  # noqa: E402
from featcache.integrity import row_digests, verify  # noqa: E402
from featcache.pixels import PixelDataset, cache_pixels  # noqa: E402
from featcache.store import RowGroup, Rows, feature_spec  # noqa: E402


def xray_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth body-like field plus noise in [0, 1]: compresses like a radiograph, not like pure noise."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = np.exp(-(x ** 2) / 0.5 - (y ** 2) / 0.9) + 0.3 * np.exp(-((np.abs(x) - 0.4) ** 2 + y ** 2) / 0.1)
    return np.clip(body / body.max() + rng.normal(0, 0.03, (size, size)), 0, 1)


def write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = xray_like(rng, size)
    lines = ["image_id,path,patient_id,center"]
    for i in range(n):
        image = np.roll(base, i % size, axis=1) * 0.9 + rng.uniform(0, 0.1, (size, size))
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
        lines.append(f"i{i:05d},{i:05d}.png,p{i},A")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def write_dicoms(folder: Path, n: int, size: int, seed: int = 1) -> Path:
    """16-bit MONOCHROME2 DICOMs at radiograph size: what stage 2 would decode every epoch."""
    import pydicom
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = xray_like(rng, size)
    lines = ["image_id,path,patient_id,center"]
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = DicomDataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        pixels = (np.roll(base, 7 * i, axis=0) * 4095).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        pydicom.dcmwrite(folder / f"{i:04d}.dcm", ds, enforce_file_format=True)
        lines.append(f"d{i:04d},{i:04d}.dcm,p{i},A")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def bare_loop(model: str, manifest: Path, batch_size: int) -> float:
    """Images/s of ``model(x)`` over the same images, pre-made as input tensors: the pipeline's ceiling."""
    from featcache.manifest import load_manifest

    m = load_manifest(manifest)
    backbone, pre = build_backbone(model, random_init=True), get_spec(model).preprocess
    inputs = torch.stack([load_image(m.abspath(i), pre) for i in m.ids])
    batches = inputs.split(batch_size)
    with torch.inference_mode():
        backbone(batches[0])  # warm-up, as the pipeline's first batch also pays it
        started = time.perf_counter()
        for x in batches:
            backbone(x)
    return len(inputs) / (time.perf_counter() - started)


def timed_extract(manifest: Path, model: str, store: Path, batch_size: int, workers: int
                  ) -> tuple[float, float]:
    """Images/s of an `extract_features` call on a fresh store: end to end (model build, store creation,
    worker start-up included) and from its first batch on (the steady state the bare loop compares with)."""
    first_batch: list[float] = []
    started = time.perf_counter()
    result = extract_features(manifest, model, store=store, random_init=True, batch_size=batch_size,
                              num_workers=workers, progress=lambda done, total: first_batch or
                              first_batch.append(time.perf_counter()))
    ended = time.perf_counter()
    assert result.embedded == result.rows and result.model_loaded
    return result.rows / (ended - started), result.rows / (ended - first_batch[0])


def cli_seconds(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.featcache_app", *args], check=True, cwd=ROOT,
                   capture_output=True)
    return time.perf_counter() - started


class _Decoding(Dataset):
    """What an epoch costs without the cache: decode, crop, resize, normalise every file."""

    def __init__(self, paths: list[Path], model: str):
        self.paths, self.pre = paths, get_spec(model).preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.pre)


def epoch_seconds(dataset: Dataset, batch_size: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


_PEAK = """
import json, sys
from pathlib import Path
from featcache.extract import extract_features
status = Path("/proc/self/status")
def vm(key):
    return int(next(l.split()[1] for l in status.read_text().splitlines() if l.startswith(key)))
before = vm("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark left by the imports
extract_features(sys.argv[1], sys.argv[2], store=sys.argv[3], batch_size=64, chunk_rows=256)
print(json.dumps({"before_kib": before, "peak_kib": vm("VmHWM:")}))
"""


def peak_rss(manifest: Path, model: str, store: Path) -> dict[str, int]:
    """RSS (KiB) of a fresh process after its imports, and its peak during the extraction of ``manifest``
    (decoding in-process, workers = 0). Linux: reads /proc/self/status, resets VmHWM via clear_refs."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(manifest), model, str(store)], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def feature_group(store: Path, model: str, n: int) -> RowGroup:
    """A complete group of ``n`` random rows of ``model``'s views, written chunk by chunk (no model run)."""
    spec = feature_spec(model, random_init=True)
    group = RowGroup.create_or_open(store, model, spec)
    ids = [f"r{i:06d}" for i in range(n)]
    group.sync(Rows.build(ids, [f"{i}.png" for i in ids], [None] * n))
    rng = np.random.default_rng(0)
    for chunk in range(group.n_chunks):
        rows = np.arange(group.n_rows)[group.chunk_slice(chunk)]
        values = {v: rng.normal(size=(len(rows), d)).astype(np.float16) for v, d in spec["views"].items()}
        group.write_chunk(chunk, rows, values, np.full(len(rows), ""))
    return RowGroup.open(store, group.name)


def best_of(rounds: int, run) -> float:
    """The fastest of ``rounds`` timings of ``run()``: others share these cores."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def checksum_rows(group: RowGroup, pixels: PixelDataset, rounds: int) -> list[tuple[str, str, str, str]]:
    """Section 5: checked against plain reads, in one run."""
    view, index = group.data_names[0], np.arange(group.n_rows)
    checked = best_of(rounds, lambda: group.read_checked(view, index))
    plain = best_of(rounds, lambda: group.read(view, index))
    full = best_of(rounds, lambda: verify(group))
    every = best_of(rounds, lambda: [group.read(name) for name in group.layout])
    raw = np.stack([np.asarray(pixels._array()[int(r)]) for r in pixels.rows])
    digests = best_of(rounds, lambda: [row_digests(row[None]) for row in raw])
    epoch = best_of(rounds, lambda: [pixels[i] for i in range(len(pixels))])
    n = f"{group.n_rows} rows"
    return [(f"checked read, {view} of {n} (s)", f"checked {checked:.3f}", f"plain {plain:.3f}",
             f"{checked / plain:.2f}x"),
            (f"verify before resuming, {n} (s)", f"verify {full:.3f}", f"plain read of all arrays {every:.3f}",
             f"{full / every:.2f}x"),
            (f"pixel epoch, {len(pixels)} rows (s)", f"digests {digests:.3f}", f"epoch {epoch:.3f}",
             f"{digests / epoch:.2f} of the epoch")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="built with --random-init")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512, help="PNG side for the throughput part")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of bare loop and pipeline")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, both sides [default: cores - workers: decoding gets its own]")
    parser.add_argument("--sources", type=int, default=48, help="DICOMs for the pixel-cache epoch")
    parser.add_argument("--source-size", type=int, default=2048)
    parser.add_argument("--memory-images", type=int, default=300, help="N of the N vs 10 N memory check")
    parser.add_argument("--memory-model", default="dinov2-s-tiny")
    parser.add_argument("--checksum-rows", type=int, default=20000, help="rows of the checksum section")
    parser.add_argument("--checksum-model", default="dinov2-b", help="its views' dims (no model is run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))
    print(f"torch threads {torch.get_num_threads()}, decoding workers {args.workers}, "
          f"batch {args.batch_size}")
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        manifest = write_pngs(tmp / "png", args.images, args.image_size)

        # Alternate the two and keep each one's best: others share these cores.
        ceiling, whole, steady = 0.0, 0.0, 0.0
        for round_ in range(args.rounds):
            ceiling = max(ceiling, bare_loop(args.model, manifest, args.batch_size))
            speeds = timed_extract(manifest, args.model, tmp / f"f{round_}.zarr", args.batch_size,
                                   args.workers)
            whole, steady = max(whole, speeds[0]), max(steady, speeds[1])
        rows.append((f"extract {args.model} (img/s)", f"{steady:.1f} ({whole:.1f} end to end)",
                     f"bare model(x) {ceiling:.1f}",
                     f"{steady / ceiling:.2f}x ({whole / ceiling:.2f}x end to end; goal >= 0.9)"))

        started = time.perf_counter()
        again = extract_features(manifest, args.model, store=tmp / "f0.zarr", random_init=True)
        rerun = time.perf_counter() - started
        assert again.embedded == 0 and not again.model_loaded
        startup = cli_seconds("--help")
        command = cli_seconds("extract", "--model", args.model, "--random-init", "--manifest", str(manifest),
                              "--store", str(tmp / "f0.zarr"))
        rows.append(("complete-store rerun (s)", f"in-process {rerun:.2f}",
                     f"CLI {command:.1f} (start-up {startup:.1f})",
                     f"+{command - startup:.1f} s beyond start-up, no model built"))

        sources = write_dicoms(tmp / "dcm", args.sources, args.source_size)
        cache_pixels(sources, args.model, store=tmp / "pixels.zarr", num_workers=args.workers)
        ids = [f"d{i:04d}" for i in range(args.sources)]
        files = sorted((tmp / "dcm").glob("*.dcm"))
        decoding = epoch_seconds(_Decoding(files, args.model), args.batch_size, args.workers)
        cached = epoch_seconds(PixelDataset(tmp / "pixels.zarr", args.model, ids), args.batch_size,
                               args.workers)
        rows.append((f"epoch of {args.sources} DICOM {args.source_size}px (s)", f"cache {cached:.2f}",
                     f"decode {decoding:.2f}", f"{decoding / cached:.1f}x (goal >= 3)"))

        small = write_pngs(tmp / "mem_n", args.memory_images, 96)
        large = write_pngs(tmp / "mem_10n", 10 * args.memory_images, 96)
        at_n = peak_rss(small, args.memory_model, tmp / "mem_n.zarr")
        at_10n = peak_rss(large, args.memory_model, tmp / "mem_10n.zarr")
        grown = [(m["peak_kib"] - m["before_kib"]) / 1024 for m in (at_n, at_10n)]
        rows.append((f"peak RSS, {args.memory_model} (MiB)",
                     f"N={args.memory_images}: {at_n['peak_kib'] / 1024:.0f} (+{grown[0]:.0f})",
                     f"10N: {at_10n['peak_kib'] / 1024:.0f} (+{grown[1]:.0f})",
                     f"{at_10n['peak_kib'] / at_n['peak_kib']:.2f}x (goal: flat)"))

        group = feature_group(tmp / "checks.zarr", args.checksum_model, args.checksum_rows)
        rows += checksum_rows(group, PixelDataset(tmp / "pixels.zarr", args.model, ids, raw=True), args.rounds)

    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])} on {os.cpu_count()} cores")
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)))


if __name__ == "__main__":
    main()
