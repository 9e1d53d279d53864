"""The `pathology` domain of the CLI: `fm-prepare pathology` (tiling) and `fm-train pathology`.

Extraction (`fm-extract pathology`) and slide-level evaluation (`fm-eval pathology <task>`) are added
to DOMAIN by pathology.extract / pathology.evaluate when those modules exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from fm.config import apply_flags as apply_flag_map
from fm.config import set_value
from fm.domains import Command, Domain
from fm.train import add_train_args, apply_train_flags, multicrop_from_config, run_pretraining
from pathology.augment import HEPhotometric
from pathology.cohorts import SlideRecord, resolve_cohorts
from pathology.evaluate import EVAL_TASKS
from pathology.extract import EXTRACT_COMMAND
from pathology.tile_dataset import TileStream
from pathology.tiling import COORDS_NAME, tile_cohort, tiling_defaults
from pathology.tissue import TissueParams

CONFIGS = Path(__file__).resolve().parent / "configs"


def add_cohort_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cohorts")
    g.add_argument("--cohorts", help="comma-separated: tcga, csv:PATH, demo (built-in generated slides)")
    g.add_argument("--data-root", help="folder with the slides (tcga: scanned, GDC layout accepted)")
    g.add_argument("--projects", help="TCGA project filter, e.g. TCGA-LUAD,TCGA-LUSC")
    g.add_argument("--mpp", type=float, help="microns per pixel for slides whose files lack it")
    g.add_argument("--slides", help="only these slide ids (comma-separated), e.g. one per Nextflow task")


def select_slides(args: argparse.Namespace, cohorts, data_root=None, projects=None, mpp=None) -> list[SlideRecord]:
    names = args.cohorts.split(",") if getattr(args, "cohorts", None) else list(cohorts)
    projects = args.projects.split(",") if getattr(args, "projects", None) else projects
    records = resolve_cohorts(names, data_root=getattr(args, "data_root", None) or data_root,
                              projects=projects, mpp=args.mpp if getattr(args, "mpp", None) else mpp)
    if getattr(args, "slides", None):
        wanted = args.slides.split(",")
        known = {r.slide_id for r in records}
        missing = [s for s in wanted if s not in known]
        if missing:
            raise ValueError(f"--slides names slides not in the cohort: {', '.join(missing)}")
        records = [r for r in records if r.slide_id in wanted]
    if not records:
        raise ValueError(f"no slides found for cohorts {names} (data root: {getattr(args, 'data_root', None)})")
    return records


def write_samplesheet(records: list[SlideRecord], path: str | Path) -> Path:
    rows = [{"slide_id": r.slide_id, "patient_id": r.patient_id, "slide_path": str(r.slide_path),
             "mpp": r.mpp, **r.labels} for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# -- fm-prepare pathology ---------------------------------------------------------------------
def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    add_cohort_args(p)
    p.add_argument("--output-dir", required=False, default="fm-runs/tiles", help="tiles go to DIR/<slide_id>/")
    p.add_argument("--tile-px", type=int, help="tile size in pixels (default 224)")
    p.add_argument("--target-mpp", type=float, help="tile resolution in um/px (default 0.5, i.e. 20x)")
    p.add_argument("--min-tissue", type=float, help="keep tiles with at least this tissue fraction (0.6)")
    p.add_argument("--workers", type=int, help="slides tiled in parallel")
    p.add_argument("--overwrite", action="store_true", help="re-tile slides that are already done")
    p.add_argument("--write-samplesheet", metavar="CSV", help="also write the cohort as a samplesheet CSV")


def tile_slides(records: list[SlideRecord], out_dir: Path, params: dict, overwrite: bool = False) -> pd.DataFrame:
    return tile_cohort(records, out_dir, tile_px=params["tile_px"], target_mpp=params["target_mpp"],
                       min_tissue=params["min_tissue"], overwrite=overwrite, workers=params["workers"],
                       tissue_params=TissueParams(**params["tissue"]))


def prepare(args: argparse.Namespace) -> dict:
    params = tiling_defaults()
    for flag, key in (("tile_px", "tile_px"), ("target_mpp", "target_mpp"), ("min_tissue", "min_tissue"),
                      ("workers", "workers")):
        if getattr(args, flag) is not None:
            params[key] = getattr(args, flag)
    records = select_slides(args, ["demo"] if not args.cohorts else [])
    if args.write_samplesheet:
        print(f"samplesheet: {write_samplesheet(records, args.write_samplesheet)}")
    out = Path(args.output_dir)
    rows = tile_slides(records, out, params, args.overwrite)
    summary = rows.groupby("status").size().to_dict() if len(rows) else {}
    print(f"tiled {len(rows)} slide(s) into {out}: {summary}; manifest: {out / 'manifest.csv'}")
    failed = rows[rows["status"] == "failed"] if len(rows) else rows
    for _, row in failed.iterrows():
        print(f"  FAILED {row['slide_id']}: {row['reason']}")
    return {"manifest": str(out / "manifest.csv"), "statuses": summary}


# -- fm-train pathology -----------------------------------------------------------------------
class TileSource:
    """ImageSource over all tiles of the tiled slides (decoded on demand; no tile dump)."""

    def __init__(self, coords_paths: list[Path], tile_px: int, target_mpp: float, seed: int):
        self.stream = TileStream([str(p) for p in coords_paths], tile_px=tile_px, target_mpp=target_mpp, seed=seed)

    def __len__(self) -> int:
        return self.stream.total

    def get(self, index: int) -> torch.Tensor:
        return self.stream.sample(index)["image"]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_cohort_args(p)
    p.add_argument("--tiles-dir", help="[pathology.tiles_dir] where tiles are (tiled first if missing)")
    add_train_args(p)


def apply_flags(args: argparse.Namespace, cfg: dict) -> dict:
    cfg = apply_train_flags(args, cfg)
    for flag in ("cohorts", "projects"):  # comma-separated on the command line, lists in the config
        if getattr(args, flag, None) is not None:
            set_value(cfg, f"pathology.{flag}", getattr(args, flag).split(","))
    return apply_flag_map(args, cfg, {"data_root": "pathology.data_root", "mpp": "pathology.mpp",
                                      "tiles_dir": "pathology.tiles_dir"})


def train(args: argparse.Namespace) -> dict:
    cfg = apply_flags(args, args.cfg)
    p = cfg["pathology"]
    tiles_dir = Path(p["tiles_dir"] or Path(cfg["train"]["output_dir"]) / "tiles")
    records = select_slides(args, p["cohorts"], p["data_root"], p["projects"], p["mpp"])
    params = {**tiling_defaults(), "tile_px": p["tile_px"], "target_mpp": p["target_mpp"],
              "min_tissue": p["min_tissue"], "workers": p["tiling_workers"]}
    rows = tile_slides(records, tiles_dir, params)  # tiles what is not tiled yet (resumable)
    coords = [tiles_dir / r.slide_id / COORDS_NAME for r in records if (tiles_dir / r.slide_id / COORDS_NAME).is_file()]
    n_failed = int((rows["status"] == "failed").sum()) if len(rows) else 0
    if not coords:
        raise ValueError(f"no slide of the cohort has tiles in {tiles_dir} (see {tiles_dir / 'manifest.csv'})")
    source = TileSource(coords, p["tile_px"], p["target_mpp"], cfg["data"]["seed"])
    photometric = HEPhotometric(strength=p["he_strength"], flips=False, rotate90=False)
    rotate = (lambda x: torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))) if p["rotate90"] else None
    transform = multicrop_from_config(cfg, photometric=(photometric, photometric, photometric), extra_geometric=rotate)
    thumbnails = [(c.parent / "thumbnail.png", f"qc/{c.parent.name}") for c in coords]
    artifacts = [tiles_dir / "manifest.csv", *[t for t in thumbnails if t[0].is_file()]]
    print(f"pretraining on {len(source)} tiles from {len(coords)} slide(s) ({n_failed} failed, see manifest)")
    result = run_pretraining(cfg, source, transform, artifacts=artifacts)
    return {"export": str(result.export), "run_id": result.run_id, "tiles_dir": str(tiles_dir), "n_tiles": len(source)}


train.apply_flags = apply_flags

DOMAIN = Domain(
    name="pathology",
    help="whole-slide images: tiling, Phikon-v2-style pretraining, extraction, slide-level MIL",
    train=Command(help="tile what is not tiled yet, then pretrain (default config: Phikon-v2 recipe)",
                  run=train, add_args=_add_train_args, default_config=CONFIGS / "phikon_v2.yaml"),
    prepare=Command(help="tissue detection + tiling of a cohort (resumable; one bad slide never stops it)",
                    run=prepare, add_args=_add_prepare_args),
    extract=EXTRACT_COMMAND,
    eval_tasks=EVAL_TASKS,
    configs_dir=CONFIGS,
)
