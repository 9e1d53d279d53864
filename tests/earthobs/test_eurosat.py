"""EuroSAT-MS on a fake tree: split files, class labels, and B8A moved from last to after B08."""

from __future__ import annotations

import numpy as np
import pytest
from data_eurosat import make_eurosat

from earthobs.bands import EUROSAT_FILE_BANDS, S2_L1C_BANDS
from earthobs.eurosat import EUROSAT_CLASSES, EuroSAT
from earthobs.readers import EOReadError


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    root = tmp_path_factory.mktemp("eurosat")
    return root, make_eurosat(root)


def test_splits_labels_and_band_order(eurosat):
    root, written = eurosat
    train = EuroSAT(root, "train")
    assert train.ids == [f"{c}_1" for c in EUROSAT_CLASSES]
    assert [int(train[k]["label"]) for k in range(len(train))] == list(range(10))
    sample = train[3]
    assert sample["image"].shape == (13, 8, 8) and train.bands == S2_L1C_BANDS
    file_order = written[sample["id"]]
    for band in ("B02", "B8A", "B09", "B10", "B12"):
        np.testing.assert_array_equal(sample["image"][S2_L1C_BANDS.index(band)].numpy(),
                                      file_order[EUROSAT_FILE_BANDS.index(band)])
    # B8A values (stored 13th: 12001..12999) land at position 8, right after B08
    assert 12000 < sample["image"][8].min() and sample["image"][8].max() < 13000
    assert len(EuroSAT(root, "test")) == 10 and EuroSAT(root, "val").ids == [f"{EUROSAT_CLASSES[0]}_2"]
    assert len(EuroSAT(root, split=None)) == 20
    rgb = EuroSAT(root, "train", bands=["B04", "B03", "B02"])
    np.testing.assert_array_equal(rgb[0]["image"].numpy(), written[rgb.ids[0]][[3, 2, 1]])


def test_missing_image_and_band_count_errors(eurosat, tmp_path):
    root, _ = eurosat
    (tmp_path / "eurosat-train.txt").write_text("Forest_99.jpg\n")
    with pytest.raises(FileNotFoundError, match="Forest_99.tif"):
        EuroSAT(root, "train", split_dir=tmp_path)
    bad_root = tmp_path / "twelve"
    make_eurosat(bad_root, count=12)
    ds = EuroSAT(bad_root, "train")
    with pytest.raises(EOReadError, match=r"AnnualCrop_1.tif: has 12 bands, expected 13"):
        ds[0]
