"""Sentinel-1/2 GeoTIFF readers returning raw values as float32 (C, H, W) in a named band order.

Two file layouts occur in the public data sets:
- one single-band GeoTIFF per band (BigEarthNet v1/v2: `<patch>/<patch>_B01.tif`; SSL4EO-S12:
  `<season>/B1.tif`), each band at its native resolution (10 m, 20 m or 60 m);
- one multi-band GeoTIFF per sample (EuroSAT-MS, 13 bands in its own order).

Bands at 20 m and 60 m are resampled onto the 10 m grid with **bilinear interpolation on pixel
centres** (the values of `torch.nn.functional.interpolate(..., align_corners=False)` and of OpenCV's
INTER_LINEAR that the SSL4EO-S12/SoftCon authors use). torchgeo's BigEarthNet asks GDAL for the same
bilinear resampling through rasterio's `out_shape`; GDAL then rounds to the source integer type, so
the two differ by at most 0.5 DN. `resampling="nearest"` replicates native pixels exactly.

Bad input raises `EOReadError` naming the file: missing band files, wrong band sizes (a 20 m band
that is not half the 10 m grid), unexpected dtypes (an 8-bit file is a pre-normalised product and
would be scaled twice), band-count mismatches, and NaN / inf / nodata pixels. NaN policy: by
default a band with such pixels raises with the pixel count; `nan_policy="zero"` fills them with 0
and records the count in `filled_counts[path]` when a dict is passed (the commands' `--nan-policy`).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from earthobs.bands import (
    BAND_INFO,
    BIGEARTHNET_S2_BANDS,
    S1_BANDS,
    canonical_bands,
    short_band_name,
)
from earthobs.choices import NAN_POLICIES

RESAMPLING_MODES = ("bilinear", "nearest", "bicubic")
ENGINES = ("rasterio", "tifffile")
# S2 products are 16-bit integers (DN = reflectance x 1e4); S1 GRD patches are dB floats.
S2_DTYPES: tuple[str, ...] = ("uint16", "int16")
S1_DTYPES: tuple[str, ...] = ("float32", "float64")
# Skip GDAL's listing of each band's folder for sidecar files: it costs more than the read itself.
_GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


class EOReadError(ValueError):
    """A raster that cannot be used as it is; `path` names the file, `problem` says what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class NoReadableSampleError(ValueError):
    """Not one sample of a data set could be read: a wrong root or a broken copy, not a bad patch.
    A ValueError, so the fm-* commands report it in one line."""


def no_readable_sample(n: int, where: str, skipped: Sequence[dict]) -> NoReadableSampleError:
    """The error for `n` samples of `where` that all failed; names the first few files and problems."""
    first = "; ".join(f"{s['id']}: {s['error']}" for s in skipped[:3])
    return NoReadableSampleError(f"none of the {n} samples of {where} could be read"
                                 + (f"; first errors: {first}" if first else ""))


def _size2(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))


def _read_raster(path: Path, engine: str) -> tuple[np.ndarray, float | None]:
    """All bands of one file as (count, H, W) in the file's dtype, plus its declared nodata value."""
    if engine == "tifffile":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                arr = page.asarray()
                tag = page.tags.get("GDAL_NODATA")
                nodata = float(str(tag.value).strip("\x00 ")) if tag is not None else None
                contig = page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
        except FileNotFoundError:
            raise EOReadError(path, "file not found") from None
        except Exception as e:  # tifffile raises several types for corrupt files
            raise EOReadError(path, f"cannot read TIFF: {e}") from e
        if arr.ndim == 2:
            arr = arr[None]
        elif contig:
            arr = np.moveaxis(arr, -1, 0)
        return arr, nodata
    try:
        with rasterio.open(path) as src:
            return src.read(), src.nodata
    except RasterioIOError as e:
        problem = "file not found" if not path.exists() else f"cannot read raster: {e}"
        raise EOReadError(path, problem) from e


@functools.lru_cache(maxsize=32)
def _dtype_set(allowed: tuple[str, ...]) -> frozenset:
    return frozenset(np.dtype(a) for a in allowed)


def _check_dtype(arr: np.ndarray, path: Path, allowed: Sequence[str] | None) -> None:
    # compares dtype objects: numpy's `dtype.name` is computed in Python and costs ~50 us per call
    if allowed is not None and arr.dtype not in _dtype_set(tuple(allowed)):
        hint = " (8-bit data is a pre-scaled product; use the raw 16-bit/dB files)" if arr.dtype.itemsize == 1 else ""
        raise EOReadError(path, f"has dtype {arr.dtype.name}, expected one of {list(allowed)}{hint}")


def _check_invalid(arr: np.ndarray, path: Path, nodata: float | None, nan_policy: str,
                   filled_counts: dict[str, int] | None) -> np.ndarray:
    """Apply the NaN/nodata policy; returns float32."""
    out = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(out) if np.issubdtype(arr.dtype, np.floating) else None
    if nodata is not None and not np.isnan(nodata):
        eq = arr == nodata
        bad = eq if bad is None else (bad | eq)
    if bad is None:
        return out
    n_bad = int(bad.sum())
    if n_bad == 0:
        return out
    if nan_policy == "raise":
        raise EOReadError(path, f"{n_bad} of {bad.size} pixels are NaN, inf or nodata (nodata={nodata}); "
                                "to fill them with 0, pass --nan-policy zero (nan_policy='zero')")
    out = out.copy() if out is arr else out
    out[bad] = 0.0
    if filled_counts is not None:
        filled_counts[str(path)] = filled_counts.get(str(path), 0) + n_bad
    return out


@functools.lru_cache(maxsize=64)
def _resize_taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each (n_out, taps), reproducing `torch.nn.functional.interpolate`
    (align_corners=False, no antialias) along one axis. Gathers and weighted sums rather than torch or
    BLAS calls: those start thread pools that cost milliseconds per call on a busy machine."""
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    if mode == "nearest":
        idx = np.minimum(np.floor(dst * scale).astype(np.int64), n_in - 1)[:, None]
        return idx, np.ones_like(idx, dtype=np.float32)
    if mode == "bilinear":
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam = src - i0
        return np.stack([i0, np.minimum(i0 + 1, n_in - 1)], 1), np.stack([1 - lam, lam], 1).astype(np.float32)
    # bicubic: Keys kernel, a = -0.75, borders clamped (torch and OpenCV)
    a = -0.75
    src = (dst + 0.5) * scale - 0.5
    i0 = np.floor(src).astype(np.int64)
    t = src - i0

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    idx = np.stack([np.clip(i0 + k, 0, n_in - 1) for k in (-1, 0, 1, 2)], 1)
    return idx, np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1).astype(np.float32)


def _resize_axis(x: np.ndarray, n_out: int, axis: int, mode: str) -> np.ndarray:
    idx, w = _resize_taps(x.shape[axis], n_out, mode)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = np.take(x, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += np.take(x, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def _resample(planes: list[np.ndarray], size: tuple[int, int], mode: str) -> np.ndarray:
    """Stack 2-D planes onto a (C, *size) float32 grid; planes of one shape are resized together."""
    out = np.empty((len(planes), *size), dtype=np.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(planes):
        if p.shape == size:
            out[i] = p
        else:
            groups.setdefault(p.shape, []).append(i)
    for _, idx in groups.items():
        stack = np.stack([planes[i] for i in idx])
        out[idx] = _resize_axis(_resize_axis(stack, size[0], 1, mode), size[1], 2, mode)
    return out


def band_files(folder_or_files: str | os.PathLike | Mapping[str, str | os.PathLike],
               bands: Sequence[str]) -> dict[str, Path]:
    """Band -> file for a one-file-per-band folder (`<folder>_B01.tif`, `B01.tif` or `B1.tif`) or an
    explicit mapping. A missing band raises `EOReadError` naming the file looked for."""
    bands = canonical_bands(list(bands))
    if isinstance(folder_or_files, Mapping):
        files = {canonical_bands([k])[0]: Path(v) for k, v in folder_or_files.items()}
        missing = [b for b in bands if b not in files]
        if missing:
            raise EOReadError(next(iter(files.values()), "<no files>"), f"no file given for bands {missing}")
        return {b: files[b] for b in bands}
    folder = Path(folder_or_files)
    if not folder.is_dir():
        raise EOReadError(folder, "patch folder not found")
    out = {}
    for b in bands:
        short = short_band_name(b)
        candidates = [f"{folder.name}_{b}.tif", f"{b}.tif", f"{short}.tif", f"{folder.name}_{short}.tif"]
        found = next((folder / c for c in dict.fromkeys(candidates) if (folder / c).is_file()), None)
        if found is None:
            raise EOReadError(folder / candidates[0], f"missing band file for {b} (looked for {candidates})")
        out[b] = found
    return out


def read_band_files(files: Mapping[str, Path], target_size: int | Sequence[int] | None = None,
                    resampling: str = "bilinear", nan_policy: str = "raise",
                    allowed_dtypes: Sequence[str] | None = None, engine: str = "rasterio",
                    filled_counts: dict[str, int] | None = None) -> np.ndarray:
    """Read single-band files (band order = mapping order) onto a common 10 m grid.

    The 10 m grid is taken from the 10 m bands present (else inferred from the first band's GSD);
    each band must be either at its native size on that grid (grid x 10 / GSD) or already on it.
    The result is then resized to `target_size` if given.
    """
    if resampling not in RESAMPLING_MODES:
        raise ValueError(f"resampling must be one of {RESAMPLING_MODES}, got {resampling!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    planes: list[np.ndarray] = []
    with rasterio.Env(**_GDAL_OPTIONS):
        for band, path in files.items():
            arr, nodata = _read_raster(Path(path), engine)
            if arr.shape[0] != 1:
                raise EOReadError(path, f"has {arr.shape[0]} bands, expected a single-band file for {band}")
            _check_dtype(arr, Path(path), allowed_dtypes)
            planes.append(_check_invalid(arr[0], Path(path), nodata, nan_policy, filled_counts))
    grid = _ten_metre_grid(list(files), planes)
    for (band, path), plane in zip(files.items(), planes):
        factor = BAND_INFO[band].gsd_m / 10.0
        native = (round(grid[0] / factor), round(grid[1] / factor))
        if plane.shape not in (native, grid):
            raise EOReadError(path, f"band {band} is {plane.shape[0]}x{plane.shape[1]} px, expected "
                                    f"{native[0]}x{native[1]} ({BAND_INFO[band].gsd_m:g} m band on a "
                                    f"{grid[0]}x{grid[1]} px 10 m grid)")
    return _resample(planes, _size2(target_size) or grid, resampling)


def _ten_metre_grid(bands: list[str], planes: list[np.ndarray]) -> tuple[int, int]:
    """The 10 m grid: the most common shape of the 10 m bands (so one bad 10 m band is the one named),
    else the first band's shape x GSD / 10."""
    ten = Counter(p.shape for b, p in zip(bands, planes) if BAND_INFO[b].gsd_m == 10)
    if ten:
        return ten.most_common(1)[0][0]
    factor = BAND_INFO[bands[0]].gsd_m / 10.0
    return round(planes[0].shape[0] * factor), round(planes[0].shape[1] * factor)


def read_s2_patch(folder_or_files: str | os.PathLike | Mapping[str, str | os.PathLike],
                  bands: Sequence[str] = BIGEARTHNET_S2_BANDS, target_size: int | Sequence[int] | None = None,
                  resampling: str = "bilinear", nan_policy: str = "raise",
                  allowed_dtypes: Sequence[str] | None = S2_DTYPES, engine: str = "rasterio",
                  filled_counts: dict[str, int] | None = None) -> np.ndarray:
    """Sentinel-2 patch from one-file-per-band GeoTIFFs -> float32 (len(bands), H, W) raw DN.

    Default bands: BigEarthNet's 12 (B01..B08, B8A, B09, B11, B12). BigEarthNet gives 120x120 px.
    """
    files = band_files(folder_or_files, bands)
    return read_band_files(files, target_size, resampling, nan_policy, allowed_dtypes, engine, filled_counts)


def read_s1_patch(folder_or_files: str | os.PathLike | Mapping[str, str | os.PathLike],
                  bands: Sequence[str] = S1_BANDS, target_size: int | Sequence[int] | None = None,
                  resampling: str = "bilinear", nan_policy: str = "raise",
                  allowed_dtypes: Sequence[str] | None = S1_DTYPES, engine: str = "rasterio",
                  filled_counts: dict[str, int] | None = None) -> np.ndarray:
    """Sentinel-1 patch (`<patch>_VV.tif`, `<patch>_VH.tif` or `VV.tif`...) -> float32 dB, [VV, VH] order."""
    files = band_files(folder_or_files, bands)
    return read_band_files(files, target_size, resampling, nan_policy, allowed_dtypes, engine, filled_counts)


def read_multiband(path: str | os.PathLike, file_bands: Sequence[str], bands: Sequence[str] | None = None,
                   target_size: int | Sequence[int] | None = None, resampling: str = "bilinear",
                   nan_policy: str = "raise", allowed_dtypes: Sequence[str] | None = S2_DTYPES,
                   engine: str = "rasterio", filled_counts: dict[str, int] | None = None) -> np.ndarray:
    """One multi-band GeoTIFF whose bands are `file_bands` (in file order) -> float32 (len(bands), H, W)
    in `bands` order (default: file order). The file's band count must equal len(file_bands)."""
    path = Path(path)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    file_bands = canonical_bands(list(file_bands))
    want = canonical_bands(list(bands)) if bands is not None else file_bands
    missing = [b for b in want if b not in file_bands]
    if missing:
        raise ValueError(f"bands {missing} are not stored in files with bands {list(file_bands)}")
    with rasterio.Env(**_GDAL_OPTIONS):
        arr, nodata = _read_raster(path, engine)
    if arr.shape[0] != len(file_bands):
        raise EOReadError(path, f"has {arr.shape[0]} bands, expected {len(file_bands)} ({', '.join(file_bands)})")
    _check_dtype(arr, path, allowed_dtypes)
    arr = arr[[file_bands.index(b) for b in want]]
    arr = _check_invalid(arr, path, nodata, nan_policy, filled_counts)
    size = _size2(target_size)
    if size is None or size == arr.shape[1:]:
        return np.ascontiguousarray(arr)
    return _resample(list(arr), size, resampling)


def read_json(path: str | os.PathLike) -> object:
    """A JSON file; a missing or malformed file is an EOReadError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EOReadError(path, "labels file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EOReadError(path, f"not valid JSON: {e}") from e
