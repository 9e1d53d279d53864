"""What `fm-extract pathology` has to do: which slides to embed (locks taken), which are done, locked,
in conflict or failed before any embedding, and the one tile setting of the run.

The tile setting comes from the flags where given, else from the tiles already in the tiles folder
(so a rerun, or a cohort that grew, keeps its setting), else from the tiling defaults; slides not
tiled yet are tiled at it first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fm.io import ItemLock, remove_stale_temporaries, stale_temporaries
from pathology.cohorts import SlideRecord
from pathology.feature_files import FINGERPRINT_ATTRS, code_version, feature_file_state
from pathology.tile_setting import coords_attrs, resolve_setting, setting_of
from pathology.tiling import COORDS_NAME, FAILED, LOCKED, OK, OK_EMPTY, SKIPPED_DONE

if TYPE_CHECKING:
    from pathology.extract import FeatureEncoder


@dataclass
class SlideJob:
    record: SlideRecord
    coords_path: Path
    out_path: Path
    n_tiles: int
    slide_mpp: float
    lock: ItemLock | None = None
    started: float = 0.0
    extra: dict = field(default_factory=dict)

    def row(self, status: str, reason: str = "", seconds: float = 0.0) -> dict:
        r = self.record
        return dict(slide_id=r.slide_id, patient_id=r.patient_id, slide_path=str(r.slide_path), status=status,
                    reason=reason, n_tiles=self.n_tiles, seconds=round(seconds, 3), mpp=self.slide_mpp)


def _record_row(record: SlideRecord, status: str, reason: str, n_tiles: int = 0) -> dict:
    return dict(slide_id=record.slide_id, patient_id=record.patient_id, slide_path=str(record.slide_path),
                status=status, reason=reason, n_tiles=n_tiles, seconds=0.0, mpp=record.mpp)


def shard_of(records: list[SlideRecord], shard: str | None) -> list[SlideRecord]:
    """Slides of shard `i/n` (sorted ids, every n-th); without `shard`, RANK/WORLD_SIZE (torchrun) decide."""
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        shard = f"{os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))}/{os.environ['WORLD_SIZE']}"
    if shard is None:
        return records
    try:
        index, count = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {shard!r}: INDEX must be in 0..COUNT-1")
    return sorted(records, key=lambda r: r.slide_id)[index::count]


def _tile_missing(missing: list[SlideRecord], tiles_dir: Path, tiling: dict, setting: tuple[int, float],
                  tiled: Iterable[str] = ()) -> dict[str, str]:
    """Tile slides without coords.h5 at `setting` (and the threshold of the cohort's slides already
    `tiled`); returns slide_id -> reason for those that failed."""
    if not missing:
        return {}
    from pathology.tile_setting import resolve_min_tissue
    from pathology.tiling import tile_cohort, tiling_defaults
    from pathology.tissue import TissueParams

    params = {**tiling_defaults(), **{k: v for k, v in tiling.items() if v is not None}}
    min_tissue = resolve_min_tissue(tiles_dir, tiling.get("min_tissue"), tiled)  # the cohort's, as its setting
    print(f"tiling {len(missing)} slide(s) first into {tiles_dir} ({setting[0]} px at {setting[1]} um/px, "
          f"--min-tissue {min_tissue:g})")
    table = tile_cohort(missing, tiles_dir, tile_px=setting[0], target_mpp=setting[1],
                        min_tissue=min_tissue, workers=params["workers"],
                        tissue_params=TissueParams(**params["tissue"]))
    return {row.slide_id: f"tiling {row.status}: {row.reason}" for row in table.itertuples()
            if row.status not in (OK, OK_EMPTY, SKIPPED_DONE)}


def _read_tilings(records: list[SlideRecord], tiles_dir: Path, rows: list[dict] | None) -> dict:
    """slide_id -> (n tiles, coords attributes) of the slides tiled in `tiles_dir`. An unreadable tiling
    output becomes a FAILED row in `rows`; with `rows` None it is left out, to be tiled again (tiling
    replaces an unreadable coords.h5)."""
    found = {}
    for record in records:
        coords_path = tiles_dir / record.slide_id / COORDS_NAME
        if not coords_path.is_file():
            continue
        try:
            found[record.slide_id] = coords_attrs(coords_path)
        except (OSError, KeyError) as err:
            if rows is not None:
                rows.append(_record_row(record, FAILED, f"{coords_path}: unreadable tiling output ({err})"))
    return found


def plan_extraction(records: list[SlideRecord], tiles_dir: Path, output_dir: Path, encoder: FeatureEncoder,
                    overwrite: bool = False, tiling: dict | None = None) -> tuple[list[SlideJob], list[dict], dict]:
    """(jobs to run, with their locks held; manifest rows of slides not run; file attributes common to all)."""
    tiling, rows = tiling or {}, []
    found = _read_tilings(records, tiles_dir, None)
    (tile_px, target_mpp), source = resolve_setting(tiles_dir, tiling.get("tile_px"), tiling.get("target_mpp"),
                                                    [setting_of(attrs) for _, attrs in found.values()])
    missing = [r for r in records if r.slide_id not in found]  # not tiled yet, or its coords.h5 is damaged
    not_tiled = _tile_missing(missing, tiles_dir, tiling, (tile_px, target_mpp), found)
    found |= _read_tilings([r for r in missing if r.slide_id not in not_tiled], tiles_dir, rows)
    recorded = {row["slide_id"] for row in rows}
    for record in missing:
        if record.slide_id not in found and record.slide_id not in recorded:
            reason = not_tiled.get(record.slide_id, f"{tiles_dir / record.slide_id / COORDS_NAME} missing")
            rows.append(_record_row(record, FAILED, reason))
    if not found:
        return [], rows, {}
    common = {**encoder_attrs(encoder, tile_px, target_mpp), "patch_size": tile_px, "target_mpp": target_mpp}
    fingerprint = {k: common[k] for k in FINGERPRINT_ATTRS}
    jobs, stale = [], stale_temporaries(output_dir)
    try:  # locks are held from here: a stop halfway (SIGTERM, an error) must not strand them
        for record in (r for r in records if r.slide_id in found):
            coords_path = tiles_dir / record.slide_id / COORDS_NAME
            n, attrs = found[record.slide_id]
            if setting_of(attrs) != (tile_px, target_mpp):
                rows.append(_record_row(record, FAILED, f"{coords_path}: tiled at {attrs['patch_size']} px, "
                                        f"{attrs['target_mpp']} um/px, but this extraction uses {tile_px} px, "
                                        f"{target_mpp} um/px (from {source}): one extraction needs one tile setting; "
                                        f"re-tile it (fm-prepare pathology --overwrite) or use another --tiles-dir", n))
                continue
            job = SlideJob(record, coords_path, output_dir / f"{record.slide_id}.h5", n, float(attrs["slide_mpp"]))
            if n == 0:
                rows.append(job.row(OK_EMPTY, "no tissue tiles: no feature file"))
                continue
            state = "missing" if overwrite else feature_file_state(job.out_path, n, fingerprint)
            if state == "complete":
                rows.append(job.row(SKIPPED_DONE, "features already extracted"))
                continue
            if state.startswith("conflict"):
                rows.append(job.row(FAILED, state.split(": ", 1)[1]))
                continue
            job.lock = ItemLock(job.out_path)
            if not job.lock.acquire():
                rows.append(job.row(LOCKED, f"being extracted by {job.lock.holder()}"))
                continue
            jobs.append(job)
            if not overwrite and feature_file_state(job.out_path, n, fingerprint) == "complete":
                jobs.pop().lock.release()  # finished by another process between the check and the lock
                rows.append(job.row(SKIPPED_DONE, "features already extracted"))
                continue
            remove_stale_temporaries(job.out_path, stale)
    except BaseException:
        for job in jobs:
            job.lock.release()
        raise
    return jobs, rows, common


def encoder_attrs(encoder: FeatureEncoder, tile_px: int, target_mpp: float) -> dict:
    """File attributes describing the extraction (identical for every slide of a run)."""
    return dict(encoder=encoder.name, encoder_weights_sha256=encoder.weights_sha256,
                encoder_weights_file=str(encoder.weights_path or ""), checkpoint_format=encoder.checkpoint_format,
                feature=encoder.feature, feature_dim=encoder.dim,
                preprocessing=json.dumps(encoder.preprocessing(tile_px, target_mpp), sort_keys=True),
                code_version=code_version())
