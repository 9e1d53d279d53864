"""SSL4EO-S12 on a fake tree: one sample per (location, season), bands from `B1.tif` files resampled to
the 10 m grid, and Dynamic World labels looked up by season folder, season index or location."""

from __future__ import annotations

import numpy as np
import pytest
from data_ssl4eo import LOCATIONS, SEASONS, make_ssl4eo, write_labels

from earthobs.bands import S2_L1C_BANDS
from earthobs.readers import EOReadError
from earthobs.ssl4eo import DYNAMIC_WORLD_CLASSES, SSL4EOS12


@pytest.fixture(scope="module")
def s2c(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4eo")
    return root, make_ssl4eo(root, "s2c", size=24)


def test_every_location_season_is_one_sample(s2c):
    root, written = s2c
    ds = SSL4EOS12(root, "s2c")
    assert len(ds) == len(LOCATIONS) * 4 and ds.ids == sorted(written)
    sample = ds[5]
    bands = written[ds.ids[5]]
    assert sample["image"].shape == (13, 24, 24) and ds.bands == S2_L1C_BANDS
    np.testing.assert_array_equal(sample["image"][S2_L1C_BANDS.index("B04")].numpy(), bands["B04"])
    nearest = SSL4EOS12(root, "s2c", resampling="nearest")[5]["image"]
    np.testing.assert_array_equal(nearest[S2_L1C_BANDS.index("B10")].numpy(),
                                  np.repeat(np.repeat(bands["B10"], 6, 0), 6, 1))  # 60 m: 4x4 -> 24x24
    assert not sample["has_label"] and sample["label"].sum() == 0


def test_labels_by_season_folder_index_or_location(s2c, tmp_path):
    root, _ = s2c
    loc0, loc1, loc3 = LOCATIONS
    labels = write_labels(tmp_path / "dw.json", {
        f"{loc0}/{SEASONS['s2c'][2]}": [0, 6],          # one season by folder name
        f"{loc1}/1": ["trees", "crops"],                 # one season by index
        loc1: [8],                                        # the other seasons of loc1
        f"{loc3}/{SEASONS['s2c'][0]}": [],                # labelled, but no class present
    }, classes=list(DYNAMIC_WORLD_CLASSES))
    ds = SSL4EOS12(root, "s2c", labels=labels)
    by_id = {i: ds[k] for k, i in enumerate(ds.ids)}

    def classes(sample):
        return [DYNAMIC_WORLD_CLASSES[i] for i in sample["label"].nonzero().flatten().tolist()]

    assert classes(by_id[f"{loc0}/{SEASONS['s2c'][2]}"]) == ["water", "built"]
    assert not by_id[f"{loc0}/{SEASONS['s2c'][0]}"]["has_label"]
    assert classes(by_id[f"{loc1}/{SEASONS['s2c'][1]}"]) == ["trees", "crops"]
    assert classes(by_id[f"{loc1}/{SEASONS['s2c'][3]}"]) == ["snow_and_ice"]
    assert by_id[f"{loc3}/{SEASONS['s2c'][0]}"]["has_label"] and classes(by_id[f"{loc3}/{SEASONS['s2c'][0]}"]) == []
    labelled = SSL4EOS12(root, "s2c", labels=labels, require_labels=True)
    assert len(labelled) == 1 + 4 + 1


def test_bad_label_files_are_named(s2c, tmp_path):
    root, _ = s2c
    with pytest.raises(EOReadError, match=r"dw.json: label of '0000000' has invalid class 9"):
        SSL4EOS12(root, "s2c", labels=write_labels(tmp_path / "dw.json", {"0000000": [1, 9]}))
    with pytest.raises(EOReadError, match=r"bad.json: 'classes' must be"):
        SSL4EOS12(root, "s2c", labels=write_labels(tmp_path / "bad.json", {}, classes=["water", "trees"]))


def test_s1_modality_and_missing_band(tmp_path):
    written = make_ssl4eo(tmp_path, "s1", size=12)
    ds = SSL4EOS12(tmp_path, "s1", locations=[LOCATIONS[1]])
    assert len(ds) == 4 and ds.bands == ("VV", "VH")
    np.testing.assert_array_equal(ds[0]["image"][0].numpy(), written[ds.ids[0]]["VV"])
    np.testing.assert_array_equal(ds[0]["image"][1].numpy(), written[ds.ids[0]]["VH"])
    (tmp_path / "s1" / ds.ids[2] / "VH.tif").unlink()
    with pytest.raises(EOReadError, match="VH"):
        ds[2]
