"""SoftCon objective: instance contrast plus a soft contrast guided by multi-label land-cover vectors.

SoftCon (Wang, Albrecht, Zhu, arXiv 2405.20462) released no training code, so the form below is our
reconstruction from the paper's figure and text, and every constant is a parameter:

- S = cosine similarity of the student embeddings (masked view) with the teacher embeddings (full view,
  no gradient) over the batch;
- instance term: InfoNCE on S / temperature with the diagonal as positives (both directions when
  `symmetric`);
- soft term: target T_ij = cosine similarity of the multi-hot label vectors of images i and j (T_ii = 1;
  a pair where either image has no label falls back to the identity), either as element-wise binary
  cross-entropy on sigmoid(a * S_ij + b) (`bce`, SigLIP-like) or as cross-entropy of the softmax of
  S / temperature against the row-normalised T (`ce`);
- loss = instance + soft_weight * soft.

Defaults (temperature 0.1, a = 10, b = -5, lambda = 1) are our choice, not published values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SOFT_MODES = ("bce", "ce")


def soft_targets(labels: torch.Tensor) -> torch.Tensor:
    """T_ij = cos(y_i, y_j) for multi-hot rows; identity wherever i or j has no label; T_ii = 1."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be (B, K) multi-hot, got shape {tuple(labels.shape)}")
    labels = labels.float()
    labelled = labels.abs().sum(dim=1) > 0
    unit = F.normalize(labels, dim=1)
    sim = unit @ unit.T
    both = labelled[:, None] & labelled[None, :]
    eye = torch.eye(labels.shape[0], dtype=sim.dtype, device=sim.device)
    sim = torch.where(both, sim, eye)
    return torch.maximum(sim, eye)  # T_ii = 1 even for unlabelled rows (and against rounding)


def info_nce(logits: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Cross-entropy of each row of `logits` against its diagonal entry (and of each column if symmetric)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Cross-entropy of softmax rows of `logits` against the rows of `targets` normalised to sum 1.
    T is symmetric, so the column direction uses the same normalised rows against logits.T."""
    probs = targets / targets.sum(dim=1, keepdim=True)
    loss = -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    if symmetric:
        loss_t = -(probs * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
        loss = 0.5 * (loss + loss_t)
    return loss


class SoftConLoss(nn.Module):
    """SoftCon loss over a batch of student/teacher embeddings and multi-hot labels.

    Args:
        temperature: softmax temperature of the instance term (and of the `ce` soft term unless
            `soft_temperature` is given).
        soft_weight: lambda, the weight of the soft term.
        soft_mode: `bce` (element-wise sigmoid BCE) or `ce` (soft-target cross-entropy).
        bce_scale, bce_bias: a and b in sigmoid(a * S + b).
        learnable_bce: learn a (as log a, so it stays positive) and b, as SigLIP does.
        symmetric: average the student->teacher and teacher->student directions.
        soft_temperature: temperature of the `ce` soft term; None = `temperature`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        soft_weight: float = 1.0,
        soft_mode: str = "bce",
        bce_scale: float = 10.0,
        bce_bias: float = -5.0,
        learnable_bce: bool = False,
        symmetric: bool = True,
        soft_temperature: float | None = None,
    ):
        super().__init__()
        if soft_mode not in SOFT_MODES:
            raise ValueError(f"unknown soft_mode {soft_mode!r}; use one of {SOFT_MODES}")
        if temperature <= 0 or (soft_temperature is not None and soft_temperature <= 0):
            raise ValueError(f"temperatures must be > 0, got {temperature} and {soft_temperature}")
        if bce_scale <= 0:
            raise ValueError(f"bce_scale must be > 0, got {bce_scale}")
        self.temperature = temperature
        self.soft_temperature = soft_temperature if soft_temperature is not None else temperature
        self.soft_weight = soft_weight
        self.soft_mode = soft_mode
        self.symmetric = symmetric
        log_scale = torch.tensor(math.log(bce_scale))
        bias = torch.tensor(float(bce_bias))
        if learnable_bce:
            self.log_bce_scale = nn.Parameter(log_scale)
            self.bce_bias = nn.Parameter(bias)
        else:
            self.register_buffer("log_bce_scale", log_scale)
            self.register_buffer("bce_bias", bias)

    @property
    def bce_scale(self) -> torch.Tensor:
        return self.log_bce_scale.exp()

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return `loss` (total), `instance` and `soft`; the teacher side gets no gradient."""
        if student.ndim != 2 or student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher embeddings must both be (B, D); got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)}"
            )
        batch = student.shape[0]
        if labels is None:
            labels = student.new_zeros(batch, 1)
        if labels.shape[0] != batch:
            raise ValueError(f"labels have {labels.shape[0]} rows for a batch of {batch}")
        # Similarities in fp32 even under bf16 autocast: logits / 0.1 would lose the fine differences.
        with torch.autocast(device_type=student.device.type, enabled=False):
            sim = F.normalize(student.float(), dim=1) @ F.normalize(teacher.detach().float(), dim=1).T
        instance = info_nce(sim / self.temperature, self.symmetric)
        targets = soft_targets(labels.to(sim.device))
        if self.soft_mode == "bce":
            logits = self.bce_scale * sim + self.bce_bias
            soft = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            soft = soft_cross_entropy(sim / self.soft_temperature, targets, self.symmetric)
        return {"loss": instance + self.soft_weight * soft, "instance": instance, "soft": soft}
