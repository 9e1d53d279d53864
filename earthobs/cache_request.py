"""Which request a packed cache answers, and the refusal of a cache packed for another one.

A cache folder is named by data set, sensor and split only; two requests can share that name yet want
different data (another root, dtype, NaN policy or list of samples). `meta.json["source"]` records the
request, so a rerun can tell "already done" from "something else is there". Only the data root may
differ, when a few samples read again from the new root are the same (`packed._reuse_cache`).

`open_cache` is the one check of a complete cache's files before it is read or reused: a truncated copy
or a hand-edited meta.json is named there, file and reason, instead of failing later in numpy or json
with a message that names no file (or being reused as if fine).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMAT = "fm-packed-v1"

# `source` keys that define what a cache holds; a cache is reused only when they all match the request
REQUEST_KEYS = ("name", "root", "split", "sensor", "fraction", "seed", "nan_policy", "labels")
_PATH_KEYS = ("root", "labels")
_UNRECORDED = {"nan_policy": "raise"}  # what caches written before a key was recorded were packed with


class CacheMismatchError(ValueError):
    """A packed cache exists where asked but was packed for another request (root, dtype, ids, ...)."""


class CorruptCacheError(ValueError):
    """A packed cache whose files cannot be read or disagree with its meta.json (a ValueError: one line)."""


def _corrupt(path: Path, reason: str) -> CorruptCacheError:
    return CorruptCacheError(f"{path}: corrupt packed cache ({reason}); fm-prepare ... --overwrite repacks it")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _corrupt(path, "missing") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _corrupt(path, f"not JSON: {e}") from None


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a .npy file declares, from its header alone (cheap on a 60 GB file), once its size
    holds that much data: a truncated copy fails here, not when a row past its end is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            needed = f.tell() + math.prod(shape) * dtype.itemsize
    except FileNotFoundError:
        raise _corrupt(path, "missing") from None
    except (ValueError, EOFError):
        raise _corrupt(path, f"no .npy header in its {size} bytes") from None
    if size < needed:
        raise _corrupt(path, f"truncated: {size} bytes, its header needs {needed}")
    return shape, dtype


def open_cache(out: str | os.PathLike) -> tuple[dict, list[str]]:
    """meta.json and ids.json of the complete cache at `out`, once meta.json has this format and the
    arrays (headers only) hold the rows, shapes and dtypes it records; `CorruptCacheError` otherwise."""
    out = Path(out)
    meta = _read_json(out / "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _corrupt(out / "meta.json", f"format {found!r}, expected {FORMAT!r}")
    try:
        n = int(meta["n"])
        arrays = {"images": ((n, *meta["image_shape"]), np.dtype(meta["dtype"])),
                  "labels": ((n, *meta["label_shape"]), np.dtype(meta["label_dtype"]))}
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(out / "meta.json", f"no valid n, shapes and dtypes: {type(e).__name__}: {e}") from None
    if meta.get("has_label"):
        arrays["has_label"] = ((n,), np.dtype(bool))
    ids = _read_json(out / "ids.json")
    if not isinstance(ids, list) or len(ids) != n:
        count = f"{len(ids)} ids" if isinstance(ids, list) else f"a {type(ids).__name__}"
        raise _corrupt(out / "ids.json", f"{count}, meta.json records {n} samples")
    for name, (shape, dtype) in arrays.items():
        found_shape, found_dtype = _npy_header(out / f"{name}.npy")
        if found_shape != tuple(shape) or found_dtype != dtype:
            raise _corrupt(out / f"{name}.npy", f"{found_dtype} {list(found_shape)}, meta.json records "
                                                f"{dtype} {list(shape)}")
    return meta, ids


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def movable_keys(out: str | os.PathLike, source: dict) -> set[str]:
    """The request keys that may differ in a cache whose data moved: the root (its samples are then
    spot-checked), and the labels file when its contents are those the cache was packed with."""
    recorded = (json.loads((Path(out) / "meta.json").read_text()).get("source") or {}).get("labels_sha256")
    return {"root"} | ({"labels"} if recorded and recorded == source.get("labels_sha256") else set())


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _same_value(key: str, old, new) -> bool:
    if key == "name" and old == "bigearthnet" and str(new).startswith("bigearthnet-v"):
        return True  # packed before the alias was resolved to a version; the root says which
    if key in _PATH_KEYS and old is not None and new is not None:
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return old == new


def cache_diffs(out: str | os.PathLike, dtype: str | None, source: dict,
                ids: Sequence[str] | None = None) -> dict[str, str]:
    """What differs between the complete cache at `out` and this request (key -> "old (asked new)"):
    `dtype` (None: any), each REQUEST_KEYS entry of `source`, and (when given) the sample ids ("ids").
    A damaged cache is refused first (`open_cache`): comparing its request would declare it fine."""
    out = Path(out)
    meta, packed = open_cache(out)
    recorded = meta.get("source") or {}
    diffs = {} if dtype is None or meta.get("dtype") == dtype else {"dtype": f"dtype {meta.get('dtype')} (asked {dtype})"}
    for key in REQUEST_KEYS:
        old = recorded.get(key, _UNRECORDED.get(key))
        if key in source and not _same_value(key, old, source[key]):
            diffs[key] = f"{key} {old!r} (asked {source[key]!r})"
    if ids is not None:
        n_recorded = int(meta.get("n_requested", meta.get("n", 0) + len(meta.get("skipped", []))))
        if "sorted_ids_sha256" in meta:
            same = meta["sorted_ids_sha256"] == ids_digest(sorted(ids))
        else:  # caches from before the digest was recorded: their packed and skipped ids
            same = set(packed) | {s["id"] for s in meta.get("skipped", [])} == set(ids)
        if not same:
            diffs["ids"] = f"other sample ids ({n_recorded} recorded, {len(ids)} asked)"
    return diffs


def refuse(out: str | os.PathLike, diffs: dict[str, str]) -> None:
    """Raise the one-line `CacheMismatchError` for `diffs` (nothing when empty)."""
    if diffs:
        raise CacheMismatchError(
            f"{out} holds a cache packed for another request: {', '.join(diffs.values())}; repack it with "
            "`fm-prepare ... --overwrite`, remove that folder, or pack into another folder (--output-dir / --packed)")

