"""The tiles of many slides as one stream, embedded batch after batch without idling the device.

`CohortTiles` gives every tile of every slide one global index, in slide order; a plain sequential
DataLoader over it then hands out batches that cross slide boundaries, decoded by all workers in
parallel, so there is no per-slide loader start-up or tail. Batches are taken in the order they are
ready, not the order they were sent (`in_order=False`): a batch that is slow to decode (a slide file
cold on network storage, a huge first open) holds up only its own worker, and the device goes on with
the other workers' batches. Each worker keeps a small LRU of open slides (consecutive batches of one
worker mostly hit the same slide). A tile that cannot be read does
not raise inside the worker (that would kill the whole loader): it comes back as a blank tile with
the reason, the caller fails that slide, and the worker remembers the slide as bad so its other tiles
cost nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fm.worker_deaths import WorkerDeathGuard
from pathology.slides import read_tile_view
from pathology.tile_dataset import SlideTiles, _SlideCache, _to_tensor

PREFETCH = 4  # batches each worker decodes ahead


class CohortTiles(Dataset):
    """Item i -> (uint8 CHW tile, slide position, row in that slide's coords, error message or "")."""

    def __init__(self, slides: Sequence[SlideTiles], tile_px: int, target_mpp: float, cache_size: int = 4):
        self.slides = list(slides)
        self.offsets = np.concatenate([[0], np.cumsum([s.n_tiles for s in self.slides])]).astype(np.int64)
        self.tile_px, self.target_mpp, self.cache_size = int(tile_px), float(target_mpp), cache_size
        self._cache: _SlideCache | None = None
        self._bad: dict[int, str] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        pos = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return pos, int(index - self.offsets[pos])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        pos, row = self.locate(index)
        if pos not in self._bad:
            try:
                if self._cache is None:
                    self._cache = _SlideCache(self.cache_size)
                slide, coords = self._cache.get(pos, self.slides[pos])
                if len(coords) != self.slides[pos].n_tiles:
                    raise ValueError(f"{self.slides[pos].coords_path} changed during extraction")
                image = read_tile_view(slide, int(coords[row, 0]), int(coords[row, 1]), self.tile_px, self.target_mpp)
                return _to_tensor(image), pos, row, ""
            except Exception as err:  # noqa: BLE001 - reported per slide, never kills the loader
                self._bad[pos] = f"{self.slides[pos].slide_path}: {type(err).__name__}: {err}"
        return torch.zeros(3, self.tile_px, self.tile_px, dtype=torch.uint8), pos, row, self._bad[pos]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"], state["_bad"] = None, {}  # open handles never travel to worker processes
        return state


def _shared_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; inside a DataLoader worker, already in shared memory. A worker has to
    hand a batch over through shared memory anyway: stacking straight into it saves a copy of the
    whole batch (~40 % of the collate cost for 256 tiles of 224 px)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_tiles(items: list) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    first = items[0][0]
    images = torch.stack([item[0] for item in items], out=_shared_batch((len(items), *first.shape), first.dtype))
    slides = np.array([item[1] for item in items], dtype=np.int64)
    rows = np.array([item[2] for item in items], dtype=np.int64)
    errors = sorted({(item[1], item[3]) for item in items if item[3]})
    return images, slides, rows, errors


@dataclass
class StreamStats:
    """Where the wall time of an embedding run went, so a slow run says what limits it.

    The main loop is: wait for the next decoded batch, run (CUDA: launch) the encoder, wait for the
    previous batch's features, hand its rows over (feature files are written there). On a GPU the
    device works while the loop does the rest, so a device-bound run waits mostly in `device_s`;
    an input-bound one in `wait_input_s`."""

    tiles: int = 0
    batches: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0  # until the first batch arrived: workers started, first batch decoded
    wait_input_s: float = 0.0  # after the first batch: blocked waiting for decoded tiles
    encoder_s: float = 0.0  # in the encoder call (CPU: the forward; CUDA: copy + kernel launches)
    device_s: float = 0.0  # CUDA: blocked until the previous batch's features were ready
    write_s: float = 0.0  # handing rows over (writing feature files)

    def __iadd__(self, other: StreamStats) -> StreamStats:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_tiles_per_s(self) -> float:
        """Rate after the start-up (what a long cohort approaches)."""
        steady = self.seconds - self.startup_s
        first = self.tiles / self.batches if self.batches else 0
        return (self.tiles - first) / steady if steady > 0 else 0.0

    def share(self, part: float) -> float:
        return part / self.seconds if self.seconds > 0 else 0.0

    def limit(self, workers: int) -> str:
        """One line naming what held the run back."""
        if self.share(self.wait_input_s) > 0.2:
            more = f"raise --workers (now {workers})" if workers else "use --workers (now 0: decoding in this process)"
            return (f"input-bound: waited for decoded tiles {self.share(self.wait_input_s):.0%} of the time; "
                    f"{more} or check the slide storage")
        if self.share(self.write_s) > 0.2:
            return f"output-bound: writing features took {self.share(self.write_s):.0%} of the time; check the output disk"
        return "encoder-bound: the encoder ran (almost) all the time"

    def summary(self) -> str:
        return (f"{self.tiles} tiles in {self.seconds:.1f} s ({self.tiles_per_s:.1f} tiles/s; "
                f"{self.steady_tiles_per_s:.1f} after a {self.startup_s:.1f} s start-up); time: waiting for tiles "
                f"{self.share(self.wait_input_s):.0%}, encoder {self.share(self.encoder_s + self.device_s):.0%}, "
                f"writing {self.share(self.write_s):.0%}")


def _deliver(pending: tuple, on_rows: Callable[[int, int, np.ndarray], None], stats: StreamStats) -> None:
    slides, rows, host, event = pending
    if event is not None:
        began = time.perf_counter()
        event.synchronize()
        stats.device_s += time.perf_counter() - began
    began = time.perf_counter()
    features = host.numpy()
    cuts = np.flatnonzero(np.diff(slides)) + 1
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(slides)]])):
        on_rows(int(slides[a]), int(rows[a]), features[a:b])
    stats.write_s += time.perf_counter() - began


def embed_stream(
    dataset: CohortTiles,
    encoder: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    workers: int,
    collate: Callable = collate_tiles,
    on_rows: Callable[[int, int, np.ndarray], None] = lambda *a: None,
    on_error: Callable[[int, str], None] = lambda *a: None,
    stats: StreamStats | None = None,
    in_order: bool = False,
) -> StreamStats:
    """Embed every tile of `dataset`; `on_rows(slide, first_row, features)` gets each batch's run of rows
    per slide, `on_error(slide, reason)` each unreadable slide. Batches come as they are decoded, so a
    slide's rows may arrive out of order (`in_order=True`: in order, one slow batch stalls the stream). Returns (and adds to
    `stats`, if given, so a caller that stops halfway still has them) where the time went.

    The features of batch k are copied device -> pinned host memory asynchronously and handed over
    only after batch k+1 has been launched, so host-side writing overlaps the next forward pass."""
    stats = stats if stats is not None else StreamStats()
    device = getattr(encoder, "device", torch.device("cpu"))
    cuda = device.type == "cuda"
    pad_to = batch_size if getattr(encoder, "compiled", False) else 0  # one static shape for torch.compile
    began = time.perf_counter()
    # Pinned here, one batch at a time, rather than by the DataLoader's pin thread: that one pins every
    # batch the workers have ready (up to workers x prefetch x 38 MB for 256 tiles), and torch's host
    # allocator keeps that peak for the rest of the run. The copy (~10 ms) overlaps the device's work.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        prefetch_factor=PREFETCH if workers else None, in_order=in_order)
    pending, waited = None, time.perf_counter()
    try:
        with WorkerDeathGuard(iter(loader)) as batches:  # a dead worker raises from the wait, nowhere else
            for images, slides, rows, errors in batches:
                now = time.perf_counter()
                if pending is None:
                    stats.startup_s += now - waited
                else:
                    stats.wait_input_s += now - waited
                for pos, reason in errors:
                    on_error(pos, reason)
                n = len(images)
                if pad_to and n < pad_to:
                    images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
                if cuda:
                    images = images.pin_memory()  # so the encoder's host -> device copy is asynchronous
                features = encoder(images)[:n]
                if cuda:
                    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
                    host.copy_(features, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host, event = features, None
                stats.encoder_s += time.perf_counter() - now
                if pending is not None:
                    _deliver(pending, on_rows, stats)
                pending = (slides, rows, host, event)  # not None from here on: start-up is over
                stats.tiles += n
                stats.batches += 1
                waited = time.perf_counter()
            if pending is not None:
                _deliver(pending, on_rows, stats)
    finally:
        stats.seconds += time.perf_counter() - began
    return stats
