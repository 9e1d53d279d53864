"""The `core` domain: the DINOv2 recipe on built-in synthetic textures (no domain data needed).

`fm-train core` pretrains, then reports kNN accuracy of the frozen teacher CLS features on the hidden
texture classes, next to the same network at initialisation. It lives in `evaluation` (not `fm`)
because it evaluates, and evaluation may import fm but not the other way round. Torch is imported
inside the functions: every fm-* command loads this module to build its parsers.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fm.domains import Command, Domain
from fm.train_args import CONFIGS_DIR, add_train_args, apply_train_flags

if TYPE_CHECKING:
    import torch

    from fm.backbones import ViTBackbone
    from fm.demo_images import DemoTextures

CONFIGS = CONFIGS_DIR / "core"


def embed_images(backbone: ViTBackbone, images: torch.Tensor, mean, std, batch: int = 256) -> torch.Tensor:
    import torch

    backbone.eval()
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        feats = [backbone((images[i : i + batch] - mean_t) / std_t) for i in range(0, len(images), batch)]
        return torch.cat(feats).float()


def texture_knn_accuracy(backbone: ViTBackbone, cfg: dict, n_train: int = 512, n_test: int = 256) -> float:
    """kNN accuracy (k=20, cosine, DINO weighting) on held-out demo images resized to the global crop."""
    import torch

    from evaluation.knn import knn_classify
    from fm.demo_images import DemoTextures

    size = cfg["crops"]["global_size"]
    data = DemoTextures(n=n_train + n_test, size=size, seed=cfg["data"]["seed"] + 12345)
    images = torch.stack([data.get(i) for i in range(len(data))])
    labels = torch.from_numpy(data.labels())
    feats = embed_images(backbone, images, cfg["crops"]["mean"], cfg["crops"]["std"])
    pred, _ = knn_classify(feats[:n_train], labels[:n_train], feats[n_train:], k=20)
    return float((torch.as_tensor(pred) == labels[n_train:]).float().mean())


def demo_source(cfg: dict) -> DemoTextures:
    from fm.demo_images import DemoTextures

    d = cfg["data"]
    return DemoTextures(n=d["demo_images"], size=d["demo_size"], seed=d["seed"])


def train(args: argparse.Namespace) -> dict:
    import lightning as L

    from fm.train import build_module, run_pretraining

    cfg = apply_train_flags(args, args.cfg)
    L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)  # as run_pretraining seeds: the
    baseline = texture_knn_accuracy(build_module(cfg).backbone, cfg)  # very network training starts from
    result = run_pretraining(cfg, demo_source(cfg))
    trained = texture_knn_accuracy(result.module.backbone, cfg)
    from fm.tracking import tracked_run

    with tracked_run(cfg["tracking"]["experiment"], run_name="knn-demo-textures", config=cfg,
                     tracking_uri=cfg["tracking"]["tracking_uri"], tags={"pretrain_run": result.run_id or ""}) as run:
        run.log_metrics({"knn_acc/init": baseline, "knn_acc/trained": trained})
    print(f"kNN accuracy on the hidden texture classes (chance {1 / 4:.2f}): "
          f"at initialisation {baseline:.3f}, after pretraining {trained:.3f}")
    print(f"teacher weights: {result.export}")
    return {"knn_init": baseline, "knn_trained": trained, "export": str(result.export)}


train.apply_flags = apply_train_flags  # lets --print-config show flag values too

DOMAIN = Domain(
    name="core",
    help="DINOv2 recipe on built-in synthetic textures (no data needed)",
    train=Command(help="pretrain on synthetic textures, then report kNN accuracy vs initialisation",
                  run=train, add_args=add_train_args, default_config=CONFIGS / "demo_cpu.yaml"),
    configs_dir=CONFIGS,
)


