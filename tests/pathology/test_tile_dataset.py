from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pathology.slides import open_slide, read_tile
from pathology.tile_dataset import TileDataset, TileStream, index_sources
from pathology.tiling import read_coords


def _indices_and_pixels(stream, n):
    items = [item for _, item in zip(range(n), stream)]
    return [item["index"] for item in items], torch.stack([item["image"] for item in items])


def test_index_sources_accepts_output_folder_slide_folder_and_pairs(demo_tiles):
    records, out = demo_tiles
    everything = index_sources([out])
    assert len(everything) == len(records)
    assert sum(s.n_tiles for s in everything) == sum(
        len(read_coords(out / r.slide_id / "coords.h5")[0]) for r in records
    )
    pair = index_sources([(str(records[0].slide_path), out / records[0].slide_id / "coords.h5")])
    assert pair == index_sources([out / records[0].slide_id]) == [everything[0]]


def test_stream_is_seeded_and_tiles_match_the_reader(demo_tiles):
    _, out = demo_tiles
    a = TileStream([out], seed=3, num_samples=12)
    b = TileStream([out], seed=3, num_samples=12)
    c = TileStream([out], seed=4, num_samples=12)
    items = list(a)
    assert [i["index"] for i in items] == list(range(12))
    first = items[0]
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (3, 224, 224)
    _, pixels_b = _indices_and_pixels(b, 12)
    assert torch.equal(torch.stack([i["image"] for i in items]), pixels_b)
    assert [a.locate(i) for i in range(50)] != [c.locate(i) for i in range(50)]
    with open_slide(a.slides[first["slide"]].slide_path) as slide:
        expected = read_tile(slide, *first["coords"].tolist(), 224, 0.5)
    assert torch.equal(first["image"], torch.from_numpy(expected).permute(2, 0, 1))


def test_stream_samples_tiles_uniformly(demo_tiles):
    _, out = demo_tiles
    stream = TileStream([out], seed=0)
    n = 30_000
    picks = np.array([stream.locate(i) for i in range(n)])
    per_slide = np.bincount(picks[:, 0], minlength=len(stream.slides))
    expected = stream.counts / stream.total * n
    chi2 = ((per_slide - expected) ** 2 / expected).sum()
    assert chi2 < 40, chi2  # 11 degrees of freedom: p ~ 1e-4 at 40
    rows = picks[picks[:, 0] == 0, 1]
    assert rows.min() == 0 and rows.max() == stream.counts[0] - 1


def test_resume_at_k_equals_tail_of_full_run(demo_tiles):
    _, out = demo_tiles
    full_idx, full = _indices_and_pixels(TileStream([out], seed=1, num_samples=10), 10)
    tail_idx, tail = _indices_and_pixels(TileStream([out], seed=1, start=6, num_samples=10), 10)
    assert tail_idx == full_idx[6:] == [6, 7, 8, 9]
    assert torch.equal(tail, full[6:])
    assert len(TileStream([out], seed=1, start=6, num_samples=10)) == 4
    with pytest.raises(TypeError):
        len(TileStream([out], seed=1))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_two_workers_give_the_global_order(demo_tiles, batch_size):
    _, out = demo_tiles
    reference = TileStream([out], seed=2, num_samples=12)
    expected_idx, expected = _indices_and_pixels(reference, 12)
    stream = TileStream([out], seed=2, num_samples=12, shard_block=batch_size, cache_size=2)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=2)
    batches = list(loader)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert indices == expected_idx
    assert torch.equal(torch.cat([b["image"] for b in batches]), expected)


def test_shards_partition_the_stream_across_ranks():
    class Fake(TileStream):
        def __init__(self, rank, world):  # only the index logic, no slides needed
            self.rank, self.world_size, self.shard_block, self.start, self.num_samples = rank, world, 2, 3, 20

    seen = [list(Fake(r, 3).indices()) for r in range(3)]
    assert sorted(sum(seen, [])) == list(range(3, 20))
    assert seen[1][:2] == [5, 6]  # rank 1 takes the second block


def test_slide_cache_stays_bounded(demo_tiles):
    _, out = demo_tiles
    stream = TileStream([out], seed=0, num_samples=40, cache_size=3)
    for _ in stream:
        assert len(stream._cache.items) <= 3
    assert len({stream.locate(i)[0] for i in range(40)}) > 3


def test_tile_dataset_returns_tiles_and_coords_of_one_slide(demo_tiles):
    records, out = demo_tiles
    dataset = TileDataset(out / records[1].slide_id / "coords.h5")
    coords, _ = read_coords(out / records[1].slide_id / "coords.h5")
    assert len(dataset) == len(coords) and dataset.tile_px == 224 and dataset.target_mpp == 0.5
    tile, xy = dataset[2]
    assert tile.dtype == torch.uint8 and tile.shape == (3, 224, 224) and xy.tolist() == coords[2].tolist()
    with open_slide(records[1].slide_path) as slide:
        assert torch.equal(tile, torch.from_numpy(read_tile(slide, *coords[2], 224, 0.5)).permute(2, 0, 1))
    loaded = list(DataLoader(dataset, batch_size=4, num_workers=2))
    assert torch.equal(torch.cat([c for _, c in loaded]), torch.from_numpy(coords))
    assert torch.equal(loaded[0][0][2], tile)


def test_unreadable_tiles_are_replaced_and_the_stream_stays_seeded(test_slides, tmp_path):
    """A slide damaged after tiling (here: half its level-0 tiles zeroed) must not stop pretraining:
    its unreadable tiles are replaced by others drawn from (seed, index), its readable ones still come."""
    from pathology.slides import SlideError, read_tile_view
    from pathology.tiling import tile_slide

    out = tmp_path / "tiles"
    for name in ("x20", "x40"):
        assert tile_slide(test_slides[name], out, name).status == "ok"
    sources = [(str(test_slides["damaged"]), out / "x20" / "coords.h5"),
               (str(test_slides["x40"]), out / "x40" / "coords.h5")]
    coords, _ = read_coords(out / "x20" / "coords.h5")

    def readable(x, y):
        with open_slide(test_slides["damaged"]) as slide:
            try:
                read_tile_view(slide, int(x), int(y), 224, 0.5)
                return True
            except SlideError:
                return False

    good = {tuple(int(v) for v in c) for c in coords if readable(*c)}
    assert 0 < len(good) < len(coords)  # the control: the damaged copy fails on some tiles, not all

    stream = TileStream(sources, seed=0)
    items = [stream.sample(i) for i in range(80)]
    again = TileStream(sources, seed=0)
    assert all(torch.equal(a["image"], again.sample(a["index"])["image"]) for a in items[::7])
    assert stream.skipped.keys == {0}
    damaged = [a for a in items if a["slide"] == 0]
    assert all(tuple(a["coords"].tolist()) in good for a in damaged)
    first_failure = next(i for i in range(80) if stream.locate(i)[0] == 0
                         and tuple(int(v) for v in coords[stream.locate(i)[1]]) not in good)
    # the handle is reopened after a read error: readable tiles of the slide still come after it
    assert any(a["index"] > first_failure for a in damaged)

    gone = TileStream([(str(tmp_path / "moved-away.tif"), out / "x20" / "coords.h5")], seed=0)
    with pytest.raises(SlideError, match="moved-away.tif"):
        gone.sample(0)
