"""Parameter groups of the DINOv2 recipe: layer-wise lr decay, patch-embed lr x0.2, no weight decay on
biases / norms / LayerScale, and a flag for the prototype layer (frozen during the first epoch)."""

from __future__ import annotations

from collections import defaultdict

from torch import nn


def _layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i+1 for block i, depth+1 for everything after the blocks (final norm, heads)."""
    if not name.startswith("backbone."):
        return depth + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
        return 0
    if ".blocks." in name:
        return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return depth + 1


def param_groups(
    student: nn.ModuleDict, depth: int, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2
) -> list[dict]:
    """Group the student's trainable parameters by (lr multiplier, wd multiplier, is last layer).

    The multipliers are stored in each group; the per-step hook multiplies the scheduled lr / wd by them.
    """
    grouped: dict[tuple, list] = defaultdict(list)
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layerwise_decay ** (depth + 1 - _layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or ".gamma" in name
        wd_mult = 0.0 if no_wd else 1.0
        is_last = "last_layer" in name
        grouped[(round(lr_mult, 12), wd_mult, is_last)].append(p)
    return [
        {"params": ps, "lr_mult": lr, "wd_mult": wd, "is_last_layer": last, "lr": 0.0, "weight_decay": 0.0}
        for (lr, wd, last), ps in sorted(grouped.items(), key=lambda kv: kv[0])
    ]


def apply_schedule(optimizer, lr: float, last_layer_lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]
