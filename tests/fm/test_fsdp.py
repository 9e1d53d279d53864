"""`fm-train --strategy fsdp` with 2 CPU processes (gloo), checked against the same run under DDP.

Same seeds and per-rank data, so FSDP must reproduce DDP's weights: this covers what FSDP's flattened,
sharded parameters can break (EMA teacher, per-submodule clipping, prototypes frozen in the first steps,
checkpoint, resume, export). KoLeo is off in both runs: on the nearly collapsed CLS features of a freshly
initialised tiny ViT its nearest-neighbour distances are ~1e-9, so it turns float rounding differences
between the two strategies into O(1) gradient differences (with it on, DDP and FSDP agree only before
step 2). Slow (process start-up), so run with `make test-slow`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open

from fm.config import resolve_config
from fm.registry import load_encoder
from fm.train import build_module

TINY = ["--set", "model.backbone.embed_dim=48", "--set", "model.backbone.depth=2", "--set", "model.backbone.num_heads=3",
        "--set", "model.dino.n_prototypes=64", "--set", "model.ibot.n_prototypes=64", "--set", "crops.n_local=2",
        "--set", "model.dino.centering=sinkhorn_knopp"]
# 2-step epochs: lr warm-up, teacher momentum and temperature move within 4 steps; prototypes are frozen in
# the first epoch (steps 0-1).
RECIPE = ["--set", "model.koleo_weight=0", "--set", "train.epoch_length=2",
          "--set", "optim.freeze_last_layer_epochs=1", "--set", "train.checkpoint_every=2"]
LAST_LAYER = "student.dino_head.last_layer.weight_v"


def _train(strategy: str, out: Path, steps: int) -> str:
    exe = Path(sys.executable).parent / "fm-train"
    cmd = [str(exe), "core", "--accelerator", "cpu", "--devices", "2", "--strategy", strategy, "--max-steps",
           str(steps), "--batch-size", "8", "--output-dir", str(out), *TINY, *RECIPE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _state(out: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / f"step{step:07d}.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step
    return ckpt["state_dict"]


def _assert_matches(fsdp: dict, ddp: dict, init: dict, where: str) -> None:
    """FSDP's tensors equal DDP's up to float rounding: a difference under 1e-3 of how far the tensor
    moved from initialisation (measured ~1e-5). Wrong EMA, clipping or optimizer state gives O(1)."""
    assert fsdp.keys() == ddp.keys()
    for key, want in ddp.items():
        got = fsdp[key]
        assert got.shape == want.shape, f"{where} {key}: {tuple(got.shape)} (FSDP) vs {tuple(want.shape)}"
        if key.startswith(("student.", "teacher.")):
            moved = (want - init[key]).norm()
            assert (got - want).norm() <= 1e-3 * moved + 1e-7, f"{where} {key}: FSDP differs from DDP"


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_and_exports_the_teacher(tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _train("ddp", ddp, 4)
    _train("fsdp", fsdp, 2)
    resumed = _train("fsdp", fsdp, 4)  # continues from checkpoints/last.ckpt (step 2)
    assert "Restored all states from the checkpoint" in resumed

    cfg = resolve_config(fsdp / "config.yaml")
    L.seed_everything(cfg["train"]["seed"], verbose=False)  # as run_pretraining does before building
    init = build_module(cfg).state_dict()
    f2, f4, d2, d4 = _state(fsdp, 2), _state(fsdp, 4), _state(ddp, 2), _state(ddp, 4)

    assert torch.equal(f2[LAST_LAYER], init[LAST_LAYER]), "prototypes must stay frozen for 2 steps"
    assert not torch.equal(f4[LAST_LAYER], init[LAST_LAYER])
    _assert_matches(f2, d2, init, "step 2")
    _assert_matches(f4, d4, init, "step 4 (resumed)")
    teacher = [k for k in f4 if k.startswith("teacher.")]
    unmoved = [k for k in teacher if torch.equal(f4[k], f2[k])]
    assert not unmoved, f"teacher tensors not moved by the EMA between steps 2 and 4: {unmoved[:5]}"
    same = [k for k in teacher if torch.equal(f4[k], f4["student." + k.removeprefix("teacher.")])]
    assert not same, f"teacher equals student: {same[:5]}"

    # The export (gathered by fm.train.unwrap_fsdp) and the checkpoint (Lightning's full state dict) are
    # two gathering paths; both load into plain backbones that give the trained teacher's features.
    export = fsdp / "export" / "teacher.safetensors"
    with safe_open(str(export), "pt") as f:
        assert f.metadata()["steps"] == "4"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = load_encoder(export).backbone(x)
        checkpointed = load_encoder(fsdp / "checkpoints" / "step0000004.ckpt").backbone(x)
        student = load_encoder(fsdp / "checkpoints" / "step0000004.ckpt", branch="student").backbone(x)
        ddp_teacher = load_encoder(ddp / "export" / "teacher.safetensors").backbone(x)
    assert torch.equal(exported, checkpointed)
    torch.testing.assert_close(exported, ddp_teacher, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exported, student, rtol=1e-4, atol=1e-5), "the export must be the teacher"
