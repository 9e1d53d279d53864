"""`fm-extract pathology`: tile features of whole cohorts into one `<slide_id>.h5` per slide.

Speed: one DataLoader streams the tiles of MANY slides (workers decode JPEG tiles in parallel, batches
cross slide boundaries), so the GPU never waits at the end of a slide; batches are taken as they are
decoded, so a slow slide (a cold file on network storage) holds up only the worker reading it; the
device output of batch k is copied to pinned host memory while batch k+1 runs. Each slide's rows go
straight to their place in its temporary file, which is renamed into place once its last tile is
embedded: memory does not grow with slide size, and a killed run keeps every finished slide.

Safety: slides are sharded over processes (`--shard i/n`, or RANK/WORLD_SIZE under torchrun, one
process per GPU), each output has a lock, finished files are skipped on a rerun (same encoder,
weights hash, feature kind and preprocessing), and a bad slide is recorded in
`<output-dir>/extract_manifest.csv` with its reason while the others go on (`--fail-fast` stops).
Slides that are not tiled yet are tiled first (at the setting of the tiles already there, else the
tiling defaults, or --tile-px/--target-mpp/--min-tissue), so the command works on a fresh or grown
cohort; which slides to run is planned in `pathology.extract_plan`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fm.cli import UserError
from fm.host import available_cores, fix_mmap_threshold, intra_op_threads
from fm.registry import load_encoder
from pathology.cohort_tiles import PREFETCH, CohortTiles, StreamStats, collate_tiles, embed_stream
from pathology.cohorts import SlideRecord
from pathology.domain import FEATURE_KINDS
from pathology.extract_plan import SlideJob, plan_extraction, shard_of
from pathology.feature_files import (
    FeatureFileWriter,
    weights_sha256,
)
from pathology.tile_dataset import SlideTiles
from pathology.tiling import (
    FAILED,
    LOCKED,
    OK,
    _write_manifest,
    read_coords,
)

MANIFEST_NAME = "extract_manifest.csv"


class FailFast(UserError):
    """`--fail-fast` stopped the run at a bad slide (shown as one line, not a traceback)."""


class FeatureEncoder:
    """A frozen backbone plus its input pipeline: uint8 tiles on the device -> (B, dim) float32 features.

    Resizing (to the encoder's input size) and normalisation (the encoder's mean/std) run on the
    device, so workers ship compact uint8 tiles and the host does no per-pixel float work."""

    def __init__(self, name: str, feature: str = "cls", weights: str | None = None, device: str = "auto",
                 precision: str = "auto", input_px: int | None = None, compile_model: bool = False, loaded=None):
        if feature not in FEATURE_KINDS:
            raise ValueError(f"--feature {feature!r}: use one of {FEATURE_KINDS}")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision {precision!r}: use auto, bf16 or fp32")
        self.amp = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # pinned memory and kernels on this process's GPU
        loaded = loaded or load_encoder(name, weights)
        bands = int(loaded.spec.backbone.in_chans)
        if bands != 3:
            raise UserError(f"--encoder {name} takes {bands}-band images, but slide tiles are RGB: use an RGB "
                            "encoder (e.g. pathology/phikon-v2, dinov2/vitl14, or an fm-train pathology export)")
        self.backbone = loaded.backbone.to(self.device).eval().requires_grad_(False)
        is_file = loaded.weights_path is not None and loaded.spec.name == str(loaded.weights_path)
        self.name = str(Path(loaded.weights_path).resolve()) if is_file else loaded.spec.name
        self.weights_path, self.checkpoint_format = loaded.weights_path, loaded.checkpoint_format
        self.weights_sha256 = weights_sha256(loaded.weights_path)
        self.feature = feature
        self.input_px = int(input_px if input_px is not None else loaded.spec.backbone.img_size)
        self.mean = tuple(float(v) for v in loaded.spec.mean)
        self.std = tuple(float(v) for v in loaded.spec.std)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self._std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1) * 255.0
        self.dim = self.backbone.embed_dim * (2 if feature == "cls+mean" else 1)
        self.compiled = compile_model
        if compile_model:
            self.backbone.compile(dynamic=False)

    def preprocessing(self, tile_px: int, target_mpp: float) -> dict:
        resize = "none" if self.input_px in (0, tile_px) else "bilinear-antialias"
        return {"tile_px": int(tile_px), "target_mpp": float(target_mpp),
                "input_px": int(self.input_px or tile_px), "resize": resize, "mean": list(self.mean),
                "std": list(self.std), "scale": "uint8/255"}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        if self.input_px and x.shape[-1] != self.input_px:
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - self._mean) / self._std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.backbone.forward_tokens(x)
        feats = out["cls"] if self.feature == "cls" else torch.cat([out["cls"], out["patch"].mean(1)], dim=1)
        return feats.float()


def _in_flight(todo: list[int], jobs: list[SlideJob], writers: dict, finished: set, window: int) -> list[int]:
    """Unfinished slides the loader may have been reading: those holding the first `window` unwritten
    rows in cohort order. Batches are dispatched in order and at most `window` tiles are out at once;
    each batch that came back was written, so the ones still out are the first unwritten rows, even
    when batches come back out of order."""
    suspects = []
    for p in todo:
        if p in finished:
            continue
        if window <= 0:
            break
        suspects.append(p)
        window -= jobs[p].n_tiles - (writers[p].filled if p in writers else 0)
    return suspects


def _slide_attrs(job: SlideJob, common: dict, dtype: str) -> dict:
    r = job.record
    return {**common, "dtype": dtype, "n_tiles": job.n_tiles, "slide_id": r.slide_id, "patient_id": r.patient_id,
            "cohort": r.cohort or "", "project": r.project or "", "slide_path": str(r.slide_path),
            "coords_path": str(job.coords_path), "slide_mpp": job.slide_mpp}


def extract_cohort(records: list[SlideRecord], tiles_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   encoder: FeatureEncoder, batch_size: int = 64, workers: int = 4, dtype: str = "float16",
                   overwrite: bool = False, fail_fast: bool = False, tiling: dict | None = None) -> pd.DataFrame:
    """Extract every slide of `records`; returns this run's manifest rows (also merged into the manifest),
    with where the time went (`StreamStats`) in `table.attrs["stream"]`."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: use float16 or float32")
    tiles_dir, output_dir = Path(tiles_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs, rows, common = plan_extraction(records, tiles_dir, output_dir, encoder, overwrite, tiling)
    for row in rows:
        if row["status"] in (FAILED, LOCKED):
            print(f"  {row['status'].upper()} {row['slide_id']}: {row['reason']}")
    failed = [row for row in rows if row["status"] == FAILED]
    if fail_fast and failed:
        for job in jobs:
            job.lock.release()
        _write_manifest(output_dir / MANIFEST_NAME, rows)
        raise FailFast(f"--fail-fast: slide {failed[0]['slide_id']} failed: {failed[0]['reason']} "
                       f"(manifest: {output_dir / MANIFEST_NAME})")
    writers: dict[int, FeatureFileWriter] = {}
    finished: set[int] = set()
    stats = StreamStats()

    def fail(pos: int, reason: str) -> None:
        if pos in finished:
            return
        finished.add(pos)
        if pos in writers:
            writers.pop(pos).discard()
        jobs[pos].lock.release()
        rows.append(jobs[pos].row(FAILED, reason, time.perf_counter() - (jobs[pos].started or time.perf_counter())))
        print(f"  FAILED {jobs[pos].record.slide_id}: {reason}")
        if fail_fast:
            raise FailFast(f"--fail-fast: slide {jobs[pos].record.slide_id} failed: {reason} "
                           f"(manifest: {output_dir / MANIFEST_NAME})")

    def consume(pos: int, start_row: int, features: np.ndarray) -> None:
        job = jobs[pos]
        if pos in finished:
            return
        if pos not in writers:
            job.started = time.perf_counter()
            writers[pos] = FeatureFileWriter(job.out_path, job.n_tiles, encoder.dim, dtype)
        writer = writers[pos]
        try:
            writer.write_rows(start_row, features)
            if writer.filled == job.n_tiles:
                coords, coords_attrs = read_coords(job.coords_path)
                writers.pop(pos).commit(coords, coords_attrs, _slide_attrs(job, common, dtype))
                finished.add(pos)
                job.lock.release()
                rows.append(job.row(OK, "", time.perf_counter() - job.started))
        except OSError as err:
            fail(pos, f"{job.out_path}: cannot write features: {err}")

    on_cpu = getattr(encoder, "device", torch.device("cpu")).type == "cpu"
    # a CPU forward leaves the workers their cores (oversubscribed, it runs several times slower)
    with intra_op_threads(max(1, available_cores() - workers) if on_cpu else None):
        try:
            queue, suspects = list(range(len(jobs))), []
            while queue or suspects:
                # after a worker crash, each slide that was in flight runs alone to find the one that crashes
                todo, alone = ([suspects.pop(0)], True) if suspects else (queue, False)
                tiles = [SlideTiles(str(jobs[p].record.slide_path), str(jobs[p].coords_path), jobs[p].n_tiles,
                                    jobs[p].slide_mpp) for p in todo]
                dataset = CohortTiles(tiles, int(common["patch_size"]), float(common["target_mpp"]))
                try:
                    embed_stream(dataset, encoder, batch_size, workers, collate_tiles,
                                 on_rows=lambda i, row, feats, todo=todo: consume(todo[i], row, feats),
                                 on_error=lambda i, reason, todo=todo: fail(todo[i], reason), stats=stats)
                except (RuntimeError, ConnectionError, EOFError) as err:
                    # a killed worker shows up as torch's "DataLoader worker ... killed" error, or, when it
                    # died while handing over a tensor, as a broken connection in the unpickling
                    if isinstance(err, RuntimeError) and "DataLoader worker" not in str(err):
                        raise
                    if alone:
                        fail(todo[0], f"the tile-reading worker died while reading this slide ({err})")
                    else:
                        suspects = _in_flight(todo, jobs, writers, finished, (PREFETCH * workers + 2) * batch_size)
                        print(f"  a tile-reading worker died ({err}); retrying {len(suspects)} slide(s) one by one")
                    for p in todo:
                        if p in writers and p not in finished:
                            writers.pop(p).discard()  # its rows come again on the retry
                queue = [p for p in queue if p not in finished and p not in suspects]
        finally:
            for pos in list(writers):
                writers.pop(pos).discard()
            for job in jobs:
                if job.lock is not None:
                    job.lock.release()
            if rows:
                _write_manifest(output_dir / MANIFEST_NAME, rows)
    columns = ["slide_id", "patient_id", "slide_path", "status", "reason", "n_tiles", "seconds", "mpp"]
    table = pd.DataFrame(rows, columns=columns)
    table.attrs["stream"] = stats
    if stats.batches:
        print(f"  embedding: {stats.summary()}\n  {stats.limit(workers)}")
    return table


# -- CLI ------------------------------------------------------------------------------------------------
def run_extract(args: argparse.Namespace) -> dict:
    """`fm-extract pathology` (its flags: pathology.domain.add_extract_args)."""
    from pathology.prepare import select_slides

    if not args.cohorts:
        raise ValueError("--cohorts is required (tcga, tcga:GDC_MANIFEST, csv:PATH or demo)")
    records = shard_of(select_slides(args, []), args.shard)
    fix_mmap_threshold()  # a long run's heap must not creep up (see fm.host)
    device = args.device
    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    encoder = FeatureEncoder(args.encoder, args.feature, args.weights, device, args.precision, args.input_px,
                             args.compile)
    batch_size = args.batch_size or (256 if encoder.device.type == "cuda" else 32)
    began = time.perf_counter()
    table = extract_cohort(records, args.tiles_dir, args.output_dir, encoder, batch_size, args.workers, args.dtype,
                           args.overwrite, args.fail_fast,
                           dict(tile_px=args.tile_px, target_mpp=args.target_mpp, min_tissue=args.min_tissue))
    seconds = time.perf_counter() - began
    statuses = table.groupby("status").size().to_dict() if len(table) else {}
    n_tiles = int(table.loc[table["status"] == OK, "n_tiles"].sum()) if len(table) else 0
    manifest = Path(args.output_dir) / MANIFEST_NAME
    print(f"extracted {statuses.get(OK, 0)} of {len(records)} slide(s) ({n_tiles} tiles, {n_tiles / seconds:.1f} "
          f"tiles/s) with {encoder.name} into {args.output_dir}: {statuses}; manifest: {manifest}")
    stream = table.attrs["stream"]
    return {"output_dir": str(args.output_dir), "manifest": str(manifest), "statuses": statuses,
            "n_tiles": n_tiles, "seconds": round(seconds, 2), "encoder": encoder.name,
            "steady_tiles_per_s": round(stream.steady_tiles_per_s, 1), "limit": stream.limit(args.workers)}
