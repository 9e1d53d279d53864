"""EuroSAT-MS: 27,000 Sentinel-2 L1C 64x64 px patches, 13 bands, 10 land-use classes (accuracy task).

Each patch is one 13-band uint16 GeoTIFF `<Class>/<Class>_<n>.tif` whose bands are stored as
B01..B12 then **B8A last** (torchgeo's `EuroSAT.all_band_names`; the SSL4EO-S12 authors move B8A
after B08 the same way). We return bands in the 13-band L1C order B01..B08, B8A, B09, B10, B11, B12
that 13-band encoders (SoftCon, SSL4EO-S12) expect.

Image folder: `<root>/ds/images/remote_sensing/otherDatasets/sentinel_2/tif` (torchgeo's extracted
layout), `<root>/EuroSAT_MS`, `<root>/EuroSATallBands` or `<root>` itself. Splits: torchgeo's split
files `eurosat-{train,val,test}.txt` (file names listed with `.jpg`, from Neumann et al. 2019),
looked up in `split_dir` (default `root`); `split=None` takes every image.

We read with our own reader rather than torchgeo's `EuroSAT` to get the band reordering, dtype and
NaN checks, and file-naming errors of the other EO datasets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from earthobs.bands import EUROSAT_FILE_BANDS, S2_L1C_BANDS, canonical_bands
from earthobs.readers import read_multiband

EUROSAT_CLASSES: tuple[str, ...] = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
TORCHGEO_BASE_DIR = os.path.join("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif")


def find_image_dir(root: Path) -> Path:
    for candidate in (root / TORCHGEO_BASE_DIR, root / "EuroSAT_MS", root / "EuroSATallBands", root):
        if any((candidate / c).is_dir() for c in EUROSAT_CLASSES):
            return candidate
    raise FileNotFoundError(f"no EuroSAT class folders ({', '.join(EUROSAT_CLASSES[:3])}, ...) under {root}")


class EuroSAT(Dataset):
    """EuroSAT-MS single-label classification; samples `{"image": float32 (C,64,64) raw DN,
    "label": int64 class index, "id": file stem}`."""

    classes = EUROSAT_CLASSES

    def __init__(self, root: str | os.PathLike, split: str | None = "train", bands: Sequence[str] = S2_L1C_BANDS,
                 split_dir: str | os.PathLike | None = None, target_size: int | None = None,
                 resampling: str = "bilinear", nan_policy: str = "raise", engine: str = "rasterio",
                 transforms: Callable[[dict], dict] | None = None):
        self.root, self.split = Path(root), split
        self.image_dir = find_image_dir(self.root)
        self.bands = canonical_bands(list(bands))
        self.read_kwargs = dict(target_size=target_size, resampling=resampling, nan_policy=nan_policy, engine=engine)
        self.transforms = transforms
        self.filled_counts: dict[str, int] = {}
        if split is None:
            files = [p for c in EUROSAT_CLASSES if (self.image_dir / c).is_dir()
                     for p in sorted((self.image_dir / c).glob("*.tif"))]
        else:
            split_file = Path(split_dir or self.root) / f"eurosat-{split}.txt"
            if not split_file.is_file():
                raise FileNotFoundError(f"EuroSAT split file not found: {split_file}")
            files = []
            for line in split_file.read_text().splitlines():
                stem = Path(line.strip()).stem
                if stem:
                    files.append(self.image_dir / stem.rsplit("_", 1)[0] / f"{stem}.tif")
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} images listed in {split_file} are missing, e.g. {missing[:3]}")
        unknown = sorted({p.parent.name for p in files} - set(EUROSAT_CLASSES))
        if unknown:
            raise ValueError(f"unknown EuroSAT class folders {unknown} in {self.image_dir}")
        self.files = files
        self.targets = [EUROSAT_CLASSES.index(p.parent.name) for p in files]
        self.ids = [p.stem for p in files]

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> np.ndarray:
        return read_multiband(self.files[index], EUROSAT_FILE_BANDS, self.bands,
                              filled_counts=self.filled_counts, **self.read_kwargs)

    def load_label(self, index: int) -> np.ndarray:
        return np.asarray(self.targets[index], dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        sample = {"image": torch.from_numpy(self.load_image(index)),
                  "label": torch.tensor(self.targets[index], dtype=torch.long), "id": self.ids[index]}
        return self.transforms(sample) if self.transforms is not None else sample
