"""DINOv2 objective: DINO CLS loss, iBOT masked-patch loss, KoLeo regulariser, and teacher centering.

Formulas follow facebookresearch/dinov2 (loss/dino_clstoken_loss.py, ibot_patch_loss.py,
koleo_loss.py); the tests in tests/fm/test_losses.py write them out independently.
Teacher logits are always processed in float32 (the "heads reduce in fp32" rule of the recipe).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _dist_ready():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3, n_samples: int | None = None
) -> torch.Tensor:
    """Sinkhorn-Knopp centering (SwAV/DINOv2): returns (B, K) teacher targets whose rows sum to 1 and
    whose prototype marginals are pushed towards uniform. Sums are all-reduced across ranks, so the
    balancing is over the global batch. `n_samples` = global number of rows (default B * world)."""
    logits = teacher_logits.float() / temperature
    shift = logits.max()
    if _dist_ready():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    logits = logits - shift  # the same constant on every rank: cancels in the normalisations
    q = torch.exp(logits).t()  # K x B
    world = dist.get_world_size() if _dist_ready() else 1
    b = n_samples if n_samples is not None else q.shape[1] * world
    k = q.shape[0]
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype gets total mass 1 ...
        q /= k  # ... then 1/K
        q /= q.sum(dim=0, keepdim=True)  # each sample gets total mass 1 ...
        q /= b  # ... then 1/B
    q *= b  # rows of the result (samples) sum to one
    return q.t()


class TeacherCentering(nn.Module):
    """Turns teacher logits into targets with either softmax centering (EMA centre) or Sinkhorn-Knopp."""

    def __init__(self, n_prototypes: int, mode: str = "softmax", center_momentum: float = 0.9, sk_iterations: int = 3):
        super().__init__()
        if mode not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"unknown centering {mode!r}; use 'softmax' or 'sinkhorn_knopp'")
        self.mode = mode
        self.center_momentum = center_momentum
        self.sk_iterations = sk_iterations
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temperature: float, n_samples: int | None = None) -> torch.Tensor:
        logits = teacher_logits.float()
        if self.mode == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sk_iterations, n_samples)
        targets = F.softmax((logits - self.center) / temperature, dim=-1)
        self.update_center(logits)
        return targets

    @torch.no_grad()
    def update_center(self, logits: torch.Tensor) -> None:
        count = torch.tensor([float(logits.shape[0])], device=logits.device)
        batch_sum = logits.sum(dim=0, keepdim=True)
        _all_reduce(batch_sum)
        _all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def dino_loss(
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    teacher_targets: torch.Tensor,
    n_global: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Cross-entropy of every student crop against every teacher global crop except the same view,
    averaged over (student crop, teacher crop) pairs.

    Shapes are crop-major: student_global (n_global*B, K), student_local (n_local*B, K),
    teacher_targets (n_global*B, K) (probabilities).
    """
    k = teacher_targets.shape[-1]
    t = teacher_targets.float().view(n_global, -1, k)  # G, B, K
    t_sum = t.sum(dim=0)  # sum over teacher views: CE is linear in the target
    g = F.log_softmax(student_global.float().view(n_global, -1, k) / student_temp, dim=-1)
    # global student crop i vs all teacher crops j != i
    global_terms = -((t_sum.unsqueeze(0) - t) * g).sum(-1).mean(-1).sum()
    n_pairs = n_global * (n_global - 1)
    total = global_terms
    if student_local is not None and student_local.numel():
        loc = F.log_softmax(student_local.float().view(-1, t.shape[1], k) / student_temp, dim=-1)
        total = total - (t_sum.unsqueeze(0) * loc).sum(-1).mean(-1).sum()
        n_pairs += loc.shape[0] * n_global
    return total / max(n_pairs, 1)


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_targets: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT loss on masked patches: CE per masked patch, each image's patches weighted 1/(its masked
    count), summed and divided by the number of global-crop images (as DINOv2's forward_masked).

    student_patch_logits, teacher_patch_targets: (M, K) for the M masked patches in `masks` order;
    masks: (N_images, h, w) bool.
    """
    flat = masks.flatten(1)
    if flat.sum() == 0:
        return student_patch_logits.sum() * 0.0
    ce = -(teacher_patch_targets.float() * F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)).sum(-1)
    weights = (1.0 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat]
    return (ce * weights).sum() / flat.shape[0]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: -mean log distance to the nearest other sample,
    on L2-normalised features (spreads features out in the batch)."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()
