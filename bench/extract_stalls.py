"""Slow slides against the extraction stream: batches taken in order (one slow batch stalls the device)
versus as they are decoded (it holds up only its own worker), in the same run.

    python bench/extract_stalls.py                              # CPU: 6 workers, stand-in device
    python bench/extract_stalls.py --workers 14 --rate 2700 --copies 1000 --every 50 --stall 2

A slide file on network storage can take seconds to open or to read its first tiles when it is cold.
Every `--every`-th slide here stalls `--stall` seconds the first time a worker reads it (each worker
opens its own handle, as in extraction); a stalled worker sleeps, so six workers fit on two cores.
The device is a stand-in of `--rate` tiles/s (see
bench/extract.py `--simulate-forward`), so only the input side and its ordering are measured. The tiles
are the fixture slide's, tiled once and listed `--copies` times. Prints one `BENCH extract-stalls`
line: tiles/s and device busy share in order and out of order, and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import SimulatedDevice, build_cohort  # noqa: E402  (bench/ is on sys.path as the script's folder)

from pathology.cohort_tiles import CohortTiles, embed_stream  # noqa: E402
from pathology.tile_dataset import SlideTiles  # noqa: E402


class StallingTiles(CohortTiles):
    """CohortTiles where every `every`-th slide costs `stall` s on each worker's first read of it."""

    def __init__(self, *args, every: int, stall: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.every, self.stall, self._opened = every, stall, set()

    def __getitem__(self, index: int):
        pos, _ = self.locate(index)
        if pos % self.every == 0 and pos not in self._opened:
            self._opened.add(pos)
            time.sleep(self.stall)
        return super().__getitem__(index)


def run(dataset: StallingTiles, rate: float, batch_size: int, workers: int, in_order: bool) -> dict:
    device = SimulatedDevice(SimpleNamespace(dim=8, device=torch.device("cpu")), rate)
    stats = embed_stream(dataset, device, batch_size, workers, in_order=in_order)
    return dict(tiles_per_s=stats.tiles_per_s, busy=stats.tiles / rate / stats.seconds, seconds=stats.seconds)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--rate", type=float, default=800.0, help="stand-in device speed, tiles/s")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--copies", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="every N-th slide is slow")
    p.add_argument("--stall", type=float, default=2.0, help="seconds a slow slide costs a worker's first read")
    p.add_argument("--slide", help="slide file (default: the fixture slide)")
    args = p.parse_args(argv)
    args.big_slide, args.tile_px, args.target_mpp, args.min_tissue = None, 224, 0.5, 0.6
    work = Path(tempfile.mkdtemp(prefix="fm-bench-stalls-"))
    try:
        records, tiles = build_cohort(args, work)
        from pathology.tiling import read_coords

        coords, attrs = read_coords(tiles / records[0].slide_id / "coords.h5")
        slides = [SlideTiles(str(r.slide_path), str(tiles / r.slide_id / "coords.h5"), len(coords),
                             float(attrs["slide_mpp"])) for r in records]
        dataset = StallingTiles(slides, args.tile_px, args.target_mpp, every=args.every, stall=args.stall)
        ordered = run(dataset, args.rate, args.batch_size, args.workers, in_order=True)
        unordered = run(dataset, args.rate, args.batch_size, args.workers, in_order=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_slow = len(range(0, len(slides), args.every))
    print(f"BENCH extract-stalls: {len(slides)} slides x {len(coords)} tiles, {n_slow} slow ({args.stall:g} s per "
          f"worker), device {args.rate:g} tiles/s, {args.workers} workers, batch {args.batch_size} | in order "
          f"{ordered['tiles_per_s']:.0f} tiles/s (device busy {ordered['busy']:.0%}) | as decoded "
          f"{unordered['tiles_per_s']:.0f} tiles/s (busy {unordered['busy']:.0%}) | ratio "
          f"{unordered['tiles_per_s'] / ordered['tiles_per_s']:.2f}")
    return dict(ordered=ordered, unordered=unordered)


if __name__ == "__main__":
    main()
