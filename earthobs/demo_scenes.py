"""Generated multispectral demo scenes in the BigEarthNet v1 layout, for demos, tests and CI.

Real EO data cannot be downloaded at test time, yet the demo must exercise the real readers. We
write seeded synthetic Sentinel-2 (12 bands, BigEarthNet L2A order, uint16 DN at native 10/20/60 m
sizes) and Sentinel-1 ([VV, VH] float32 dB) patches of 120x120 px, with the official folder layout,
`_labels_metadata.json` files (43-class names, `corresponding_s2_patch` for S1), and torchgeo-named
split files `bigearthnet-{train,val,test}.csv` (`s2,s1` per line, 60/20/20).

Six land-cover classes differ in spectrum AND texture, so that an encoder must use both:
urban (bright, flat spectrum, block grid), arable (bright SWIR, oriented stripes), pasture (strong
red-edge/NIR, smooth), coniferous forest (dark visible, NIR plateau, fine blobs), water (dark, flat),
sand (bright everywhere, fine speckle). A scene holds one class or two classes split by a random
line (each covering >= 20 % of it), so labels are genuinely multi-label. SAR backscatter per class
follows the same split, with multiplicative speckle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine
from scipy.ndimage import gaussian_filter

from earthobs.bands import BAND_INFO, BIGEARTHNET_S2_BANDS
from fm.io import ItemLock

VERSION = 1
# (43-class label name, S2 reflectance x 1e4 in BIGEARTHNET_S2_BANDS order, S1 (VV, VH) dB)
DEMO_CLASSES: tuple[tuple[str, tuple[int, ...], tuple[float, float]], ...] = (
    ("Discontinuous urban fabric", (1100, 1200, 1300, 1400, 1500, 1600, 1700, 1800, 1850, 1700, 2000, 1800), (-3.0, -10.0)),
    ("Non-irrigated arable land", (600, 700, 900, 1100, 1300, 1600, 1800, 2000, 2100, 2000, 2600, 1900), (-11.0, -18.0)),
    ("Pastures", (400, 400, 700, 500, 1100, 2600, 3100, 3300, 3400, 3300, 2200, 1200), (-12.0, -19.0)),
    ("Coniferous forest", (300, 250, 400, 250, 600, 1800, 2200, 2400, 2500, 2500, 1200, 600), (-7.0, -12.5)),
    ("Water bodies", (600, 500, 450, 300, 250, 200, 180, 150, 140, 100, 80, 60), (-22.0, -28.0)),
    ("Beaches, dunes, sands", (1500, 1700, 2100, 2500, 2800, 3000, 3100, 3200, 3300, 3000, 3800, 3300), (-16.0, -24.0)),
)  # fmt: skip
CRS = "EPSG:32632"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $FM_CACHE_DIR, else ~/.cache/fm-suite."""
    return Path(cache_dir or os.environ.get("FM_CACHE_DIR") or Path.home() / ".cache" / "fm-suite")


def _texture(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Zero-mean texture field (relative modulation) for class `kind`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:  # urban: building blocks separated by streets
        period, width = rng.integers(8, 13), rng.integers(4, 7)
        ox, oy = rng.integers(0, period, 2)
        t = (((xx + ox) % period) < width) & (((yy + oy) % period) < width)
        t = np.where(t, 0.35, -0.35)
    elif kind == 1:  # arable: parallel crop rows at a random angle
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 10)
        t = 0.25 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == 2:  # pasture: smooth, low-frequency
        t = gaussian_filter(rng.standard_normal((size, size)), 8) * 8 * 0.15
    elif kind == 3:  # forest: fine crown-scale blobs
        t = gaussian_filter(rng.standard_normal((size, size)), 1.2) * 2.5 * 0.3
    elif kind == 4:  # water: nearly flat
        t = rng.standard_normal((size, size)) * 0.02
    else:  # sand: fine speckle plus faint ripples
        t = rng.standard_normal((size, size)) * 0.1 + 0.05 * np.sin(xx / 3.0)
    return (t - t.mean()).astype(np.float32)


def _layout(rng: np.random.Generator, size: int) -> tuple[list[int], np.ndarray]:
    """Classes of a scene and a (size, size) map of indices into that list."""
    if rng.random() < 0.4:
        return [int(rng.integers(len(DEMO_CLASSES)))], np.zeros((size, size), dtype=np.int64)
    a, b = (int(c) for c in rng.choice(len(DEMO_CLASSES), 2, replace=False))
    yy, xx = np.mgrid[0:size, 0:size]
    while True:
        cx, cy = rng.uniform(size / 3, 2 * size / 3, 2)
        phi = rng.uniform(0, 2 * np.pi)
        side = ((xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)) > 0
        if 0.2 <= side.mean() <= 0.8:
            return [a, b], side.astype(np.int64)


def _block_mean(x: np.ndarray, k: int) -> np.ndarray:
    h, w = x.shape
    return x.reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def make_scene(rng: np.random.Generator, size: int = 120) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One scene: S2 (12, size, size) reflectance x 1e4 on the 10 m grid, S1 (2, size, size) dB, classes."""
    classes, region = _layout(rng, size)
    s2 = np.zeros((len(BIGEARTHNET_S2_BANDS), size, size), dtype=np.float32)
    s1 = np.zeros((2, size, size), dtype=np.float32)
    gain = rng.uniform(0.9, 1.1)  # illumination / atmosphere nuisance, shared by all classes
    for k, c in enumerate(classes):
        m = region == k
        _, spectrum, backscatter = DEMO_CLASSES[c]
        texture = _texture(c, rng, size)
        s2[:, m] = (np.asarray(spectrum, np.float32)[:, None] * gain * (1 + texture[m])[None])
        s1[:, m] = np.asarray(backscatter, np.float32)[:, None] + 6.0 * texture[m][None]
    s2 *= 1 + 0.01 * rng.standard_normal(s2.shape).astype(np.float32)
    speckle = rng.gamma(4.0, 0.25, s1.shape).astype(np.float32)  # 4-look intensity speckle, mean 1
    s1 += 10 * np.log10(speckle)
    return np.clip(s2, 1, 20000), s1, classes


def _write_tif(path: Path, array: np.ndarray, res: float, origin: tuple[float, float]) -> None:
    profile = dict(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1, dtype=array.dtype.name,
                   crs=CRS, transform=Affine(res, 0.0, origin[0], 0.0, -res, origin[1]))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def _write_dataset(root: Path, n: int, seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    s2_root, s1_root = root / "BigEarthNet-v1.0", root / "BigEarthNet-S1-v1.0"
    pairs = []
    for i in range(n):
        row, col = divmod(i, 100)
        s2_name = f"S2A_MSIL2A_20180417T102021_{row}_{col}"
        s1_name = f"S1A_IW_GRDH_1SDV_20180417T171603_32TNT_{row}_{col}"
        s2, s1, classes = make_scene(rng, size)
        origin = (500000.0 + col * size * 10, 5000000.0 - row * size * 10)
        labels = [DEMO_CLASSES[c][0] for c in classes]
        (s2_root / s2_name).mkdir(parents=True)
        (s1_root / s1_name).mkdir(parents=True)
        for b, plane in zip(BIGEARTHNET_S2_BANDS, s2):
            k = int(BAND_INFO[b].gsd_m // 10)
            native = _block_mean(plane, k) if k > 1 else plane
            _write_tif(s2_root / s2_name / f"{s2_name}_{b}.tif", np.rint(native).astype(np.uint16), 10.0 * k, origin)
        for b, plane in zip(("VV", "VH"), s1):
            _write_tif(s1_root / s1_name / f"{s1_name}_{b}.tif", plane.astype(np.float32), 10.0, origin)
        (s2_root / s2_name / f"{s2_name}_labels_metadata.json").write_text(json.dumps(
            {"labels": labels, "acquisition_date": "2018-04-17 10:20:21", "demo": True}))
        (s1_root / s1_name / f"{s1_name}_labels_metadata.json").write_text(json.dumps(
            {"labels": labels, "corresponding_s2_patch": s2_name, "acquisition_time": "2018-04-17T17:16:03",
             "demo": True}))
        pairs.append(f"{s2_name},{s1_name}\n")
    order = np.random.default_rng(seed + 1).permutation(n)
    n_train, n_val = int(round(0.6 * n)), int(round(0.2 * n))
    for split, idx in (("train", order[:n_train]), ("val", order[n_train : n_train + n_val]),
                       ("test", order[n_train + n_val :])):
        (root / f"bigearthnet-{split}.csv").write_text("".join(pairs[i] for i in sorted(idx)))


def demo_bigearthnet(cache_dir: str | os.PathLike | None = None, n: int = 150, seed: int = 0,
                     size: int = 120, timeout_s: float = 300.0) -> Path:
    """Root of the demo data set (generated once under `<cache>/demo/earthobs/`), readable by
    `BigEarthNetV1(root, split=...)` and by torchgeo's `BigEarthNet(root, split, bands="s2")`."""
    if size % 6:
        raise ValueError(f"size must be a multiple of 6 (60 m bands), got {size}")
    root = cache_root(cache_dir) / "demo" / "earthobs" / f"bigearthnet-v1-n{n}-seed{seed}-{size}px-v{VERSION}"
    marker = root / "demo.json"
    deadline = time.monotonic() + timeout_s
    while not marker.is_file():
        with ItemLock(root) as got:
            if got and not marker.is_file():
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}.", dir=root.parent))
                try:
                    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
                        _write_dataset(tmp, n, seed, size)
                    (tmp / "demo.json").write_text(json.dumps(
                        {"n": n, "seed": seed, "size": size, "version": VERSION,
                         "classes": [c[0] for c in DEMO_CLASSES]}))
                    if root.exists():  # a stale, incomplete folder (no marker): replace it
                        shutil.rmtree(root)
                    os.replace(tmp, root)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp)
        if not marker.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo data at {root} not ready after {timeout_s:.0f} s (lock {root}.lock)")
            time.sleep(0.2)
    return root
