"""Weighted k-nearest-neighbour evaluation of frozen features (the DINO protocol).

Features are L2-normalised, so similarity is cosine; each of the k nearest training samples votes
for its label with weight exp(similarity / temperature). Test samples are processed in batches and
the training set in chunks, keeping memory at about batch_size x (train_chunk + k) similarities
whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


def _as_features(values: Any, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(values).to(device=device, dtype=torch.float32)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return F.normalize(tensor, dim=1)


def _neighbours(
    train: torch.Tensor, test: torch.Tensor, k: int, temperature: float, batch_size: int, train_chunk: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (test rows, neighbour indices (B, k), normalised vote weights (B, k)) batch by batch."""
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have dim {train.shape[1]} but test features have {test.shape[1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    k = min(k, train.shape[0])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for start in range(0, test.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        best_sim = best_idx = None
        for offset in range(0, train.shape[0], train_chunk):
            sim = test[rows] @ train[offset : offset + train_chunk].T
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            top_idx = top_idx + offset
            if best_sim is not None:
                merged = torch.cat([best_sim, top_sim], 1)
                top_sim, order = merged.topk(min(k, merged.shape[1]), dim=1)
                top_idx = torch.cat([best_idx, top_idx], 1).gather(1, order)
            best_sim, best_idx = top_sim, top_idx
        weights = torch.softmax(best_sim / temperature, dim=1)  # exp(sim/T), normalised per test sample
        yield rows, best_idx, weights


def knn_classify(
    train_feats: Any,
    train_labels: Any,
    test_feats: Any,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
    train_chunk: int = 65536,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict class ids for `test_feats`; returns (predictions (M,), class scores (M, C) summing to 1)."""
    device = torch.device(device)
    train = _as_features(train_feats, "train_feats", device)
    test = _as_features(test_feats, "test_feats", device)
    labels = torch.as_tensor(train_labels, device=device).long().ravel()
    if labels.shape[0] != train.shape[0]:
        raise ValueError(
            f"train_labels has {labels.shape[0]} entries but train_feats has {train.shape[0]} rows"
        )
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    scores = torch.zeros(test.shape[0], num_classes, device=device)
    for rows, idx, weights in _neighbours(train, test, k, temperature, batch_size, train_chunk):
        scores[rows].scatter_add_(1, labels[idx], weights)
    return scores.argmax(dim=1).cpu(), scores.cpu()


def knn_multilabel_scores(
    train_feats: Any,
    train_targets: Any,
    test_feats: Any,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    train_chunk: int = 65536,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-class scores (M, C) in [0, 1]: the similarity-weighted mean of the neighbours' multi-hot labels."""
    device = torch.device(device)
    train = _as_features(train_feats, "train_feats", device)
    test = _as_features(test_feats, "test_feats", device)
    targets = torch.as_tensor(train_targets, device=device).float()
    if targets.ndim != 2 or targets.shape[0] != train.shape[0]:
        raise ValueError(
            f"train_targets must be (N, C) multi-hot with N = {train.shape[0]}, got shape {tuple(targets.shape)}"
        )
    scores = torch.zeros(test.shape[0], targets.shape[1], device=device)
    for rows, idx, weights in _neighbours(train, test, k, temperature, batch_size, train_chunk):
        scores[rows] = torch.einsum("bk,bkc->bc", weights, targets[idx])
    return scores.cpu()
