"""The `earthobs` domain of the fm-* commands.

    fm-train earthobs --data ssl4eo:ROOT --labels dw.json --modality s2 --init dinov2/vitb14
    fm-train earthobs --preset demo_cpu                      # tiny CPU demo on generated scenes
    fm-prepare earthobs bigearthnet --root DIR --out CACHE --split train --fraction 0.1
    fm-eval earthobs bigearthnet --encoder earthobs/softcon-vitb14-s2 --root DIR --protocol linear
    fm-eval earthobs eurosat --encoder runs/export/teacher.safetensors --root DIR
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from earthobs.choices import DATASETS, DTYPES, INIT_MODES, NAN_POLICIES, PROTOCOLS
from fm.config import apply_flags, resolve_config
from fm.domains import Command, Domain
from fm.train_args import add_train_args, apply_train_flags

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = ("softcon_vitb14_s2", "demo_cpu")

TRAIN_FLAGS = {"modality": "data.modality", "data": "data.source", "labels": "data.labels",
               "packed": "data.packed_dir", "init_mode": "model.init_mode", "nan_policy": "data.nan_policy"}
EVAL_FLAGS = {"encoder": "encoder", "weights": "weights", "root": "root", "packed": "packed_dir",
              "version": "version", "modality": "modality", "nan_policy": "nan_policy", "protocol": "protocol",
              "train_fraction": "train_fraction", "seed": "seed", "splits": "splits", "image_size": "image_size",
              "batch_size": "batch_size", "num_workers": "num_workers", "device": "device",
              "output_dir": "output_dir"}


# -- fm-train earthobs -----------------------------------------------------------------------------------


def add_train_cli(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("earth observation (each flag overrides the config key in brackets)")
    g.add_argument("--preset", choices=PRESETS, help="start from this shipped config instead of softcon_vitb14_s2 "
                   "(demo_cpu: tiny ViT on generated scenes, about a minute on a CPU)")
    g.add_argument("--data", metavar="SOURCE", help="[data.source] demo | bigearthnet:ROOT | ssl4eo:ROOT")
    g.add_argument("--modality", choices=["s2", "s1"],
                   help="[data.modality] s2: 13-band L1C (zero B10 for 12-band data); s1: [VV, VH]")
    g.add_argument("--labels", metavar="JSON", help="[data.labels] SSL4EO-S12 Dynamic World multi-hot labels")
    g.add_argument("--packed", metavar="DIR", help="[data.packed_dir] pack the training split here once, then memory-map it")
    g.add_argument("--nan-policy", choices=NAN_POLICIES, help="[data.nan_policy] NaN/inf/nodata pixels in the "
                   "GeoTIFFs: raise (the patch is replaced by another, or skipped by a --packed cache) or zero (fill with 0)")
    g.add_argument("--init", dest="init", metavar="ENCODER",
                   help="[model.init] same as --from: registered encoder (dinov2/vitb14) or checkpoint to continue")
    g.add_argument("--init-mode", choices=["auto", *INIT_MODES],
                   help="[model.init_mode] first-layer adaptation to the input bands (auto: rgb_map if possible)")
    add_train_args(p)


def apply_train_cli(args: argparse.Namespace, cfg: dict) -> dict:
    if getattr(args, "preset", None):
        cfg = resolve_config(CONFIGS / f"{args.preset}.yaml", args.config, args.overrides)
    cfg = apply_flags(args, apply_train_flags(args, cfg), TRAIN_FLAGS)
    from earthobs.ssl_data import modality_bands

    cfg["model"]["backbone"]["in_chans"] = len(modality_bands(cfg["data"]["modality"]))  # shown by --print-config
    return cfg


# kNN shows what pretraining adds on the demo scenes; a linear probe on their spectra is already near
# its ceiling at initialisation (the classes differ linearly in mean spectrum)
DEMO_PROTOCOLS = ("knn", "linear")


def train(args: argparse.Namespace) -> dict:
    import lightning as L

    from earthobs.softcon_module import build_softcon_module, run_softcon_pretraining

    cfg = apply_train_cli(args, args.cfg)
    labels = cfg["data"]["labels"]
    if labels and not Path(labels).is_file():
        raise FileNotFoundError(f"--labels {labels}: no such file")
    demo = cfg["data"]["source"] == "demo"
    before = None
    if demo:  # the same network at initialisation: seeded exactly as run_softcon_pretraining seeds it
        from earthobs.evaluate import demo_probe

        L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)
        initial = build_softcon_module(copy.deepcopy(cfg)).backbone
        before = {p: demo_probe(initial, cfg, p) for p in DEMO_PROTOCOLS}
    result = run_softcon_pretraining(cfg)
    summary = {"export": str(result.export), "run_id": result.run_id}
    if demo:
        from fm.tracking import tracked_run

        after = {p: demo_probe(result.module.backbone, cfg, p) for p in DEMO_PROTOCOLS}
        tr = cfg["tracking"]
        with tracked_run(tr["experiment"], run_name="probe-demo-scenes", config=cfg, tracking_uri=tr["tracking_uri"],
                         tags={"pretrain_run": result.run_id or ""}) as run:
            for p in DEMO_PROTOCOLS:
                run.log_metrics({**{f"init/{p}/{k}": v for k, v in before[p].items()},
                                 **{f"trained/{p}/{k}": v for k, v in after[p].items()}})
        for p in DEMO_PROTOCOLS:
            print(f"{p} micro mAP on held-out demo scenes: at initialisation {before[p]['map_micro']:.3f}, "
                  f"after pretraining {after[p]['map_micro']:.3f}")
        summary.update(before=before, after=after)
    print(f"teacher weights: {result.export}")
    return summary


train.apply_flags = apply_train_cli  # lets --print-config show presets and flag values


# -- fm-prepare earthobs ---------------------------------------------------------------------------------


def add_prepare_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=DATASETS, help="data set to pack")
    p.add_argument("--root", help="the data set's folder (demo: cache dir of the generated scenes)")
    p.add_argument("--output-dir", "--out", dest="out", required=True,
                   help="cache root: packs go to <output-dir>/<dataset>/<sensor>/<split>, where bigearthnet is "
                        "bigearthnet-v1 or -v2 (v2 when the root holds metadata.parquet), as fm-eval/fm-train --packed read it")
    p.add_argument("--split", default="train", help="split to pack, or 'all' (default: train)")
    p.add_argument("--sensor", default="s2", help="s2 | s1 | s1s2 (BigEarthNet); s2 | s1 (SSL4EO-S12)")
    p.add_argument("--dtype", choices=DTYPES, help="float16 (default for a new cache) | float32 | uint16; an "
                   "existing cache of another dtype is refused (use --overwrite)")
    p.add_argument("--fraction", type=float, help="pack only this fraction (the saved, seeded subset list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", help="SSL4EO-S12 labels JSON")
    p.add_argument("--nan-policy", choices=NAN_POLICIES, default="raise",
                   help="NaN/inf/nodata pixels: raise (the patch is skipped and listed) or zero (fill with 0)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="repack even when a cache exists (else one packed for another request is refused)")


def prepare_cmd(args: argparse.Namespace) -> Path:
    from earthobs.prepare import prepare

    if args.dataset not in ("demo",) and not args.root:
        raise ValueError(f"--root is required for {args.dataset}")
    kwargs = {"labels": args.labels} if args.labels else {}
    return prepare(args.dataset, args.root, args.out, split=None if args.split == "all" else args.split,
                   sensor=args.sensor, dtype=args.dtype, fraction=args.fraction, seed=args.seed,
                   num_workers=args.num_workers, overwrite=args.overwrite, nan_policy=args.nan_policy,
                   say=print, **kwargs)  # what was packed and skipped, or that an existing cache is reused


# -- fm-eval earthobs <task> -----------------------------------------------------------------------------


def add_eval_cli(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (each flag overrides the config key in brackets)")
    g.add_argument("--encoder", help="[encoder] registered encoder name or checkpoint path")
    g.add_argument("--weights", help="[weights] weights file for a registered encoder")
    g.add_argument("--root", help="[root] data set folder")
    g.add_argument("--packed", metavar="DIR", help="[packed_dir] pack the splits here once and memory-map them")
    g.add_argument("--version", choices=["auto", "v1", "v2"], help="[version] BigEarthNet version")
    g.add_argument("--modality", choices=["s2", "s1"], help="[modality]")
    g.add_argument("--nan-policy", choices=NAN_POLICIES, help="[nan_policy] NaN/inf/nodata pixels in the GeoTIFFs: "
                   "raise (the patch is skipped) or zero (fill with 0)")
    g.add_argument("--protocol", choices=PROTOCOLS, help="[protocol]")
    g.add_argument("--train-fraction", type=float, help="[train_fraction] e.g. 0.1 for BigEarthNet-10 %%")
    g.add_argument("--seed", type=int, help="[seed] draws the training subset and seeds the probe")
    g.add_argument("--splits", choices=["official", "all"],
                   help="[splits] official train/test lists, or all samples in both (pipeline check only)")
    g.add_argument("--image-size", type=int, help="[image_size] encoder input size")
    g.add_argument("--batch-size", type=int, help="[batch_size]")
    g.add_argument("--num-workers", type=int, help="[num_workers]")
    g.add_argument("--device", help="[device] auto | cpu | cuda")
    g.add_argument("--output-dir", help="[output_dir]")


def apply_eval_cli(args: argparse.Namespace, cfg: dict) -> dict:
    return apply_flags(args, cfg, EVAL_FLAGS)


def _eval_runner(task: str):
    def run(args: argparse.Namespace) -> dict:
        from earthobs.evaluate import evaluate_task
        from evaluation.reporting import to_markdown

        cfg = apply_eval_cli(args, args.cfg)
        out = evaluate_task(task, cfg)
        print(out["markdown"])
        print()
        print(to_markdown(out["per_class"]))
        if out["subset_file"] is not None:
            print(f"\ntraining subset ({out['n_train']} samples): {out['subset_file']}")
        return out

    run.apply_flags = apply_eval_cli
    return run


DOMAIN = Domain(
    name="earthobs",
    help="earth observation: SoftCon continual pretraining on Sentinel-1/2, BigEarthNet and EuroSAT evaluation",
    train=Command(help="SoftCon continual pretraining (multispectral / SAR), optionally with the DINOv2 loss",
                  run=train, add_args=add_train_cli, default_config=CONFIGS / "softcon_vitb14_s2.yaml"),
    prepare=Command(help="pack a data set split into a memory-mappable cache", run=prepare_cmd,
                    add_args=add_prepare_cli),
    eval_tasks={
        "bigearthnet": Command(help="BigEarthNet-19 multi-label: frozen encoder, linear / knn / last4, micro mAP",
                               run=_eval_runner("bigearthnet"), add_args=add_eval_cli,
                               default_config=CONFIGS / "eval_bigearthnet.yaml"),
        "eurosat": Command(help="EuroSAT-MS 10 classes: frozen encoder, linear / knn / last4, accuracy",
                           run=_eval_runner("eurosat"), add_args=add_eval_cli,
                           default_config=CONFIGS / "eval_eurosat.yaml"),
    },
    configs_dir=CONFIGS,
)
