"""Packed cache: a data-set split converted once into memory-mappable `.npy` files.

Reading 12-14 GeoTIFFs per BigEarthNet sample costs milliseconds of CPU in GDAL; a linear probe over
frozen features or a pretraining epoch reads every sample many times. `pack_split` reads each sample
once and writes

    <out>/images.npy    (N, C, H, W) float16 (default), float32 or uint16 - raw values, NOT normalised
    <out>/labels.npy    (N, ...) the data set's label per sample (multi-hot float32 or int64 class)
    <out>/has_label.npy (N,) bool, only for data sets that return `has_label` (SSL4EO-S12)
    <out>/ids.json      sample ids, row order
    <out>/meta.json     format, bands, dtypes, source, skipped items (written last)

`PackedDataset(out)` then serves rows from the memory map. Writing is crash-safe: rows go to
`<out>.partial/` with a progress record every `flush_every` rows (a killed run resumes there), an
`ItemLock` keeps two packers apart, and the folder is renamed to `<out>` only when complete, so a
half-written cache is never visible. Items that fail to read (`EOReadError`, `OSError`) are skipped
and listed in `meta.json["skipped"]`; they never stop the run.

`meta.json` also records the request (data set, absolute root, split, sensor, fraction/seed, NaN policy,
labels file, dtype, a digest of the sample ids). A later call for the same folder gets the cache back only
when its request matches; any other request is refused (`CacheMismatchError`) rather than silently
served data it did not ask for. `overwrite` repacks. A data root that moved (or is mounted elsewhere)
is no other request: the cache is reused when a few samples read from the new root match it. A cache
whose files are damaged (truncated, not .npy, meta.json not JSON) is neither read nor reused: opening
it raises `CorruptCacheError` naming the file (`cache_request.open_cache`).

float16 keeps 11 significant bits (S2 DN to +-0.05 %, S1 dB to +-0.016 at -40 dB); values beyond
+-65504 are clipped and counted in `meta.json["clipped_values"]`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from earthobs.cache_request import FORMAT, cache_diffs, ids_digest, movable_keys, open_cache, refuse
from earthobs.choices import DTYPES
from earthobs.readers import EOReadError, NoReadableSampleError, no_readable_sample
from fm.io import ItemLock, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_DTYPE = "float16"
_F16_MAX = float(np.finfo(np.float16).max)
SPOT_CHECKS = 3  # samples read again to tell the same data at a new root from other data


class IdSubset(Dataset):
    """The samples of `dataset` whose ids are in `ids`, in `ids` order (e.g. the saved 10 % list)."""

    def __init__(self, dataset, ids: Sequence[str]):
        where = {i: k for k, i in enumerate(dataset.ids)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise KeyError(f"{len(missing)} ids are not in the data set, e.g. {missing[:3]}")
        self.dataset, self.indices = dataset, [where[i] for i in ids]
        self.ids, self.bands = list(ids), getattr(dataset, "bands", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]


class _SafeItems(Dataset):
    """Wraps a data set so that a sample that cannot be read becomes an error record, not an exception."""

    def __init__(self, dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, k: int) -> dict:
        index = self.start + k
        try:
            sample = self.dataset[index]
        except (EOReadError, OSError) as e:
            return {"index": index, "error": f"{type(e).__name__}: {e}"}
        out = {"index": index, "image": np.asarray(sample["image"]), "label": np.asarray(sample["label"])}
        if "has_label" in sample:
            out["has_label"] = bool(sample["has_label"])
        return out


def _identity(item: dict) -> dict:
    return item


def _where(source: dict, dataset) -> str:
    return str(source.get("root") or type(getattr(dataset, "dataset", dataset)).__name__)


def _to_dtype(image: np.ndarray, dtype: str, where: str) -> tuple[np.ndarray, int]:
    if dtype == "float32":
        return image.astype(np.float32, copy=False), 0
    if dtype == "float16":
        clipped = int(np.count_nonzero(np.abs(image) > _F16_MAX))
        return np.clip(image, -_F16_MAX, _F16_MAX).astype(np.float16), clipped
    if image.min() < 0:
        raise ValueError(f"{where}: uint16 packing needs non-negative values (S1 dB data: use float16/float32)")
    clipped = int(np.count_nonzero(image > 65535))
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16), clipped


def pack_split(dataset, out_path: str | os.PathLike, dtype: str | None = None, num_workers: int = 0,
               overwrite: bool = False, source: dict | None = None, flush_every: int = 256) -> Path:
    """Write `dataset` (items with image/label/id; `.ids`, `.bands` attributes) to a packed cache at
    `out_path` and return it. `dtype` None: DEFAULT_DTYPE for a new cache, any for an existing one.
    An existing complete cache is returned as is when `cache_diffs` finds it packed for this request
    (`source`, dtype, ids), refused when not; `overwrite` repacks it."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out, source = Path(out_path), dict(source or {})
    ids = [str(i) for i in dataset.ids]
    if len(ids) != len(dataset):
        raise ValueError(f"dataset has {len(dataset)} items but {len(ids)} ids")
    if not ids:
        raise NoReadableSampleError(f"nothing to pack into {out}: {_where(source, dataset)} holds no samples")
    if (out / "meta.json").is_file() and not overwrite:
        _reuse_cache(dataset, out, dtype, source, ids)
        return out
    with ItemLock(out) as got:
        if not got:
            raise RuntimeError(f"{out} is being packed by another process (lock file {out}.lock)")
        if (out / "meta.json").is_file() and not overwrite:  # finished by another process meanwhile
            _reuse_cache(dataset, out, dtype, source, ids)
            return out
        transforms = getattr(dataset, "transforms", None)
        if transforms is not None:  # the cache holds raw values; transforms run when reading it
            dataset.transforms = None
        try:
            _pack_locked(dataset, ids, out, dtype, num_workers, source, flush_every)
        finally:
            if transforms is not None:
                dataset.transforms = transforms
    return out


def _reuse_cache(dataset, out: Path, dtype: str | None, source: dict, ids: list[str]) -> None:
    """Accept the complete cache at `out` for this request, or raise `CacheMismatchError`. A cache whose
    data root alone differs (the data moved, or is mounted elsewhere on this node; its labels file with
    it, same contents) is reused when the samples it spot-checks read the same from the new root:
    repacking BigEarthNet takes hours."""
    diffs = cache_diffs(out, dtype, source, ids)
    if diffs and set(diffs) <= movable_keys(out, source):
        differs = _moved_copy_differs(dataset, out)
        if differs is None:
            meta = json.loads((out / "meta.json").read_text())
            log.warning("%s was packed from %s; the samples checked read the same from %s, so it is reused",
                        out, meta["source"].get("root"), source.get("root"))
            meta["source"].update({key: source[key] for key in diffs})
            with contextlib.suppress(OSError):  # a read-only cache is reused all the same (checked each time)
                atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
            return
        diffs[next(iter(diffs))] += f", where {differs}"
    refuse(out, diffs)


def _moved_copy_differs(dataset, out: Path, checks: int = SPOT_CHECKS) -> str | None:
    """None when `checks` packed samples (first, last, evenly between) read from `dataset` give the values
    in the cache, else what differs."""
    meta = json.loads((out / "meta.json").read_text())
    packed_ids = json.loads((out / "ids.json").read_text())
    images, labels = np.load(out / "images.npy", mmap_mode="r"), np.load(out / "labels.npy", mmap_mode="r")
    where = {str(i): k for k, i in enumerate(dataset.ids)}
    transforms = getattr(dataset, "transforms", None)
    if transforms is not None:  # the cache holds raw values
        dataset.transforms = None
    try:
        for row in np.unique(np.linspace(0, len(packed_ids) - 1, checks).round().astype(int)):
            sample_id = packed_ids[row]
            item = _SafeItems(dataset, 0)[where[sample_id]]
            if "error" in item:
                return f"sample {sample_id} cannot be read ({item['error']})"
            image = _to_dtype(item["image"], meta["dtype"], sample_id)[0]
            if not (np.array_equal(image, images[row]) and np.array_equal(item["label"], labels[row])):
                return f"sample {sample_id} holds other values"
    finally:
        if transforms is not None:
            dataset.transforms = transforms
    return None


def _pack_locked(dataset, ids: list[str], out: Path, dtype: str | None, num_workers: int, source: dict,
                 flush_every: int) -> None:
    partial = out.with_name(out.name + ".partial")
    plan_path, progress_path = partial / "plan.json", partial / "progress.json"
    n, digest = len(ids), ids_digest(ids)
    state = {"next": 0, "written": 0, "skipped": [], "clipped_values": 0}
    plan = None
    if plan_path.is_file() and progress_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan.get("ids_sha256") == digest and dtype in (None, plan.get("dtype")) and plan.get("source") == source:
            state, dtype = json.loads(progress_path.read_text()), plan["dtype"]
        else:
            plan = None
    if plan is None and partial.exists():
        shutil.rmtree(partial)
    dtype = dtype or DEFAULT_DTYPE
    arrays: dict[str, np.ndarray] = {}

    def open_arrays(first: dict) -> dict:
        nonlocal plan
        if plan is None:
            partial.mkdir(parents=True, exist_ok=True)
            plan = {"ids_sha256": digest, "n": n, "dtype": dtype, "source": source,
                    "image_shape": list(first["image"].shape),
                    "label_shape": list(first["label"].shape), "label_dtype": first["label"].dtype.name,
                    "has_label": "has_label" in first}
            specs = {"images": (dtype, plan["image_shape"]), "labels": (plan["label_dtype"], plan["label_shape"]),
                     "rows": ("int64", [])}
            if plan["has_label"]:
                specs["has_label"] = ("bool", [])
            for name, (dt, shape) in specs.items():
                np.lib.format.open_memmap(partial / f"{name}.npy", mode="w+", dtype=dt, shape=(n, *shape)).flush()
            atomic_write_text(plan_path, json.dumps(plan))
        names = ["images", "labels", "rows"] + (["has_label"] if plan["has_label"] else [])
        return {k: np.load(partial / f"{k}.npy", mmap_mode="r+") for k in names}

    def save_progress() -> None:
        for a in arrays.values():
            a.flush()
        if plan is not None:
            atomic_write_text(progress_path, json.dumps(state))

    if plan is not None:
        arrays = open_arrays({})
    loader = DataLoader(_SafeItems(dataset, state["next"]), batch_size=None, num_workers=num_workers,
                        collate_fn=_identity)
    for item in loader:
        index = item["index"]
        if "error" in item:
            state["skipped"].append({"id": ids[index], "error": item["error"]})
        else:
            if not arrays:
                arrays = open_arrays(item)
            if list(item["image"].shape) != plan["image_shape"] or list(item["label"].shape) != plan["label_shape"]:
                state["skipped"].append({"id": ids[index], "error": f"shape {list(item['image'].shape)} / label "
                                         f"{list(item['label'].shape)} differs from the first sample's"})
            else:
                w = state["written"]
                image, clipped = _to_dtype(item["image"], dtype, ids[index])
                arrays["images"][w] = image
                arrays["labels"][w] = item["label"]
                arrays["rows"][w] = index
                if "has_label" in arrays:
                    arrays["has_label"][w] = item.get("has_label", False)
                state["written"], state["clipped_values"] = w + 1, state["clipped_values"] + clipped
        state["next"] = index + 1
        if state["next"] % flush_every == 0:
            save_progress()
    save_progress()
    if not arrays:
        raise no_readable_sample(n, _where(source, dataset), state["skipped"])
    _finalize(partial, out, arrays, plan, state, ids, dataset, source)


def _finalize(partial: Path, out: Path, arrays: dict, plan: dict, state: dict, ids: list[str], dataset,
              source: dict) -> None:
    written = state["written"]
    rows = np.asarray(arrays["rows"][:written])
    for name, arr in arrays.items():
        if name != "rows" and written < len(arr):  # skipped items: shrink to the rows written
            small = np.lib.format.open_memmap(partial / f"{name}.small.npy", mode="w+", dtype=arr.dtype,
                                              shape=(written, *arr.shape[1:]))
            for s in range(0, written, 4096):
                small[s : s + 4096] = arr[s : min(s + 4096, written)]
            small.flush()
            del small
            os.replace(partial / f"{name}.small.npy", partial / f"{name}.npy")
    arrays.clear()
    bands = getattr(dataset, "bands", None)
    meta = {
        "format": FORMAT, "n": int(written), "image_shape": plan["image_shape"], "dtype": plan["dtype"],
        "label_shape": plan["label_shape"], "label_dtype": plan["label_dtype"], "has_label": plan["has_label"],
        "bands": list(bands) if bands is not None else None, "normalised": False,
        "source": {"dataset": type(getattr(dataset, "dataset", dataset)).__name__, **source},
        "n_requested": len(ids), "sorted_ids_sha256": ids_digest(sorted(ids)),
        "skipped": state["skipped"], "clipped_values": state["clipped_values"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(partial / "ids.json", json.dumps([ids[i] for i in rows]))
    for name in ("rows.npy", "plan.json", "progress.json"):
        (partial / name).unlink(missing_ok=True)
    atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1))
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)


class PackedDataset(Dataset):
    """Map-style data set over a packed cache; same sample keys as the source data set, image float32.
    `skipped_when_packed`: the samples that could not be read when the (whole) cache was packed, so that
    a reader reports them as it reports samples it cannot read itself."""

    def __init__(self, path: str | os.PathLike, ids: Sequence[str] | None = None, transforms=None):
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise FileNotFoundError(f"no packed cache at {self.path} (meta.json missing: never packed or unfinished)")
        self.meta, all_ids = open_cache(self.path)
        self.skipped_when_packed = list(self.meta.get("skipped", [])) if ids is None else []
        if ids is None:
            self.rows = np.arange(len(all_ids))
        else:
            where = {i: k for k, i in enumerate(all_ids)}
            missing = [i for i in ids if i not in where]
            if missing:
                raise KeyError(f"{len(missing)} ids are not in {self.path}, e.g. {missing[:3]}")
            self.rows = np.asarray([where[i] for i in ids], dtype=np.int64)
        self.ids = [all_ids[r] for r in self.rows]
        self.bands = tuple(self.meta["bands"]) if self.meta.get("bands") else None
        self.labels = np.load(self.path / "labels.npy")
        self.has_label = np.load(self.path / "has_label.npy") if self.meta.get("has_label") else None
        self.transforms = transforms
        self._images: np.ndarray | None = None  # opened lazily, so each DataLoader worker maps its own

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path / "images.npy", mmap_mode="r")
        return self._images

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        sample = {"image": torch.from_numpy(self.images[row].astype(np.float32)),
                  "label": torch.from_numpy(np.array(self.labels[row])), "id": self.ids[index]}
        if self.has_label is not None:
            sample["has_label"] = torch.tensor(bool(self.has_label[row]))
        return self.transforms(sample) if self.transforms is not None else sample

