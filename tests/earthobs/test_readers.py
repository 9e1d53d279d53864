"""Readers on real BigEarthNet v1 files: band order, 10 m grid, resampling, and bad-input errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import Affine

from earthobs.bands import BIGEARTHNET_S2_BANDS, EUROSAT_FILE_BANDS, S2_L1C_BANDS
from earthobs.readers import EOReadError, read_multiband, read_s1_patch, read_s2_patch

S2_PATCH = "S2A_MSIL2A_20170617T113321_4_55"
S1_PATCH = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39"


@pytest.fixture()
def s2_dir(shared_fixtures) -> Path:
    return shared_fixtures / "earthobs/bigearthnet-v1/s2-tiny" / S2_PATCH


@pytest.fixture()
def s1_dir(shared_fixtures) -> Path:
    return shared_fixtures / "earthobs/bigearthnet-v1/s1-tiny" / S1_PATCH


def raw(folder: Path, band: str) -> np.ndarray:
    with rasterio.open(folder / f"{folder.name}_{band}.tif") as src:
        return src.read(1)


def test_s2_bands_in_documented_order_on_the_10m_grid(s2_dir):
    x = read_s2_patch(s2_dir)
    assert x.shape == (12, 120, 120) and x.dtype == np.float32
    for band in ("B02", "B03", "B04", "B08"):  # 10 m bands: the file values, unchanged
        np.testing.assert_array_equal(x[BIGEARTHNET_S2_BANDS.index(band)], raw(s2_dir, band))
    subset = read_s2_patch(s2_dir, bands=["B08", "B02"])
    np.testing.assert_array_equal(subset, x[[7, 1]])


def test_nearest_resampling_replicates_native_pixels(s2_dir):
    x = read_s2_patch(s2_dir, resampling="nearest")
    i, j = np.mgrid[0:120, 0:120]
    for band, k in (("B05", 2), ("B8A", 2), ("B12", 2), ("B01", 6), ("B09", 6)):
        native = raw(s2_dir, band)
        assert native.shape == (120 // k, 120 // k)
        np.testing.assert_array_equal(x[BIGEARTHNET_S2_BANDS.index(band)], native[i // k, j // k])


def test_bilinear_upsampling_on_pixel_centres(s2_dir):
    x = read_s2_patch(s2_dir)
    b05 = raw(s2_dir, "B05").astype(np.float64)
    up = x[BIGEARTHNET_S2_BANDS.index("B05")]
    # 2x upsampling, pixel-centre aligned: output row 2r+1 sits 1/4 of the way from native row r to r+1,
    # output row 2r+2 sits 3/4 of the way.
    r = np.arange(59)
    w = {1: (0.75, 0.25), 2: (0.25, 0.75)}
    for dy in (1, 2):
        for dx in (1, 2):
            expected = (w[dy][0] * w[dx][0] * b05[r[:, None], r[None, :]]
                        + w[dy][0] * w[dx][1] * b05[r[:, None], r[None, :] + 1]
                        + w[dy][1] * w[dx][0] * b05[r[:, None] + 1, r[None, :]]
                        + w[dy][1] * w[dx][1] * b05[r[:, None] + 1, r[None, :] + 1])
            np.testing.assert_allclose(up[2 * r[:, None] + dy, 2 * r[None, :] + dx], expected, rtol=1e-6)
    # GDAL's bilinear (what torchgeo asks rasterio for) agrees up to its rounding to integers
    for band in ("B05", "B01"):
        with rasterio.open(s2_dir / f"{S2_PATCH}_{band}.tif") as src:
            gdal = src.read(1, out_shape=(120, 120), resampling=Resampling.bilinear, out_dtype="float32")
        assert np.abs(gdal - x[BIGEARTHNET_S2_BANDS.index(band)]).max() <= 0.51


def test_engines_agree(s2_dir, s1_dir):
    np.testing.assert_array_equal(read_s2_patch(s2_dir), read_s2_patch(s2_dir, engine="tifffile"))
    np.testing.assert_array_equal(read_s1_patch(s1_dir), read_s1_patch(s1_dir, engine="tifffile"))


def test_target_size_resamples_the_whole_patch(s2_dir):
    x = read_s2_patch(s2_dir, target_size=224)
    assert x.shape == (12, 224, 224)
    assert abs(x[1].mean() - raw(s2_dir, "B02").mean()) < 0.01 * raw(s2_dir, "B02").mean()


def test_s1_is_vv_then_vh(s1_dir):
    x = read_s1_patch(s1_dir)
    assert x.shape == (2, 120, 120)
    np.testing.assert_array_equal(x[0], raw(s1_dir, "VV"))
    np.testing.assert_array_equal(x[1], raw(s1_dir, "VH"))
    assert not np.array_equal(x[0], x[1])


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.fixture()
def s2_copy(s2_dir, tmp_path) -> Path:
    return Path(shutil.copytree(s2_dir, tmp_path / S2_PATCH))


@pytest.fixture()
def s1_copy(s1_dir, tmp_path) -> Path:
    return Path(shutil.copytree(s1_dir, tmp_path / S1_PATCH))


def rewrite(path: Path, array: np.ndarray, nodata=None) -> None:
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(width=array.shape[-1], height=array.shape[-2], dtype=array.dtype.name,
                   count=1 if array.ndim == 2 else array.shape[0], nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array if array.ndim == 3 else array[None])


def test_missing_band_file_is_named(s2_copy):
    (s2_copy / f"{S2_PATCH}_B05.tif").unlink()
    with pytest.raises(EOReadError, match=f"{S2_PATCH}_B05.tif.*missing band file for B05"):
        read_s2_patch(s2_copy)


def test_band_of_wrong_size_is_named(s2_copy):
    rewrite(s2_copy / f"{S2_PATCH}_B05.tif", np.ones((61, 60), dtype=np.uint16))
    with pytest.raises(EOReadError, match=r"_B05.tif: band B05 is 61x60 px, expected 60x60"):
        read_s2_patch(s2_copy)


def test_bad_10m_band_is_the_one_named(s2_copy):
    rewrite(s2_copy / f"{S2_PATCH}_B02.tif", np.ones((120, 121), dtype=np.uint16))
    with pytest.raises(EOReadError, match=r"_B02.tif: band B02 is 120x121 px, expected 120x120"):
        read_s2_patch(s2_copy)


def test_band_of_wrong_dtype_is_named(s2_copy):
    rewrite(s2_copy / f"{S2_PATCH}_B03.tif", np.ones((120, 120), dtype=np.uint8))
    with pytest.raises(EOReadError, match=r"_B03.tif: has dtype uint8.*pre-scaled"):
        read_s2_patch(s2_copy)
    assert read_s2_patch(s2_copy, allowed_dtypes=None).shape == (12, 120, 120)


def test_corrupt_file_is_named(s2_copy):
    (s2_copy / f"{S2_PATCH}_B11.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(EOReadError, match="_B11.tif: cannot read"):
        read_s2_patch(s2_copy)
    with pytest.raises(EOReadError, match="_B11.tif: cannot read"):
        read_s2_patch(s2_copy, engine="tifffile")


def test_nan_pixels_raise_with_count_or_are_zero_filled(s1_copy):
    vv = raw(s1_copy, "VV")
    vv[3, :5] = np.nan
    rewrite(s1_copy / f"{S1_PATCH}_VV.tif", vv)
    with pytest.raises(EOReadError, match=r"_VV.tif: 5 of 14400 pixels are NaN"):
        read_s1_patch(s1_copy)
    counts: dict[str, int] = {}
    x = read_s1_patch(s1_copy, nan_policy="zero", filled_counts=counts)
    assert np.all(x[0, 3, :5] == 0) and np.isfinite(x).all()
    assert counts == {str(s1_copy / f"{S1_PATCH}_VV.tif"): 5}


def test_declared_nodata_counts_as_invalid(s2_copy):
    b02 = raw(s2_copy, "B02")
    b02[0, :7] = 0
    rewrite(s2_copy / f"{S2_PATCH}_B02.tif", b02, nodata=0)
    with pytest.raises(EOReadError, match=r"_B02.tif: 7 of 14400 pixels are NaN, inf or nodata \(nodata=0"):
        read_s2_patch(s2_copy)


def test_multiband_band_count_mismatch_is_named(tmp_path):
    path = tmp_path / "Forest_1.tif"
    arr = np.arange(12 * 4 * 4, dtype=np.uint16).reshape(12, 4, 4)
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=12, dtype="uint16", crs="EPSG:32631",
                       transform=Affine(10, 0.0, 0, 0.0, -10, 0)) as dst:
        dst.write(arr)
    with pytest.raises(EOReadError, match=r"Forest_1.tif: has 12 bands, expected 13"):
        read_multiband(path, EUROSAT_FILE_BANDS)
    out = read_multiband(path, EUROSAT_FILE_BANDS[:12], bands=["B03", "B01"])
    np.testing.assert_array_equal(out, arr[[2, 0]])
    with pytest.raises(ValueError, match="B8A"):
        read_multiband(path, EUROSAT_FILE_BANDS[:12], bands=S2_L1C_BANDS)
