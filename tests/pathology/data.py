"""Tiny seeded slides for the pathology tests: one synthetic tissue scanned at 40x and 20x, plus the
problem cases users meet (no mpp, truncated file, not a slide, empty glass, transparent regions).

Run `python tests/pathology/data.py OUT_DIR` to write them for a look.
"""

from __future__ import annotations

import sys
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from pathology.demo_slides import downsample, synthetic_tissue, write_pyramid_tiff

SEED = 7
HEIGHT_40X, WIDTH_40X = 2048, 2560  # 512 x 640 um: a 4 x 5 grid of 224 px tiles at 0.5 um/px


def tissue_40x() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_tissue(HEIGHT_40X, WIDTH_40X, 0.25, "glandular", SEED, coverage=0.6, return_mask=True)


def write_sparse_tiff(path: Path, mpp: float = 0.5) -> Path:
    """A 1024 px generic TIFF whose left half has no tile data (OpenSlide returns it transparent)."""
    tile = np.zeros((256, 256, 3), np.uint8)
    tile[...] = (180, 60, 150)
    encoded = imagecodecs.jpeg8_encode(tile, level=90)

    def tiles():
        for _ty in range(4):
            for tx in range(4):
                yield (encoded, len(encoded)) if tx >= 2 else (b"", 0)

    with tifffile.TiffWriter(path) as writer:
        writer.write(
            tiles(),
            shape=(1024, 1024, 3),
            dtype=np.uint8,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
        )
    return path


def write_damaged_copy(src: Path, dst: Path) -> Path:
    """`src` with the level-0 tiles of its left half zeroed: readable in places, as after a bad sector or
    a broken copy (OpenSlide fails on the zeroed tiles, and its handle is unusable after that)."""
    damaged = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        columns = -(-page.imagewidth // page.tilewidth)
        spans = list(zip(page.dataoffsets, page.databytecounts))
    for index, (offset, size) in enumerate(spans):
        if index % columns < columns // 2:
            damaged[offset:offset + size] = bytes(size)
    dst.write_bytes(bytes(damaged))
    return dst


def make_test_slides(root: Path) -> dict[str, Path]:
    """Write every test slide under `root`; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    rgb40, _ = tissue_40x()
    rgb20 = downsample(rgb40, 2)
    paths = {
        "x40": write_pyramid_tiff(root / "tissue-40x.tif", rgb40, 0.25),
        "x20": write_pyramid_tiff(root / "tissue-20x.tif", rgb20, 0.5),
        "nompp": write_pyramid_tiff(root / "tissue-nompp.tif", rgb20, None),
        "background": write_pyramid_tiff(
            root / "background.tif", synthetic_tissue(640, 896, 0.5, "background", SEED), 0.5
        ),
        "sparse": write_sparse_tiff(root / "sparse.tif"),
    }
    truncated = root / "tissue-truncated.tif"
    data = paths["x20"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    paths["truncated"] = truncated
    corrupt = root / "tissue-corrupt.tif"  # level-0 tile data zeroed, as left by a broken copy
    damaged = bytearray(data)
    with tifffile.TiffFile(paths["x20"]) as tif:
        offsets = tif.pages[0].dataoffsets
    first, last = offsets[0], offsets[-1]
    damaged[first:last] = bytes(last - first)
    corrupt.write_bytes(bytes(damaged))
    paths["corrupt"] = corrupt
    paths["damaged"] = write_damaged_copy(paths["x20"], root / "tissue-damaged.tif")
    notes = root / "notes.svs"
    notes.write_text("this is a text file, not a slide\n")
    paths["nonslide"] = notes
    return paths


if __name__ == "__main__":
    for name, path in make_test_slides(Path(sys.argv[1])).items():
        print(f"{name:12s} {path}")
