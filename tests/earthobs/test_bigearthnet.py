"""BigEarthNet v1 on real patches (labels written out by hand from their JSON files), v2 on a fake
reBEN, the 43 -> 19 nomenclature, split files, and the deterministic saved 10 % subset."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_bigearthnet_v2 import PATCHES, make_bigearthnet_v2

from earthobs.bands import BIGEARTHNET_S2_BANDS, S1_BANDS
from earthobs.bigearthnet import (
    BEN19_CLASSES,
    BEN43_CLASSES,
    BEN43_TO_19,
    BigEarthNetV1,
    BigEarthNetV2,
    training_subset,
    v1_labels_to_19,
)
from earthobs.readers import EOReadError

# Expected 19-class labels, derived by hand from each fixture's *_labels_metadata.json:
EXPECTED_S2 = {
    # ["Non-irrigated arable land", "Pastures"]
    "S2A_MSIL2A_20170617T113321_36_85": ["Arable land", "Pastures"],
    # ["Pastures"]
    "S2A_MSIL2A_20170617T113321_4_55": ["Pastures"],
    # ["Complex cultivation patterns", "Land principally occupied by agriculture, ...", "Broad-leaved
    #  forest", "Transitional woodland/shrub"]
    "S2A_MSIL2A_20171221T112501_56_35": [
        "Complex cultivation patterns",
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
        "Broad-leaved forest", "Transitional woodland, shrub"],
}
EXPECTED_S1 = {  # keyed by corresponding_s2_patch
    # ["Non-irrigated arable land", "Broad-leaved forest", "Water courses"]
    "S2A_MSIL2A_20170613T101031_61_39": ["Arable land", "Broad-leaved forest", "Inland waters"],
    # ["Discontinuous urban fabric", "Non-irrigated arable land", "Land principally occupied ...",
    #  "Broad-leaved forest", "Inland marshes", "Water courses"]
    "S2A_MSIL2A_20170613T101031_61_40": [
        "Urban fabric", "Arable land",
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
        "Broad-leaved forest", "Inland wetlands", "Inland waters"],
    # ["Discontinuous urban fabric", "Non-irrigated arable land", "Broad-leaved forest", "Coniferous forest"]
    "S2A_MSIL2A_20170613T101031_61_41": ["Urban fabric", "Arable land", "Broad-leaved forest", "Coniferous forest"],
    **EXPECTED_S2,
}
S1_OF_S2 = {
    "S2A_MSIL2A_20170617T113321_36_85": "S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85",
    "S2A_MSIL2A_20170617T113321_4_55": "S1A_IW_GRDH_1SDV_20170617T064724_29UPU_4_55",
    "S2A_MSIL2A_20171221T112501_56_35": "S1A_IW_GRDH_1SDV_20171221T064238_29SND_56_35",
}


def names(label: torch.Tensor) -> list[str]:
    assert label.shape == (19,) and set(label.unique().tolist()) <= {0.0, 1.0}
    return [BEN19_CLASSES[i] for i in label.nonzero().flatten().tolist()]


@pytest.fixture()
def ben(shared_fixtures) -> Path:
    return shared_fixtures / "earthobs/bigearthnet-v1"


def test_nomenclature_agrees_with_torchgeo():
    from torchgeo.datasets import BigEarthNet as TorchgeoBEN

    assert list(BEN19_CLASSES) == TorchgeoBEN.class_sets[19]
    assert list(BEN43_CLASSES) == TorchgeoBEN.class_sets[43]
    theirs = {TorchgeoBEN.class_sets[43][k]: v for k, v in TorchgeoBEN.label_converter.items()}
    assert {k: v for k, v in BEN43_TO_19.items() if v is not None} == theirs
    assert sum(v is None for v in BEN43_TO_19.values()) == 11


def test_v1_s2_real_patches(ben):
    ds = BigEarthNetV1(ben / "s2-tiny")
    assert ds.ids == sorted(EXPECTED_S2) and ds.bands == BIGEARTHNET_S2_BANDS
    for sample in ds:
        assert sample["image"].shape == (12, 120, 120) and sample["image"].dtype == torch.float32
        assert names(sample["label"]) == EXPECTED_S2[sample["id"]]


def test_v1_s1_real_patches_map_to_their_s2_twins(ben):
    ds = BigEarthNetV1(ben / "s1-tiny", sensor="s1")
    assert sorted(ds.ids) == sorted(EXPECTED_S1) and ds.bands == ("VV", "VH")
    for sample in ds:
        assert sample["image"].shape == (2, 120, 120)
        assert names(sample["label"]) == EXPECTED_S1[sample["id"]]


def test_v1_s1_channels_are_the_vv_and_vh_files_in_that_order(ben):
    """DESIGN: Sentinel-1 is [VV, VH] (torchgeo's BigEarthNet returns [VH, VV]); channel k must be the raw
    values of that band's own GeoTIFF, for S1 alone and after the 12 S2 bands of s1s2."""
    import rasterio

    ds = BigEarthNetV1(ben / "s1-tiny", sensor="s1")
    both = BigEarthNetV1(ben, s2_root=ben / "s2-tiny", s1_root=ben / "s1-tiny", sensor="s1s2")
    for k in range(len(ds)):
        s1 = ds.records[k][1]
        raw = {}
        for band in ("VV", "VH"):
            with rasterio.open(ben / "s1-tiny" / s1 / f"{s1}_{band}.tif") as f:
                raw[band] = f.read(1)
        assert not np.array_equal(raw["VV"], raw["VH"])
        np.testing.assert_array_equal(ds[k]["image"][0].numpy(), raw["VV"])
        np.testing.assert_array_equal(ds[k]["image"][1].numpy(), raw["VH"])
    for k, (_, s1) in enumerate(both.records):
        with rasterio.open(ben / "s1-tiny" / s1 / f"{s1}_VV.tif") as f:
            np.testing.assert_array_equal(both[k]["image"][12].numpy(), f.read(1))


def test_v1_s1s2_from_a_split_file(ben, tmp_path):
    (tmp_path / "train.csv").write_text("S2A_MSIL2A_20170617T113321_4_55\nS2A_MSIL2A_20171221T112501_56_35\n")
    (tmp_path / "bigearthnet-test.csv").write_text(
        "S2A_MSIL2A_20170617T113321_36_85,S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85\n")
    kw = dict(s2_root=ben / "s2-tiny", s1_root=ben / "s1-tiny", split_dir=tmp_path, sensor="s1s2")
    train = BigEarthNetV1(tmp_path, split="train", **kw)  # S1 twins found through the S1 label files
    assert [r[1] for r in train.records] == [S1_OF_S2[i] for i in train.ids]
    s2_only = BigEarthNetV1(ben / "s2-tiny", ids=train.ids)
    s1_only = BigEarthNetV1(ben / "s1-tiny", sensor="s1", ids=train.ids)
    for k in range(2):
        both = train[k]["image"]
        assert both.shape == (14, 120, 120)
        torch.testing.assert_close(both[:12], s2_only[k]["image"])
        torch.testing.assert_close(both[12:], s1_only[k]["image"])
    test = BigEarthNetV1(tmp_path, split="test", **kw)
    assert test.ids == ["S2A_MSIL2A_20170617T113321_36_85"]
    with pytest.raises(FileNotFoundError, match="val"):
        BigEarthNetV1(tmp_path, split="val", **kw)


def test_v1_bad_label_files_are_named(ben, tmp_path):
    root = Path(shutil.copytree(ben / "s2-tiny", tmp_path / "s2"))
    patch = "S2A_MSIL2A_20170617T113321_4_55"
    label_file = root / patch / f"{patch}_labels_metadata.json"
    label_file.write_text('{"labels": ["Pastures", "Lunar regolith"]}')
    ds = BigEarthNetV1(root, ids=[patch])
    with pytest.raises(EOReadError, match=f"{patch}_labels_metadata.json.*Lunar regolith"):
        ds[0]
    label_file.write_text("{not json")
    with pytest.raises(EOReadError, match="not valid JSON"):
        ds[0]
    label_file.write_text('{"labels": [["Pastures"]]}')  # a list where a class name belongs
    with pytest.raises(EOReadError, match=rf"{patch}_labels_metadata.json: 'labels' must list class names"):
        ds[0]
    with pytest.raises(EOReadError, match=r"<labels>: label entries must be class names \(strings\)"):
        v1_labels_to_19([["Pastures"]])


def test_v1_an_unreadable_s1_label_file_fails_only_its_patch(ben, tmp_path, caplog):
    """Without a split file, S1 patches are paired with S2 through the S1 label files; a malformed one
    used to fail the whole data set. Now its patch alone fails when read (and is skipped, as any
    unreadable patch), naming the file; the others read as before."""
    s1 = Path(shutil.copytree(ben / "s1-tiny", tmp_path / "s1"))
    broken_s2, broken_s1 = next(iter(S1_OF_S2.items()))
    (s1 / broken_s1 / f"{broken_s1}_labels_metadata.json").write_text("{not json")

    s1_only = BigEarthNetV1(s1, sensor="s1")
    assert len(s1_only) == len(EXPECTED_S1) and broken_s1 in s1_only.ids  # S2 partner unknown: its own name
    for k, patch_id in enumerate(s1_only.ids):
        if patch_id == broken_s1:
            with pytest.raises(EOReadError, match=f"{broken_s1}_labels_metadata.json: not valid JSON"):
                s1_only[k]
        else:
            assert names(s1_only[k]["label"]) == EXPECTED_S1[patch_id]

    with caplog.at_level("WARNING", logger="earthobs.bigearthnet"):
        both = BigEarthNetV1(tmp_path, s2_root=ben / "s2-tiny", s1_root=s1, sensor="s1s2")
    assert any("1 of 3 S2 patches have no S1 patch" in r.getMessage() for r in caplog.records)  # said at once
    assert sorted(both.ids) == sorted(EXPECTED_S2)
    for k, patch_id in enumerate(both.ids):
        if patch_id == broken_s2:
            with pytest.raises(EOReadError, match=f"names {patch_id} .*1 S1 label files could not be used, "
                               f"e.g. .*{broken_s1}_labels_metadata.json: not valid JSON"):
                both[k]
        else:
            assert both[k]["image"].shape == (14, 120, 120)
    for d in s1.iterdir():  # no S1 partner at all: the S1 root is wrong, said at once
        (d / f"{d.name}_labels_metadata.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="no Sentinel-1 patch in .* names"):
        BigEarthNetV1(tmp_path, s2_root=ben / "s2-tiny", s1_root=s1, sensor="s1s2")


def test_v1_s1_patch_with_an_unreadable_label_is_replaced_in_training(ben, tmp_path):
    """S1 only: the patch's image reads but its label file does not; SoftCon training from the raw patches
    replaces it (with the replacement's own label) like any unreadable patch, also when it is the first."""
    from earthobs.normalize import stats_spec
    from earthobs.ssl_data import EOSource, modality_bands

    s1 = Path(shutil.copytree(ben / "s1-tiny", tmp_path / "s1"))
    dataset = BigEarthNetV1(s1, sensor="s1")
    first = dataset.records[0][1]
    (s1 / first / f"{first}_labels_metadata.json").write_text("{not json")
    dataset = BigEarthNetV1(s1, sensor="s1")
    source = EOSource(dataset, stats_spec("softcon", "bigearthnet_s1", S1_BANDS), modality_bands("s1"))
    image, (label, _) = source.get(0), source.label(0)
    j = source.replaced[0]
    assert j != 0 and source.skipped.keys == {0}
    assert torch.equal(label, dataset[j]["label"]) and image.shape == (2, 120, 120)


@pytest.mark.parametrize("sensor", ["s2", "s1"])
def test_v1_root_without_patch_folders_says_what_it_expected(ben, tmp_path, sensor):
    pattern = "S1" if sensor == "s1" else "S2"
    with pytest.raises(FileNotFoundError, match=rf"no {pattern}\* patch folders under {ben} \(expected "
                                                r"BigEarthNet-v1.0/.*\); it holds s1-tiny/, s2-tiny/"):
        BigEarthNetV1(ben, sensor=sensor)
    with pytest.raises(FileNotFoundError, match=rf"no {pattern}\* patch folders under {tmp_path} .*; it is empty"):
        BigEarthNetV1(tmp_path, sensor=sensor)
    (tmp_path / "train.csv").write_text("s2_name\n")
    with pytest.raises(ValueError, match="train.csv lists no patches"):
        BigEarthNetV1(tmp_path, split="train", sensor=sensor)


def test_v1_labels_to_19_drops_classes_without_counterpart():
    assert v1_labels_to_19(["Airports", "Sea and ocean"]).nonzero()[0].tolist() == [18]
    assert v1_labels_to_19(["Bare rock"]).sum() == 0


def test_v2_fake_reben(tmp_path):
    written = make_bigearthnet_v2(tmp_path)
    train = BigEarthNetV2(tmp_path, split="train", sensor="s1s2")
    expected_train = [p[0] for p in PATCHES if p[2] == "train" and not p[4]]
    assert train.ids == expected_train  # the snowy patch is dropped
    assert len(BigEarthNetV2(tmp_path, split="train", drop_snow_cloud=False)) == len(expected_train) + 1
    sample = train[0]
    bands = written[sample["id"]]
    assert sample["image"].shape == (14, 12, 12)
    np.testing.assert_array_equal(sample["image"][1].numpy(), bands["B02"])
    np.testing.assert_array_equal(sample["image"][12].numpy(), bands["VV"])  # VV first, then VH
    np.testing.assert_array_equal(sample["image"][13].numpy(), bands["VH"])
    assert names(sample["label"]) == ["Arable land", "Broad-leaved forest"]
    val = BigEarthNetV2(tmp_path, split="val", sensor="s1")
    assert val.ids == [PATCHES[2][0]] and val[0]["image"].shape == (2, 12, 12)
    assert names(val[0]["label"]) == ["Coniferous forest", "Transitional woodland, shrub", "Inland waters"]
    test = BigEarthNetV2(tmp_path, split="test", resampling="nearest")
    np.testing.assert_array_equal(test[0]["image"][0].numpy(),
                                  np.repeat(np.repeat(written[PATCHES[3][0]]["B01"], 6, 0), 6, 1))


def test_v2_missing_patch_folder_is_named(tmp_path):
    make_bigearthnet_v2(tmp_path)
    patch = PATCHES[1][0]
    shutil.rmtree(next((tmp_path / "BigEarthNet-S2").glob(f"*/{patch}")))
    ds = BigEarthNetV2(tmp_path, split="train")
    with pytest.raises(EOReadError, match=f"{patch}: patch folder not found"):
        ds[1]


def test_training_subset_is_deterministic_and_saved(tmp_path):
    ids = [f"S2A_MSIL2A_2017_{i}_{j}" for i in range(20) for j in range(50)]
    subset = training_subset(ids, fraction=0.1, seed=0)
    assert len(subset) == 100 and set(subset) <= set(ids) and subset == sorted(subset)
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    assert training_subset(shuffled, fraction=0.1, seed=0) == subset  # order of the input is irrelevant
    assert training_subset(ids, fraction=0.1, seed=1) != subset
    path = tmp_path / "lists" / "train-10pct.txt"
    assert training_subset(ids, 0.1, 0, path=path) == subset
    text = path.read_text()
    assert "# fraction=0.1" in text and "# seed=0" in text
    assert [line for line in text.splitlines() if not line.startswith("#")] == subset
    path.write_text(text.replace(f"{subset[0]}\n", ""))  # a saved list is read back, never recomputed
    assert training_subset(ids, 0.1, 0, path=path) == subset[1:]
    with pytest.raises(ValueError, match="seed=0, asked 5"):
        training_subset(ids, 0.1, 5, path=path)
    with pytest.raises(ValueError, match="not in this split"):
        training_subset(ids[:500], 0.1, 0, path=path)
