"""Seeded fake BigEarthNet v2 (reBEN) in torchgeo's layout: metadata.parquet + nested patch folders.

Small grids keep it fast: the 10 m grid is `size` px, 20 m bands `size/2`, 60 m bands `size/6`.
Pixel values are random and returned, so tests can compare what the loader reads with what was written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.transform import Affine

from earthobs.bands import BAND_INFO, BIGEARTHNET_S2_BANDS

# (patch_id, s1_name, split, labels (19-class names), snow, cloud)
PATCHES = [
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57", "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_26_57",
     "train", ["Arable land", "Broad-leaved forest"], False, False),
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_58", "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_26_58",
     "train", ["Pastures"], False, False),
    ("S2B_MSIL2A_20170924T093019_N9999_R136_T35VMJ_10_11", "S1B_IW_GRDH_1SDV_20170924T153522_35VMJ_10_11",
     "validation", ["Coniferous forest", "Inland waters", "Transitional woodland, shrub"], False, False),
    ("S2B_MSIL2A_20170924T093019_N9999_R136_T35VMJ_10_12", "S1B_IW_GRDH_1SDV_20170924T153522_35VMJ_10_12",
     "test", ["Marine waters"], False, False),
    ("S2B_MSIL2A_20170924T093019_N9999_R136_T35VMJ_10_13", "S1B_IW_GRDH_1SDV_20170924T153522_35VMJ_10_13",
     "train", ["Urban fabric"], True, False),  # snowy: dropped by default
]


def _write(path: Path, array: np.ndarray, res: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                       dtype=array.dtype.name, crs="EPSG:32633", transform=Affine(res, 0.0, 0, 0.0, -res, 0)) as dst:
        dst.write(array, 1)


def make_bigearthnet_v2(root: Path, size: int = 12, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Write the fake data set; return {patch_id: {band: native array}} for S2 and S1 bands."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, np.ndarray]] = {}
    for patch_id, s1_name, *_ in PATCHES:
        bands = {}
        tile = "_".join(patch_id.split("_")[:-2])
        for b in BIGEARTHNET_S2_BANDS:
            k = int(BAND_INFO[b].gsd_m // 10)
            arr = rng.integers(1, 10000, (size // k, size // k)).astype(np.uint16)
            _write(root / "BigEarthNet-S2" / tile / patch_id / f"{patch_id}_{b}.tif", arr, 10.0 * k)
            bands[b] = arr
        s1_tile = "_".join(s1_name.split("_")[:-3])
        for b in ("VV", "VH"):
            arr = rng.normal(-15 if b == "VV" else -22, 3, (size, size)).astype(np.float32)
            _write(root / "BigEarthNet-S1" / s1_tile / s1_name / f"{s1_name}_{b}.tif", arr, 10.0)
            bands[b] = arr
        written[patch_id] = bands
    df = pd.DataFrame(
        [{"patch_id": p, "labels": np.array(labels, dtype=object), "split": split, "country": "Austria",
          "s1_name": s1, "s2v1_name": p.replace("_N9999", ""), "contains_seasonal_snow": snow,
          "contains_cloud_or_shadow": cloud} for p, s1, split, labels, snow, cloud in PATCHES]
    )
    df.to_parquet(root / "metadata.parquet")
    return written
