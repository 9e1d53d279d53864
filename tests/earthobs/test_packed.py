"""Packed cache: round trip equals the source, bad items are skipped and listed, a crash leaves no
half-visible cache and the next run resumes, and `prepare` packs the saved 10 % subset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_eurosat import make_eurosat
from data_ssl4eo import LOCATIONS, make_ssl4eo, write_labels

from earthobs.bigearthnet import BigEarthNetV1
from earthobs.packed import PackedDataset, pack_split, prepare
from fm.io import ItemLock


@pytest.fixture()
def s2_tiny(shared_fixtures) -> Path:
    return shared_fixtures / "earthobs/bigearthnet-v1/s2-tiny"


def assert_same(packed, source, exact=True):
    assert len(packed) == len(source) and packed.ids == source.ids
    for k in range(len(source)):
        a, b = packed[k], source[k]
        assert a["id"] == b["id"]
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
        if exact:
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        else:  # float16: 11 significant bits
            torch.testing.assert_close(a["image"], b["image"], rtol=1e-3, atol=1e-3)


def test_round_trip_equals_source(s2_tiny, tmp_path):
    source = BigEarthNetV1(s2_tiny)
    out = pack_split(source, tmp_path / "f32", dtype="float32")
    packed = PackedDataset(out)
    assert_same(packed, source)
    assert packed.meta["bands"] == list(source.bands) and packed.meta["normalised"] is False
    assert np.load(out / "images.npy", mmap_mode="r").dtype == np.float32
    assert_same(PackedDataset(pack_split(source, tmp_path / "f16")), source, exact=False)
    assert np.load(tmp_path / "f16" / "images.npy", mmap_mode="r").dtype == np.float16
    subset = PackedDataset(out, ids=[source.ids[2], source.ids[0]])
    torch.testing.assert_close(subset[0]["image"], source[2]["image"])
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.lock"))


def test_existing_cache_is_reused_not_rewritten(s2_tiny, tmp_path):
    source = BigEarthNetV1(s2_tiny)
    out = pack_split(source, tmp_path / "c")
    before = (out / "meta.json").stat().st_mtime_ns
    assert pack_split(source, out) == out and (out / "meta.json").stat().st_mtime_ns == before
    pack_split(source, out, overwrite=True)
    assert (out / "meta.json").stat().st_mtime_ns != before and len(PackedDataset(out)) == 3


def test_bad_item_is_skipped_and_listed(s2_tiny, tmp_path):
    root = Path(shutil.copytree(s2_tiny, tmp_path / "s2"))
    bad = "S2A_MSIL2A_20170617T113321_4_55"
    (root / bad / f"{bad}_B8A.tif").unlink()
    source = BigEarthNetV1(root)
    packed = PackedDataset(pack_split(source, tmp_path / "p", dtype="float32"))
    assert packed.ids == [i for i in source.ids if i != bad]
    (skipped,) = packed.meta["skipped"]
    assert skipped["id"] == bad and f"{bad}_B8A.tif" in skipped["error"]
    good = BigEarthNetV1(root, ids=packed.ids)
    assert_same(packed, good)


class Crashing(torch.utils.data.Dataset):
    """Wraps a data set; raises at `crash_at` (a killed worker), and records which items were read."""

    def __init__(self, dataset, crash_at=None):
        self.dataset, self.crash_at, self.read = dataset, crash_at, []
        self.ids, self.bands = dataset.ids, dataset.bands

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        if k == self.crash_at:
            raise RuntimeError("killed")
        self.read.append(k)
        return self.dataset[k]


def test_crash_leaves_nothing_visible_and_the_next_run_resumes(s2_tiny, tmp_path):
    source = BigEarthNetV1(s2_tiny)
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        pack_split(Crashing(source, crash_at=2), out, dtype="float32", flush_every=1)
    assert not out.exists() and (tmp_path / "cache.partial").is_dir()
    resumed = Crashing(source)
    pack_split(resumed, out, dtype="float32", flush_every=1)
    assert resumed.read == [2]  # items 0 and 1 were already on disk
    assert_same(PackedDataset(out), source)
    assert not (tmp_path / "cache.partial").exists()


def test_a_held_lock_stops_a_second_packer(s2_tiny, tmp_path):
    out = tmp_path / "cache"
    with ItemLock(out) as got:
        assert got
        with pytest.raises(RuntimeError, match="being packed by another process"):
            pack_split(BigEarthNetV1(s2_tiny), out)


def test_prepare_packs_the_saved_subset(tmp_path):
    cache = tmp_path / "fm-cache"
    out = prepare("demo", cache, tmp_path / "packed", split="train", fraction=0.5, dtype="float32",
                  n=12, seed=0)
    listing = tmp_path / "packed" / "demo" / "train-50pct-seed0.txt"
    ids = [line for line in listing.read_text().splitlines() if not line.startswith("#")]
    packed = PackedDataset(out)
    assert out == tmp_path / "packed" / "demo" / "s2" / "train-50pct-seed0"
    assert packed.ids == ids and len(ids) == round(0.5 * len(BigEarthNetV1(_demo_root(cache), split="train")))
    assert_same(packed, BigEarthNetV1(_demo_root(cache), ids=ids))
    assert packed.meta["source"]["subset_file"] == str(listing)


def _demo_root(cache: Path) -> Path:
    return next((cache / "demo" / "earthobs").glob("bigearthnet-v1-n12-*"))


def test_prepare_eurosat_and_ssl4eo_labels(tmp_path):
    make_eurosat(tmp_path / "eurosat")
    packed = PackedDataset(prepare("eurosat", tmp_path / "eurosat", tmp_path / "packed", split="test",
                                   dtype="uint16"))
    assert [int(packed[k]["label"]) for k in range(len(packed))] == list(range(10))
    assert packed[0]["image"].shape == (13, 8, 8)
    make_ssl4eo(tmp_path / "ssl4eo", "s2c", size=12)
    labels = write_labels(tmp_path / "dw.json", {LOCATIONS[1]: [4]})
    packed = PackedDataset(prepare("ssl4eo-s12", tmp_path / "ssl4eo", tmp_path / "packed", split=None,
                                   sensor="s2c", labels=labels))
    assert len(packed) == 12 and packed.meta["has_label"]
    flags = [bool(packed[k]["has_label"]) for k in range(12)]
    assert flags == [i.startswith(LOCATIONS[1]) for i in packed.ids]
    assert json.loads((Path(packed.path) / "meta.json").read_text())["source"]["sensor"] == "s2c"
