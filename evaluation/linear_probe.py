"""Linear probe on frozen features: the standard "how linearly separable is the representation" test.

Features are standardised with the training mean/std (encoders differ wildly in feature scale, and
one learning rate should suit them all), then a single `nn.Linear` is trained with AdamW and a
cosine schedule on tensors held in memory: no data loader, no disk I/O per step, seconds on a CPU
for typical benchmark sizes. The fit is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluation.metrics import accuracy, average_precision_micro
from fm.host import intra_op_threads

TASK_LOSSES = {"multiclass": ("cross_entropy",), "multilabel": ("bce", "multilabel_soft_margin")}


class LinearProbe(nn.Module):
    """Standardisation (train mean/std, stored as buffers) followed by one linear layer."""

    def __init__(self, in_dim: int, out_dim: int, task: str):
        super().__init__()
        self.task = task
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, out_dim)
        self.lr: float | None = None
        self.val_metric: float | None = None
        self.sweep: dict[float, float] = {}
        self.history: list[float] = []

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.mean) / self.std)

    @torch.no_grad()
    def predict_logits(self, feats: Any, batch_size: int = 8192) -> torch.Tensor:
        x = _features(feats, "feats", self.mean.device)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"feats have dim {x.shape[1]} but the probe was fitted on dim {self.mean.shape[0]}"
            )
        return torch.cat([self(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]).cpu()

    def predict_scores(self, feats: Any) -> np.ndarray:
        """Class probabilities (softmax) for multiclass, per-label probabilities (sigmoid) for multilabel."""
        logits = self.predict_logits(feats)
        scores = logits.softmax(dim=1) if self.task == "multiclass" else logits.sigmoid()
        return scores.numpy()

    def predict(self, feats: Any, threshold: float = 0.5) -> np.ndarray:
        """Class ids (multiclass) or multi-hot labels with probability >= threshold (multilabel)."""
        scores = self.predict_scores(feats)
        return scores.argmax(axis=1) if self.task == "multiclass" else (scores >= threshold).astype(np.int64)


def _features(values: Any, name: str, device: torch.device | str) -> torch.Tensor:
    x = torch.as_tensor(values).to(device=device, dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _targets(values: Any, name: str, task: str, n: int, num_classes: int | None, device) -> torch.Tensor:
    y = torch.as_tensor(values).to(device)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but its features have {n} rows")
    if task == "multiclass":
        y = y.long().ravel()
        if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must hold class ids in [0, {num_classes}), got [{y.min()}, {y.max()}]")
        return y
    if y.ndim != 2 or not torch.isin(y, torch.tensor([0, 1], device=device)).all():
        raise ValueError(f"{name} must be an (N, C) multi-hot matrix of 0/1 for a multilabel probe")
    return y.float()


def _loss_fn(task: str, loss: str | None) -> nn.Module:
    loss = loss or TASK_LOSSES[task][0]
    if loss not in TASK_LOSSES[task]:
        raise ValueError(f"loss {loss!r} does not suit task {task!r}; choose one of {TASK_LOSSES[task]}")
    return {
        "cross_entropy": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
        "multilabel_soft_margin": nn.MultiLabelSoftMarginLoss,
    }[loss]()


def _train_one(
    x: torch.Tensor,
    y: torch.Tensor,
    probe: LinearProbe,
    loss_fn: nn.Module,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    nn.init.normal_(probe.linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(probe.linear.bias)
    optimizer = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    probe.history = []
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(probe.linear(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * idx.numel()
        probe.history.append(total / x.shape[0])


def _validation_metric(probe: LinearProbe, feats: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy (multiclass) or micro AP (multilabel): what the lr sweep maximises."""
    scores = probe.predict_scores(feats)
    if probe.task == "multiclass":
        return accuracy(targets.cpu().numpy(), scores.argmax(axis=1))
    return average_precision_micro(targets.cpu().numpy(), scores)


def fit_linear_probe(
    train_feats: Any,
    train_targets: Any,
    val_feats: Any = None,
    val_targets: Any = None,
    task: str = "multiclass",
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    loss: str | None = None,
    lrs: Sequence[float] | None = None,
    num_classes: int | None = None,
    cpu_threads: int | None = 1,
) -> LinearProbe:
    """Fit a linear probe; with `lrs` (needs a validation split) keep the lr with the best val metric.

    `train_targets`: class ids (multiclass) or an (N, C) multi-hot matrix (multilabel). Losses:
    cross_entropy; bce (default) or multilabel_soft_margin. The returned probe carries `.lr`,
    `.sweep` ({lr: val metric}), `.val_metric` (when a val split is given) and `.history`
    (mean train loss per epoch). On CPU the fit runs with `cpu_threads` intra-op threads (None: keep
    torch's setting): one linear layer's step is too small to gain from threads, and on a busy machine
    OpenMP threads waiting for each other made it 10-40x slower in our measurements.
    """
    if task not in TASK_LOSSES:
        raise ValueError(f"task must be one of {tuple(TASK_LOSSES)}, got {task!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if (val_feats is None) != (val_targets is None):
        raise ValueError("give both val_feats and val_targets, or neither")
    if lrs and val_feats is None:
        raise ValueError("an lr sweep (lrs=...) needs a validation split (val_feats, val_targets)")
    loss_fn = _loss_fn(task, loss)
    x = _features(train_feats, "train_feats", device)
    y = _targets(train_targets, "train_targets", task, x.shape[0], num_classes, device)
    if task == "multiclass":
        num_classes = num_classes or int(y.max()) + 1
    out_dim = num_classes if task == "multiclass" else y.shape[1]
    val = None
    if val_feats is not None:
        vx = _features(val_feats, "val_feats", device)
        if vx.shape[1] != x.shape[1]:
            raise ValueError(f"val_feats have dim {vx.shape[1]} but train_feats have dim {x.shape[1]}")
        vy = _targets(val_targets, "val_targets", task, vx.shape[0], num_classes, device)
        if task == "multilabel" and vy.shape[1] != out_dim:
            raise ValueError(f"val_targets have {vy.shape[1]} labels but train_targets have {out_dim}")
        val = (vx, vy)

    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_standard = (x - mean) / std
    best: LinearProbe | None = None
    sweep: dict[float, float] = {}
    with intra_op_threads(cpu_threads if torch.device(device).type == "cpu" else None):
        for candidate in lrs or [lr]:
            probe = LinearProbe(x.shape[1], out_dim, task).to(device)
            probe.mean.copy_(mean)
            probe.std.copy_(std)
            _train_one(x_standard, y, probe, loss_fn, epochs, candidate, weight_decay, batch_size, seed)
            probe.lr = candidate
            if val is not None:
                probe.val_metric = _validation_metric(probe, *val)
                sweep[candidate] = probe.val_metric
            if best is None or (probe.val_metric is not None and probe.val_metric > best.val_metric):
                best = probe
    best.sweep = sweep
    return best.eval()
