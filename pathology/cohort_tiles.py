"""The tiles of many slides as one stream, embedded batch after batch without idling the device.

`CohortTiles` gives every tile of every slide one global index, in slide order; a plain sequential
DataLoader over it then hands out batches that cross slide boundaries, decoded by all workers in
parallel, so there is no per-slide loader start-up or tail. Each worker keeps a small LRU of open
slides (consecutive batches of one worker mostly hit the same slide). A tile that cannot be read does
not raise inside the worker (that would kill the whole loader): it comes back as a blank tile with
the reason, the caller fails that slide, and the worker remembers the slide as bad so its other tiles
cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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


def collate_tiles(items: list) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    images = torch.stack([item[0] for item in items])
    slides = np.array([item[1] for item in items], dtype=np.int64)
    rows = np.array([item[2] for item in items], dtype=np.int64)
    errors = sorted({(item[1], item[3]) for item in items if item[3]})
    return images, slides, rows, errors


def _deliver(pending: tuple, on_rows: Callable[[int, int, np.ndarray], None]) -> None:
    slides, rows, host, event = pending
    if event is not None:
        event.synchronize()
    features = host.numpy()
    cuts = np.flatnonzero(np.diff(slides)) + 1
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(slides)]])):
        on_rows(int(slides[a]), int(rows[a]), features[a:b])


def embed_stream(
    dataset: CohortTiles,
    encoder: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    workers: int,
    collate: Callable = collate_tiles,
    on_rows: Callable[[int, int, np.ndarray], None] = lambda *a: None,
    on_error: Callable[[int, str], None] = lambda *a: None,
) -> int:
    """Embed every tile of `dataset` in order; `on_rows(slide, first_row, features)` gets each batch's
    run of rows per slide, `on_error(slide, reason)` each unreadable slide. Returns the tile count.

    The features of batch k are copied device -> pinned host memory asynchronously and handed over
    only after batch k+1 has been launched, so host-side writing overlaps the next forward pass."""
    device = getattr(encoder, "device", torch.device("cpu"))
    cuda = device.type == "cuda"
    pad_to = batch_size if getattr(encoder, "compiled", False) else 0  # one static shape for torch.compile
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        pin_memory=cuda, prefetch_factor=PREFETCH if workers else None)
    pending, count = None, 0
    for images, slides, rows, errors in loader:
        for pos, reason in errors:
            on_error(pos, reason)
        n = len(images)
        if pad_to and n < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
        features = encoder(images)[:n]
        if cuda:
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host.copy_(features, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = features, None
        if pending is not None:
            _deliver(pending, on_rows)
        pending = (slides, rows, host, event)
        count += n
    if pending is not None:
        _deliver(pending, on_rows)
    return count
