"""The `pathology` domain of the CLI: every flag of `fm-prepare`, `fm-train`, `fm-extract` and
`fm-eval pathology <task>`, and which function runs each command.

Every fm-* command imports this module to build its parsers, so it imports nothing heavy: the commands
run in pathology.prepare (tiling, torch-free), pathology.pretrain, pathology.extract and
pathology.evaluate, imported only when they run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fm.config import apply_flags as apply_flag_map
from fm.config import set_value
from fm.domains import Command, Domain
from fm.train_args import add_train_args, apply_train_flags

CONFIGS = Path(__file__).resolve().parent / "configs"
MIN_TILE_PX = 16  # smaller tiles hold too little tissue to embed (and 0 divides by zero in tiling)
FEATURE_KINDS = ("cls", "cls+mean")  # here, not in pathology.extract, so the parser needs no torch


def add_cohort_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cohorts")
    g.add_argument("--cohorts", help="comma-separated: tcga, csv:PATH, demo (built-in generated slides)")
    g.add_argument("--data-root", help="folder with the slides (tcga: scanned, GDC layout accepted)")
    g.add_argument("--projects", help="TCGA project filter, e.g. TCGA-LUAD,TCGA-LUSC")
    g.add_argument("--mpp", type=_positive_float, help="microns per pixel for slides whose files lack it")
    g.add_argument("--slides", help="only these slide ids (comma-separated), e.g. one per Nextflow task")


# -- fm-prepare pathology ---------------------------------------------------------------------
def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    add_cohort_args(p)
    p.add_argument("--output-dir", required=False, default="fm-runs/tiles", help="tiles go to DIR/<slide_id>/")
    p.add_argument("--tile-px", type=_int_at_least(MIN_TILE_PX), help="tile size in pixels (default 224)")
    p.add_argument("--target-mpp", type=_positive_float, help="tile resolution in um/px (default 0.5, i.e. 20x)")
    p.add_argument("--min-tissue", type=_fraction,
                   help="keep tiles with at least this tissue fraction (default: the folder's, else 0.6)")
    p.add_argument("--workers", type=int, help="slides tiled in parallel")
    p.add_argument("--overwrite", action="store_true", help="re-tile slides that are already done")
    p.add_argument("--write-samplesheet", metavar="CSV", help="also write the cohort as a samplesheet CSV")
    p.add_argument("--samplesheet-only", action="store_true", help="with --write-samplesheet: write it, tile nothing")


# -- fm-train pathology -----------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_cohort_args(p)
    p.add_argument("--tiles-dir", help="[pathology.tiles_dir] where tiles are (tiled first if missing)")
    p.add_argument("--tiled-only", action="store_true",
                   help="train on the slides already tiled in --tiles-dir, tile none (as a pipeline's PRETRAIN step)")
    add_train_args(p)


def apply_flags(args: argparse.Namespace, cfg: dict) -> dict:
    cfg = apply_train_flags(args, cfg)
    for flag in ("cohorts", "projects"):  # comma-separated on the command line, lists in the config
        if getattr(args, flag, None) is not None:
            set_value(cfg, f"pathology.{flag}", getattr(args, flag).split(","))
    return apply_flag_map(args, cfg, {"data_root": "pathology.data_root", "mpp": "pathology.mpp",
                                      "tiles_dir": "pathology.tiles_dir"})


# -- fm-extract pathology ---------------------------------------------------------------------
def add_extract_args(p: argparse.ArgumentParser) -> None:
    add_cohort_args(p)
    p.add_argument("--tiles-dir", default="fm-runs/tiles", help="tiling output (slides not tiled yet are tiled here)")
    p.add_argument("--output-dir", required=True, help="one <slide_id>.h5 per slide goes here")
    p.add_argument("--encoder", required=True,
                   help="registered name (pathology/phikon-v2, dinov2/vitl14, ...) or a checkpoint file/folder")
    p.add_argument("--weights", help="weights file for a registered encoder (default: looked up locally)")
    p.add_argument("--feature", default="cls", choices=FEATURE_KINDS, help="cls token, or cls + mean patch token")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="features on disk")
    p.add_argument("--batch-size", type=int, help="tiles per forward (default 256 on GPU, 32 on CPU)")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                   help="tile-decoding worker processes (0: decode in this process, no crash isolation)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (LOCAL_RANK picks the GPU under torchrun)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (GPU; pays off on big cohorts)")
    p.add_argument("--input-px", type=int, help="encoder input size (default: the encoder's; 0 keeps the tile size)")
    p.add_argument("--shard", help="INDEX/COUNT: this process extracts every COUNT-th slide (one process per GPU)")
    p.add_argument("--overwrite", action="store_true", help="re-extract slides that already have features")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad slide (default: record, go on)")
    g = p.add_argument_group("tiling of slides not tiled yet (defaults: pathology/configs/tiling.yaml)")
    g.add_argument("--tile-px", type=_int_at_least(MIN_TILE_PX))
    g.add_argument("--target-mpp", type=_positive_float)
    g.add_argument("--min-tissue", type=_fraction)


# -- fm-eval pathology <task> -----------------------------------------------------------------
def _int_at_least(least: int):
    """argparse type: an integer >= `least` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return value


def _add_eval_args(p: argparse.ArgumentParser, task_name: str) -> None:
    if task_name == "csv":
        p.add_argument("table", help="task CSV: slide_id or patient_id, label [, fold] [, split=test rows]")
    add_cohort_args(p)
    p.add_argument("--features-dir", required=True, help="fm-extract output: <slide_id>.h5 per slide")
    p.add_argument("--test-features-dir", help="features of an external test cohort (all members predict it)")
    p.add_argument("--test-labels", help="labels of the external cohort: slide_id or patient_id, label")
    if task_name == "tcga-brca":
        p.add_argument("--labels", help="IDC/ILC labels: CSV with slide_id or patient_id, label (required)")
    p.add_argument("--output-dir", help="results go here (default fm-runs/eval/<task>)")
    p.add_argument("--model", default="abmil", choices=["abmil", "mean"], help="gated attention MIL or mean pooling")
    p.add_argument("--folds", type=_int_at_least(2), default=5, help="cross-validation folds (>= 2)")
    p.add_argument("--seeds", type=_int_at_least(1), default=5, help="fold shuffles, each a set of folds (>= 1)")
    p.add_argument("--epochs", type=_int_at_least(1), default=20)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--max-tiles", type=_int_at_least(1), default=5000,
                   help="tiles sampled per slide per training step (>= 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--drop-missing", action="store_true", help="leave out labelled slides without features")
    p.add_argument("--experiment", default="fm-pathology-eval", help="MLflow experiment")
    p.add_argument("--run-name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or local SQLite)")


def _eval_task(task_name: str, help_text: str) -> Command:
    def run(args: argparse.Namespace) -> dict:
        from pathology.evaluate import run_eval

        return run_eval(args, task_name)

    return Command(help=help_text, run=run, add_args=lambda p: _add_eval_args(p, task_name))


EVAL_TASKS = {
    "tcga-nsclc": _eval_task("tcga-nsclc", "LUAD vs LUSC (label = TCGA project), diagnostic tumour slides"),
    "tcga-brca": _eval_task("tcga-brca", "IDC vs ILC; needs --labels CSV (slide or patient ids)"),
    "demo": _eval_task("demo", "the demo cohort's stroma / tumour / glandular label"),
    "csv": _eval_task("csv", "a user task: `fm-eval pathology csv:TABLE.csv` (or `csv TABLE.csv`)"),
}

DOMAIN = Domain(
    name="pathology",
    help="whole-slide images: tiling, Phikon-v2-style pretraining, extraction, slide-level MIL",
    train=Command(help="tile what is not tiled yet, then pretrain (default config: Phikon-v2 recipe)",
                  run="pathology.pretrain:train", add_args=_add_train_args, apply_flags=apply_flags,
                  default_config=CONFIGS / "phikon_v2.yaml"),
    prepare=Command(help="tissue detection + tiling of a cohort (resumable; one bad slide never stops it)",
                    run="pathology.prepare:prepare", add_args=_add_prepare_args),
    extract=Command(help="tile features of a cohort into <output-dir>/<slide_id>.h5 (resumable, sharded, one bad "
                         "slide never stops it)", run="pathology.extract:run_extract", add_args=add_extract_args),
    eval_tasks=EVAL_TASKS,
    configs_dir=CONFIGS,
)
