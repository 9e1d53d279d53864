"""SSL4EO-S12 with Dynamic World multi-hot labels (SoftCon's SSL4EO-S12-ML pretraining set).

Layout (zhu-xlab/SSL4EO-S12 raw release, also what torchgeo's `SSL4EOS12` reads):
`<root>/<modality>/<location:07d>/<season folder>/<band>.tif` with modality `s1` (GRD, VV/VH in dB),
`s2c` (L1C, 13 bands) or `s2a` (L2A, 12 bands); band files are named `B1.tif` ... `B12.tif`, `B8A.tif`,
`VV.tif`, `VH.tif`, each at its native resolution (10 m bands 264x264 px, 20 m 132, 60 m 44). Every
(location, season) pair is one sample; bands are resampled bilinearly onto the 264 px 10 m grid as
the authors do (OpenCV INTER_LINEAR).

We do not use torchgeo's `SSL4EOS12`: it samples seasons at random per call (not one sample per
image), assumes every location id 0..251078 exists (the release has void ids), and carries no labels.

Labels file (our schema; SoftCon's per-image Dynamic World labels are not distributed in a fixed
format, so users convert theirs to this):

    {
      "classes": ["water", "trees", ..., "snow_and_ice"],      # optional, must equal DYNAMIC_WORLD_CLASSES
      "labels": {
        "0000042/20200315T101021_20200315T101252_T32TQM": [1, 4],   # <location>/<season folder>
        "0000043/2": ["water", "built"],                         # <location>/<season index 0-3>
        "0000044": [2]                                            # <location>: all its seasons
      }
    }

Values are class indices or class names. Lookup order: season folder, season index (position of the
folder in sorted order), location. Samples without a label get an all-zero vector and
`has_label=False` (the SoftCon loss falls back to plain InfoNCE for them); `require_labels=True` keeps
only labelled samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from earthobs.bands import S1_BANDS, S2_L1C_BANDS, S2_L2A_BANDS, canonical_bands
from earthobs.readers import S1_DTYPES, S2_DTYPES, EOReadError, read_json, read_s1_patch, read_s2_patch

# Dynamic World v1 land-cover classes, in the product's label order.
DYNAMIC_WORLD_CLASSES: tuple[str, ...] = (
    "water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built", "bare", "snow_and_ice",
)  # fmt: skip
MODALITY_BANDS: dict[str, tuple[str, ...]] = {"s1": S1_BANDS, "s2c": S2_L1C_BANDS, "s2a": S2_L2A_BANDS}


def load_dynamic_world_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse a labels file (schema in the module docstring) into key -> float32 multi-hot (9,)."""
    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), dict):
        raise EOReadError(path, "expected an object with a 'labels' mapping")
    classes = tuple(doc.get("classes", DYNAMIC_WORLD_CLASSES))
    if classes != DYNAMIC_WORLD_CLASSES:
        raise EOReadError(path, f"'classes' must be {list(DYNAMIC_WORLD_CLASSES)}, got {list(classes)}")
    out = {}
    for key, values in doc["labels"].items():
        if not isinstance(values, list):
            raise EOReadError(path, f"label of {key!r} must be a list, got {values!r}")
        vec = np.zeros(len(classes), dtype=np.float32)
        for v in values:
            if isinstance(v, str) and v in classes:
                vec[classes.index(v)] = 1.0
            elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(classes):
                vec[v] = 1.0
            else:
                raise EOReadError(path, f"label of {key!r} has invalid class {v!r} (use 0-{len(classes) - 1} or a name)")
        out[str(key).strip("/")] = vec
    return out


class SSL4EOS12(Dataset):
    """One sample per (location, season) image of one modality, with optional Dynamic World labels."""

    def __init__(self, root: str | os.PathLike, modality: str = "s2c", labels: str | os.PathLike | None = None,
                 bands: Sequence[str] | None = None, locations: Sequence[str] | None = None,
                 require_labels: bool = False, target_size: int | None = None, resampling: str = "bilinear",
                 nan_policy: str = "raise", engine: str = "rasterio",
                 transforms: Callable[[dict], dict] | None = None):
        if modality not in MODALITY_BANDS:
            raise ValueError(f"modality must be one of {list(MODALITY_BANDS)}, got {modality!r}")
        self.root, self.modality = Path(root), modality
        self.folder = self.root / modality
        if not self.folder.is_dir():
            raise FileNotFoundError(f"SSL4EO-S12 {modality} folder not found: {self.folder}")
        self.bands = canonical_bands(list(bands)) if bands is not None else MODALITY_BANDS[modality]
        self.labels = load_dynamic_world_labels(labels) if labels is not None else {}
        self.num_classes = len(DYNAMIC_WORLD_CLASSES)
        self.read_kwargs = dict(target_size=target_size, resampling=resampling, nan_policy=nan_policy, engine=engine,
                                allowed_dtypes=S1_DTYPES if modality == "s1" else S2_DTYPES)
        self.transforms = transforms
        self.filled_counts: dict[str, int] = {}
        self.items: list[tuple[str, str, int]] = []  # (location, season folder, season index)
        locs = sorted(locations) if locations is not None else sorted(
            e.name for e in os.scandir(self.folder) if e.is_dir())
        for loc in locs:
            loc_dir = self.folder / loc
            if not loc_dir.is_dir():
                raise FileNotFoundError(f"SSL4EO-S12 location folder not found: {loc_dir}")
            seasons = sorted(e.name for e in os.scandir(loc_dir) if e.is_dir())
            for k, season in enumerate(seasons):
                if require_labels and self.label_key(loc, season, k) is None:
                    continue
                self.items.append((loc, season, k))
        self.ids = [f"{loc}/{season}" for loc, season, _ in self.items]

    def label_key(self, location: str, season: str, season_index: int) -> str | None:
        for key in (f"{location}/{season}", f"{location}/{season_index}", location):
            if key in self.labels:
                return key
        return None

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, index: int) -> np.ndarray:
        loc, season, _ = self.items[index]
        reader = read_s1_patch if self.modality == "s1" else read_s2_patch
        return reader(self.folder / loc / season, self.bands, filled_counts=self.filled_counts, **self.read_kwargs)

    def load_label(self, index: int) -> tuple[np.ndarray, bool]:
        key = self.label_key(*self.items[index])
        if key is None:
            return np.zeros(self.num_classes, dtype=np.float32), False
        return self.labels[key], True

    def __getitem__(self, index: int) -> dict:
        label, has_label = self.load_label(index)
        sample = {"image": torch.from_numpy(self.load_image(index)), "label": torch.from_numpy(label.copy()),
                  "has_label": torch.tensor(has_label), "id": self.ids[index]}
        return self.transforms(sample) if self.transforms is not None else sample
