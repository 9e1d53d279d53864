"""Tiles read straight from the slides: a seeded stream for SSL and a per-slide dataset for extraction.

No tiles are dumped to disk: each DataLoader worker opens its own slide handles (a bounded LRU
cache, so a 50k-slide cohort never holds 50k open files) and decodes tiles on the fly.

`TileStream` sample `i` is a pure function of (seed, i): a counter-based hash picks one tile
uniformly among all tiles of all slides. Hence a run can resume at sample k (`start=k`) and see
exactly what an uninterrupted run would have seen, and the global order does not depend on the
number of workers. Sharding: the stream is cut into blocks of `shard_block` consecutive indices;
with S = world_size * num_workers shards, shard s = rank * num_workers + worker takes blocks
s, s + S, s + 2S, ... A DataLoader visits workers round-robin, so with `shard_block` equal to the
batch size (and one rank) its batches come out in exactly the global order i = start, start + 1, ...
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from fm.skipped_inputs import SkippedInputs
from pathology.slides import Slide, SlideError, open_slide, read_tile_view
from pathology.tiling import COORDS_NAME, read_coords

_MASK64 = (1 << 64) - 1
MAX_REPLACEMENTS = 16  # unreadable tiles replaced in a row before a sample gives up
_REPLACEMENT_STRIDE = 1 << 48  # attempt k of sample i draws as sample i + k * stride: no real index collides



def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash of a 64-bit counter (SplitMix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_hash(seed: int, index: int) -> int:
    """Deterministic, well-spread 64-bit value for sample `index` of the stream seeded `seed`."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))


@dataclass(frozen=True)
class SlideTiles:
    """Where one slide's tiles are: the slide file, its coords.h5 and the tile count."""

    slide_path: str
    coords_path: str
    n_tiles: int
    slide_mpp: float


def _coords_files(source: str | os.PathLike) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if (path / COORDS_NAME).is_file():
        return [path / COORDS_NAME]
    found = sorted(path.glob(f"*/{COORDS_NAME}"))
    if not found:
        raise FileNotFoundError(
            f"{path}: no {COORDS_NAME} (expected a coords file, a slide folder or a tiling output)"
        )
    return found


def index_sources(sources: Sequence) -> list[SlideTiles]:
    """SlideTiles for coords files, slide folders, tiling output folders or (slide_path, coords.h5) pairs."""
    entries = []
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        pairs = (
            [(source[0], Path(source[1]))]
            if isinstance(source, (tuple, list))
            else [(None, p) for p in _coords_files(source)]
        )
        for slide_path, coords_path in pairs:
            with h5py.File(coords_path, "r") as f:
                n_tiles = int(f["coords"].shape[0])
                attrs = f["coords"].attrs
                slide_path = str(slide_path or attrs["slide_path"])
                slide_mpp = float(attrs["slide_mpp"])
            if n_tiles:
                entries.append(SlideTiles(slide_path, str(coords_path), n_tiles, slide_mpp))
    return entries


class _SlideCache:
    """Per-process LRU of open slides and their coords; dropped when the process id changes (fork)."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.pid = os.getpid()
        self.items: OrderedDict[int, tuple[Slide, np.ndarray]] = OrderedDict()

    def get(self, key: int, entry: SlideTiles) -> tuple[Slide, np.ndarray]:
        if self.pid != os.getpid():  # inherited through fork: the handles belong to the parent
            self.items, self.pid = OrderedDict(), os.getpid()
        item = self.items.get(key)
        if item is not None:
            self.items.move_to_end(key)
            return item
        coords, _ = read_coords(entry.coords_path)
        # the slide mpp recorded at tiling time, in case it came from an override
        item = (open_slide(entry.slide_path, mpp_override=entry.slide_mpp), coords)
        self.items[key] = item
        while len(self.items) > self.capacity:
            _, (old, _) = self.items.popitem(last=False)
            old.close()
        return item

    def drop(self, key: int) -> None:
        item = self.items.pop(key, None)
        if item is not None and self.pid == os.getpid():
            try:
                item[0].close()
            except Exception:  # noqa: BLE001 - a handle in an error state may fail to close too
                pass

    def close(self) -> None:
        if self.pid == os.getpid():
            for slide, _ in self.items.values():
                slide.close()
        self.items.clear()


def _to_tensor(tile: np.ndarray) -> torch.Tensor:
    # numpy's transpose copy: torch's uint8 HWC->CHW copy is ~50x slower with several intra-op threads
    return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))


class TileStream(IterableDataset):
    """Seeded stream of tiles drawn uniformly over all tiles of all slides (see module docstring).

    Yields dicts: `image` (uint8 CHW tensor, or `transform(image)`), `index` (global sample index),
    `slide` (position in `slides`) and `coords` (level-0 x, y). `num_samples=None` streams forever.
    """

    def __init__(
        self,
        sources: Sequence,
        tile_px: int = 224,
        target_mpp: float = 0.5,
        seed: int = 0,
        transform: Callable[[torch.Tensor], object] | None = None,
        start: int = 0,
        num_samples: int | None = None,
        shard_block: int = 1,
        cache_size: int = 16,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.slides = index_sources(sources)
        if not self.slides:
            raise ValueError(f"TileStream: no tiles in {sources!r}")
        self.counts = np.array([s.n_tiles for s in self.slides], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.offsets[-1])
        self.tile_px, self.target_mpp, self.seed = tile_px, target_mpp, int(seed)
        self.transform, self.start, self.num_samples = transform, int(start), num_samples
        self.shard_block, self.cache_size = max(1, int(shard_block)), cache_size
        self.rank, self.world_size = rank, world_size
        self._cache: _SlideCache | None = None
        self.skipped = SkippedInputs("slide")  # slides with a tile that could not be read (keyed by position)

    def locate(self, index: int) -> tuple[int, int]:
        """(slide position, tile row in its coords) of global sample `index`."""
        flat = sample_hash(self.seed, index) % self.total
        slide = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return slide, int(flat - self.offsets[slide])

    def sample(self, index: int) -> dict:
        """Sample `index`. A tile that cannot be read (a damaged region, a slide gone from storage) is
        replaced by another drawn from (seed, index, attempt), so one bad slide never stops a pretraining
        run and the stream stays a pure function of (seed, index); each bad slide is logged once."""
        if self._cache is None:
            self._cache = _SlideCache(self.cache_size)
        failures = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            slide_pos, row = self.locate(index + attempt * _REPLACEMENT_STRIDE)
            try:
                slide, coords = self._cache.get(slide_pos, self.slides[slide_pos])
                x, y = (int(v) for v in coords[row])
                tile = read_tile_view(slide, x, y, self.tile_px, self.target_mpp)
            except (SlideError, OSError) as err:
                self._cache.drop(slide_pos)  # OpenSlide leaves a handle unusable after a read error
                failures.append(str(err))
                self.skipped.note(slide_pos, self.slides[slide_pos].slide_path, err)
                continue
            image = _to_tensor(tile)
            if self.transform is not None:
                image = self.transform(image)
            return {"image": image, "index": index, "slide": slide_pos, "coords": torch.tensor([x, y])}
        raise SlideError(f"sample {index}: {len(failures)} tiles in a row could not be read, the last: "
                         f"{failures[-1]} (check the slides' storage, or re-tile the cohort)")

    def _shard(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def indices(self) -> Iterator[int]:
        """Global sample indices this shard yields, in order."""
        shard, shards = self._shard()
        block = self.shard_block
        first = self.start + shard * block
        step = shards * block
        while True:
            for index in range(first, first + block):
                if self.num_samples is not None and index >= self.num_samples:
                    return
                yield index
            first += step

    def __iter__(self) -> Iterator[dict]:
        for index in self.indices():
            yield self.sample(index)

    def __len__(self) -> int:
        """Samples left in a finite stream (all shards together); an endless stream has no length."""
        if self.num_samples is None:
            raise TypeError("an endless TileStream (num_samples=None) has no length")
        return max(0, self.num_samples - self.start)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # open handles never travel to worker processes
        return state


class TileDataset(Dataset):
    """Map-style tiles of one slide (feature extraction): item i -> (uint8 CHW tile, level-0 (x, y)).

    Tile size and mpp default to those recorded in the coords file, so extraction reads exactly the
    tiles that tiling selected; the slide mpp recorded at tiling is reused if the slide lacks one.
    """

    def __init__(
        self,
        coords_path: str | os.PathLike,
        slide_path: str | os.PathLike | None = None,
        tile_px: int | None = None,
        target_mpp: float | None = None,
        transform: Callable[[torch.Tensor], object] | None = None,
    ):
        self.coords, attrs = read_coords(coords_path)
        self.coords_path = str(coords_path)
        self.slide_path = str(slide_path or attrs["slide_path"])
        self.slide_mpp = float(attrs["slide_mpp"])
        self.tile_px = int(tile_px or attrs["patch_size"])
        self.target_mpp = float(target_mpp or attrs["target_mpp"])
        self.transform = transform
        self._slide: Slide | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.coords)

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path, mpp_override=self.slide_mpp)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> tuple[object, torch.Tensor]:
        x, y = (int(v) for v in self.coords[i])
        image = _to_tensor(read_tile_view(self._open(), x, y, self.tile_px, self.target_mpp))
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor([x, y], dtype=torch.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, -1
        return state
