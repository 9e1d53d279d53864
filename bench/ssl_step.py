"""Images/s of one DINOv2 recipe step versus baselines measured in the same run.

Measured variants (same model, batch, crops, prototypes):
  recipe      our step: teacher forward on the global crops + student forward/backward over all crops
              (crops of one size as one batch, batch-subset drop path) + optimiser + EMA
  naive       the same step with classic per-sample drop path (every residual computed)
  plain       a plain student forward+backward on the 2 global crops only (the issue's in-run baseline)
Prints img/s for each and the ratios. Images = samples (each with 2 global + N local crops).

  python bench/ssl_step.py --device cpu                      # tiny model, a few steps
  python bench/ssl_step.py --device cuda --preset vitl16     # ViT-L/16, batch 64, 2x224 + 8x96, 65,536 protos
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fm.config import resolve_config
from fm.masking import sample_crop_masks
from fm.ssl_module import DINOv2Module, ema_update_

CONFIGS = Path(__file__).resolve().parents[1] / "fm" / "configs" / "core"
PRESETS = {
    "tiny": ["model.backbone.arch=vitt", "model.backbone.patch_size=8", "model.backbone.embed_dim=96",
             "model.backbone.depth=4", "model.backbone.num_heads=3", "model.dino.n_prototypes=1024",
             "model.ibot.n_prototypes=1024", "crops.global_size=64", "crops.local_size=32", "data.batch_size=16"],
    "vitl16": [],
    "vitl14": ["model.backbone.patch_size=14", "crops.local_size=98", "model.dino.n_prototypes=131072",
               "model.dino.bottleneck_dim=384", "model.ibot.separate_head=true", "model.ibot.n_prototypes=131072",
               "model.ibot.bottleneck_dim=384", "model.dino.centering=sinkhorn_knopp", "data.batch_size=32"],
    "vitb14": ["model.backbone.arch=vitb", "model.backbone.patch_size=14", "crops.local_size=98"],
}


def make_batch(cfg: dict, device: torch.device) -> dict:
    c, b = cfg["crops"], cfg["data"]["batch_size"]
    p = cfg["model"]["backbone"]["patch_size"]
    grid = (c["global_size"] // p,) * 2
    gen = torch.Generator().manual_seed(0)
    masks = sample_crop_masks(2 * b, grid, np.random.default_rng(0))
    return {
        "global_crops": torch.randn(2 * b, 3, c["global_size"], c["global_size"], generator=gen).to(device),
        "local_crops": torch.randn(c["n_local"] * b, 3, c["local_size"], c["local_size"], generator=gen).to(device),
        "masks": torch.from_numpy(masks).to(device),
    }


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def recipe_step_fn(module: DINOv2Module, opt, batch: dict, bf16: bool, device: torch.device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 0)
        loss.backward()
        module.configure_gradient_clipping(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update_(module.teacher, module.student, 0.999)

    return step


def plain_step_fn(module: DINOv2Module, opt, batch: dict, bf16: bool, device: torch.device):
    backbone = module.student["backbone"]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = backbone(batch["global_crops"]).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbones (recipe variant)")
    ap.add_argument("--variants", default="recipe,naive,plain")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    device = torch.device(args.device)
    preset = args.preset or ("vitl16" if device.type == "cuda" else "tiny")
    steps = args.steps or (20 if device.type == "cuda" else 5)
    warmup = args.warmup or (5 if device.type == "cuda" else 2)
    bf16 = device.type == "cuda"
    cfg = resolve_config(CONFIGS / "dinov2_vitl16.yaml", overrides=PRESETS[preset] + args.overrides)
    b = cfg["data"]["batch_size"]
    batch = make_batch(cfg, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"preset={preset} device={device} batch={b} crops=2x{cfg['crops']['global_size']}+"
          f"{cfg['crops']['n_local']}x{cfg['crops']['local_size']} prototypes={cfg['model']['dino']['n_prototypes']} "
          f"bf16={bf16} compile={args.compile}")
    results = {}
    for variant in args.variants.split(","):
        cfg_v = resolve_config(CONFIGS / "dinov2_vitl16.yaml", overrides=PRESETS[preset] + args.overrides)
        cfg_v["optim"]["freeze_last_layer_epochs"] = 0
        if variant == "naive":
            cfg_v["model"]["backbone"]["drop_path_mode"] = "per_sample"
        module = DINOv2Module(cfg_v).to(device)
        module.train()
        if variant == "recipe" and args.compile:
            for branch in (module.student, module.teacher):
                branch["backbone"].compile()
        opt = module.configure_optimizers()
        fn = (plain_step_fn if variant == "plain" else recipe_step_fn)(module, opt, batch, bf16, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(fn, steps, warmup, device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[variant] = b / sec
        print(f"{variant:>7}: {b / sec:9.1f} img/s  ({sec * 1000:8.1f} ms/step, peak {mem:.1f} GiB)")
        del module, opt, fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "recipe" in results:
        for other in ("naive", "plain"):
            if other in results:
                print(f"ratio recipe/{other}: {results['recipe'] / results[other]:.3f}")


if __name__ == "__main__":
    main()
