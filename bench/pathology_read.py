"""Tile reading and tiling speed of the pathology data layer, against baselines measured in the same run.

Measured:
  read (20x)    tiles/s of `TileDataset` / `TileStream` through a DataLoader (decode, no augmentation)
                versus a plain `openslide.read_region` loop over the same coordinates, with 1 and N
                worker processes; prints ours / plain (target >= 0.9)
  read (40x)    the same on a generated 40x slide, where each 0.5 um/px tile is a 448 px level-0 read
                resized to 224 px; the plain loop does read_region + the same PIL resize
  tiling        seconds to tile the real fixture slide (target < 1 s)
  --big         peak RSS and time of tiling a generated 100,000 x 100,000 px slide (target < 2 GB)

  python bench/pathology_read.py                  # fixture slide, N = cpu count (max 4)
  python bench/pathology_read.py --big            # also the 100k x 100k slide (~0.3 GB on disk)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile
import torch
from torch.utils.data import DataLoader

from pathology.demo_slides import synthetic_tissue, write_pyramid_tiff
from pathology.slides import RESAMPLE
from pathology.tile_dataset import TileDataset, TileStream
from pathology.tiling import read_coords, tile_slide

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pathology" / "cmu-1-small-region.svs"


# ------------------------------------------------------------------------------------------------
# plain OpenSlide baseline


def _plain_read(args: tuple[str, np.ndarray, int, int]) -> int:
    """Read tiles with read_region (+ resize when the level-0 size differs); returns the count."""
    path, coords, size0, tile_px = args
    slide = openslide.OpenSlide(path)
    for x, y in coords:
        image = slide.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB")
        if size0 != tile_px:
            image = image.resize((tile_px, tile_px), RESAMPLE)
        np.asarray(image)
    slide.close()
    return len(coords)


def plain_tiles_per_s(path: str, coords: np.ndarray, size0: int, tile_px: int, workers: int) -> float:
    start = time.perf_counter()
    if workers <= 1:
        _plain_read((path, coords, size0, tile_px))
    else:
        chunks = np.array_split(coords, workers * 4)
        with mp.get_context("fork").Pool(workers) as pool:
            sum(pool.imap_unordered(_plain_read, [(path, c, size0, tile_px) for c in chunks]))
    return len(coords) / (time.perf_counter() - start)


def loader_tiles_per_s(dataset, workers: int, batch_size: int = 32) -> float:
    start = time.perf_counter()
    count = 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=False)
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        count += len(images)
    return count / (time.perf_counter() - start)


def compare_reads(
    label: str, slide_path: Path, tiles_dir: Path, slide_id: str, total: int, workers: int, rounds: int = 3
) -> None:
    coords_path = tiles_dir / slide_id / "coords.h5"
    coords, attrs = read_coords(coords_path)
    reps = max(1, -(-total // len(coords)))
    many = np.tile(coords, (reps, 1))[:total]
    size0, tile_px = int(attrs["patch_size_level0"]), int(attrs["patch_size"])
    print(
        f"\n== read {label}: {slide_path.name}, {len(coords)} tiles x{reps} = {len(many)} reads, "
        f"{size0} px level-0 -> {tile_px} px"
    )
    for n in sorted({1, workers}):
        loader_workers = 0 if n == 1 else n
        plain_tiles_per_s(str(slide_path), many[:64], size0, tile_px, 1)  # warm the page cache
        dataset = TileDataset(coords_path)
        dataset.coords = many
        stream = TileStream([coords_path], seed=0, num_samples=len(many), shard_block=32)
        runs: dict[str, list[float]] = {"plain": [], "dataset": [], "stream": []}
        for _ in range(rounds):  # interleaved rounds: paired ratios cancel drifting load on the machine
            runs["plain"].append(plain_tiles_per_s(str(slide_path), many, size0, tile_px, n))
            runs["dataset"].append(loader_tiles_per_s(dataset, loader_workers))
            runs["stream"].append(loader_tiles_per_s(stream, loader_workers))
        plain = np.array(runs["plain"])
        line = f"workers={n}: plain read_region {np.median(plain):7.1f} tiles/s"
        for key, name in (("dataset", "TileDataset"), ("stream", "TileStream")):
            ratio = np.median(np.array(runs[key]) / plain)
            line += f" | {name} {np.median(runs[key]):7.1f} tiles/s (ratio {ratio:.2f})"
        print(line + f"   [median of {rounds} rounds]")


# ------------------------------------------------------------------------------------------------
# the 100k x 100k slide


def write_big_slide(path: Path, side: int = 100_000, mpp: float = 0.25, tile: int = 256) -> Path:
    """A sparse pyramidal TIFF: glass tiles are left empty (OpenSlide: transparent), a few tissue
    fragments repeat pre-encoded tissue tiles. Writing takes seconds, the file ~0.3 GB."""
    rgb = synthetic_tissue(1024, 1024, mpp, "tumour", seed=0, coverage=1.0)
    encoded = [
        imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[y : y + tile, x : x + tile]), level=80)
        for y in range(0, 1024, tile)
        for x in range(0, 1024, tile)
    ]
    centres = np.array([[0.3, 0.3], [0.65, 0.4], [0.45, 0.75]]) * side
    radius = 0.12 * side

    def in_tissue(px: float, py: float) -> bool:
        return bool((np.hypot(centres[:, 0] - px, centres[:, 1] - py) < radius).any())

    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for level, factor in enumerate((1, 4, 16, 64)):
            width = -(-side // factor)
            n = -(-width // tile)

            def tiles(n=n, factor=factor):
                for ty in range(n):
                    for tx in range(n):
                        if in_tissue((tx + 0.5) * tile * factor, (ty + 0.5) * tile * factor):
                            data = encoded[(ty * 7 + tx * 3) % len(encoded)]
                            yield data, len(data)
                        else:
                            yield b"", 0

            writer.write(
                tiles(),
                shape=(width, width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if level else 0,
                resolution=(1e4 / (mpp * factor),) * 2,
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


BIG_TILING = """
import sys, time
from pathlib import Path
from pathology.tiling import tile_slide
start = time.perf_counter()
r = tile_slide(sys.argv[1], sys.argv[2], "big", overwrite=True)
seconds = time.perf_counter() - start
# VmHWM: this process's peak RSS since exec (ru_maxrss would include the parent's size at fork)
peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM"))
print(r.status, r.n_tiles, round(seconds, 2), peak_kb, r.reason)
"""


def bench_big(workdir: Path) -> None:
    path = workdir / "big-100k.tif"
    start = time.perf_counter()
    write_big_slide(path)
    size_mb = path.stat().st_size / 1e6
    print(f"\n== big slide: wrote {path.name} ({size_mb:.0f} MB) in {time.perf_counter() - start:.1f} s")
    proc = subprocess.run(
        [sys.executable, "-c", BIG_TILING, str(path), str(workdir / "big-tiles")],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"tiling the big slide failed:\n{proc.stderr}")
        return
    status, n_tiles, seconds, peak_kb, *_ = proc.stdout.split()
    print(
        f"tiling 100,000 x 100,000 px: {status}, {n_tiles} tiles in {float(seconds):.1f} s; "
        f"peak RSS {int(peak_kb) * 1024 / 1e9:.2f} GB (target < 2 GB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, default=FIXTURE, help="a 20x slide (default: the real fixture)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--tiles", type=int, default=600, help="tile reads per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median ratio reported)")
    parser.add_argument("--big", action="store_true", help="also tile a generated 100k x 100k px slide")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    # both sides single-threaded per process (DataLoader workers do this themselves); on a busy machine
    # torch's intra-op threads otherwise make the in-process collate 1000x slower than the decode
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        slide = args.slide
        if not slide.is_file():
            print(f"{slide} not found: using a generated 20x slide")
            slide = write_pyramid_tiff(
                workdir / "gen-20x.tif", synthetic_tissue(3072, 3072, 0.5, "tumour", 0), 0.5
            )

        tiles_dir = workdir / "tiles"
        times = []
        for i in range(4):
            start = time.perf_counter()
            result = tile_slide(slide, tiles_dir, "s20", overwrite=i > 0)
            times.append(time.perf_counter() - start)
        print(
            f"== tiling {slide.name}: {result.status}, {result.n_tiles} tiles; first call {times[0]:.3f} s, "
            f"then median {np.median(times[1:]):.3f} s (target < 1 s)"
        )

        compare_reads("20x", slide, tiles_dir, "s20", args.tiles, args.workers, args.rounds)

        x40 = write_pyramid_tiff(
            workdir / "gen-40x.tif", synthetic_tissue(4096, 4096, 0.25, "tumour", 1, 0.9), 0.25
        )
        tile_slide(x40, tiles_dir, "s40")
        compare_reads("40x (resized)", x40, tiles_dir, "s40", args.tiles // 2, args.workers, args.rounds)

        if args.big:
            bench_big(workdir)


if __name__ == "__main__":
    main()
