"""Seeded fake EuroSAT-MS in torchgeo's layout: 13-band uint16 GeoTIFFs (B8A stored last) + split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from earthobs.eurosat import EUROSAT_CLASSES, TORCHGEO_BASE_DIR

PER_CLASS = 2  # images per class: <Class>_1.tif, <Class>_2.tif


def make_eurosat(root: Path, size: int = 8, seed: int = 0, count: int = 13) -> dict[str, np.ndarray]:
    """Write the fake data set; return {file stem: (count, size, size) array in FILE band order}.

    Band i of every image holds values in [1000 i + 1, 1000 i + 999], so a band mix-up is visible.
    Split files: image 1 of each class -> train, image 2 -> test; val lists image 2 of the first class.
    """
    rng = np.random.default_rng(seed)
    base = root / TORCHGEO_BASE_DIR
    written = {}
    for cls in EUROSAT_CLASSES:
        (base / cls).mkdir(parents=True)
        for k in range(1, PER_CLASS + 1):
            arr = np.stack([rng.integers(1000 * i + 1, 1000 * i + 1000, (size, size)) for i in range(count)])
            arr = arr.astype(np.uint16)
            with rasterio.open(base / cls / f"{cls}_{k}.tif", "w", driver="GTiff", width=size, height=size,
                               count=count, dtype="uint16", crs="EPSG:32631",
                               transform=Affine(10, 0.0, 0, 0.0, -10, 0)) as dst:
                dst.write(arr)
            written[f"{cls}_{k}"] = arr
    (root / "eurosat-train.txt").write_text("".join(f"{c}_1.jpg\n" for c in EUROSAT_CLASSES))
    (root / "eurosat-test.txt").write_text("".join(f"{c}_2.jpg\n" for c in EUROSAT_CLASSES))
    (root / "eurosat-val.txt").write_text(f"{EUROSAT_CLASSES[0]}_2.jpg\n")
    return written
