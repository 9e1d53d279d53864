"""Multi-crop batches: a pure function of (seed, batch index, rank), whatever the worker count."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from fm.augment import MultiCropTransform
from fm.demo_images import DemoTextures
from fm.ssl_data import MultiCropBatches, SSLDataModule

BATCH = 2
PATCH = 2  # 8 x 8 grid: even the smallest ratio (0.1) asks for more than one 4-patch block


def _dataset(**kw) -> MultiCropBatches:
    source = DemoTextures(n=64, size=32)
    transform = MultiCropTransform(global_size=16, local_size=8, n_local=2)
    args = dict(batch_size=BATCH, patch_size=PATCH, seed=0) | kw
    return MultiCropBatches(source, transform, **args)


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _first(loader: DataLoader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def test_batch_layout_and_mask_grid():
    batch = _dataset().make_batch(0)
    assert batch["global_crops"].shape == (2 * BATCH, 3, 16, 16)
    assert batch["local_crops"].shape == (2 * BATCH, 3, 8, 8)
    assert batch["masks"].shape == (2 * BATCH, 16 // PATCH, 16 // PATCH)
    assert batch["masks"].dtype == torch.bool
    assert int(batch["masks"].flatten(1).any(1).sum()) == BATCH  # half of the 2B global crops
    assert batch["indices"].shape == (BATCH,)
    assert int(batch["batch_index"]) == 0


def test_make_batch_is_deterministic_and_ignores_global_rng():
    ds = _dataset()
    torch.manual_seed(123)
    a = ds.make_batch(3)
    torch.manual_seed(999)
    _ = torch.rand(10)
    b = ds.make_batch(3)
    _assert_batches_equal(a, b)
    c = ds.make_batch(4)
    assert not torch.equal(a["global_crops"], c["global_crops"])


def test_seed_and_rank_change_the_batch():
    a = _dataset().make_batch(0)
    assert not torch.equal(a["global_crops"], _dataset(seed=1).make_batch(0)["global_crops"])
    assert not torch.equal(a["global_crops"], _dataset(rank=1).make_batch(0)["global_crops"])


class _ConstantImages:
    """Image i is a constant grey of value (i + 1) / 100: every crop of it is constant too."""

    def __len__(self) -> int:
        return 20

    def get(self, index: int) -> torch.Tensor:
        return torch.full((3, 12, 12), (index + 1) / 100.0)


def test_crops_are_crop_major():
    identity = (lambda x: x,) * 3
    transform = MultiCropTransform(global_size=8, local_size=4, n_local=3, photometric=identity,
                                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = MultiCropBatches(_ConstantImages(), transform, batch_size=5, patch_size=4).make_batch(2)
    values = (batch["indices"].float() + 1) / 100.0  # (B,)
    g = batch["global_crops"][:, 0, 0, 0]
    loc = batch["local_crops"][:, 0, 0, 0]
    torch.testing.assert_close(g, values.repeat(2))  # crop 0 of every sample, then crop 1 ...
    torch.testing.assert_close(loc, values.repeat(3))


def test_order_does_not_depend_on_worker_count():
    ds = _dataset()
    serial = _first(DataLoader(ds, batch_size=None, num_workers=0), 4)
    parallel = _first(DataLoader(ds, batch_size=None, num_workers=2), 4)
    assert [int(b["batch_index"]) for b in serial] == [0, 1, 2, 3]
    assert [int(b["batch_index"]) for b in parallel] == [0, 1, 2, 3]
    for a, b in zip(serial, parallel):
        _assert_batches_equal(a, b)


def test_start_batch_resumes_at_that_batch():
    ds = _dataset()
    expected = [ds.make_batch(k) for k in (5, 6, 7)]
    resumed = _dataset(start_batch=5)
    _assert_batches_equal(next(iter(resumed)), expected[0])
    got = _first(DataLoader(resumed, batch_size=None, num_workers=2), 3)
    assert [int(b["batch_index"]) for b in got] == [5, 6, 7]
    for a, b in zip(got, expected):
        _assert_batches_equal(a, b)


def test_empty_source_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        MultiCropBatches(DemoTextures(n=0, size=8), MultiCropTransform(), batch_size=2, patch_size=4)


def _first_batch_for_rank(global_rank: int) -> dict:
    """First batch of SSLDataModule.train_dataloader under a stand-in trainer at step 0 on `global_rank`."""
    source = DemoTextures(n=64, size=32)
    transform = MultiCropTransform(global_size=16, local_size=8, n_local=2)
    data_cfg = {"batch_size": 8, "seed": 0, "num_workers": 0}
    datamodule = SSLDataModule(source, transform, data_cfg, patch_size=PATCH, mask_probability=0.5,
                               mask_ratio=(0.1, 0.5))
    datamodule.trainer = SimpleNamespace(global_step=0, global_rank=global_rank)
    return next(iter(datamodule.train_dataloader()))


def test_ddp_ranks_draw_different_images_from_the_datamodule():
    """train_dataloader passes the trainer's global rank into the batch seed: ranks 0 and 1 draw different
    images at the same step, while the same rank always redraws the same batch."""
    rank0 = _first_batch_for_rank(0)
    _assert_batches_equal(rank0, _first_batch_for_rank(0))
    rank1 = _first_batch_for_rank(1)
    assert int(rank0["batch_index"]) == int(rank1["batch_index"]) == 0
    assert not torch.equal(rank0["indices"], rank1["indices"])
