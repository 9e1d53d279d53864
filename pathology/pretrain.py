"""`fm-train pathology`: tile what is not tiled yet, then pretrain on tiles streamed from the slides."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fm.io import ItemLock
from fm.train import multicrop_from_config, run_pretraining
from pathology.augment import HEPhotometric
from pathology.domain import MIN_TILE_PX, apply_flags
from pathology.prepare import print_other_min_tissue, select_slides, tile_slides
from pathology.tile_dataset import TileStream
from pathology.tile_setting import coords_attrs, refuse_other_setting, resolve_min_tissue
from pathology.tiling import COORDS_NAME, FAILED, LOCKED, OK, SKIPPED_DONE, tiling_defaults


class TileSource:
    """ImageSource over all tiles of the tiled slides (decoded on demand; no tile dump). `slides` are
    (slide file, coords.h5) pairs: the cohort's own paths, not those recorded at tiling time, which may be
    relative to another folder or point where the slides used to be."""

    def __init__(self, slides: list[tuple[Path, Path]], tile_px: int, target_mpp: float, seed: int):
        self.stream = TileStream([(str(s), str(c)) for s, c in slides], tile_px=tile_px, target_mpp=target_mpp,
                                 seed=seed)
        self.skipped = self.stream.skipped

    def __len__(self) -> int:
        return self.stream.total

    def get(self, index: int) -> torch.Tensor:
        return self.stream.sample(index)["image"]


def _wait_for_others(tiles_dir: Path, slide_ids: list[str]) -> set[str]:
    """Slides of `slide_ids` (locked by other processes when we looked) that have tiles once those
    processes are done: waits until their locks go (at most the stale-lock time, then gives up on them)."""
    if not slide_ids:
        return set()
    print(f"waiting for {len(slide_ids)} slide(s) being tiled by other processes")
    paths = {sid: tiles_dir / sid / COORDS_NAME for sid in slide_ids}
    deadline = time.monotonic() + ItemLock.stale_after() + 60
    while any(ItemLock(p).path.exists() for p in paths.values()) and time.monotonic() < deadline:
        time.sleep(2)
    done = set()
    for sid, path in paths.items():
        try:
            if path.is_file() and coords_attrs(path)[0] > 0:
                done.add(sid)
        except (OSError, KeyError):
            continue
    return done


def train(args: argparse.Namespace) -> dict:
    cfg = apply_flags(args, args.cfg)
    p = cfg["pathology"]
    tiles_dir = Path(p["tiles_dir"] or Path(cfg["train"]["output_dir"]) / "tiles")
    records = select_slides(args, p["cohorts"], p["data_root"], p["projects"], p["mpp"])
    p["min_tissue"] = resolve_min_tissue(tiles_dir, p["min_tissue"], [r.slide_id for r in records],
                                         "pathology.min_tissue")  # recorded with the run's config
    params = {**tiling_defaults(), "tile_px": p["tile_px"], "target_mpp": p["target_mpp"],
              "min_tissue": p["min_tissue"], "workers": p["tiling_workers"]}
    setting = (int(p["tile_px"]), float(p["target_mpp"]))
    if setting[0] < MIN_TILE_PX or not setting[1] > 0:
        raise ValueError(f"pathology.tile_px must be at least {MIN_TILE_PX} and pathology.target_mpp above 0, "
                         f"got {p['tile_px']} and {p['target_mpp']}")
    refuse_other_setting(tiles_dir, setting, "the config (pathology.tile_px, pathology.target_mpp)",
                         "set them to the folder's (--set pathology.tile_px=... --set pathology.target_mpp=...), "
                         "or use another --tiles-dir")
    if getattr(args, "tiled_only", False):  # the slides that have tiles; none is tiled here
        untiled = [r.slide_id for r in records if not (tiles_dir / r.slide_id / COORDS_NAME).is_file()]
        if untiled:
            print(f"--tiled-only: leaving out {len(untiled)} slide(s) without tiles in {tiles_dir} "
                  f"(e.g. {', '.join(untiled[:3])})")
        left_out = set(untiled)
        records = [r for r in records if r.slide_id not in left_out]
    rows = tile_slides(records, tiles_dir, params)  # tiles what is not tiled yet (resumable)
    print_other_min_tissue(rows, params["min_tissue"])
    with_tiles = set(rows.loc[rows["status"].isin([OK, SKIPPED_DONE]) & (rows["n_tiles"] > 0), "slide_id"])
    locked = rows.loc[rows["status"] == LOCKED, "slide_id"].tolist()
    with_tiles |= _wait_for_others(tiles_dir, locked)  # every rank of a job then trains on the same slides
    slides = [(r.slide_path, tiles_dir / r.slide_id / COORDS_NAME) for r in records if r.slide_id in with_tiles]
    n_failed = int((rows["status"] == FAILED).sum())
    if not slides:
        raise ValueError(f"no slide of the cohort has tiles in {tiles_dir}: {n_failed} failed, {len(locked)} "
                         f"still being tiled elsewhere or unreadable, the others without tissue tiles "
                         f"(see {tiles_dir / 'manifest.csv'})")
    coords = [c for _, c in slides]
    source = TileSource(slides, p["tile_px"], p["target_mpp"], cfg["data"]["seed"])
    photometric = HEPhotometric(strength=p["he_strength"], flips=False, rotate90=False)
    rotate = (lambda x: torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))) if p["rotate90"] else None
    transform = multicrop_from_config(cfg, photometric=(photometric, photometric, photometric), extra_geometric=rotate)
    thumbnails = [(c.parent / "thumbnail.png", f"qc/{c.parent.name}") for c in coords]
    artifacts = [tiles_dir / "manifest.csv", *[t for t in thumbnails if t[0].is_file()]]
    print(f"pretraining on {len(source)} tiles from {len(coords)} slide(s) ({n_failed} failed, see manifest)")
    result = run_pretraining(cfg, source, transform, artifacts=artifacts)
    return {"export": str(result.export), "run_id": result.run_id, "tiles_dir": str(tiles_dir), "n_tiles": len(source)}
