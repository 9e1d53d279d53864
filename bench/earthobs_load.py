"""BigEarthNet S2 loading speed: our GeoTIFF path and packed cache versus torchgeo's `BigEarthNet`.

All loaders read the same files in the same run, one process, one thread, OS cache warm (one pass
before timing), and return the same (12, 120, 120) float32 images. The data are the real BigEarthNet
v1 fixture patches (../shared/fixtures) or, with --demo or without fixtures, generated demo scenes,
laid out as torchgeo expects (`BigEarthNet-v1.0/` + `bigearthnet-{split}.csv`), the split file
listing the patches repeatedly up to --samples rows.

    python bench/earthobs_load.py [--samples 240] [--repeats 5] [--demo]

Targets: packed >= 10x torchgeo, GeoTIFF path >= 1x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("FM_SHARED_FIXTURES", REPO.parent / "shared" / "fixtures")) / "earthobs/bigearthnet-v1/s2-tiny"


def build_root(tmp: Path, samples: int, demo: bool) -> tuple[Path, str]:
    """torchgeo-layout root whose train split lists `samples` rows cycling over the source patches."""
    if demo or not FIXTURE.is_dir():
        from earthobs.demo_scenes import demo_bigearthnet

        source, what = demo_bigearthnet(cache_dir=tmp / "cache", n=24) / "BigEarthNet-v1.0", "demo scenes"
    else:
        source, what = FIXTURE, "real BigEarthNet v1 fixture patches"
    root = tmp / "ben"
    shutil.copytree(source, root / "BigEarthNet-v1.0", ignore=shutil.ignore_patterns("*.lock"))
    patches = sorted(p.name for p in (root / "BigEarthNet-v1.0").iterdir() if p.is_dir())
    rows = [f"{patches[i % len(patches)]},S1_unused_{i}\n" for i in range(samples)]
    for split in ("train", "val", "test"):
        (root / f"bigearthnet-{split}.csv").write_text("".join(rows))
    return root, f"{what} ({len(patches)} distinct)"


def interleaved_rates(loaders: dict, repeats: int) -> dict[str, float]:
    """Median samples/s per loader; passes alternate between loaders so that load changes on a shared
    machine hit all of them alike."""
    for dataset in loaders.values():  # warm the OS cache and lazily opened files
        for i in range(len(dataset)):
            dataset[i]
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, dataset in loaders.items():
            t0 = time.perf_counter()
            for i in range(len(dataset)):
                dataset[i]
            rates[name].append(len(dataset) / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo", action="store_true", help="use generated demo scenes instead of fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from torchgeo.datasets import BigEarthNet as TorchgeoBigEarthNet

    from earthobs.bigearthnet import BigEarthNetV1
    from earthobs.packed import PackedDataset, pack_split

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root, what = build_root(tmp, args.samples, args.demo)
        torchgeo = TorchgeoBigEarthNet(root, split="train", bands="s2")
        ours = BigEarthNetV1(root, split="train")
        ours_tifffile = BigEarthNetV1(root, split="train", engine="tifffile")
        t0 = time.perf_counter()
        packed = PackedDataset(pack_split(ours, tmp / "packed", dtype="float16"))
        pack_s = time.perf_counter() - t0
        diff = max(float((torchgeo[i]["image"] - ours[i]["image"]).abs().max()) for i in range(3))
        print(f"data: {what}, {len(ours)} samples per pass, {args.repeats} interleaved timed passes (median), 1 thread")
        print(f"check: max |torchgeo - ours| over 3 samples = {diff:.2f} DN (GDAL rounds its bilinear output)")
        rates = interleaved_rates({
            "torchgeo BigEarthNet (GeoTIFF)": torchgeo,
            "ours GeoTIFF, rasterio": ours,
            "ours GeoTIFF, tifffile engine": ours_tifffile,
            "ours packed cache (float16 memmap)": packed,
        }, args.repeats)
        base = rates["torchgeo BigEarthNet (GeoTIFF)"]
        print(f"{'loader':40s} {'samples/s':>10s} {'x torchgeo':>11s}")
        for name, rate in rates.items():
            print(f"{name:40s} {rate:10.0f} {rate / base:10.2f}x")
        print(f"packing {len(ours)} samples took {pack_s:.1f} s ({len(ours) / pack_s:.0f} samples/s, once)")


if __name__ == "__main__":
    main()
