from __future__ import annotations

import numpy as np
import openslide
import pytest

from pathology import slides as slides_module
from pathology.slides import (
    MissingMppError,
    SlideError,
    mpp_from_properties,
    open_slide,
    read_tile,
    thumbnail,
)


def test_real_aperio_slide_reads_at_level0_without_resampling(cmu_slide):
    with open_slide(cmu_slide) as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "openslide"
        tile = read_tile(slide, 800, 1200, 224, 0.5)
        raw = np.asarray(openslide.OpenSlide(str(cmu_slide)).read_region((800, 1200), 0, (224, 224)))[..., :3]
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, raw)


@pytest.mark.parametrize(
    "props, expected",
    [
        ({"openslide.mpp-x": "0.2527"}, (0.2527, "openslide")),
        ({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}, (0.5, "tiff-resolution")),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, (0.25, "tiff-resolution")),
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, (None, "missing")),  # a screen default
        (
            {"openslide.mpp-x": "352.77", "tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"},
            (None, "missing"),
        ),
        ({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "none"}, (None, "missing")),
        ({}, (None, "missing")),
    ],
)
def test_mpp_from_properties(props, expected):
    mpp, source = mpp_from_properties(props)
    assert source == expected[1]
    assert mpp == (pytest.approx(expected[0]) if expected[0] else None)


def test_generated_slides_report_mpp_and_levels(test_slides):
    with open_slide(test_slides["x40"]) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_count >= 2
        assert slide.level_mpp(1) == pytest.approx(1.0)
        assert slide.best_level_for_mpp(0.5) == 0
        assert slide.best_level_for_mpp(1.0) == 1
        assert slide.best_level_for_mpp(3.0) == 1


def test_missing_mpp_names_slide_and_fix_then_override_works(test_slides):
    path = test_slides["nompp"]
    with pytest.raises(MissingMppError) as info:
        open_slide(path)
    assert str(path) in str(info.value) and "--mpp" in str(info.value) and "mpp` column" in str(info.value)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override"
    with pytest.raises(SlideError, match="plausible"):
        open_slide(path, mpp_override=1000)


@pytest.mark.parametrize(
    "name, reason", [("truncated", "truncated"), ("nonslide", "not a whole-slide image")]
)
def test_unreadable_files_raise_slide_error_naming_file(test_slides, name, reason):
    with pytest.raises(SlideError) as info:
        open_slide(test_slides[name])
    assert str(test_slides[name]) in str(info.value) and reason in str(info.value)


def test_damaged_tile_data_raises_slide_error_on_read(test_slides):
    with open_slide(test_slides["corrupt"]) as slide, pytest.raises(SlideError) as info:
        read_tile(slide, 224, 224, 224, 0.5)
    assert str(test_slides["corrupt"]) in str(info.value)
    with pytest.raises(SlideError, match="not found"):
        open_slide(test_slides["x20"].with_name("missing.svs"))


def test_40x_and_20x_scans_give_the_same_tiles(test_slides):
    with open_slide(test_slides["x40"]) as s40, open_slide(test_slides["x20"]) as s20:
        diffs, controls = [], []
        for x, y in [(224, 224), (448, 448), (672, 224)]:
            t20 = read_tile(s20, x, y, 224, 0.5).astype(float)
            t40 = read_tile(s40, 2 * x, 2 * y, 224, 0.5).astype(float)
            diffs.append(np.abs(t20 - t40).mean())
            controls.append(np.abs(t20 - read_tile(s20, x + 112, y, 224, 0.5)).mean())  # half a tile off
    assert max(diffs) < 3.0, diffs
    assert min(controls) > 5 * max(diffs), (diffs, controls)


def test_transparent_regions_are_white(test_slides):
    with open_slide(test_slides["sparse"]) as slide:
        tile = read_tile(slide, 0, 0, 224, 0.5)
        tissue = read_tile(slide, 600, 0, 224, 0.5)
        resized = read_tile(slide, 0, 0, 112, 0.5 * 2)  # through the PIL resize path
        small = thumbnail(slide, 4.0)
    assert (tile == 255).all() and (resized == 255).all()
    assert np.abs(tissue.astype(int) - (180, 60, 150)).max() < 10
    assert (small[:, :60] == 255).all() and np.abs(small[:, 68:].astype(int) - (180, 60, 150)).max() < 10


def test_thumbnail_scale_and_chunking(test_slides, monkeypatch):
    with open_slide(test_slides["x40"]) as s40, open_slide(test_slides["x20"]) as s20:
        whole = thumbnail(s40, 2.0)
        assert whole.shape == (256, 320, 3)  # 512 x 640 um at 2 um/px
        np.testing.assert_allclose(whole.mean(), thumbnail(s20, 2.0).mean(), atol=1.0)
        monkeypatch.setattr(slides_module, "THUMBNAIL_CHUNK_PX", 100)  # many small reads instead of one
        chunked = thumbnail(s40, 2.0)
    assert chunked.shape == whole.shape
    assert np.abs(chunked.astype(float) - whole).mean() < 1.0
