"""DINOv2 projection head: 3-layer MLP -> L2 norm -> weight-normalised prototype layer without bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is g * v / ||v|| (per output row).

    Written out instead of `nn.utils.weight_norm` so the parameters keep Meta's names
    (`weight_g`, `weight_v`), survive FSDP flattening and need no parametrisation machinery.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # DINOv2 fills g with 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, weight.to(x.dtype))


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, batch_norm: bool = False) -> nn.Sequential:
    """`nlayers` Linear layers with GELU (optionally batch norm before it) between them, trunc-normal
    init: the MLP of the DINO head (Meta's `mlp.0/2/4` names) and of contrastive projectors."""
    dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(dims[i + 1], track_running_stats=False))
            layers.append(nn.GELU())
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP (hidden 2048, GELU) -> bottleneck -> L2 norm -> prototypes, as in DINOv2's dino_head.py."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
