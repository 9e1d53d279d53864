"""Per-slide feature files (`<slide_id>.h5`) and the provenance they carry.

Layout (TRIDENT/CLAM-compatible): `features` (N, D) beside `coords` (N, 2) level-0 x, y, equal to
the tiling's `coords.h5` row for row; the tiling attributes stay on `coords` (where TRIDENT reads
them). File attributes record what produced the features (encoder name, sha256 of the weights file,
preprocessing, feature kind, code version), so an evaluation can refuse to mix encoders, and a rerun
can tell a finished file of the same extraction from a stale one.

A file is written row block by row block into a temporary file while its slide is being embedded
(memory stays O(batch), whatever the slide size) and renamed into place only when complete. Blocks
may come in any order (the extraction stream hands batches over as they are decoded); each lands at
its rows, so the file is the same whatever the order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import h5py
import numpy as np

from fm.io import atomic_path, atomic_write_text

FINGERPRINT_ATTRS = ("encoder", "encoder_weights_sha256", "feature", "preprocessing")  # read to compare
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("FM_CACHE_DIR", Path.home() / ".cache" / "fm-suite"))


def weights_sha256(path: str | os.PathLike | None) -> str:
    """sha256 of a weights file, cached per (path, size, mtime) in memory and in $FM_CACHE_DIR, since
    hashing a 1.2 GB ViT-L file costs seconds and every shard of every run needs it."""
    if path is None:
        return "none"
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    cache_file = _cache_dir() / "weights-sha256.json"
    try:
        table = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        _SHA_CACHE[key] = entry["sha256"]
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    _SHA_CACHE[key] = digest.hexdigest()
    table[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _SHA_CACHE[key]}
    try:
        atomic_write_text(cache_file, json.dumps(table, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return _SHA_CACHE[key]


def code_version() -> str:
    """`fm-suite <version>` plus the git commit of the checkout when there is one."""
    from fm.tracking import _fm_version, _git_commit

    commit = _git_commit()
    version = f"fm-suite {_fm_version()}"
    return version if commit.startswith("fm-suite==") else f"{version} git {commit}"


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value


def read_feature_attrs(path: str | os.PathLike) -> dict:
    """File attributes of a feature file (strings decoded; JSON fields left as text)."""
    with h5py.File(path, "r") as f:
        return {k: _plain(v) for k, v in f.attrs.items()}


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features (N, D), coords (N, 2) int64, file attributes)."""
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:].astype(np.int64), {k: _plain(v) for k, v in f.attrs.items()}


def extraction_fingerprint(attrs: Mapping) -> dict[str, str]:
    """What feature files must share to be used together (and a finished file to be kept by a rerun):
    the weights by content, the feature kind and the preprocessing. The weights file's path is not
    compared: the same file staged to node-local disk, or moved, is the same encoder. An encoder with
    no weights file (random weights) goes by its name."""
    sha = str(_plain(attrs.get("encoder_weights_sha256")) or "")
    weights = sha if sha not in ("", "none") else f"(no weights file) {_plain(attrs.get('encoder'))}"
    return {"weights": weights, "feature": str(_plain(attrs.get("feature"))),
            "preprocessing": str(_plain(attrs.get("preprocessing")))}


def fingerprint_difference(theirs: Mapping, ours: Mapping, ours_name: str = "this run") -> str:
    """`key='theirs' (<ours_name>: 'ours')` for each differing part of two attribute sets, encoders named."""
    a, b = extraction_fingerprint(theirs), extraction_fingerprint(ours)
    parts = [f"{k}={a[k]!r} ({ours_name}: {b[k]!r})" for k in a if a[k] != b[k]]
    if a["weights"] != b["weights"]:
        parts[0] += f" [encoder {_plain(theirs.get('encoder'))!r} vs {_plain(ours.get('encoder'))!r}]"
    return ", ".join(parts)


def feature_file_state(path: Path, n_tiles: int, fingerprint: Mapping[str, str]) -> str:
    """(`fingerprint`: this run's FINGERPRINT_ATTRS) `missing`, `complete` (same extraction, all rows), `incomplete` (unreadable or short: redo) or
    `conflict: <why>` (a finished file from another encoder/preprocessing: never silently replaced)."""
    if not path.exists():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            n_features, n_coords = f["features"].shape[0], f["coords"].shape[0]
            attrs = {k: _plain(f.attrs.get(k)) for k in (*FINGERPRINT_ATTRS, "n_tiles")}
    except (OSError, KeyError):
        return "incomplete"
    if n_features != n_coords or attrs["n_tiles"] is None or int(attrs["n_tiles"]) != n_features:
        return "incomplete"
    if extraction_fingerprint(attrs) != extraction_fingerprint(fingerprint):
        shown = fingerprint_difference(attrs, fingerprint)
        return f"conflict: {path} holds other features: {shown}; pass --overwrite or use another --output-dir"
    if n_features != n_tiles:
        return f"conflict: {path} has {n_features} tiles but the tiling now has {n_tiles}; pass --overwrite"
    return "complete"


class FeatureFileWriter:
    """Fill `<out>.h5` block by block, in any order, in a temporary file; `commit()` renames it into
    place. `filled` counts the rows written; a row written twice is refused (it would hide a lost one)."""

    def __init__(self, path: Path, n_tiles: int, dim: int, dtype: str, chunk_rows: int = 1024):
        self.path, self.n_tiles, self.filled, self.closed = path, n_tiles, 0, False
        self._written = np.zeros(n_tiles, dtype=bool)
        self._atomic: AbstractContextManager = atomic_path(path)
        tmp = self._atomic.__enter__()
        try:
            self._file = h5py.File(tmp, "w")
            self._features = self._file.create_dataset(
                "features", shape=(n_tiles, dim), dtype=dtype, chunks=(min(chunk_rows, max(n_tiles, 1)), dim)
            )
        except BaseException as err:
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        stop = start + len(rows)
        if start < 0 or stop > self.n_tiles:
            raise ValueError(f"{self.path}: rows {start}..{stop - 1} outside the slide's {self.n_tiles} tiles")
        if self._written[start:stop].any():
            raise ValueError(f"{self.path}: rows {start}..{stop - 1} written twice")
        self._features[start:stop] = rows.astype(self._features.dtype, copy=False)
        self._written[start:stop] = True
        self.filled += len(rows)

    def commit(self, coords: np.ndarray, coords_attrs: Mapping, attrs: Mapping) -> None:
        """Add coords and attributes, close, rename. Raises (and discards) if rows are missing."""
        try:
            if self.filled != self.n_tiles or len(coords) != self.n_tiles:
                raise RuntimeError(f"{self.path}: {self.filled} of {self.n_tiles} rows written, "
                                   f"{len(coords)} coords")
            dataset = self._file.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for key, value in coords_attrs.items():
                dataset.attrs[key] = value
            for key, value in attrs.items():
                self._file.attrs[key] = value
                if key in ("encoder", "feature"):
                    self._features.attrs[key] = value
            self._file.close()
        except BaseException as err:
            self.discard(err)
            raise
        self.closed = True
        self._atomic.__exit__(None, None, None)

    def discard(self, err: BaseException | None = None) -> None:
        """Close and delete the temporary file (a failed or abandoned slide)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - already closed or broken: the temporary goes anyway
            pass
        err = err or RuntimeError("discarded")
        self._atomic.__exit__(type(err), err, err.__traceback__)
