"""The work of `fm-prepare pathology` (tissue detection + tiling) and the cohort selection every
pathology command shares. Torch-free on purpose: Nextflow starts one `fm-prepare pathology --slides ID`
per slide, and importing torch would cost more than tiling a small slide."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pathology.cohorts import SlideRecord, resolve_cohorts
from pathology.tile_setting import refuse_other_setting, resolve_min_tissue, resolve_setting
from pathology.tiling import OTHER_MIN_TISSUE, tile_cohort, tiling_defaults
from pathology.tissue import TissueParams


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
             "mpp": r.mpp, "project": r.project, **r.labels} for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def tile_slides(records: list[SlideRecord], out_dir: Path, params: dict, overwrite: bool = False) -> pd.DataFrame:
    return tile_cohort(records, out_dir, tile_px=params["tile_px"], target_mpp=params["target_mpp"],
                       min_tissue=params["min_tissue"], overwrite=overwrite, workers=params["workers"],
                       tissue_params=TissueParams(**params["tissue"]))


def print_other_min_tissue(rows: pd.DataFrame, min_tissue: float) -> None:
    """Say, once, which finished slides were kept with another tissue threshold than this run's."""
    kept = rows[rows["reason"].astype(str).str.startswith(OTHER_MIN_TISSUE)] if len(rows) else rows
    if len(kept):
        names = ", ".join(kept["slide_id"].astype(str).head(5)) + (", ..." if len(kept) > 5 else "")
        print(f"  kept {len(kept)} slide(s) tiled with another --min-tissue than {min_tissue:g} ({names}); "
              "--overwrite re-tiles them")


def prepare(args: argparse.Namespace) -> dict:
    params = tiling_defaults()
    if args.workers is not None:
        params["workers"] = args.workers
    out = Path(args.output_dir)
    # a rerun, or new slides, without the flags keep the folder's setting; flags that contradict it are refused
    (params["tile_px"], params["target_mpp"]), source = resolve_setting(out, args.tile_px, args.target_mpp)
    records = select_slides(args, ["demo"] if not args.cohorts else [])
    # the threshold likewise: by default the one the cohort's (else the folder's) tiles were made with
    params["min_tissue"] = resolve_min_tissue(out, args.min_tissue, [r.slide_id for r in records])
    if args.tile_px is not None or args.target_mpp is not None:  # --overwrite re-tiles this cohort's slides only
        refuse_other_setting(out, (params["tile_px"], params["target_mpp"]), source,
                             "re-tile those (fm-prepare --slides ... --overwrite with these flags), or use another "
                             "--output-dir", besides=[r.slide_id for r in records] if args.overwrite else ())
    only_sheet = getattr(args, "samplesheet_only", False)
    if only_sheet and not args.write_samplesheet:
        raise ValueError("--samplesheet-only needs --write-samplesheet CSV")
    if args.write_samplesheet:
        print(f"samplesheet: {write_samplesheet(records, args.write_samplesheet)}")
    if only_sheet:
        return {"samplesheet": str(args.write_samplesheet), "slides": len(records)}
    rows = tile_slides(records, out, params, args.overwrite)
    summary = rows.groupby("status").size().to_dict() if len(rows) else {}
    print(f"tiled {len(rows)} slide(s) into {out}: {summary}; manifest: {out / 'manifest.csv'}")
    failed = rows[rows["status"] == "failed"] if len(rows) else rows
    for _, row in failed.iterrows():
        print(f"  FAILED {row['slide_id']}: {row['reason']}")
    print_other_min_tissue(rows, params["min_tissue"])
    return {"manifest": str(out / "manifest.csv"), "statuses": summary}
