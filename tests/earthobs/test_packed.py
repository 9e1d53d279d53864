"""Packed cache: round trip equals the source, bad items are skipped and listed, a crash leaves no
half-visible cache and the next run resumes, `prepare` packs the saved 10 % subset, a cache of another
request is refused, a damaged cache is named and never reused, a reused cache says so, and prepare /
eval / train name BigEarthNet caches alike."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_bigearthnet_v2 import make_bigearthnet_v2
from data_eurosat import make_eurosat
from data_ssl4eo import LOCATIONS, make_ssl4eo, write_labels

import earthobs.packed as packed_module
from earthobs.bigearthnet import BigEarthNetV1
from earthobs.cache_request import CacheMismatchError, CorruptCacheError
from earthobs.packed import PackedDataset, pack_split
from earthobs.prepare import prepare, resolve_dataset_name
from earthobs.readers import EOReadError, NoReadableSampleError
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


def test_a_cache_packed_for_another_request_is_refused(s2_tiny, tmp_path):
    out = prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None)
    before = (out / "meta.json").stat().st_mtime_ns
    assert prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None) == out  # same request: reused
    assert (out / "meta.json").stat().st_mtime_ns == before
    copy = Path(shutil.copytree(s2_tiny, tmp_path / "copy"))  # same patch names, another root
    first, last = sorted(p.name for p in copy.iterdir())[0::2]  # a band of one patch is another patch's
    shutil.copy(copy / last / f"{last}_B03.tif", copy / first / f"{first}_B03.tif")
    root, asked = re.escape(str(Path(s2_tiny).resolve())), re.escape(str(copy.resolve()))  # roots are resolved
    with pytest.raises(CacheMismatchError, match=rf"{re.escape(str(out))} .*root '{root}' \(asked '{asked}'\), "
                                                 rf"where sample {first} holds other values.*--overwrite"):
        prepare("bigearthnet", copy, tmp_path / "packed", split=None)
    with pytest.raises(CacheMismatchError, match=r"dtype float16 \(asked float32\)"):
        prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None, dtype="float32")
    with pytest.raises(CacheMismatchError, match=r"nan_policy 'raise' \(asked 'zero'\)"):
        prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None, nan_policy="zero")
    fewer = BigEarthNetV1(s2_tiny, ids=BigEarthNetV1(s2_tiny).ids[:2])
    with pytest.raises(CacheMismatchError, match=r"other sample ids \(3 recorded, 2 asked\)"):
        pack_split(fewer, out)
    assert (out / "meta.json").stat().st_mtime_ns == before  # nothing was touched
    shutil.copy(s2_tiny / first / f"{first}_B03.tif", copy / first / f"{first}_B03.tif")
    prepare("bigearthnet", copy, tmp_path / "packed", split=None, dtype="float32", overwrite=True)
    meta = PackedDataset(out).meta
    assert meta["source"]["root"] == str(copy) and meta["dtype"] == "float32"
    assert prepare("bigearthnet", copy, tmp_path / "packed", split=None) == out  # dtype not asked: any is fine


def test_a_cache_is_reused_when_only_its_data_moved(s2_tiny, tmp_path, caplog):
    """The data root moved (or is mounted elsewhere on a compute node): the samples the cache spot-checks
    read the same there, so the cache is reused, not refused (repacking BigEarthNet takes hours); the new
    root is recorded, and a read-only cache is reused all the same."""
    out = prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None)
    images = (out / "images.npy").read_bytes()
    moved = Path(shutil.copytree(s2_tiny, tmp_path / "moved"))
    with caplog.at_level("WARNING", logger="earthobs.packed"):
        assert prepare("bigearthnet", moved, tmp_path / "packed", split=None) == out
    assert "the samples checked read the same" in caplog.text and str(moved.resolve()) in caplog.text
    assert PackedDataset(out).meta["source"]["root"] == str(moved.resolve())
    assert (out / "images.npy").read_bytes() == images  # nothing repacked
    assert_same(PackedDataset(out), BigEarthNetV1(moved), exact=False)

    again = Path(shutil.copytree(s2_tiny, tmp_path / "again"))
    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.MonkeyPatch.context() as patch:  # a shared cache this user cannot write (tests run as root)
        patch.setattr(packed_module, "atomic_write_text", read_only)
        assert prepare("bigearthnet", again, tmp_path / "packed", split=None) == out
    assert PackedDataset(out).meta["source"]["root"] == str(moved.resolve())
    # a moved copy missing a packed sample is other data
    shutil.rmtree(again / sorted(p.name for p in again.iterdir())[1])
    with pytest.raises(CacheMismatchError, match="other sample ids"):
        prepare("bigearthnet", again, tmp_path / "packed", split=None)


def test_bigearthnet_alias_is_read_alike_by_prepare_eval_and_train(s2_tiny, tmp_path):
    from earthobs.domain import CONFIGS
    from earthobs.evaluate import dataset_name, eval_split
    from earthobs.ssl_data import training_dataset
    from fm.config import load_yaml

    make_bigearthnet_v2(tmp_path / "v2")
    assert resolve_dataset_name("bigearthnet", tmp_path / "v2") == "bigearthnet-v2"
    assert resolve_dataset_name("bigearthnet", s2_tiny) == "bigearthnet-v1"
    assert resolve_dataset_name("bigearthnet", tmp_path / "v2", version="v1") == "bigearthnet-v1"
    with pytest.raises(ValueError, match="--root is required"):
        resolve_dataset_name("bigearthnet", None)
    cache = tmp_path / "cache"
    for root, name, split in ((tmp_path / "v2", "bigearthnet-v2", "train"), (s2_tiny, "bigearthnet-v1", None)):
        out = prepare("bigearthnet", root, cache, split=split)
        assert out == cache / name / "s2" / (split or "all")
        stamp = (out / "meta.json").stat().st_mtime_ns
        cfg = dict(load_yaml(CONFIGS / "eval_bigearthnet.yaml"), root=str(root), packed_dir=str(cache), num_workers=0)
        assert dataset_name("bigearthnet", cfg) == name
        packed, _ = eval_split(dataset_name("bigearthnet", cfg), cfg, split)
        data = {"source": f"bigearthnet:{root}", "labels": None, "packed_dir": str(cache), "modality": "s2",
                "split": split, "nan_policy": "raise"}
        trained_on, _ = training_dataset({"data": data})
        assert packed.path == trained_on.path == out and (out / "meta.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == ["bigearthnet-v1", "bigearthnet-v2"]


def test_a_cache_under_the_old_bigearthnet_folder_is_pointed_out_and_reused_once_moved(s2_tiny, tmp_path, caplog):
    """Older fm-prepare stored `bigearthnet` caches under that name (and recorded that name), where nothing
    reads them: say where the cache is and how to move it before packing again; once moved as said, it
    is reused as it is."""
    import json
    import subprocess

    cache = tmp_path / "cache"
    made = prepare("bigearthnet-v1", s2_tiny, cache, split=None)
    meta = json.loads((made / "meta.json").read_text())
    meta["source"]["name"] = "bigearthnet"  # what those versions recorded
    (made / "meta.json").write_text(json.dumps(meta))
    old = cache / "bigearthnet" / "s2" / "all"
    old.parent.mkdir(parents=True)
    made.rename(old)
    stamp = (old / "meta.json").stat().st_mtime_ns

    def prepare_logged() -> tuple[Path, list[str]]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="earthobs.prepare"):
            out = prepare("bigearthnet", s2_tiny, cache, split=None)
        return out, [r.getMessage() for r in caplog.records]

    out, (message,) = prepare_logged()
    assert f"at {old} but is read from {out}" in message
    shutil.rmtree(out)  # the user stopped that packing, as the message says
    subprocess.run(message[message.index("(mkdir -p ") + 1 : -1], shell=True, check=True)  # and ran its command
    again, messages = prepare_logged()
    assert again == out and messages == []
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # the old cache, reused as it is


class Unreadable(torch.utils.data.Dataset):
    """Patches that all fail to read, as under a wrong root."""

    bands = ("B02",)

    def __init__(self, n=2):
        self.ids = [f"p{i}" for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        raise EOReadError(f"/data/{self.ids[k]}/B02.tif", "file not found")


def test_nothing_readable_is_a_one_line_user_error(tmp_path):
    with pytest.raises(NoReadableSampleError, match=r"none of the 2 samples of /data/x could be read; first "
                                                    r"errors: p0: EOReadError: /data/p0/B02.tif: file not found"):
        pack_split(Unreadable(), tmp_path / "c", source={"root": "/data/x"})
    with pytest.raises(NoReadableSampleError, match="holds no samples"):
        pack_split(Unreadable(0), tmp_path / "c")
    assert issubclass(NoReadableSampleError, ValueError) and not (tmp_path / "c").exists()


def test_malformed_label_entry_skips_only_that_patch(s2_tiny, tmp_path):
    root = Path(shutil.copytree(s2_tiny, tmp_path / "s2"))
    bad = "S2A_MSIL2A_20170617T113321_4_55"
    (root / bad / f"{bad}_labels_metadata.json").write_text(json.dumps({"labels": [["Pastures"]]}))
    packed = PackedDataset(pack_split(BigEarthNetV1(root), tmp_path / "p"))
    assert len(packed) == 2 and bad not in packed.ids
    (skipped,) = packed.meta["skipped"]
    assert skipped["id"] == bad and f"{bad}_labels_metadata.json" in skipped["error"] and "strings" in skipped["error"]


def test_fm_prepare_earthobs_records_its_run(s2_tiny, tmp_path):
    import os

    from mlflow import MlflowClient

    from fm.cli import invoke

    invoke("prepare", ["earthobs", "bigearthnet", "--root", str(s2_tiny), "--split", "all",
                       "--output-dir", str(tmp_path / "cache")])
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("fm-earthobs").experiment_id])
    assert run.data.tags["fm_command"] == "fm-prepare earthobs" and run.data.params["dataset"] == "bigearthnet"
    assert run.data.metrics == {"n_samples": 3.0, "n_skipped": 0.0}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "meta.json"]


def _truncate(path: Path, size: int = 100_000) -> None:
    path.write_bytes(path.read_bytes()[:size])


DAMAGES = {  # what was done to a cache -> (file, reason the error gives)
    "images truncated": (lambda out: _truncate(out / "images.npy"), "images.npy",
                         r"truncated: 100000 bytes, its header needs \d+"),
    "labels not .npy": (lambda out: (out / "labels.npy").write_bytes(b"bad"), "labels.npy",
                        "no .npy header in its 3 bytes"),
    "images of another shape": (lambda out: np.save(out / "images.npy", np.zeros((2, 12, 120, 120), np.float16)),
                                "images.npy", r"float16 \[2, 12, 120, 120\], meta.json records float16 \[3, 12, 120, 120\]"),
    "meta.json not JSON": (lambda out: (out / "meta.json").write_text('{"format": "fm-packed-v1", n: 3}'),
                           "meta.json", "not JSON: Expecting property name"),
    "ids.json short": (lambda out: (out / "ids.json").write_text(json.dumps(json.loads((out / "ids.json").read_text())[:2])),
                       "ids.json", "2 ids, meta.json records 3 samples"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_named_by_file_and_never_reused(s2_tiny, tmp_path, damage):
    """numpy and json failed with messages naming no file ("mmap length is greater than file size"), or not at
    all (fm-prepare reused a truncated cache as fine); each reader now refuses it in one line naming the file."""
    out = prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None)
    do, name, reason = DAMAGES[damage]
    do(out)
    expected = rf"^{re.escape(str(out / name))}: corrupt packed cache \({reason}.*\); fm-prepare \.\.\. --overwrite repacks it$"
    said = []
    for read in (lambda: PackedDataset(out), lambda: pack_split(BigEarthNetV1(s2_tiny), out),
                 lambda: prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None, say=said.append)):
        with pytest.raises(CorruptCacheError, match=expected):
            read()
    assert issubclass(CorruptCacheError, ValueError) and said == []
    prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None, overwrite=True)
    assert_same(PackedDataset(out), BigEarthNetV1(s2_tiny), exact=False)


def test_a_reused_cache_says_so_instead_of_repeating_old_skip_reasons(s2_tiny, tmp_path):
    """A patch fixed after packing is still skipped by the reused cache: fm-prepare printed the old reason as
    if just read; it now says the cache was reused, when it was packed and where the reasons are."""
    root = Path(shutil.copytree(s2_tiny, tmp_path / "s2"))
    bad = "S2A_MSIL2A_20170617T113321_4_55"
    band = root / bad / f"{bad}_B05.tif"
    band.rename(tmp_path / "B05.bak")
    said = []
    out = prepare("bigearthnet", root, tmp_path / "packed", split=None, say=said.append)
    assert said[0] == f"packed 2 samples (1 skipped) into {out}" and said[1].startswith(f"  skipped {bad}: ")
    assert "B05" in said[1] and said[2] == f'  (every skipped sample and why: "skipped" in {out / "meta.json"})'
    (tmp_path / "B05.bak").rename(band)  # the patch is fixed
    said.clear()
    assert prepare("bigearthnet", root, tmp_path / "packed", split=None, say=said.append) == out
    created = PackedDataset(out).meta["created"].replace("T", " ")
    assert said == [f"reusing the cache packed on {created} at {out}: 2 samples, 1 skipped when it was packed "
                    f"(reasons in {out / 'meta.json'}); --overwrite repacks"]
    said.clear()
    prepare("bigearthnet", root, tmp_path / "packed", split=None, overwrite=True, say=said.append)
    assert said == [f"packed 3 samples (0 skipped) into {out}"]


@pytest.mark.parametrize("damage", ["last patch's band", "middle patch's labels"])
def test_a_moved_root_with_other_data_in_any_checked_sample_is_refused(s2_tiny, tmp_path, damage):
    """The spot check covers the first, middle and last packed samples, images and labels alike."""
    out = prepare("bigearthnet", s2_tiny, tmp_path / "packed", split=None)
    order = PackedDataset(out).ids
    copy = Path(shutil.copytree(s2_tiny, tmp_path / "copy"))
    if damage == "last patch's band":
        first, last = order[0], order[-1]
        shutil.copy(copy / first / f"{first}_B03.tif", copy / last / f"{last}_B03.tif")
        named = last
    else:
        named = order[1]
        meta = json.loads((copy / named / f"{named}_labels_metadata.json").read_text())
        meta["labels"] = ["Sea and ocean"] if meta["labels"] != ["Sea and ocean"] else ["Pastures"]
        (copy / named / f"{named}_labels_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match=rf"where sample {named} holds other values"):
        prepare("bigearthnet", copy, tmp_path / "packed", split=None)


def test_a_moved_ssl4eo_root_with_its_labels_file_is_reused(tmp_path):
    """The labels file moved with the data (same contents): reused; another labels file: refused."""
    make_ssl4eo(tmp_path / "data", "s2c", size=12)
    write_labels(tmp_path / "data" / "dw.json", {LOCATIONS[1]: [4]})
    out = prepare("ssl4eo-s12", tmp_path / "data", tmp_path / "packed", split=None, sensor="s2c",
                  labels=tmp_path / "data" / "dw.json")
    (tmp_path / "data").rename(tmp_path / "moved")
    again = prepare("ssl4eo-s12", tmp_path / "moved", tmp_path / "packed", split=None, sensor="s2c",
                    labels=tmp_path / "moved" / "dw.json")
    assert again == out and PackedDataset(out).meta["source"]["labels"] == str(tmp_path / "moved" / "dw.json")
    write_labels(tmp_path / "other.json", {LOCATIONS[2]: [4]})
    with pytest.raises(CacheMismatchError, match=r"labels .*dw.json' \(asked '.*other.json'\)"):
        prepare("ssl4eo-s12", tmp_path / "moved", tmp_path / "packed", split=None, sensor="s2c",
                labels=tmp_path / "other.json")


def test_a_damaged_has_label_array_is_named_too(tmp_path):
    """SSL4EO-S12 caches with a labels file carry has_label.npy: it is checked like the other arrays."""
    make_ssl4eo(tmp_path / "ssl4eo", "s2c", size=12)
    labels = write_labels(tmp_path / "dw.json", {LOCATIONS[1]: [4]})
    out = prepare("ssl4eo-s12", tmp_path / "ssl4eo", tmp_path / "packed", split=None, sensor="s2c", labels=labels)
    np.save(out / "has_label.npy", np.zeros(5, bool))
    with pytest.raises(CorruptCacheError, match=r"has_label.npy: corrupt packed cache \(bool \[5\], meta.json records bool \[12\]"):
        PackedDataset(out)
