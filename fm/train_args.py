"""The training flags every domain's `fm-train` shares, apart from fm.train so that building the
parsers (`--help`, `--print-config`) does not import torch and Lightning."""

from __future__ import annotations

import argparse
from pathlib import Path

from fm.config import apply_flags

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# flag -> config key; shared by every domain's `fm-train`
TRAIN_FLAGS = {
    "output_dir": "train.output_dir",
    "devices": "train.devices",
    "nodes": "train.num_nodes",
    "strategy": "train.strategy",
    "precision": "train.precision",
    "accelerator": "train.accelerator",
    "max_steps": "train.max_steps",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
    "init": "model.init",
    "weights": "model.init_weights",
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (each flag overrides the config key in brackets)")
    g.add_argument("--output-dir", help="[train.output_dir] checkpoints, exports and logs go here")
    g.add_argument("--devices", type=int, help="[train.devices] GPUs (or CPU processes) per node")
    g.add_argument("--nodes", type=int, help="[train.num_nodes] nodes (SLURM: one task per GPU)")
    g.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], help="[train.strategy]")
    g.add_argument("--precision", help="[train.precision] e.g. bf16-mixed, 32-true")
    g.add_argument("--accelerator", help="[train.accelerator] auto | cpu | gpu")
    g.add_argument("--max-steps", type=int, help="[train.max_steps] stop after this many steps")
    g.add_argument("--batch-size", type=int, help="[data.batch_size] per device")
    g.add_argument("--num-workers", type=int, help="[data.num_workers] data loading processes per device")
    g.add_argument("--from", dest="init", metavar="ENCODER",
                   help="[model.init] continue pretraining from a registered encoder or checkpoint path")
    g.add_argument("--weights", help="[model.init_weights] weights file for --from (else looked up)")


def apply_train_flags(args: argparse.Namespace, cfg: dict) -> dict:
    return apply_flags(args, cfg, TRAIN_FLAGS)
