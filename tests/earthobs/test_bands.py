"""Band names, orders and reordering: B8A sits between B08 and B09, B10 is inserted after B09."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from earthobs.bands import (
    BIGEARTHNET_S2_BANDS,
    EUROSAT_FILE_BANDS,
    S1_BANDS,
    S2_BAND_INFO,
    S2_L1C_BANDS,
    S2_L2A_BANDS,
    canonical_band,
    select_bands,
    short_band_name,
    to_13_bands,
    to_band_order,
)


def test_band_orders_are_spectral_and_documented():
    assert S2_L1C_BANDS == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
    assert S2_L2A_BANDS == BIGEARTHNET_S2_BANDS == tuple(b for b in S2_L1C_BANDS if b != "B10")
    wavelengths = [S2_BAND_INFO[b].center_nm for b in S2_L1C_BANDS]
    assert wavelengths == sorted(wavelengths)
    assert [S2_BAND_INFO[b].gsd_m for b in S2_L1C_BANDS] == [60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20]
    assert S1_BANDS == ("VV", "VH")
    assert EUROSAT_FILE_BANDS[-1] == "B8A" and EUROSAT_FILE_BANDS[8] == "B09"


def test_canonical_names():
    assert canonical_band("b1") == "B01" and canonical_band("B08A") == "B8A" and canonical_band("vh") == "VH"
    assert short_band_name("B01") == "B1" and short_band_name("B8A") == "B8A" and short_band_name("B12") == "B12"
    with pytest.raises(ValueError, match="B13"):
        canonical_band("B13")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_to_13_bands_inserts_zero_b10_after_b09(as_tensor):
    x = np.stack([np.full((2, 3), i + 1.0, dtype=np.float32) for i in range(12)])[None]  # (1, 12, 2, 3)
    x = torch.from_numpy(x) if as_tensor else x
    y = to_13_bands(x, BIGEARTHNET_S2_BANDS)
    y = y.numpy() if as_tensor else y
    assert y.shape == (1, 13, 2, 3)
    assert [float(v) for v in y[0, :, 0, 0]] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 11, 12]


def test_to_band_order_refuses_missing_bands_other_than_b10():
    x = np.zeros((11, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="B12"):
        to_13_bands(x, BIGEARTHNET_S2_BANDS[:-1])
    with pytest.raises(ValueError, match="12 bands were named"):
        to_band_order(x, BIGEARTHNET_S2_BANDS, S2_L1C_BANDS)


def test_select_bands_reorders_by_name():
    x = torch.arange(13.0)[:, None, None].expand(13, 2, 2)
    rgb = select_bands(x, S2_L1C_BANDS, ["B04", "B03", "B02"])
    assert rgb[:, 0, 0].tolist() == [3.0, 2.0, 1.0]
    eurosat = np.arange(13.0)[:, None, None] * np.ones((1, 2, 2))
    reordered = select_bands(eurosat, EUROSAT_FILE_BANDS, S2_L1C_BANDS)
    assert reordered[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="VV"):
        select_bands(x, S2_L1C_BANDS, ["VV"])
