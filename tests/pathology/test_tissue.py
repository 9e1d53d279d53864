from __future__ import annotations

import numpy as np
import pytest

from pathology.demo_slides import CLASSES, downsample, synthetic_tissue
from pathology.tissue import TissueParams, otsu_threshold, saturation_u8, tissue_fractions, tissue_mask


def test_saturation_matches_hsv_definition():
    rgb = np.array([[[255, 255, 255], [200, 100, 50], [0, 0, 0], [10, 20, 40]]], np.uint8)
    expected = [0, (200 - 50) / 200, 0, (40 - 10) / 40]
    np.testing.assert_allclose(saturation_u8(rgb)[0] / 255, expected, atol=1 / 255)


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = (
        np.concatenate([rng.normal(40, 5, 5000), rng.normal(160, 10, 3000)]).clip(0, 255).astype(np.uint8)
    )
    low, high = values[:5000], values[5000:]
    assert low.max() <= otsu_threshold(values) < high.min()
    assert abs(otsu_threshold(values) - (int(low.max()) + int(high.min())) / 2) <= 1


@pytest.mark.parametrize("kind", CLASSES)
def test_mask_recovers_synthetic_tissue(kind):
    rgb, truth = synthetic_tissue(1024, 1280, 0.5, kind, seed=3, return_mask=True)
    small = downsample(rgb, 8)  # 4 um/px
    truth = downsample(np.repeat(truth[..., None].astype(np.uint8) * 255, 3, axis=2), 8)[..., 0] > 127
    mask = tissue_mask(small, 4.0)
    # stained tissue must be found; unstained gland lumens open to the glass may go either way
    stained = truth & (saturation_u8(small) > 0.15 * 255)
    assert (mask & stained).sum() / stained.sum() > 0.97
    assert (mask & truth).sum() / mask.sum() > 0.97


def test_empty_glass_gives_no_tissue_although_plain_otsu_would():
    rgb = downsample(synthetic_tissue(1024, 1024, 0.5, "background", seed=1), 8)
    plain_otsu = saturation_u8(rgb) > otsu_threshold(saturation_u8(rgb))
    assert plain_otsu.mean() > 0.05  # the control: Otsu alone "finds" tissue in noise
    assert not tissue_mask(rgb, 4.0).any()


def test_small_specks_are_removed():
    rgb = np.full((200, 200, 3), 245, np.uint8)
    rgb[20:26, 20:26] = (150, 40, 140)  # 24 um speck at 4 um/px
    rgb[80:180, 60:170] = (200, 90, 170)  # 400 x 440 um fragment
    mask = tissue_mask(rgb, 4.0)
    assert not mask[20:26, 20:26].any()
    assert mask[85:175, 65:165].all()
    # the control: without the clean-up steps the speck would count as tissue
    assert tissue_mask(rgb, 4.0, TissueParams(min_component_um2=0, open_um=0))[20:26, 20:26].all()


def test_tissue_fractions_are_exact_for_unaligned_tiles():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.5
    scale = 7  # level-0 pixels per mask pixel
    dense = np.kron(mask, np.ones((scale, scale), bool))
    coords = np.stack([rng.integers(0, 50 * scale - 30, 50), rng.integers(0, 40 * scale - 30, 50)], axis=1)
    got = tissue_fractions(mask, (50 * scale, 40 * scale), coords, 30)
    expected = [dense[y : y + 30, x : x + 30].mean() for x, y in coords]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # tiles hanging over the slide edge count the missing part as background
    edge = tissue_fractions(np.ones((10, 10), bool), (100, 100), np.array([[90, 0]]), 20)
    np.testing.assert_allclose(edge, [0.5])
