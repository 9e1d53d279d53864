"""Tile grids over whole slides: tissue detection, coordinates on disk, per-cohort manifests.

Output per slide (TRIDENT/CLAM-compatible): `<out_dir>/<slide_id>/coords.h5` holding `coords`
(N, 2) int64 level-0 x, y of tiles with enough tissue, `tissue_fraction` (N,), and the tiling
parameters as attributes (on the `coords` dataset, as TRIDENT reads them, and on the file), plus a
QC `thumbnail.png` showing the tissue mask outline and the kept tiles.

Crash and concurrency safety: each slide is tiled under a per-slide lock (so several processes or
SLURM tasks can share one cohort), files are written to temporaries and renamed, and `coords.h5`
is written last, so its existence means "done": a rerun skips finished slides and redoes the rest.
One bad slide is recorded as `failed` with its reason; the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw
from scipy import ndimage

from fm.io import ItemLock, atomic_path, remove_stale_temporaries
from fm.termination import exit_on_sigterm
from pathology.cohorts import SlideRecord
from pathology.slides import SlideError, open_slide, read_tile, thumbnail, tile_size_level0
from pathology.tissue import TissueParams, tissue_fractions, tissue_mask

log = logging.getLogger(__name__)

COORDS_NAME = "coords.h5"
THUMBNAIL_NAME = "thumbnail.png"
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ["slide_id", "patient_id", "slide_path", "status", "reason", "n_tiles", "seconds", "mpp"]
OK, OK_EMPTY, SKIPPED_DONE, LOCKED, FAILED = "ok", "ok_empty", "skipped_done", "locked", "failed"
OTHER_MIN_TISSUE = "already tiled with --min-tissue"  # how a kept slide's row says it has another threshold
QC_MAX_SIDE = 1024
PROBE_TILES = 3  # kept tiles decoded at tiling time to catch slides whose full-resolution data is damaged
CONFIG_PATH = Path(__file__).parent / "configs" / "tiling.yaml"


def tiling_defaults() -> dict:
    """The shipped tiling defaults (`pathology/configs/tiling.yaml`): tiling keys and a `tissue` mapping."""
    return yaml.safe_load(CONFIG_PATH.read_text())


@dataclass
class TilingResult:
    slide_id: str
    status: str
    reason: str = ""
    n_tiles: int = 0
    seconds: float = 0.0
    mpp: float | None = None
    coords_path: str | None = None
    extra: dict = field(default_factory=dict)


def grid_coords(width0: int, height0: int, tile_level0: int) -> np.ndarray:
    """Top-left corners (x, y) of whole tiles on a grid anchored at (0, 0), row by row."""
    xs = np.arange(0, width0 - tile_level0 + 1, tile_level0, dtype=np.int64)
    ys = np.arange(0, height0 - tile_level0 + 1, tile_level0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def read_coords(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(coords (N, 2) int64, attributes) of a coords.h5 written by `tile_slide`."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["coords"].attrs.items()}
    return coords.astype(np.int64).reshape(-1, 2), attrs


def _write_coords(path: Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dataset = f.create_dataset("coords", data=coords.astype(np.int64))
        f.create_dataset("tissue_fraction", data=fractions.astype(np.float32))
        for key, value in attrs.items():
            dataset.attrs[key] = value
            f.attrs[key] = value


def _write_qc_thumbnail(
    path: Path,
    thumb: np.ndarray,
    mask: np.ndarray,
    coords: np.ndarray,
    tile_level0: int,
    level0_size: tuple[int, int],
) -> None:
    """Thumbnail with the tissue outline (green) and the kept tiles (blue) for a quick visual check."""
    image = Image.fromarray(thumb)
    scale = min(1.0, QC_MAX_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    small_mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST)) if mask.any() else None
    canvas = np.asarray(image).copy()
    if small_mask is not None:
        outline = small_mask & ~ndimage.binary_erosion(small_mask, iterations=1)
        canvas[outline] = (0, 200, 0)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    sx, sy = image.width / level0_size[0], image.height / level0_size[1]
    for x, y in coords:
        draw.rectangle(
            [x * sx, y * sy, (x + tile_level0) * sx - 1, (y + tile_level0) * sy - 1], outline=(30, 60, 220)
        )
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _done_summary(coords_path: Path) -> tuple[int, float | None, tuple[int, float] | None, float | None]:
    """(tile count, slide mpp, (tile px, target mpp), tissue threshold) of a finished slide, for the rows
    of skipped slides."""
    try:
        with h5py.File(coords_path, "r") as f:
            attrs = f["coords"].attrs
            setting = (int(attrs["patch_size"]), float(attrs["target_mpp"])) if "patch_size" in attrs else None
            min_tissue = float(attrs["min_tissue"]) if "min_tissue" in attrs else None
            return int(f["coords"].shape[0]), float(attrs.get("slide_mpp", np.nan)), setting, min_tissue
    except (OSError, KeyError):
        return -1, None, None, None


def _select_tiles(slide, tile_px: int, target_mpp: float, min_tissue: float, params: TissueParams):
    """(thumbnail, tissue mask, kept coords, their tissue fractions, tile side in level-0 pixels)."""
    width0, height0 = slide.dimensions
    thumb = thumbnail(slide, params.mask_mpp_for(width0 * slide.mpp, height0 * slide.mpp))
    mask = tissue_mask(thumb, width0 * slide.mpp / thumb.shape[1], params)
    tile_level0 = tile_size_level0(tile_px, target_mpp, slide.mpp)
    grid = grid_coords(width0, height0, tile_level0)
    fractions = tissue_fractions(mask, (width0, height0), grid, tile_level0)
    keep = fractions >= min_tissue
    coords, fractions = grid[keep], fractions[keep]
    # the thumbnail came from a low-resolution level: make sure full-resolution tiles decode too
    if len(coords):
        for row in np.unique(np.linspace(0, len(coords) - 1, PROBE_TILES).round().astype(int)):
            read_tile(slide, int(coords[row, 0]), int(coords[row, 1]), tile_px, target_mpp)
    return thumb, mask, coords, fractions, tile_level0


def tile_slide(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    slide_id: str,
    tile_px: int = 224,
    target_mpp: float = 0.5,
    min_tissue: float = 0.6,
    mpp_override: float | None = None,
    overwrite: bool = False,
    tissue_params: TissueParams | None = None,
) -> TilingResult:
    """Tile one slide into `<out_dir>/<slide_id>/`; never raises for a bad slide (status `failed`)."""
    start = time.perf_counter()
    slide_dir = Path(out_dir) / slide_id
    coords_path, thumb_path = slide_dir / COORDS_NAME, slide_dir / THUMBNAIL_NAME

    def result(status: str, reason: str = "", n_tiles: int = 0, mpp: float | None = None) -> TilingResult:
        done = status in (OK, OK_EMPTY, SKIPPED_DONE)
        return TilingResult(
            slide_id,
            status,
            reason,
            n_tiles,
            round(time.perf_counter() - start, 3),
            mpp,
            str(coords_path) if done else None,
        )

    if not slide_id or slide_id in (".", "..") or "/" in slide_id or "\\" in slide_id:
        return result(FAILED, f"{slide_path}: slide_id {slide_id!r} cannot be a folder name")
    def already_tiled() -> TilingResult | None:
        """The outcome for a slide whose coords.h5 is there; None when that file is unreadable (a
        damaged disk or copy): it is derived data, so the slide is tiled again."""
        n_tiles, mpp, setting, held_min_tissue = _done_summary(coords_path)
        if n_tiles < 0:
            log.warning("%s is unreadable: tiling %s again", coords_path, slide_id)
            return None
        if setting is not None and setting != (int(tile_px), float(target_mpp)):
            return result(FAILED, f"{coords_path}: tiled at {setting[0]} px, {setting[1]:g} um/px, not the "
                          f"{tile_px} px, {target_mpp:g} um/px asked for; --overwrite re-tiles it", n_tiles, mpp)
        if held_min_tissue is not None and held_min_tissue != float(min_tissue):
            return result(SKIPPED_DONE, f"{OTHER_MIN_TISSUE} {held_min_tissue:g}, not {float(min_tissue):g}; "
                          "--overwrite re-tiles it", n_tiles, mpp)
        return result(SKIPPED_DONE, "already tiled", n_tiles, mpp)

    done = already_tiled() if coords_path.exists() and not overwrite else None
    if done is not None:
        return done
    lock = ItemLock(coords_path)
    with lock as got:
        if not got:
            return result(LOCKED, f"being tiled by {lock.holder()}")
        done = already_tiled() if coords_path.exists() and not overwrite else None
        if done is not None:  # finished by another process meanwhile
            return done
        remove_stale_temporaries(coords_path)
        remove_stale_temporaries(thumb_path)
        if overwrite or coords_path.exists():  # old (or unreadable) outputs go first: a failed re-tiling
            coords_path.unlink(missing_ok=True)  # must not leave them looking done
            thumb_path.unlink(missing_ok=True)
        try:
            with open_slide(slide_path, mpp_override) as slide:
                thumb, mask, coords, fractions, tile_level0 = _select_tiles(
                    slide, tile_px, target_mpp, min_tissue, tissue_params or TissueParams()
                )
                attrs = dict(
                    patch_size=int(tile_px),
                    patch_size_level0=int(tile_level0),
                    target_mpp=float(target_mpp),
                    target_magnification=float(10.0 / target_mpp),
                    slide_mpp=float(slide.mpp),
                    level0_magnification=float(10.0 / slide.mpp),
                    mpp_source=slide.mpp_source,
                    level0_width=int(slide.dimensions[0]),
                    level0_height=int(slide.dimensions[1]),
                    overlap=0,
                    slide_id=str(slide_id),
                    slide_path=str(slide_path),
                    min_tissue=float(min_tissue),
                    mask_mpp=float(slide.dimensions[0] * slide.mpp / mask.shape[1]),
                )
                _write_qc_thumbnail(thumb_path, thumb, mask, coords, tile_level0, slide.dimensions)
                _write_coords(coords_path, coords, fractions, attrs)  # last: its existence means done
                mpp = slide.mpp
        except SlideError as err:
            return result(FAILED, str(err))
        except Exception as err:  # one bad slide must not kill the cohort
            log.exception("tiling %s failed", slide_path)
            return result(FAILED, f"{slide_path}: {type(err).__name__}: {err}")
    if len(coords) == 0:
        return result(OK_EMPTY, "no tissue tiles", 0, mpp)
    return result(OK, "", len(coords), mpp)


def _tile_job(job: dict) -> dict:
    return asdict(tile_slide(**job))


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A cohort `manifest.csv` with ids and reasons as text and numbers as numbers."""
    table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "slide_path": str, "status": str})
    table["reason"] = table["reason"].fillna("").astype(str)
    return table


def _keep_old_row(old_status: str, new_status: str) -> bool:
    """The manifest records each slide's outcome: `locked` never hides another process's result, and
    `skipped_done` never hides the `ok`/`ok_empty` row that made the slide done."""
    if new_status == LOCKED:
        return old_status != LOCKED
    return new_status == SKIPPED_DONE and old_status in (OK, OK_EMPTY)


def _write_manifest(path: Path, rows: list[dict], wait_s: float = 120.0) -> None:
    """Merge this run's rows into `manifest.csv` (several processes may share a cohort), under a lock."""
    deadline = time.monotonic() + wait_s
    lock = ItemLock(path)
    while not lock.acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: manifest lock held for more than {wait_s:.0f} s ({lock.path})")
        time.sleep(0.05)
    try:
        merged: dict[str, dict] = {}
        if path.exists():
            for row in read_manifest(path).to_dict("records"):
                merged[str(row["slide_id"])] = row
        for row in rows:
            old = merged.get(row["slide_id"])
            if old is not None and _keep_old_row(old["status"], row["status"]):
                continue
            merged[row["slide_id"]] = row
        table = pd.DataFrame(list(merged.values()), columns=MANIFEST_COLUMNS)
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    finally:
        lock.release()


def tile_cohort(
    slides: list[SlideRecord],
    out_dir: str | os.PathLike,
    tile_px: int = 224,
    target_mpp: float = 0.5,
    min_tissue: float = 0.6,
    overwrite: bool = False,
    workers: int = 1,
    tissue_params: TissueParams | None = None,
) -> pd.DataFrame:
    """Tile every slide (process pool when workers > 1) and merge the outcomes into `manifest.csv`.

    Returns this run's rows (statuses of what this call did: `skipped_done`, `locked` included).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        dict(
            slide_path=str(r.slide_path),
            out_dir=str(out_dir),
            slide_id=r.slide_id,
            tile_px=tile_px,
            target_mpp=target_mpp,
            min_tissue=min_tissue,
            mpp_override=r.mpp,
            overwrite=overwrite,
            tissue_params=tissue_params,
        )
        for r in slides
    ]
    results: dict[int, dict] = {}
    rows = []
    try:
        if workers <= 1:
            for i, job in enumerate(jobs):
                results[i] = _tile_job(job)
                log.info("%s: %s %s", job["slide_id"], results[i]["status"], results[i]["reason"])
        else:
            _run_pool(jobs, workers, results)
    finally:  # a run stopped halfway (SIGTERM, an error) still records the slides it finished
        for i, record in enumerate(slides):
            if i not in results:
                continue
            res = results[i]
            rows.append(
                dict(
                    slide_id=record.slide_id,
                    patient_id=record.patient_id,
                    slide_path=str(record.slide_path),
                    status=res["status"],
                    reason=res["reason"],
                    n_tiles=res["n_tiles"],
                    seconds=res["seconds"],
                    mpp=res["mpp"],
                )
            )
        if rows:
            _write_manifest(out_dir / MANIFEST_NAME, rows)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _run_pool(jobs: list[dict], workers: int, results: dict[int, dict]) -> None:
    """Run jobs `workers` at a time, filling `results` as they finish (so a caller stopped halfway still
    has them); a crashed worker fails only the slides it had in flight. Workers end through their
    cleanup on SIGTERM (SLURM signals the whole process group), releasing their slide locks."""
    pending = list(range(len(jobs)))[::-1]
    context = mp.get_context("spawn")  # no OpenSlide handles or threads inherited from the parent
    while pending:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=exit_on_sigterm) as pool:
            in_flight = {}
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < workers:
                        i = pending.pop()
                        in_flight[pool.submit(_tile_job, jobs[i])] = i
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = in_flight[future]
                        results[i] = future.result()  # raises BrokenProcessPool if its worker died
                        del in_flight[future]
                        log.info("%s: %s %s", jobs[i]["slide_id"], results[i]["status"], results[i]["reason"])
            except BrokenProcessPool:
                for i in in_flight.values():
                    results[i] = asdict(
                        TilingResult(
                            jobs[i]["slide_id"],
                            FAILED,
                            f"{jobs[i]['slide_path']}: the worker process died while tiling this or a concurrent "
                            "slide (crash inside the slide reader?); rerun to retry",
                        )
                    )
            except BaseException:  # stopping (SIGTERM to this process only, an error): stop the workers too,
                for process in list((pool._processes or {}).values()):  # through their cleanup, not after
                    with contextlib.suppress(OSError):  # their current slide
                        process.terminate()
                raise
