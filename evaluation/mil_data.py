"""Slide feature bags for MIL: loaded once, packed into one array, sampled on the training device.

A `FeatureBank` holds every slide's tile features as one `(T, D)` array plus offsets (in memory or a
memory-mapped `.npy`), so training never touches per-slide files. A `BagSampler` puts that array on
the training device when it fits and draws padded batches of bags with one gather per step: a random
subset of up to `max_tiles` instances per bag (fresh each step, seeded), a mask for the padding.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fm.io import atomic_path, atomic_write_text

PACK_INDEX = "index.json"
PACK_FEATURES = "features.npy"
PACK_COORDS = "coords.npy"
_LISTED = 20  # names shown in an error before "... and N more"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in items[:_LISTED])
    return shown + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class FeatureBank:
    """Per-slide features `(N_i, D)` stored packed as one `(T, D)` array with row offsets."""

    def __init__(
        self,
        slide_ids: Sequence[str],
        features: np.ndarray,
        offsets: np.ndarray,
        coords: np.ndarray | None = None,
        encoder: str | None = None,
    ):
        if len(offsets) != len(slide_ids) + 1 or offsets[-1] != len(features):
            raise ValueError("offsets must have one entry per slide plus the total row count")
        if len(set(slide_ids)) != len(slide_ids):
            dupes = [s for s, n in Counter(slide_ids).items() if n > 1]
            raise ValueError(f"duplicate slide ids in feature bank: {_listing(dupes)}")
        self.slide_ids = [str(s) for s in slide_ids]
        self.features = features
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.coords = coords
        self.encoder = encoder
        self.index = {sid: i for i, sid in enumerate(self.slide_ids)}

    # ------------------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.index

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, slide_ids: Sequence[str]) -> np.ndarray:
        """Bank rows of `slide_ids`; a clear error lists every slide that has no features."""
        missing = [s for s in slide_ids if s not in self.index]
        if missing:
            raise ValueError(f"{len(missing)} slide(s) have no features in the bank: {_listing(missing)}")
        return np.array([self.index[s] for s in slide_ids], dtype=np.int64)

    def slide_features(self, slide_id: str) -> np.ndarray:
        i = self.index[slide_id]
        return self.features[self.offsets[i] : self.offsets[i + 1]]

    def slide_coords(self, slide_id: str) -> np.ndarray | None:
        if self.coords is None:
            return None
        i = self.index[slide_id]
        return self.coords[self.offsets[i] : self.offsets[i + 1]]

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_arrays(
        cls,
        features: Mapping[str, np.ndarray],
        coords: Mapping[str, np.ndarray] | None = None,
        encoder: str | None = None,
    ) -> FeatureBank:
        """Pack a `{slide_id: (N, D) array}` mapping (tests, in-memory features)."""
        ids = list(features)
        arrays = [np.asarray(features[s]) for s in ids]
        bad = [s for s, a in zip(ids, arrays) if a.ndim != 2 or len(a) == 0]
        if bad:
            raise ValueError(f"features must be non-empty (N, D) arrays; bad slides: {_listing(bad)}")
        dims = Counter(a.shape[1] for a in arrays)
        if len(dims) > 1:
            main = dims.most_common(1)[0][0]
            odd = [f"{s} (dim {a.shape[1]})" for s, a in zip(ids, arrays) if a.shape[1] != main]
            raise ValueError(f"feature dims differ from the common {main}: {_listing(odd)}")
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])])
        packed_coords = np.concatenate([np.asarray(coords[s]) for s in ids]) if coords is not None else None
        return cls(ids, np.concatenate(arrays), offsets, packed_coords, encoder)

    @classmethod
    def from_h5_dir(
        cls,
        directory: str | os.PathLike,
        slide_ids: Sequence[str] | None = None,
        encoder: str | None = None,
        pack_dir: str | os.PathLike | None = None,
    ) -> FeatureBank:
        """Read `<directory>/<slide_id>.h5` files (`features` (N, D), `coords`, attribute `encoder`).

        All files must come from one encoder (by weights hash where recorded, else by name); the error
        names the files that differ. `encoder` names the bank (default: the files' encoder). With `pack_dir`, the packed array is written there as a memory-mapped
        `.npy` and reused by later calls while the source files are unchanged.
        """
        import h5py

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"feature directory {directory} does not exist")
        if (directory / "h5_files").is_dir() and not any(directory.glob("*.h5")):
            directory = directory / "h5_files"  # CLAM/TRIDENT layout
        ids = (
            [str(s) for s in slide_ids]
            if slide_ids is not None
            else sorted(p.stem for p in directory.glob("*.h5"))
        )
        if not ids:
            raise FileNotFoundError(f"no .h5 feature files in {directory}")
        paths = {s: directory / f"{s}.h5" for s in ids}
        missing = [s for s, p in paths.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} slide(s) have no feature file in {directory}: {_listing(missing)}"
            )

        shapes, encoders, weights, extraction, has_coords, problems = {}, {}, {}, {}, True, []
        for sid, path in paths.items():
            try:
                with h5py.File(path, "r") as f:
                    shapes[sid] = f["features"].shape
                    encoders[sid] = _text(f.attrs.get("encoder", f["features"].attrs.get("encoder")))
                    weights[sid] = _text(f.attrs.get("encoder_weights_sha256"))
                    extraction[sid] = tuple(str(_text(f.attrs.get(k, ""))) for k in ("feature", "preprocessing"))
                    has_coords &= "coords" in f
            except (OSError, KeyError) as err:
                problems.append(f"{path.name} ({err})")
        if problems:
            raise ValueError(f"unreadable feature files in {directory}: {_listing(problems)}")
        # one encoder = one weights file by content where the files record its hash (the same weights
        # staged at another path are the same encoder), else by name (CLAM / TRIDENT files); plus the
        # feature kind and preprocessing where recorded (fm-extract writes them)
        identity = {s: (weights[s] if weights[s] not in (None, "", "none") else encoders[s], *extraction[s])
                    for s in ids}
        expected = Counter(identity.values()).most_common(1)[0][0]
        foreign = [f"{paths[s].name} (encoder={encoders[s]!r}"
                   + (f", feature/preprocessing={extraction[s]!r})" if extraction[s] != expected[1:] else ")")
                   for s in ids if identity[s] != expected]
        if foreign:
            common = next(encoders[s] for s in ids if identity[s] == expected)
            raise ValueError(
                f"{len(foreign)} feature file(s) in {directory} come from another encoder than {common!r}: "
                f"{_listing(foreign)}"
            )
        expected = encoder if encoder is not None else next(encoders[s] for s in ids if identity[s] == expected)
        bad = [f"{paths[s].name} {shape}" for s, shape in shapes.items() if len(shape) != 2 or shape[0] == 0]
        dims = Counter(shape[1] for shape in shapes.values() if len(shape) == 2)
        main_dim = dims.most_common(1)[0][0] if dims else 0
        bad += [
            f"{paths[s].name} dim {shape[1]} != {main_dim}"
            for s, shape in shapes.items()
            if len(shape) == 2 and shape[0] and shape[1] != main_dim
        ]
        if bad:
            raise ValueError(f"feature files with unusable shapes in {directory}: {_listing(bad)}")

        offsets = np.concatenate([[0], np.cumsum([shapes[s][0] for s in ids])]).astype(np.int64)
        stamp = {s: [paths[s].stat().st_size, paths[s].stat().st_mtime_ns] for s in ids}
        if pack_dir is not None:
            cached = _open_pack_if_fresh(Path(pack_dir), ids, stamp)
            if cached is not None:
                return cached

        def fill(features: np.ndarray, coords: np.ndarray | None) -> None:
            for i, sid in enumerate(ids):
                with h5py.File(paths[sid], "r") as f:
                    f["features"].read_direct(features, dest_sel=np.s_[offsets[i] : offsets[i + 1]])
                    if coords is not None:
                        coords[offsets[i] : offsets[i + 1]] = f["coords"][:, :2]

        total = int(offsets[-1])
        if pack_dir is None:
            features = np.empty((total, main_dim), dtype=np.float16)
            coords = np.empty((total, 2), dtype=np.int64) if has_coords else None
            fill(features, coords)
            return cls(ids, features, offsets, coords, expected)
        pack_dir = Path(pack_dir)
        (pack_dir / PACK_INDEX).unlink(missing_ok=True)  # a stale index must never describe the new arrays
        coords_target = atomic_path(pack_dir / PACK_COORDS) if has_coords else contextlib.nullcontext()
        with atomic_path(pack_dir / PACK_FEATURES) as tmp_f, coords_target as tmp_c:
            features = np.lib.format.open_memmap(tmp_f, mode="w+", dtype=np.float16, shape=(total, main_dim))
            coords = (
                np.lib.format.open_memmap(tmp_c, mode="w+", dtype=np.int64, shape=(total, 2))
                if tmp_c
                else None
            )
            fill(features, coords)
            features.flush()
            del features, coords
        index = {
            "slide_ids": ids,
            "offsets": offsets.tolist(),
            "encoder": expected,
            "coords": has_coords,
            "sources": stamp,
        }
        atomic_write_text(pack_dir / PACK_INDEX, json.dumps(index))  # written last: marks the pack complete
        return cls.open_packed(pack_dir)

    def save_packed(self, pack_dir: str | os.PathLike) -> None:
        """Write this bank as a pack (`features.npy`, `coords.npy`, `index.json`) for `open_packed`."""
        pack_dir = Path(pack_dir)
        (pack_dir / PACK_INDEX).unlink(missing_ok=True)
        with atomic_path(pack_dir / PACK_FEATURES) as tmp:
            np.save(tmp, np.ascontiguousarray(self.features), allow_pickle=False)
        if self.coords is not None:
            with atomic_path(pack_dir / PACK_COORDS) as tmp:
                np.save(tmp, self.coords, allow_pickle=False)
        index = {
            "slide_ids": self.slide_ids,
            "offsets": self.offsets.tolist(),
            "encoder": self.encoder,
            "coords": self.coords is not None,
            "sources": {},
        }
        atomic_write_text(pack_dir / PACK_INDEX, json.dumps(index))

    @classmethod
    def open_packed(cls, pack_dir: str | os.PathLike) -> FeatureBank:
        """Memory-map a pack; pages are read on demand, so a 10 GB task costs no load time."""
        pack_dir = Path(pack_dir)
        if not (pack_dir / PACK_INDEX).is_file():
            raise FileNotFoundError(f"{pack_dir} is not a complete feature pack (no {PACK_INDEX})")
        index = json.loads((pack_dir / PACK_INDEX).read_text())
        # copy-on-write mapping: writable for torch.from_numpy, never writes back to the file
        features = np.load(pack_dir / PACK_FEATURES, mmap_mode="c")
        coords = np.load(pack_dir / PACK_COORDS, mmap_mode="c") if index["coords"] else None
        return cls(index["slide_ids"], features, np.asarray(index["offsets"]), coords, index["encoder"])


def _open_pack_if_fresh(pack_dir: Path, ids: list[str], stamp: dict) -> FeatureBank | None:
    try:
        index = json.loads((pack_dir / PACK_INDEX).read_text())
    except (OSError, ValueError):
        return None
    if index.get("slide_ids") != ids or index.get("sources") != stamp:
        return None
    return FeatureBank.open_packed(pack_dir)


class BagSampler:
    """Draws padded bag batches from a bank with one gather per call, on the training device when it fits."""

    def __init__(
        self, bank: FeatureBank, device: str | torch.device = "cpu", features_on_device: bool | None = None
    ):
        self.device = torch.device(device)
        host = torch.from_numpy(np.asarray(bank.features))
        if features_on_device is None:
            features_on_device = self.device.type == "cpu" or _fits_on_device(host, self.device)
        self.store_device = self.device if features_on_device else torch.device("cpu")
        self.features = host.to(self.store_device)
        self.starts = torch.from_numpy(bank.offsets[:-1].copy()).to(self.store_device)
        self.lengths = torch.from_numpy(bank.lengths.copy()).to(self.store_device)
        self.host_lengths = bank.lengths.copy()  # batch shapes are decided on the host: no device sync

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.store_device).manual_seed(seed)

    def gather(
        self, rows: torch.Tensor | np.ndarray, max_tiles: int | None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of bank `rows` -> features `(R, K, D)` float32 and mask `(R, K)` on the training device.

        Bags longer than `max_tiles` get a uniform random subset (without replacement); `max_tiles=None`
        keeps every instance. K is the longest (capped) bag of the batch.
        """
        rows = torch.as_tensor(rows)
        longest = int(self.host_lengths[rows.cpu().numpy()].max())
        rows = rows.to(self.store_device, non_blocking=True)
        lengths = self.lengths[rows]
        if max_tiles is None or longest <= max_tiles:
            idx = torch.arange(longest, device=self.store_device).expand(len(rows), longest)
            mask = idx < lengths[:, None]
        else:
            keys = torch.rand(len(rows), longest, generator=generator, device=self.store_device)
            keys = keys.masked_fill(torch.arange(longest, device=self.store_device) >= lengths[:, None], 2.0)
            picked = keys.topk(max_tiles, dim=1, largest=False, sorted=False)
            idx, mask = picked.indices, picked.values < 1.5
        idx = torch.minimum(idx, lengths[:, None] - 1)  # padding points at a real row; the mask hides it
        x = self.features[self.starts[rows, None] + idx]
        return x.to(self.device, torch.float32, non_blocking=True), mask.to(self.device, non_blocking=True)


def _fits_on_device(host: torch.Tensor, device: torch.device, share: float = 0.6) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return host.numel() * host.element_size() < share * free


def epoch_schedule(
    member_rows: Sequence[np.ndarray], batch_size: int, rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """One epoch of bag indices for members trained in lockstep: `(steps, M, batch_size)`.

    Each member sees a fresh permutation of its own training bags; members with fewer bags than the
    largest fill their last steps with extra random draws of their own bags, so every step has a
    full batch for every member (at most `batch_size - 1 + max difference in set sizes` extra draws).
    """
    longest = max(len(r) for r in member_rows)
    steps = -(-longest // batch_size)
    out = np.empty((steps * batch_size, len(member_rows)), dtype=np.int64)
    for m, (rows, rng) in enumerate(zip(member_rows, rngs)):
        order = rng.permutation(rows)
        extra = rng.choice(rows, size=steps * batch_size - len(rows), replace=True)
        out[:, m] = np.concatenate([order, extra])
    return out.reshape(steps, batch_size, len(member_rows)).transpose(0, 2, 1)
