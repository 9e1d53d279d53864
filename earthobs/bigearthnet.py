"""BigEarthNet v1 and v2 (reBEN) multi-label datasets, 19-class nomenclature, S1 / S2 / both.

We do not wrap torchgeo's `BigEarthNet`/`BigEarthNetV2` because (1) they return Sentinel-1 as
[VH, VV] (files sorted by name) while SoftCon and our specs use [VV, VH]; (2) they glob every patch
folder per sample and need the download archives' directory names and split files to exist; (3) v2
also requires the reference maps; (4) they give no file-naming errors for broken patches. The facts
(class lists, 43->19 mapping, folder layouts, parquet columns) agree with torchgeo 0.8.

Layouts read:
- v1: `<s2_root>/<patch>/<patch>_B01.tif ... _B12.tif, _B8A.tif, <patch>_labels_metadata.json` and
  `<s1_root>/<s1patch>/<s1patch>_VV.tif, _VH.tif, _labels_metadata.json` (whose
  `corresponding_s2_patch` names the S2 twin). `root` may hold `BigEarthNet-v1.0/` and
  `BigEarthNet-S1-v1.0/` (the archives' names) or be a folder of patches itself. Official splits are
  CSV files `<split>.csv` or `bigearthnet-<split>.csv` (torchgeo's names), one patch per line as
  `s2_name` or `s2_name,s1_name` (BigEarthNet-MM format).
- v2: `<root>/metadata.parquet` (columns patch_id, labels [19-class names], split in
  train/validation/test, country, s1_name, s2v1_name, contains_seasonal_snow,
  contains_cloud_or_shadow), `<root>/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B01.tif`, and
  `<root>/BigEarthNet-S1/<s1 tile>/<s1_name>/<s1_name>_VV.tif`.

Samples: `{"image": float32 (C,120,120) raw values, "label": float32 multi-hot (19,), "id": S2 patch
name}`; with `sensor="s1s2"` the image is S2 bands then [VV, VH]. Sample ids are always S2 patch names,
so one split list and one 10 % subset list serve S1, S2 and both.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from earthobs.bands import BIGEARTHNET_S2_BANDS, S1_BANDS, canonical_bands
from earthobs.readers import EOReadError, read_json, read_s1_patch, read_s2_patch
from fm.io import atomic_write_text

log = logging.getLogger(__name__)

BEN19_CLASSES: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
# The 43 CLC level-3 names of v1 JSON files -> index into BEN19_CLASSES; None: no 19-class counterpart
# (Sumbul et al., "BigEarthNet-MM", 2021; rsim label_indices.json). 11 classes are dropped.
BEN43_TO_19: dict[str, int | None] = {
    "Continuous urban fabric": 0,
    "Discontinuous urban fabric": 0,
    "Industrial or commercial units": 1,
    "Road and rail networks and associated land": None,
    "Port areas": None,
    "Airports": None,
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,
    "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": 2,
    "Permanently irrigated land": 2,
    "Rice fields": 2,
    "Vineyards": 3,
    "Fruit trees and berry plantations": 3,
    "Olive groves": 3,
    "Pastures": 4,
    "Annual crops associated with permanent crops": 3,
    "Complex cultivation patterns": 5,
    "Land principally occupied by agriculture, with significant areas of natural vegetation": 6,
    "Agro-forestry areas": 7,
    "Broad-leaved forest": 8,
    "Coniferous forest": 9,
    "Mixed forest": 10,
    "Natural grassland": 11,
    "Moors and heathland": 12,
    "Sclerophyllous vegetation": 12,
    "Transitional woodland/shrub": 13,
    "Beaches, dunes, sands": 14,
    "Bare rock": None,
    "Sparsely vegetated areas": 11,
    "Burnt areas": None,
    "Inland marshes": 15,
    "Peatbogs": 15,
    "Salt marshes": 16,
    "Salines": 16,
    "Intertidal flats": None,
    "Water courses": 17,
    "Water bodies": 17,
    "Coastal lagoons": 18,
    "Estuaries": 18,
    "Sea and ocean": 18,
}
BEN43_CLASSES: tuple[str, ...] = tuple(BEN43_TO_19)
_V2_ALIASES = {"Transitional woodland/shrub": "Transitional woodland, shrub"}
SENSORS = ("s2", "s1", "s1s2")


def multi_hot(indices: Sequence[int], num_classes: int = len(BEN19_CLASSES)) -> np.ndarray:
    out = np.zeros(num_classes, dtype=np.float32)
    out[list(indices)] = 1.0
    return out


def v1_labels_to_19(names: Sequence[str], source: str | os.PathLike = "<labels>") -> np.ndarray:
    """43-class v1 label names -> 19-class multi-hot; unknown names raise naming `source`."""
    not_text = [n for n in names if not isinstance(n, str)]
    if not_text:
        raise EOReadError(source, f"label entries must be class names (strings), got {not_text[:3]}")
    unknown = [n for n in names if n not in BEN43_TO_19]
    if unknown:
        raise EOReadError(source, f"unknown BigEarthNet-43 label(s) {unknown}")
    return multi_hot(sorted({BEN43_TO_19[n] for n in names} - {None}))


def v2_labels_to_19(names: Sequence[str], source: str | os.PathLike = "<labels>") -> np.ndarray:
    """19-class names (reBEN metadata) -> multi-hot; unknown names raise naming `source`."""
    idx = []
    for n in names:
        n = _V2_ALIASES.get(n, n)
        if n not in BEN19_CLASSES:
            raise EOReadError(source, f"unknown BigEarthNet-19 label {n!r}")
        idx.append(BEN19_CLASSES.index(n))
    return multi_hot(idx)


def read_labels_json(path: str | os.PathLike) -> dict:
    """A v1 `<patch>_labels_metadata.json`; errors name the file."""
    path = Path(path)
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise EOReadError(path, "has no 'labels' list")
    not_text = [n for n in meta["labels"] if not isinstance(n, str)]
    if not_text:
        raise EOReadError(path, f"'labels' must list class names (strings), got {not_text[:3]}")
    return meta


def _first_dir(root: Path, names: Sequence[str]) -> Path:
    return next((root / n for n in names if (root / n).is_dir()), root)


def _read_split_csv(path: Path) -> list[tuple[str, str | None]]:
    """Rows `s2[,s1]`; a header row (first field not starting with 'S2') is skipped."""
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            row = [c.strip() for c in row if c.strip()]
            if not row or (i == 0 and not row[0].startswith("S2")):
                continue
            rows.append((row[0], row[1] if len(row) > 1 else None))
    return rows


class BigEarthNetV1(Dataset):
    """BigEarthNet v1 (S2 L2A 12 bands at 120x120 after resampling, S1 [VV, VH]), 19 classes."""

    def __init__(self, root: str | os.PathLike, split: str | None = None, sensor: str = "s2",
                 bands: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 s2_root: str | os.PathLike | None = None, s1_root: str | os.PathLike | None = None,
                 split_dir: str | os.PathLike | None = None, target_size: int | None = None,
                 resampling: str = "bilinear", nan_policy: str = "raise", engine: str = "rasterio",
                 transforms: Callable[[dict], dict] | None = None):
        if sensor not in SENSORS:
            raise ValueError(f"sensor must be one of {SENSORS}, got {sensor!r}")
        self.root, self.sensor, self.split = Path(root), sensor, split
        self.s2_root = Path(s2_root) if s2_root else _first_dir(self.root, ("BigEarthNet-v1.0", "BigEarthNet-S2-v1.0"))
        self.s1_root = Path(s1_root) if s1_root else _first_dir(self.root, ("BigEarthNet-S1-v1.0", "BigEarthNet-S1"))
        s2_bands = canonical_bands(list(bands)) if bands is not None and sensor != "s1" else BIGEARTHNET_S2_BANDS
        s1_bands = canonical_bands(list(bands)) if bands is not None and sensor == "s1" else S1_BANDS
        self.s2_bands, self.s1_bands = s2_bands, s1_bands
        self.bands = {"s2": s2_bands, "s1": s1_bands, "s1s2": s2_bands + s1_bands}[sensor]
        self.read_kwargs = dict(target_size=target_size, resampling=resampling, nan_policy=nan_policy, engine=engine)
        self.transforms = transforms
        self.filled_counts: dict[str, int] = {}
        self._s1_of_s2: dict[str, str] | None = None
        self._unreadable_s1_labels: list[str] = []  # S1 label files that could not pair their patch
        self.records = self._load_records(ids, Path(split_dir) if split_dir else self.root)
        self.ids = [r[0] for r in self.records]

    # ---- index -------------------------------------------------------------------------------------
    def _load_records(self, ids: Sequence[str] | None, split_dir: Path) -> list[tuple[str, str | None]]:
        if ids is not None:
            rows = [(i, None) for i in ids]
        elif self.split is not None:
            names = [f"{self.split}.csv", f"bigearthnet-{self.split}.csv"]
            if self.split in ("val", "validation"):
                names += ["val.csv", "validation.csv", "bigearthnet-val.csv"]
            path = next((split_dir / n for n in dict.fromkeys(names) if (split_dir / n).is_file()), None)
            if path is None:
                raise FileNotFoundError(f"no split file for {self.split!r} in {split_dir} (looked for {names})")
            rows = _read_split_csv(path)
            if not rows:
                raise ValueError(f"split file {path} lists no patches")
        elif self.sensor == "s1" and not any(self.s2_root.glob("S2*")):
            if not self.s1_root.is_dir():
                raise FileNotFoundError(f"BigEarthNet S1 folder not found: {self.s1_root}")
            rows = [(self._s2_name_of_s1(d, default=d.name), d.name) for d in sorted(self.s1_root.iterdir())
                    if d.is_dir() and d.name.startswith("S1")]  # unreadable label file: the S1 name as id
            if not rows:
                raise self._no_patches("S1*", self.s1_root)
            if self._unreadable_s1_labels:
                log.warning("%d S1 label files cannot be used (their patches are skipped when read), e.g. %s",
                            len(self._unreadable_s1_labels), self._unreadable_s1_labels[0])
        else:
            if not self.s2_root.is_dir():
                raise FileNotFoundError(f"BigEarthNet S2 folder not found: {self.s2_root}")
            rows = [(d.name, None) for d in sorted(self.s2_root.iterdir()) if d.is_dir() and d.name.startswith("S2")]
            if not rows:
                raise self._no_patches("S2*", self.s2_root)
        if self.sensor != "s2" and any(s1 is None for _, s1 in rows):
            mapping = self._s2_to_s1()
            missing = [s2 for s2, s1 in rows if s1 is None and s2 not in mapping]
            if len(missing) == len(rows):
                raise FileNotFoundError(f"no Sentinel-1 patch in {self.s1_root} names {missing[:3]} "
                                        f"({len(missing)} in all) as its corresponding_s2_patch")
            # a few without a partner (or whose partner's label file is unreadable) fail when read, so
            # they are skipped and listed like any unreadable patch instead of sinking the whole set
            if missing:
                log.warning("%d of %d S2 patches have no S1 patch (with a readable label file) in %s naming them, "
                            "e.g. %s: they are skipped when read", len(missing), len(rows), self.s1_root, missing[0])
            rows = [(s2, s1 or mapping.get(s2)) for s2, s1 in rows]
        return rows

    def _no_patches(self, pattern: str, folder: Path) -> FileNotFoundError:
        """A root without patch folders: usually the wrong level of the tree, so show what it holds."""
        held = sorted(d.name + "/" for d in folder.iterdir() if d.is_dir())
        shown = f"; it holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}" if held else "; it is empty"
        return FileNotFoundError(
            f"no {pattern} patch folders under {folder} (expected BigEarthNet-v1.0/ and BigEarthNet-S1-v1.0/ with "
            f"one folder per patch, or --root pointing at a folder of patches){shown}")

    def _s2_name_of_s1(self, folder: Path, default: str | None = None) -> str | None:
        """The S2 partner named by an S1 label file; `default` when the file cannot be used (the patch
        then fails when read, with the reason, and is skipped like any unreadable patch)."""
        path = folder / f"{folder.name}_labels_metadata.json"
        try:
            name = read_labels_json(path).get("corresponding_s2_patch")
        except (EOReadError, OSError) as err:
            self._unreadable_s1_labels.append(str(err))
            return default
        if not isinstance(name, str):
            self._unreadable_s1_labels.append(f"{path}: has no 'corresponding_s2_patch' name")
            return default
        return name

    def _s2_to_s1(self) -> dict[str, str]:
        """S2 -> S1 names from the S1 label files (one pass; pass two-column split CSVs to avoid it)."""
        if self._s1_of_s2 is None:
            if not self.s1_root.is_dir():
                raise FileNotFoundError(f"BigEarthNet S1 folder not found: {self.s1_root}")
            folders = [d for d in sorted(self.s1_root.iterdir()) if d.is_dir() and d.name.startswith("S1")]
            self._s1_of_s2 = {s2: d.name for d in folders if (s2 := self._s2_name_of_s1(d)) is not None}
        return self._s1_of_s2

    def _no_s1_partner(self, s2: str) -> EOReadError:
        bad = self._unreadable_s1_labels
        hint = f" ({len(bad)} S1 label files could not be used, e.g. {bad[0]})" if bad else ""
        return EOReadError(self.s1_root, f"no Sentinel-1 patch with a readable label file names {s2} as its "
                                         f"corresponding_s2_patch{hint}")

    # ---- samples -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> np.ndarray:
        s2, s1 = self.records[index]
        parts = []
        if self.sensor in ("s2", "s1s2"):
            parts.append(read_s2_patch(self.s2_root / s2, self.s2_bands, filled_counts=self.filled_counts,
                                       **self.read_kwargs))
        if self.sensor in ("s1", "s1s2"):
            if s1 is None:
                raise self._no_s1_partner(s2)
            parts.append(read_s1_patch(self.s1_root / s1, self.s1_bands, filled_counts=self.filled_counts,
                                       **self.read_kwargs))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def load_label(self, index: int) -> np.ndarray:
        s2, s1 = self.records[index]
        if self.sensor == "s1" and s1 is None:
            raise self._no_s1_partner(s2)
        folder = self.s2_root / s2 if self.sensor != "s1" else self.s1_root / s1
        path = folder / f"{folder.name}_labels_metadata.json"
        return v1_labels_to_19(read_labels_json(path)["labels"], source=path)

    def __getitem__(self, index: int) -> dict:
        sample = {"image": torch.from_numpy(self.load_image(index)),
                  "label": torch.from_numpy(self.load_label(index)), "id": self.ids[index]}
        return self.transforms(sample) if self.transforms is not None else sample


BigEarthNet = BigEarthNetV1


class BigEarthNetV2(Dataset):
    """BigEarthNet v2 / reBEN: 19 classes from `metadata.parquet`, geographic train/validation/test split."""

    split_names = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}

    def __init__(self, root: str | os.PathLike, split: str | None = "train", sensor: str = "s2",
                 bands: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 metadata: str | os.PathLike | None = None, drop_snow_cloud: bool = True,
                 target_size: int | None = None, resampling: str = "bilinear", nan_policy: str = "raise",
                 engine: str = "rasterio", transforms: Callable[[dict], dict] | None = None):
        import pandas as pd

        if sensor not in SENSORS:
            raise ValueError(f"sensor must be one of {SENSORS}, got {sensor!r}")
        if split is not None and split not in self.split_names:
            raise ValueError(f"split must be one of {sorted(self.split_names)} or None, got {split!r}")
        self.root, self.sensor, self.split = Path(root), sensor, split
        meta_path = Path(metadata) if metadata else self.root / "metadata.parquet"
        if not meta_path.is_file():
            raise FileNotFoundError(f"BigEarthNet v2 metadata not found: {meta_path}")
        df = pd.read_parquet(meta_path)
        needed = {"patch_id", "labels", "split", "s1_name"}
        if not needed <= set(df.columns):
            raise EOReadError(meta_path, f"missing columns {sorted(needed - set(df.columns))}")
        if split is not None:
            df = df[df["split"] == self.split_names[split]]
        if drop_snow_cloud:
            for col in ("contains_seasonal_snow", "contains_cloud_or_shadow"):
                if col in df.columns:
                    df = df[~df[col].astype(bool)]
        if ids is not None:
            df = df.set_index("patch_id", drop=False).loc[list(ids)]
        self.meta = df.reset_index(drop=True)
        self.meta_path = meta_path
        self.ids = [str(p) for p in self.meta["patch_id"]]
        self.s2_bands = canonical_bands(list(bands)) if bands is not None and sensor != "s1" else BIGEARTHNET_S2_BANDS
        self.s1_bands = canonical_bands(list(bands)) if bands is not None and sensor == "s1" else S1_BANDS
        self.bands = {"s2": self.s2_bands, "s1": self.s1_bands, "s1s2": self.s2_bands + self.s1_bands}[sensor]
        self.read_kwargs = dict(target_size=target_size, resampling=resampling, nan_policy=nan_policy, engine=engine)
        self.transforms = transforms
        self.filled_counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.meta)

    def patch_folder(self, name: str, sensor: str) -> Path:
        """`BigEarthNet-S2/<tile>/<patch_id>` (tile = name without its last 2 fields; S1: last 3)."""
        base = self.root / ("BigEarthNet-S2" if sensor == "s2" else "BigEarthNet-S1")
        tile = "_".join(name.split("_")[: -2 if sensor == "s2" else -3])
        nested = base / tile / name
        return nested if nested.is_dir() or not (base / name).is_dir() else base / name

    def load_image(self, index: int) -> np.ndarray:
        row = self.meta.iloc[index]
        parts = []
        if self.sensor in ("s2", "s1s2"):
            parts.append(read_s2_patch(self.patch_folder(str(row["patch_id"]), "s2"), self.s2_bands,
                                       filled_counts=self.filled_counts, **self.read_kwargs))
        if self.sensor in ("s1", "s1s2"):
            parts.append(read_s1_patch(self.patch_folder(str(row["s1_name"]), "s1"), self.s1_bands,
                                       filled_counts=self.filled_counts, **self.read_kwargs))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def load_label(self, index: int) -> np.ndarray:
        labels = self.meta.iloc[index]["labels"]
        return v2_labels_to_19([str(n) for n in labels], source=f"{self.meta_path} [{self.ids[index]}]")

    def __getitem__(self, index: int) -> dict:
        sample = {"image": torch.from_numpy(self.load_image(index)),
                  "label": torch.from_numpy(self.load_label(index)), "id": self.ids[index]}
        return self.transforms(sample) if self.transforms is not None else sample


# ---- the deterministic, saved training subset ("BigEarthNet-10 %") ------------------------------------
def _subset_rank(seed: int, patch_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{patch_id}".encode()).digest()


def training_subset(ids: Sequence[str], fraction: float = 0.1, seed: int = 0,
                    path: str | os.PathLike | None = None) -> list[str]:
    """The `fraction` of `ids` with the smallest sha256(seed:id): the same list for the same ids,
    whatever their order, platform or numpy version. With `path`, the list is written there once
    (atomically; `# key=value` header lines, then one id per line) and later calls read it back; a
    saved list made with another fraction/seed, or naming ids not in `ids`, is an error."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    unique = sorted(set(ids))
    k = max(1, round(fraction * len(unique))) if unique else 0
    chosen = sorted(sorted(unique, key=lambda i: _subset_rank(seed, i))[:k])
    if path is None:
        return chosen
    path = Path(path)
    header = {"fraction": f"{fraction:g}", "seed": str(seed), "n_total": str(len(unique)), "n": str(len(chosen))}
    if path.is_file():
        saved_header, saved = {}, []
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                key, _, value = line[1:].strip().partition("=")
                saved_header[key.strip()] = value.strip()
            elif line.strip():
                saved.append(line.strip())
        for key in ("fraction", "seed"):
            if saved_header.get(key) != header[key]:
                raise ValueError(f"{path}: saved subset has {key}={saved_header.get(key)}, asked {header[key]}")
        stray = set(saved) - set(unique)
        if stray:
            raise ValueError(f"{path}: saved subset names {len(stray)} ids not in this split, e.g. {sorted(stray)[:3]}")
        return saved
    text = "".join(f"# {k}={v}\n" for k, v in header.items()) + "".join(f"{i}\n" for i in chosen)
    atomic_write_text(path, text)
    return chosen
