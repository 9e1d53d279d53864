"""Per-step schedules of the DINOv2 recipe (lr, weight decay, teacher momentum and temperature).

DINOv2 counts in "epochs" of a fixed number of iterations (1,250 in the official config), so every
schedule here is a numpy array indexed by the global optimiser step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """`freeze_steps` zeros, then a linear warm-up from warmup_start to base, then a half cosine
    from base to final over the remaining steps (DINOv2's CosineScheduler)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    freeze = np.zeros(min(freeze_steps, total_steps))
    # a warm-up longer than the run keeps its slope and is cut off (it is not squeezed)
    warm = np.linspace(warmup_start, base, warmup_steps)[: total_steps - len(freeze)]
    n_cos = total_steps - len(freeze) - len(warm)
    t = np.arange(n_cos)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(n_cos, 1)))
    return np.concatenate([freeze, warm, cos])


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_wrt_1024") -> float:
    """DINOv2 scales lr by sqrt(batch / 1024); `linear_wrt_256` and `none` are offered for other recipes."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; use sqrt_wrt_1024, linear_wrt_256 or none")


@dataclass
class RecipeSchedules:
    lr: np.ndarray
    last_layer_lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    def at(self, step: int) -> dict[str, float]:
        """Values for a step; past the end the final values hold (training may run longer)."""
        i = min(step, len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "last_layer_lr": float(self.last_layer_lr[i]),
            "weight_decay": float(self.weight_decay[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
        }


def build_schedules(optim: dict, model: dict, epochs: int, epoch_length: int, global_batch: int) -> RecipeSchedules:
    total = epochs * epoch_length
    peak_lr = scaled_lr(optim["base_lr"], global_batch, optim["lr_scaling"])
    warmup = int(optim["warmup_epochs"] * epoch_length)
    lr = cosine_schedule(peak_lr, optim["min_lr"], total, warmup)
    last_layer_lr = lr.copy()
    last_layer_lr[: int(optim["freeze_last_layer_epochs"] * epoch_length)] = 0.0
    wd = cosine_schedule(optim["weight_decay"], optim["weight_decay_end"], total)
    mom = model["teacher_momentum"]
    momentum = cosine_schedule(mom["base"], mom["final"], total)
    temp = model["teacher_temp"]
    temp_warm = int(temp["warmup_epochs"] * epoch_length)
    teacher_temp = np.concatenate(
        [np.linspace(temp["warmup_start"], temp["final"], temp_warm), np.full(max(total - temp_warm, 0), temp["final"])]
    )[:total]
    return RecipeSchedules(lr, last_layer_lr, wd, momentum, teacher_temp)
