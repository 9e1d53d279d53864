"""Tissue detection on a low-resolution thumbnail, and per-tile tissue fractions.

H&E tissue is coloured; glass, background and most scanner artefacts are grey or white. So the mask
is a threshold on HSV saturation (Otsu, as CLAM does), with a floor on the threshold so that an
empty slide (only noise around grey) never yields tissue, then morphological clean-up. Tiles are
kept by the fraction of their area covered by the mask (Phikon-v2 keeps tiles with >= 60 % tissue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class TissueParams:
    """Knobs of the tissue detector, in physical units so they mean the same at any mask scale."""

    mask_mpp: float = 4.0  # preferred mask pixel size (um)
    max_mask_side: int = 4096  # coarser mask for huge slides (8 um at 32 mm), to bound memory and time
    min_saturation: float = 0.07  # threshold floor on [0, 1] saturation: empty slides stay empty
    close_um: float = 12.0  # closing radius: joins nuclei and fibres into solid tissue
    open_um: float = 8.0  # opening radius: removes dust and speckle
    min_component_um2: float = 20_000.0  # drop blobs smaller than ~140 x 140 um
    fill_holes: bool = True

    def mask_mpp_for(self, width_um: float, height_um: float) -> float:
        return max(self.mask_mpp, max(width_um, height_um) / self.max_mask_side)


def saturation_u8(rgb: np.ndarray, rows_per_chunk: int = 1024) -> np.ndarray:
    """HSV saturation (max - min) / max of a uint8 RGB image, as uint8 0..255, in bounded-memory chunks."""
    sat = np.empty(rgb.shape[:2], np.uint8)
    for top in range(0, rgb.shape[0], rows_per_chunk):
        part = rgb[top : top + rows_per_chunk]
        r, g, b = part[..., 0], part[..., 1], part[..., 2]
        high = np.maximum(np.maximum(r, g), b).astype(np.float32)
        spread = high - np.minimum(np.minimum(r, g), b)
        np.divide(spread * 255.0, high, out=spread, where=high > 0)
        sat[top : top + rows_per_chunk] = spread  # exact: spread <= high, so values stay in 0..255
    return sat


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu threshold of uint8 values: the t maximising the between-class variance of (<= t, > t)."""
    flat = values.ravel()
    hist = np.zeros(256, np.float64)
    for start in range(0, flat.size, 1 << 22):  # bincount converts to intp: bound that copy
        hist += np.bincount(flat[start : start + (1 << 22)], minlength=256)
    total = hist.sum()
    if total == 0:
        return 255
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)
    weight_high = total - weight_low
    cum_mean = np.cumsum(hist * levels)
    mean_low = np.divide(cum_mean, weight_low, out=np.zeros(256), where=weight_low > 0)
    mean_high = np.divide(cum_mean[-1] - cum_mean, weight_high, out=np.zeros(256), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # well-separated modes give a plateau of equally good thresholds: take its middle
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return int(round(best.mean()))


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing with a square of side 2r+1 (separable min/max filters: fast on 10^7-pixel masks).
    Edges are replicated, so tissue touching the border is not eroded."""
    size = 2 * radius + 1
    return ndimage.minimum_filter(ndimage.maximum_filter(mask, size=size), size=size)


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    return ndimage.maximum_filter(ndimage.minimum_filter(mask, size=size), size=size)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not connected to the image border are holes in tissue: fill them."""
    background, count = ndimage.label(~mask)
    outside = np.zeros(count + 1, bool)
    outside[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    outside[0] = False  # label 0 is tissue
    return ~outside[background]


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are `mpp` microns wide."""
    sat = saturation_u8(rgb)
    threshold = max(otsu_threshold(sat), int(np.ceil(params.min_saturation * 255)))
    mask = sat > threshold
    del sat
    if not mask.any():
        return mask
    close_r, open_r = round(params.close_um / mpp), round(params.open_um / mpp)
    if close_r > 0:
        mask = _close(mask, close_r)
    if open_r > 0:
        mask = _open(mask, open_r)
    if params.fill_holes and mask.any():
        mask = _fill_holes(mask)
    min_px = params.min_component_um2 / (mpp * mpp)
    if min_px > 1 and mask.any():
        mask = _drop_small(mask, min_px)
    return mask


def tissue_fractions(
    mask: np.ndarray, level0_size: tuple[int, int], coords: np.ndarray, tile_level0: int
) -> np.ndarray:
    """Fraction of each tile (level-0 top-left `coords`, side `tile_level0`) covered by `mask`.

    The mask's integral image is bilinear inside each mask pixel, so interpolating it at the tile
    corners gives the exact covered area even when tiles do not align with mask pixels.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    mask_h, mask_w = mask.shape
    sx, sy = level0_size[0] / mask_w, level0_size[1] / mask_h  # level-0 px per mask px
    integral = np.zeros((mask_h + 1, mask_w + 1), np.int32)  # mask sides are bounded: no overflow
    np.cumsum(mask, axis=0, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.clip(x, 0, mask_w), np.clip(y, 0, mask_h)
        ix, iy = np.minimum(x.astype(np.int64), mask_w - 1), np.minimum(y.astype(np.int64), mask_h - 1)
        fx, fy = x - ix, y - iy
        return (
            integral[iy, ix] * (1 - fx) * (1 - fy)
            + integral[iy, ix + 1] * fx * (1 - fy)
            + integral[iy + 1, ix] * (1 - fx) * fy
            + integral[iy + 1, ix + 1] * fx * fy
        )

    x0, y0 = coords[:, 0] / sx, coords[:, 1] / sy
    x1, y1 = (coords[:, 0] + tile_level0) / sx, (coords[:, 1] + tile_level0) / sy
    covered = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    full_area = (x1 - x0) * (y1 - y0)  # parts of a tile outside the mask count as background
    return np.clip(covered / full_area, 0.0, 1.0).astype(np.float32)
