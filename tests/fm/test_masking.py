"""iBOT block masks: counts near the target, half the crops masked, ratios spread, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from fm.masking import block_mask, sample_crop_masks

GRID = (14, 14)
N_PATCHES = GRID[0] * GRID[1]


@pytest.mark.parametrize("target", [0, 10, 20, 39, 60, 98])
def test_block_mask_count_close_to_target_never_above(target):
    rng = np.random.default_rng(target)
    for _ in range(20):
        mask = block_mask(GRID, target, rng)
        assert mask.shape == GRID and mask.dtype == bool
        count = int(mask.sum())
        assert count <= target  # DINOv2 never overshoots the budget
        assert count >= target - 4  # at most a block smaller than min_block (4) is left unfilled


def test_block_mask_is_made_of_blocks_not_scattered_pixels():
    """Rectangles: almost every masked patch has a masked 4-neighbour (random pixels would not)."""
    rng = np.random.default_rng(0)
    mask = block_mask(GRID, 60, rng)
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (mask & neighbours).sum() >= 0.95 * mask.sum()


@pytest.mark.parametrize("n_images", [2, 5, 8, 16])
def test_half_of_the_images_are_masked(n_images):
    rng = np.random.default_rng(1)
    for _ in range(5):
        masks = sample_crop_masks(n_images, GRID, rng, mask_probability=0.5, ratio_range=(0.1, 0.5))
        assert masks.shape == (n_images, *GRID) and masks.dtype == bool
        n_masked = int((masks.reshape(n_images, -1).sum(1) > 0).sum())
        assert n_masked == int(n_images * 0.5)


def test_ratios_spread_over_range():
    """Masked image i gets a ratio from slice i of linspace(0.1, 0.5, n+1): sorted ratios fall in their slices."""
    rng = np.random.default_rng(2)
    n_images, n_masked = 16, 8
    bounds = np.linspace(0.1, 0.5, n_masked + 1)
    tol = 5 / N_PATCHES  # int() truncation plus an unfilled remainder below min_block
    for _ in range(10):
        masks = sample_crop_masks(n_images, GRID, rng)
        ratios = np.sort(masks.reshape(n_images, -1).mean(1))[n_images - n_masked :]
        assert np.all(ratios <= bounds[1:] + 1e-9)
        assert np.all(ratios >= bounds[:-1] - tol)


def test_masked_images_are_shuffled():
    rng = np.random.default_rng(3)
    positions = set()
    for _ in range(20):
        masks = sample_crop_masks(8, GRID, rng)
        positions |= set(np.flatnonzero(masks.reshape(8, -1).any(1)).tolist())
    assert positions == set(range(8))  # not always the first half


def test_seeded_determinism():
    a = sample_crop_masks(8, GRID, np.random.default_rng(42))
    b = sample_crop_masks(8, GRID, np.random.default_rng(42))
    c = sample_crop_masks(8, GRID, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
