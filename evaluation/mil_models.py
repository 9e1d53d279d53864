"""Multiple-instance (MIL) heads that turn a bag of tile features into slide-level logits.

`GatedAttentionMIL` is the gated attention pooling of Ilse et al. (2018), the head of the Phikon-v2
slide-level protocol (attention dim 128); `MeanPoolMIL` is the control that shows what attention buys.
Both take a padded batch `(B, N, D)` with a boolean `mask` (True = real instance) or a single bag
`(N, D)`, and return `(logits, attention)`.

`StackedMIL` trains several independent members (the folds x seeds of a cross-validation) in one
vectorised step: their parameters are stacked along a leading member axis and the model is mapped
over it with `torch.func.vmap`, so 25 small models cost one launch sequence instead of 25.
`fit_lockstep` / `predict_lockstep` train and apply such a stack on bags drawn by a `BagSampler`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from evaluation.mil_data import BagSampler, epoch_schedule


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis that gives padded positions exactly zero weight."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


def _as_batch(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    if x.dim() == 2:
        return x.unsqueeze(0), None if mask is None else mask.unsqueeze(0), True
    if x.dim() != 3:
        raise ValueError(f"MIL input must be (N, D) or (B, N, D), got shape {tuple(x.shape)}")
    return x, mask, False


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL: a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))), logits = W sum_i a_i h_i.

    `hidden_dim=None` skips the input projection (attention directly on the encoder features).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        hidden_dim: int | None = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ):
        super().__init__()
        if hidden_dim:
            self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        else:
            self.project = nn.Identity()
        dim = hidden_dim or in_dim
        self.attention_v = nn.Linear(dim, attention_dim)
        self.attention_u = nn.Linear(dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask, single = _as_batch(x, mask)
        h = self.project(x)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = masked_softmax(self.attention_w(gate).squeeze(-1), mask)  # (B, N)
        pooled = torch.bmm(attention.unsqueeze(1).to(h.dtype), h).squeeze(1)  # (B, dim)
        logits = self.classifier(self.dropout(pooled))
        return (logits[0], attention[0]) if single else (logits, attention)


class MeanPoolMIL(nn.Module):
    """Masked mean of the instances followed by a linear layer: the no-attention baseline."""

    def __init__(self, in_dim: int, n_classes: int = 2, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask, single = _as_batch(x, mask)
        weights = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
        weights = weights / weights.sum(-1, keepdim=True)
        pooled = torch.bmm(weights.unsqueeze(1).to(x.dtype), x).squeeze(1)
        logits = self.classifier(self.dropout(pooled))
        return (logits[0], weights[0]) if single else (logits, weights)


MIL_MODELS: dict[str, type[nn.Module]] = {"abmil": GatedAttentionMIL, "mean": MeanPoolMIL}


def build_mil_model(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """Build a registered MIL head by name ("abmil", "mean")."""
    if name not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {name!r}; choose one of {sorted(MIL_MODELS)}")
    return MIL_MODELS[name](in_dim=in_dim, n_classes=n_classes, **kwargs)


class StackedMIL(nn.Module):
    """M independent copies of one MIL head evaluated together with `vmap`.

    Parameters have a leading member axis; Adam's update is element-wise, so one optimiser over the
    stacked tensors with the summed member losses trains each member exactly as if it were alone.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("StackedMIL needs at least one member")
        params, buffers = stack_module_state(members)
        self.stacked = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in params.items()})
        self._names = list(params)
        self._buffers_stacked = buffers
        self._template = [copy.deepcopy(members[0]).to("meta")]  # list: not registered as a submodule
        self.n_members = len(members)

    def train(self, mode: bool = True) -> StackedMIL:
        super().train(mode)
        self._template[0].train(mode)
        return self

    def member_params(self) -> dict[str, torch.Tensor]:
        return {name: self.stacked[name.replace(".", "__")] for name in self._names}

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, shared_input: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` is `(M, B, N, D)` (one batch per member) or, with `shared_input`, `(B, N, D)` for all.

        Returns logits `(M, B, C)` and attention `(M, B, N)`.
        """
        template = self._template[0]

        def one(params, buffers, bags, bag_mask):
            return functional_call(template, (params, buffers), (bags, bag_mask))

        in_x = None if shared_input else 0
        mapped = vmap(one, in_dims=(0, 0, in_x, in_x), randomness="different")
        return mapped(self.member_params(), self._buffers_stacked, x, mask)

    def member(self, index: int) -> nn.Module:
        """A plain module holding member `index`'s current weights (for saving or single-bag use)."""
        module = copy.deepcopy(self._template[0]).to_empty(
            device=self.stacked[next(iter(self.stacked))].device
        )
        state = {name: tensor[index].detach().clone() for name, tensor in self.member_params().items()}
        state.update({name: tensor[index].clone() for name, tensor in self._buffers_stacked.items()})
        module.load_state_dict(state)
        return module.train(self.training)


def cross_entropy_per_member(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each member's batch: logits (M, B, C), targets (M, B) -> (M,)."""
    m, b, c = logits.shape
    losses = F.cross_entropy(logits.float().reshape(m * b, c), targets.reshape(m * b), reduction="none")
    return losses.view(m, b).mean(1)


# ---------------------------------------------------------------------------------------------- lockstep training


@dataclass
class LockstepTraining:
    """Optimisation shared by the members of a stack (Adam; optional early stopping on each member's val set)."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-5
    bag_batch_size: int = 1
    max_tiles: int | None = 5000
    patience: int | None = None
    amp: bool = True
    eval_max_tiles: int | None = None
    eval_tile_budget: int = 500_000  # member x tile rows per prediction batch


def bf16_autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def fit_lockstep(
    members: list[nn.Module],
    train_rows: list[np.ndarray],
    val_rows: list[np.ndarray],
    sampler: BagSampler,
    targets: torch.Tensor,
    rngs: list[np.random.Generator],
    seed: int,
    settings: LockstepTraining,
) -> tuple[StackedMIL, pd.DataFrame]:
    """Train `members` together, member j on bank rows `train_rows[j]` (labels: `targets[row]`).

    Returns the stack (best validation epoch of each member when `settings.patience` is set) and a
    per-member, per-epoch history of train and validation loss. No host sync inside an epoch.
    """
    s, device = settings, sampler.device
    stacked = StackedMIL(members)
    optimizer = torch.optim.Adam(stacked.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    generator = sampler.generator(seed)
    m, b = len(members), s.bag_batch_size
    best_loss, best_epoch = np.full(m, np.inf), np.zeros(m, dtype=int)
    best_state = {k: v.detach().clone() for k, v in stacked.stacked.items()} if s.patience else {}
    records = []
    for epoch in range(s.epochs):
        stacked.train()
        schedule = torch.from_numpy(epoch_schedule(train_rows, b, rngs))
        total = torch.zeros(m, device=device)
        for step_rows in schedule:
            flat = step_rows.reshape(-1)
            x, mask = sampler.gather(flat, s.max_tiles, generator)
            with bf16_autocast(device, s.amp):
                logits, _ = stacked(x.view(m, b, *x.shape[1:]), mask.view(m, b, -1))
            losses = cross_entropy_per_member(logits, targets[flat.to(device)].view(m, b))
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            total += losses.detach()
        train_loss = (total / len(schedule)).cpu().numpy()
        val_loss = np.full(m, np.nan)
        if s.patience:
            val_loss = _member_val_loss(stacked, sampler, val_rows, targets, s)
            improved = val_loss < best_loss - 1e-6
            best_loss[improved], best_epoch[improved] = val_loss[improved], epoch
            keep = torch.from_numpy(improved).to(device)
            for k, v in stacked.stacked.items():
                best_state[k][keep] = v.detach()[keep]
        records += [
            {
                "member": j,
                "epoch": epoch,
                "train_loss": train_loss[j],
                "val_loss": val_loss[j],
                "best_epoch": best_epoch[j] if s.patience else epoch,
            }
            for j in range(m)
        ]
        if s.patience and (epoch - best_epoch >= s.patience).all():
            break
    if s.patience:
        with torch.no_grad():
            for k, v in stacked.stacked.items():
                v.copy_(best_state[k])
    return stacked.eval(), pd.DataFrame(records)


def _member_val_loss(stacked, sampler, val_rows, targets, settings) -> np.ndarray:
    union = np.unique(np.concatenate(val_rows))
    probs = predict_lockstep(stacked, sampler, union, settings)
    y = targets[torch.from_numpy(union).to(targets.device)].cpu().numpy()
    losses = []
    for j, rows in enumerate(val_rows):
        idx = np.searchsorted(union, rows)
        losses.append(-np.mean(np.log(np.clip(probs[j, idx, y[idx]], 1e-7, 1.0))))
    return np.array(losses)


@torch.no_grad()
def predict_lockstep(
    stacked: StackedMIL, sampler: BagSampler, rows: np.ndarray, settings: LockstepTraining
) -> np.ndarray:
    """Class probabilities `(M, len(rows), C)` of every member; slides batched by length (little padding)."""
    stacked.eval()
    lengths = sampler.host_lengths[rows]
    if settings.eval_max_tiles is not None:
        lengths = np.minimum(lengths, settings.eval_max_tiles)
    per_batch = max(1, settings.eval_tile_budget // stacked.n_members)
    batches, current = [], []
    for pos in np.argsort(lengths, kind="stable"):
        if current and (len(current) + 1) * lengths[pos] > per_batch:
            batches.append(current)
            current = []
        current.append(pos)
    batches.append(current)
    out = None
    generator = sampler.generator(0)
    for batch in batches:
        x, mask = sampler.gather(torch.from_numpy(rows[batch]), settings.eval_max_tiles, generator)
        with bf16_autocast(sampler.device, settings.amp):
            logits, _ = stacked(x, mask, shared_input=True)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        if out is None:
            out = np.empty((stacked.n_members, len(rows), probs.shape[-1]), dtype=np.float32)
        out[:, batch] = probs
    return out
