"""Feature files: blocks written in any order give the same file; lost or doubled rows are refused."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pathology.feature_files import FeatureFileWriter, read_features

N, DIM = 50, 6


def _write(path, blocks: list[tuple[int, int]], features: np.ndarray) -> FeatureFileWriter:
    writer = FeatureFileWriter(path, N, DIM, "float32", chunk_rows=16)
    for start, stop in blocks:
        writer.write_rows(start, features[start:stop])
    return writer


def test_blocks_in_any_order_land_at_their_rows(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(N, DIM)).astype(np.float32)
    coords = np.arange(2 * N).reshape(N, 2)
    blocks = [(a, min(a + 8, N)) for a in range(0, N, 8)]
    shuffled = [blocks[i] for i in rng.permutation(len(blocks))]
    assert shuffled != blocks
    for name, order in (("in-order.h5", blocks), ("shuffled.h5", shuffled)):
        writer = _write(tmp_path / name, order, features)
        assert writer.filled == N
        writer.commit(coords, {"patch_size": 224}, {"encoder": "test"})
    got, got_coords, attrs = read_features(tmp_path / "shuffled.h5")
    np.testing.assert_array_equal(got, features)
    np.testing.assert_array_equal(got, read_features(tmp_path / "in-order.h5")[0])
    np.testing.assert_array_equal(got_coords, coords)
    assert attrs["encoder"] == "test"


def test_doubled_out_of_range_and_missing_rows_are_refused(tmp_path):
    features = np.ones((N, DIM), dtype=np.float32)
    writer = _write(tmp_path / "a.h5", [(8, 24)], features)
    with pytest.raises(ValueError, match="rows 16..31 written twice"):
        writer.write_rows(16, features[:16])
    with pytest.raises(ValueError, match="outside the slide's 50 tiles"):
        writer.write_rows(40, features[:16])
    assert writer.filled == 16
    writer.write_rows(0, features[:8])
    with pytest.raises(RuntimeError, match="24 of 50 rows written"):
        writer.commit(np.zeros((N, 2)), {}, {})
    assert not (tmp_path / "a.h5").exists() and not list(tmp_path.iterdir())  # temporary discarded too


def test_an_uncommitted_file_never_appears(tmp_path):
    writer = _write(tmp_path / "b.h5", [(0, N)], np.zeros((N, DIM), np.float32))
    assert not (tmp_path / "b.h5").exists()
    writer.discard()
    assert not list(tmp_path.iterdir())
    writer = _write(tmp_path / "b.h5", [(0, N)], np.zeros((N, DIM), np.float32))
    writer.commit(np.zeros((N, 2)), {}, {})
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["features"].shape == (N, DIM)
