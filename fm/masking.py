"""iBOT block masking as in BEiT / DINOv2: rectangles of random area and aspect ratio until the target
number of patches is masked; half of the global crops masked with ratios spread over [0.1, 0.5]."""

from __future__ import annotations

import math

import numpy as np


def block_mask(
    grid: tuple[int, int],
    n_masked: int,
    rng: np.random.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> np.ndarray:
    """Boolean (h, w) mask with about `n_masked` patches covered by random rectangles."""
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < n_masked:
        budget = n_masked - count
        added = 0
        for _ in range(max_attempts):
            area = rng.uniform(min(min_block, budget), max(budget, min_block))
            ratio = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * ratio)))
            bw = int(round(math.sqrt(area / ratio)))
            if 0 < bh < h and 0 < bw < w:
                top = int(rng.integers(0, h - bh + 1))
                left = int(rng.integers(0, w - bw + 1))
                new = bh * bw - int(mask[top : top + bh, left : left + bw].sum())
                if 0 < new <= budget:
                    mask[top : top + bh, left : left + bw] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def sample_crop_masks(
    n_images: int,
    grid: tuple[int, int],
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
) -> np.ndarray:
    """(n_images, h, w) masks: int(n * p) images masked, with ratios from consecutive slices of
    linspace(min, max) so the batch covers the whole range; the rest unmasked; order shuffled."""
    n_patches = grid[0] * grid[1]
    n_masked_images = int(n_images * mask_probability)
    bounds = np.linspace(ratio_range[0], ratio_range[1], n_masked_images + 1)
    masks = np.zeros((n_images, *grid), dtype=bool)
    for i in range(n_masked_images):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = block_mask(grid, int(n_patches * ratio), rng)
    return masks[rng.permutation(n_images)]
