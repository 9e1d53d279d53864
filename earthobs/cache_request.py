"""Which request a packed cache answers, and the refusal of a cache packed for another one.

A cache folder is named by data set, sensor and split only; two requests can share that name yet want
different data (another root, dtype, NaN policy or list of samples). `meta.json["source"]` records the
request, so a rerun can tell "already done" from "something else is there". Only the data root may
differ, when a few samples read again from the new root are the same (`packed._reuse_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

# `source` keys that define what a cache holds; a cache is reused only when they all match the request
REQUEST_KEYS = ("name", "root", "split", "sensor", "fraction", "seed", "nan_policy", "labels")
_PATH_KEYS = ("root", "labels")
_UNRECORDED = {"nan_policy": "raise"}  # what caches written before a key was recorded were packed with


class CacheMismatchError(ValueError):
    """A packed cache exists where asked but was packed for another request (root, dtype, ids, ...)."""


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
    `dtype` (None: any), each REQUEST_KEYS entry of `source`, and (when given) the sample ids ("ids")."""
    out = Path(out)
    meta = json.loads((out / "meta.json").read_text())
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
            packed = json.loads((out / "ids.json").read_text())
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

