"""Weighted kNN: matches a brute-force reference, learns clusters, and stays at chance on shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.knn import knn_classify, knn_multilabel_scores
from evaluation.metrics import accuracy, average_precision_micro


def gaussian_clusters(
    n_per_class: int,
    num_classes: int = 4,
    dim: int = 16,
    spread: float = 0.6,
    seed: int = 0,
    centres_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Features around one random unit-norm centre per class (fixed by `centres_seed`); noise from `seed`."""
    centres = np.random.default_rng(centres_seed).normal(size=(num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), n_per_class))
    feats = centres[labels] + spread * rng.normal(size=(labels.size, dim)) / np.sqrt(dim)
    return feats.astype(np.float32), labels


def reference_votes(train, labels_or_targets, test, k, temperature):
    """Loop over test samples: cosine similarities, k best, weights exp(sim/T) normalised, summed votes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    rows = []
    for x in test:
        sim = train @ x
        nearest = np.argsort(-sim)[:k]
        w = np.exp(sim[nearest] / temperature)
        rows.append((w[:, None] * labels_or_targets[nearest]).sum(0) / w.sum())
    return np.stack(rows)


def test_scores_match_brute_force_reference_with_chunking():
    train, labels = gaussian_clusters(15, num_classes=3, seed=1)
    test, _ = gaussian_clusters(4, num_classes=3, seed=2)
    expected = reference_votes(train.astype(np.float64), np.eye(3)[labels], test.astype(np.float64), 5, 0.1)
    preds, scores = knn_classify(train, labels, test, k=5, temperature=0.1, batch_size=5, train_chunk=7)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(preds.numpy(), expected.argmax(1))
    _, unchunked = knn_classify(train, labels, test, k=5, temperature=0.1)
    torch.testing.assert_close(scores, unchunked)


def test_knn_beats_chance_and_shuffled_labels_stay_at_chance():
    train, train_labels = gaussian_clusters(100, seed=1)
    test, test_labels = gaussian_clusters(50, seed=2)  # same centres, new noise
    preds, scores = knn_classify(train, train_labels, test, k=20)
    assert scores.shape == (test.shape[0], 4)
    assert accuracy(test_labels, preds) > 0.9
    shuffled = np.random.default_rng(7).permutation(train_labels)
    control, _ = knn_classify(train, shuffled, test, k=20)
    assert accuracy(test_labels, control) < 0.45  # chance is 0.25


def test_multilabel_scores_match_reference_and_learn():
    train, train_labels = gaussian_clusters(60, seed=1)
    label_sets = np.array(
        [[1, 0, 0, 1, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=np.float32
    )
    train_targets = label_sets[train_labels]
    test, test_labels = gaussian_clusters(20, seed=2)
    test_targets = label_sets[test_labels]
    scores = knn_multilabel_scores(train, train_targets, test, k=10, temperature=0.07)
    expected = reference_votes(train.astype(np.float64), train_targets, test.astype(np.float64), 10, 0.07)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert average_precision_micro(test_targets, scores) > 0.95
    prior = test_targets.mean()
    shuffled = train_targets[np.random.default_rng(3).permutation(len(train_targets))]
    control = knn_multilabel_scores(train, shuffled, test, k=10)
    assert average_precision_micro(test_targets, control) < prior + 0.25


def test_k_larger_than_train_set_and_bad_inputs():
    train, labels = gaussian_clusters(2, num_classes=2, seed=0)
    preds, scores = knn_classify(train, labels, train, k=50, num_classes=3)
    assert scores.shape == (4, 3) and torch.allclose(scores.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="dim 16 but test features have 8"):
        knn_classify(train, labels, np.zeros((2, 8)))
    with pytest.raises(ValueError, match="train_labels has 3 entries"):
        knn_classify(train, labels[:3], train)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        knn_classify(train, labels, train, num_classes=1)
    with pytest.raises(ValueError, match="NaN"):
        knn_classify(np.full((2, 16), np.nan), [0, 1], train)


def test_train_chunks_smaller_than_k_give_the_unchunked_neighbours():
    train, labels = gaussian_clusters(15, num_classes=3, seed=1)
    test, _ = gaussian_clusters(4, num_classes=3, seed=2)
    _, chunked = knn_classify(train, labels, test, k=20, temperature=0.1, train_chunk=8)  # used to raise
    _, whole = knn_classify(train, labels, test, k=20, temperature=0.1)
    torch.testing.assert_close(chunked, whole)
