"""Whole-slide images through OpenSlide, with a trustworthy pixel size and physical-scale reads.

Everything downstream (tissue masks, tile grids, tiles) is defined in microns, not pyramid levels, so
a 20x and a 40x scan of the same tissue give the same tiles. That only works when every slide has a
microns-per-pixel (mpp) value we can trust; a slide without one is refused with a message that says
how to supply it, instead of being tiled at a silently wrong scale (a common complaint about
existing tools).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

log = logging.getLogger(__name__)

# Plausible whole-slide pixel sizes. Generic TIFFs often carry a default 72 dpi (352 um/px), which
# OpenSlide reports as mpp too; such values are not a scan resolution and must not be trusted.
MPP_RANGE = (0.05, 50.0)
# A pyramid level this close to the target counts as "at or finer than" it (rounded downsamples).
LEVEL_TOLERANCE = 1.01
# Largest region (level pixels per side) read at once when building thumbnails.
THUMBNAIL_CHUNK_PX = 4096
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when PIL reduces


class SlideError(RuntimeError):
    """A slide could not be opened or read; the message names the file and the reason."""


class MissingMppError(SlideError):
    """The slide has no usable microns-per-pixel and no override was given."""


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mpp_from_properties(props) -> tuple[float | None, str]:
    """(mpp, source) from OpenSlide properties: `openslide.mpp-x`, else TIFF resolution tags."""
    mpp = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
    if _plausible(mpp):
        return mpp, "openslide"
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    xres = _float(props.get("tiff.XResolution"))
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if microns_per_unit and xres and xres > 0:
        mpp = microns_per_unit / xres
        if _plausible(mpp):
            return mpp, "tiff-resolution"
    return None, "missing"


class Slide:
    """An open slide with a known mpp; levels are described in microns as well as pixels."""

    def __init__(self, path: Path, handle: openslide.OpenSlide, mpp: float, mpp_source: str):
        self.path = path
        self.handle = handle
        self.mpp = float(mpp)
        self.mpp_source = mpp_source

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.handle.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.handle.level_downsamples

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose pixels are at least as fine as `target_mpp` (level 0 if none)."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * LEVEL_TOLERANCE:
                best = level
        return best

    def _read_rgba(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        try:
            return self.handle.read_region((int(x0), int(y0)), level, (int(width), int(height)))
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.path}: reading failed (corrupt or truncated file?): {err}") from err

    @staticmethod
    def _on_white(region: Image.Image) -> Image.Image:
        # openslide-python returns straight (non-premultiplied) RGBA: blend onto white (in C)
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=region.getchannel("A"))
        return white

    def read_rgb(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        """RGB region at `level` whose top-left is (x0, y0) in level-0 pixels; transparency -> white."""
        region = self._read_rgba(x0, y0, level, width, height)
        if region.getchannel("A").getextrema()[0] == 255:
            return region.convert("RGB")
        return self._on_white(region)

    def read_array(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """`read_rgb` as a (height, width, 3) uint8 array, possibly a read-only non-contiguous view of
        the RGBA buffer: the fast path for tile loaders that copy into their own layout anyway."""
        region = self._read_rgba(x0, y0, level, width, height)
        rgba = np.asarray(region)
        if rgba[..., 3].min() == 255:
            return rgba[..., :3]
        return np.asarray(self._on_white(region))

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path.name!r}, {w}x{h} px, mpp={self.mpp:.4g} [{self.mpp_source}], levels={self.level_count})"


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _why_unsupported(path: Path) -> str:
    """A human reason for OpenSlide's bare 'unsupported format', from the file's first bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"cannot be read ({err})"
    if size == 0:
        return "empty file (interrupted download?)"
    if head in _TIFF_MAGIC:
        return (
            f"a TIFF file ({size} bytes) that OpenSlide cannot open: truncated or corrupt "
            "(interrupted download?), or not a tiled pyramidal slide"
        )
    return "not a whole-slide image format OpenSlide can read"


def open_slide(path: str | os.PathLike, mpp_override: float | None = None) -> Slide:
    """Open any format OpenSlide reads; mpp from the slide, else TIFF tags, else `mpp_override`.

    Raises SlideError (missing, unreadable, not a slide, corrupt) or MissingMppError, both naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide file not found")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideError(f"{path}: is a directory, not a slide file")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        raise SlideError(
            f"{path}: {_why_unsupported(path)} (OpenSlide: {err or 'unsupported format'})"
        ) from err
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: OpenSlide could not open it (corrupt or truncated file?): {err}") from err
    except OSError as err:
        raise SlideError(f"{path}: cannot be read: {err}") from err
    mpp, source = mpp_from_properties(handle.properties)
    if mpp is None and mpp_override is not None:
        if not _plausible(float(mpp_override)):
            handle.close()
            raise SlideError(
                f"{path}: mpp override {mpp_override} is outside the plausible range {MPP_RANGE} um/px"
            )
        mpp, source = float(mpp_override), "override"
    elif mpp is not None and mpp_override is not None and abs(mpp - mpp_override) > 0.05 * mpp:
        log.warning(
            "%s: slide metadata says %.4g um/px; the override %.4g is ignored", path, mpp, mpp_override
        )
    if mpp is None:
        handle.close()
        raise MissingMppError(
            f"{path}: no microns-per-pixel in the slide metadata (no openslide.mpp-x and no usable TIFF "
            "resolution tags); give it with --mpp for the cohort or an `mpp` column in the cohort CSV"
        )
    return Slide(path, handle, mpp, source)


def tile_size_level0(tile_px: int, target_mpp: float, slide_mpp: float) -> int:
    """Side of a `tile_px` tile at `target_mpp`, in level-0 pixels of a slide scanned at `slide_mpp`."""
    return max(1, round(tile_px * target_mpp / slide_mpp))


def read_tile_view(slide: Slide, x0: int, y0: int, size_px: int, target_mpp: float) -> np.ndarray:
    """`read_tile` without the final copy: possibly a read-only, non-contiguous view (for loaders)."""
    level = slide.best_level_for_mpp(target_mpp)
    side = max(1, round(size_px * target_mpp / slide.level_mpp(level)))
    if side == size_px:
        return slide.read_array(x0, y0, level, side, side)
    region = slide.read_rgb(x0, y0, level, side, side)
    factor = side // size_px
    if side == factor * size_px:
        # an exact integer reduction (a 40x scan read at 20x): box averaging, as pyramid levels are
        # made, and ~4x faster than the general resize (~20 % of a 40x tile's read time)
        return np.asarray(region.reduce(factor))
    return np.asarray(region.resize((size_px, size_px), RESAMPLE))


def read_tile(slide: Slide, x0: int, y0: int, size_px: int, target_mpp: float) -> np.ndarray:
    """(size_px, size_px, 3) uint8 tile at `target_mpp` whose top-left is (x0, y0) in level-0 pixels.

    Reads the coarsest level at or finer than the target and resizes (antialiased) only when the
    level's pixel size differs from the target, so a 20x slide read at 0.5 um/px is never resampled.
    """
    return np.array(read_tile_view(slide, x0, y0, size_px, target_mpp))  # writable, contiguous


def thumbnail(slide: Slide, target_mpp: float) -> np.ndarray:
    """(H, W, 3) uint8 image of the whole slide at about `target_mpp`, read in bounded chunks.

    Uses the coarsest pyramid level finer than needed and reads it piecewise, so a 100,000 px slide
    never loads a whole high-resolution level. Pixel size of the result: level-0 size / result size.
    """
    width0, height0 = slide.dimensions
    out_w = max(1, round(width0 * slide.mpp / target_mpp))
    out_h = max(1, round(height0 * slide.mpp / target_mpp))
    level = slide.best_level_for_mpp(target_mpp)
    downsample = slide.level_downsamples[level]
    level_w, level_h = slide.level_dimensions[level]
    # level pixels per output pixel, per axis (exact, so chunks line up with the whole-image scale)
    fx, fy = width0 / downsample / out_w, height0 / downsample / out_h
    block = max(1, int(THUMBNAIL_CHUNK_PX / max(fx, fy)))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for oy in range(0, out_h, block):
        bh = min(block, out_h - oy)
        for ox in range(0, out_w, block):
            bw = min(block, out_w - ox)
            lx0, ly0 = round(ox * fx), round(oy * fy)
            lx1, ly1 = min(level_w, round((ox + bw) * fx)), min(level_h, round((oy + bh) * fy))
            region = slide.read_rgb(
                round(lx0 * downsample), round(ly0 * downsample), level, max(1, lx1 - lx0), max(1, ly1 - ly0)
            )
            if region.size != (bw, bh):
                region = region.resize((bw, bh), RESAMPLE)
            out[oy : oy + bh, ox : ox + bw] = np.asarray(region)
    return out
