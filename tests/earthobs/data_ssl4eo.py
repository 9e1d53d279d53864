"""Seeded fake SSL4EO-S12: `<root>/<modality>/<location>/<season>/<band>.tif` at native band sizes.

The 10 m grid is `size` px (the real data: 264), 20 m bands `size/2`, 60 m bands `size/6`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from earthobs.bands import BAND_INFO, short_band_name
from earthobs.ssl4eo import MODALITY_BANDS

LOCATIONS = ("0000000", "0000001", "0000003")  # 0000002 is a void id, as in the release
SEASONS = {
    "s2c": ("20200315T101021_20200315T101252_T32TQM", "20200614T101031_20200614T101300_T32TQM",
            "20200912T101029_20200912T101517_T32TQM", "20201211T101419_20201211T101450_T32TQM"),
    "s1": ("S1A_IW_GRDH_1SDV_20200316T050322_20200316T050347_031688_03A77B_5F3A",
           "S1A_IW_GRDH_1SDV_20200615T050327_20200615T050352_033013_03D323_8FB2",
           "S1A_IW_GRDH_1SDV_20200913T050334_20200913T050359_034338_03FE0F_0F0C",
           "S1A_IW_GRDH_1SDV_20201212T050333_20201212T050358_035663_042BB0_8E7E"),
}


def make_ssl4eo(root: Path, modality: str = "s2c", size: int = 24, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Write the fake modality; return {"<location>/<season>": {band: native array}}."""
    rng = np.random.default_rng(seed)
    seasons = SEASONS["s1" if modality == "s1" else "s2c"]
    written = {}
    for loc in LOCATIONS:
        for season in seasons:
            folder = root / modality / loc / season
            folder.mkdir(parents=True)
            bands = {}
            for b in MODALITY_BANDS[modality]:
                k = int(BAND_INFO[b].gsd_m // 10)
                if modality == "s1":
                    arr = rng.normal(-15, 4, (size, size)).astype(np.float32)
                else:
                    arr = rng.integers(1, 10000, (size // k, size // k)).astype(np.uint16)
                with rasterio.open(folder / f"{short_band_name(b)}.tif", "w", driver="GTiff", width=arr.shape[1],
                                   height=arr.shape[0], count=1, dtype=arr.dtype.name, crs="EPSG:32632",
                                   transform=Affine(10.0 * k, 0.0, 0, 0.0, -10.0 * k, 0)) as dst:
                    dst.write(arr, 1)
                bands[b] = arr
            written[f"{loc}/{season}"] = bands
    return written


def write_labels(path: Path, labels: dict, classes: list[str] | None = None) -> Path:
    doc = {"labels": labels} if classes is None else {"classes": classes, "labels": labels}
    path.write_text(json.dumps(doc))
    return path
