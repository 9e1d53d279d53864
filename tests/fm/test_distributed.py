"""Multi-process training through Lightning's DDP (2 CPU processes, gloo): what a multi-GPU/SLURM run
exercises, minus the GPUs. Slow (process start-up), so run with `make test-slow`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

TINY = ["--set", "model.backbone.embed_dim=48", "--set", "model.backbone.depth=2", "--set", "model.backbone.num_heads=3",
        "--set", "model.dino.n_prototypes=64", "--set", "model.ibot.n_prototypes=64", "--set", "crops.n_local=2",
        "--set", "model.dino.centering=sinkhorn_knopp"]


@pytest.mark.slow
def test_ddp_two_processes_train_and_export(tmp_path):
    exe = Path(sys.executable).parent / "fm-train"
    out = tmp_path / "run"
    cmd = [str(exe), "core", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--max-steps", "3",
           "--batch-size", "8", "--output-dir", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = out / "export" / "teacher.safetensors"
    with safe_open(str(export), "pt") as f:
        assert f.metadata()["steps"] == "3"
    assert (out / "checkpoints" / "last.ckpt").is_file()
