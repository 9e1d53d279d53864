"""The extraction stream: every row reaches its slide once, a slow batch does not stall the others,
batches are stacked straight into shared memory in workers, and the run reports what limited it
(input, encoder or output)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathology.cohort_tiles import StreamStats, collate_tiles, embed_stream


class FakeTiles(Dataset):
    """Item i -> (tile filled with i % 251, slide i // per_slide, row i % per_slide, ""), after `delay` s."""

    def __init__(self, n: int, per_slide: int, delay: float = 0.0, px: int = 8):
        self.n, self.per_slide, self.delay, self.px = n, per_slide, delay, px

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        tile = torch.full((3, self.px, self.px), i % 251, dtype=torch.uint8)
        return tile, i // self.per_slide, i % self.per_slide, ""


class MeanEncoder:
    """Feature = mean pixel value (so each row can be traced back to its tile), after `delay` s."""

    device = torch.device("cpu")

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return images.float().mean(dim=(1, 2, 3), keepdim=False)[:, None]


def test_rows_arrive_per_slide_in_order_across_batch_boundaries():
    received: dict[int, list[float]] = {}

    def on_rows(slide: int, first_row: int, feats: np.ndarray) -> None:
        rows = received.setdefault(slide, [])
        assert first_row == len(rows), "rows of a slide must arrive in order, without gaps"
        rows.extend(feats[:, 0].tolist())

    stats = embed_stream(FakeTiles(50, per_slide=7), MeanEncoder(), batch_size=8, workers=0, on_rows=on_rows)
    assert stats.tiles == 50 and stats.batches == 7
    assert sorted(received) == list(range(8))
    assert [len(received[s]) for s in range(8)] == [7] * 7 + [1]
    assert received[3] == [float(i % 251) for i in range(21, 28)]


class SlowFirstTile(FakeTiles):
    """FakeTiles whose tile 0 takes `stall` s to read: a slide file cold on network storage."""

    def __init__(self, n: int, per_slide: int, stall: float):
        super().__init__(n, per_slide)
        self.stall = stall

    def __getitem__(self, i: int):
        if i == 0:
            time.sleep(self.stall)
        return super().__getitem__(i)


def _arrivals(in_order: bool) -> tuple[list[int], dict[int, dict[int, float]]]:
    """(slides in the order their rows were handed over, slide -> row -> feature)."""
    order: list[int] = []
    rows: dict[int, dict[int, float]] = {}

    def on_rows(slide: int, first_row: int, feats: np.ndarray) -> None:
        order.append(slide)
        for k, value in enumerate(feats[:, 0].tolist()):
            assert first_row + k not in rows.setdefault(slide, {}), "a row was handed over twice"
            rows[slide][first_row + k] = value

    # one slide per batch; two workers, so the other worker's batches can go ahead of the stalled one
    embed_stream(SlowFirstTile(96, per_slide=8, stall=2.0), MeanEncoder(), batch_size=8, workers=2,
                 on_rows=on_rows, in_order=in_order)
    return order, rows


def test_a_slow_batch_holds_up_only_its_own_worker():
    order, rows = _arrivals(in_order=False)
    # the other worker's four queued batches (slides 1, 3, 5, 7) and the ones it was given while
    # worker 0 slept reached the encoder before the stalled slide 0
    assert order.index(0) >= 4
    assert sorted(order) == list(range(12))
    assert rows == {s: {r: float(s * 8 + r) for r in range(8)} for s in range(12)}  # every row once, in place
    # control: in order, nothing is handed over until the stalled batch is decoded
    control_order, control_rows = _arrivals(in_order=True)
    assert control_order == list(range(12)) and control_rows == rows


class CollateInWorker(Dataset):
    """Each item collates a small batch inside the worker and says whether it landed in shared memory."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        images, *_ = collate_tiles([FakeTiles(4, 4)[k] for k in range(4)])
        return bool(images.is_shared())


def test_worker_batches_are_stacked_straight_into_shared_memory():
    # a batch built in ordinary memory would be copied into shared memory once more to be handed over
    flags = list(DataLoader(CollateInWorker(), batch_size=None, num_workers=1))
    assert flags == [True, True]
    images, slides, rows, errors = collate_tiles([FakeTiles(4, 2)[k] for k in range(4)])
    assert not images.is_shared()  # in the main process: nothing to hand over
    assert images.shape == (4, 3, 8, 8) and slides.tolist() == [0, 0, 1, 1] and rows.tolist() == [0, 1, 0, 1]
    assert errors == []


def _run(tile_delay: float = 0.0, encoder_delay: float = 0.0, write_delay: float = 0.0) -> StreamStats:
    def on_rows(*_):
        time.sleep(write_delay)

    return embed_stream(FakeTiles(48, per_slide=48, delay=tile_delay), MeanEncoder(encoder_delay), batch_size=8,
                        workers=1, on_rows=on_rows)


def test_stats_name_what_limits_the_run():
    slow_input = _run(tile_delay=0.01)  # 80 ms per batch to decode
    slow_encoder = _run(encoder_delay=0.08)
    slow_output = _run(write_delay=0.08)
    assert slow_input.limit(workers=1).startswith("input-bound") and "--workers (now 1)" in slow_input.limit(1)
    assert slow_encoder.limit(workers=1).startswith("encoder-bound")
    assert slow_output.limit(workers=1).startswith("output-bound")
    for stats in (slow_input, slow_encoder, slow_output):
        assert stats.tiles == 48 and stats.batches == 6
        parts = stats.startup_s + stats.wait_input_s + stats.encoder_s + stats.device_s + stats.write_s
        assert parts <= stats.seconds * 1.001 + 1e-3
    assert slow_encoder.share(slow_encoder.encoder_s) > 0.6
    assert slow_input.share(slow_input.wait_input_s) > 0.5
    # the first batch is start-up, not input starvation; the steady rate excludes it
    assert slow_input.startup_s >= 0.07
    assert slow_input.steady_tiles_per_s > slow_input.tiles_per_s


def test_stats_add_up_over_retries():
    total = StreamStats()
    embed_stream(FakeTiles(16, 16), MeanEncoder(), 8, 0, stats=total)
    embed_stream(FakeTiles(8, 8), MeanEncoder(), 8, 0, stats=total)
    assert (total.tiles, total.batches) == (24, 3)
    assert "24 tiles" in total.summary()
