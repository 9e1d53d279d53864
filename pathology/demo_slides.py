"""A built-in demo cohort of small synthetic H&E-like slides, generated once into the cache.

The slides are real pyramidal TIFFs that OpenSlide opens (levels as separate reduced-resolution
pages, JPEG tiles, mpp in the resolution tags), so the demo and the tests exercise the same code
paths as real scans. Tissue is painted in stain space (hematoxylin / eosin optical densities, then
Beer-Lambert back to RGB), in three classes whose difference is visible in a 224 px tile at 0.5 um/px:
`stroma` (pink fibres, sparse spindle nuclei), `tumour` (sheets of dense purple nuclei) and
`glandular` (rings of nuclei around pale lumens).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import imagecodecs  # noqa: F401  (tifffile needs it for JPEG tiles)
import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy import ndimage

from fm.io import ItemLock, atomic_path, atomic_write_text

CLASSES = ("stroma", "tumour", "glandular")
DEMO_VERSION = 2
# Ruifrok & Johnston stain optical-density vectors (rows: hematoxylin, eosin), normalised
_STAIN_OD = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], np.float32)
_STAIN_OD /= np.linalg.norm(_STAIN_OD, axis=1, keepdims=True)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $FM_CACHE_DIR, else ~/.cache/fm-suite."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FM_CACHE_DIR", Path.home() / ".cache" / "fm-suite"))


# ---------------------------------------------------------------------------------------------
# synthetic tissue


def _smooth_noise(height: int, width: int, cell_px: float, rng: np.random.Generator) -> np.ndarray:
    """Float32 noise in about [-1, 1] varying on a scale of `cell_px` pixels (bicubic-upsampled)."""
    gh, gw = int(height / cell_px) + 3, int(width / cell_px) + 3
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    big = Image.fromarray(coarse, mode="F").resize((round(gw * cell_px), round(gh * cell_px)), Image.BICUBIC)
    return np.asarray(big)[:height, :width] / 1.5


def _blobs(shape: tuple[int, int], density: float, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Soft discs of about `radius_px` at Poisson-random centres (`density` per pixel)."""
    points = np.zeros(shape, np.float32)
    count = rng.poisson(density * shape[0] * shape[1])
    ys, xs = rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)
    points[ys, xs] = rng.uniform(0.7, 1.3, count)
    sigma = radius_px / 1.2
    soft = ndimage.gaussian_filter(points, sigma) * (2 * np.pi * sigma * sigma)
    return np.clip((soft - 0.25) * 3.0, 0.0, 1.0)


def tissue_shape(
    height: int, width: int, mpp: float, rng: np.random.Generator, coverage: float = 0.55
) -> np.ndarray:
    """Float mask in [0, 1] of an irregular tissue fragment (soft edge of a few microns)."""
    yy, xx = (g.astype(np.float32) for g in np.ogrid[0:height, 0:width])
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    radial = np.sqrt(((yy - cy) / (0.5 * height)) ** 2 + ((xx - cx) / (0.5 * width)) ** 2)
    field = 1.0 - radial + 0.35 * _smooth_noise(height, width, 120 / mpp, rng)
    threshold = np.quantile(field, 1.0 - coverage)
    return np.clip((field - threshold) * 12.0, 0.0, 1.0)


def synthetic_tissue(
    height: int,
    width: int,
    mpp: float,
    kind: str,
    seed: int,
    coverage: float = 0.55,
    return_mask: bool = False,
):
    """(height, width, 3) uint8 H&E-like image of tissue class `kind` on white, scanned at `mpp`.

    With `return_mask`, also the boolean ground-truth tissue mask (for testing tissue detection).
    """
    if kind not in CLASSES and kind != "background":
        raise ValueError(f"unknown tissue kind {kind!r}; expected one of {CLASSES + ('background',)}")
    rng = np.random.default_rng(seed)
    shape = (height, width)
    um = 1.0 / mpp  # pixels per micron
    if kind == "background":
        rgb = np.clip(246 + 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32), 0, 255)
        return (
            (rgb.astype(np.uint8), np.zeros((height, width), bool)) if return_mask else rgb.astype(np.uint8)
        )
    yy, xx = (g.astype(np.float32) / um for g in np.ogrid[0:height, 0:width])  # microns
    texture = _smooth_noise(height, width, 30 * um, rng)
    if kind == "stroma":
        angle = rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / 7.0 + 3.0 * _smooth_noise(
            height, width, 40 * um, rng
        )
        fibres = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * phase)
        eosin = 0.45 + 0.45 * fibres * fibres * fibres + 0.05 * texture
        hema = 0.08 + 0.9 * _blobs(shape, 0.0006 / um**2, 2.5 * um, rng)
    elif kind == "tumour":
        eosin = 0.35 + 0.1 * texture
        nuclei = _blobs(shape, 0.008 / um**2, 3.5 * um, rng)
        hema = 0.25 + 0.9 * nuclei + 0.1 * texture
    else:  # glandular
        # distance to the nearest gland centre, computed on a 4x coarser grid (it is smooth)
        small = (height // 4 + 1, width // 4 + 1)
        centres = np.ones(small, bool)
        step = 45 * um / 4  # glands on a jittered 45 um lattice: every tile shows several
        gy, gx = np.meshgrid(np.arange(0, small[0], step), np.arange(0, small[1], step), indexing="ij")
        gy = np.clip(gy + rng.uniform(-0.3, 0.3, gy.shape) * step, 0, small[0] - 1).astype(int)
        gx = np.clip(gx + rng.uniform(-0.3, 0.3, gx.shape) * step, 0, small[1] - 1).astype(int)
        centres[gy, gx] = False
        coarse = (ndimage.distance_transform_edt(centres) * (4 / um)).astype(np.float32)
        dist = np.asarray(
            Image.fromarray(coarse, mode="F").resize((small[1] * 4, small[0] * 4), Image.BILINEAR)
        )
        dist = dist[:height, :width] + 4.0 * _smooth_noise(height, width, 15 * um, rng)
        ring = np.exp(-(((dist - 16.0) / 3.5) ** 2))
        lumen = np.clip((12.5 - dist) / 3.0, 0.0, 1.0)
        eosin = (0.5 + 0.1 * texture) * (1.0 - 0.9 * lumen)
        hema = 0.05 + 1.0 * ring * (0.6 + 0.4 * _blobs(shape, 0.01 / um**2, 3.0 * um, rng))
    shape_mask = tissue_shape(height, width, mpp, rng, coverage)
    hema, eosin = (hema * shape_mask).astype(np.float32), (eosin * shape_mask).astype(np.float32)
    rgb = np.empty((height, width, 3), np.float32)
    for c in range(3):
        od = hema * _STAIN_OD[0, c] + eosin * _STAIN_OD[1, c]
        rgb[..., c] = np.exp(-od, out=od)
    rgb *= 246.0
    rgb += 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return (rgb, shape_mask > 0.5) if return_mask else rgb


def downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsampling by an integer factor (how a coarser scan of the same tissue looks)."""
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    view = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).astype(np.float32)
    return np.round(view.mean(axis=(1, 3))).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# pyramidal TIFF writer


def write_pyramid_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    quality: int = 90,
    level_factor: int = 4,
) -> Path:
    """Write a tiled JPEG pyramidal TIFF that OpenSlide opens as a generic-tiff slide.

    Levels are separate pages marked as reduced-resolution images (OpenSlide ignores SubIFDs and
    unmarked pages); mpp goes into XResolution/YResolution in pixels per centimetre, which OpenSlide
    reports as `openslide.mpp-x`. With `mpp=None` no resolution is written (a slide lacking mpp).
    """
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as writer:
        level, image = 0, rgb
        while True:
            extra = {}
            if mpp is not None:
                level_mpp = mpp * level_factor**level
                extra = dict(resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
            writer.write(
                image,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                subfiletype=1 if level else 0,
                metadata=None,
                **extra,
            )
            if min(image.shape[:2]) // level_factor < tile:
                break
            image = np.asarray(Image.fromarray(image).reduce(level_factor))
            level += 1
    return path


# ---------------------------------------------------------------------------------------------
# the demo cohort


def demo_specs(n_slides: int = 12, n_patients: int = 6) -> list[dict]:
    """Slide ids, patients and classes of the demo cohort (each patient's slides share a class)."""
    specs = []
    for i in range(n_slides):
        patient = i % n_patients
        label = CLASSES[patient % len(CLASSES)]
        specs.append(
            dict(slide_id=f"DEMO-{i:02d}", patient_id=f"DEMO-P{patient}", label=label, seed=1000 + i)
        )
    return specs


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "demo" / "pathology" / f"v{DEMO_VERSION}"


def build_demo_cohort(
    cache_dir: str | os.PathLike | None = None, height: int = 1280, width: int = 1792, mpp: float = 0.5
) -> Path:
    """Generate the demo slides once (atomic, locked); returns the path of their cohort CSV."""
    root = demo_dir(cache_dir)
    csv_path = root / "cohort.csv"
    if csv_path.exists():
        return csv_path
    deadline = time.monotonic() + 300
    while True:
        with ItemLock(csv_path) as got:
            if got:
                if not csv_path.exists():
                    rows = []
                    for spec in demo_specs():
                        slide_path = root / f"{spec['slide_id']}.tif"
                        if not slide_path.exists():
                            rgb = synthetic_tissue(height, width, mpp, spec["label"], spec["seed"])
                            write_pyramid_tiff(slide_path, rgb, mpp)
                        rows.append(
                            dict(
                                slide_id=spec["slide_id"],
                                patient_id=spec["patient_id"],
                                slide_path=slide_path.name,
                                label=spec["label"],
                            )
                        )
                    atomic_write_text(csv_path, pd.DataFrame(rows).to_csv(index=False))
                return csv_path
        if csv_path.exists():
            return csv_path
        if time.monotonic() > deadline:
            raise TimeoutError(f"{csv_path}: another process holds the demo generation lock for > 300 s")
        time.sleep(0.2)


def demo_cohort(cache_dir: str | os.PathLike | None = None):
    """The built-in demo cohort as SlideRecords (label column `label`), generating it on first use."""
    from pathology.cohorts import read_csv_cohort

    return read_csv_cohort(build_demo_cohort(cache_dir), cohort="demo")
