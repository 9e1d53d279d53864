"""Linear probe: learns a linearly separable problem, stays at the prior on shuffled labels, is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.linear_probe import fit_linear_probe
from evaluation.metrics import accuracy, average_precision_micro

FAST = dict(epochs=30, batch_size=64, lr=1e-2)


def linear_multilabel(
    n: int, seed: int, num_classes: int = 6, dim: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot targets given by fixed random hyperplanes (shared by all seeds) of the latent features.

    Features are shifted and scaled per dimension (0.5x to 20x), so an unstandardised probe would suffer.
    """
    truth = np.random.default_rng(123)
    w = truth.normal(size=(dim, num_classes))
    bias = truth.normal(size=num_classes) * 0.5
    scale = truth.uniform(0.5, 20.0, size=dim)
    offset = truth.normal(size=dim) * 5
    z = np.random.default_rng(seed).normal(size=(n, dim))
    targets = (z @ w + bias > 0.8).astype(np.float32)
    return (z * scale + offset).astype(np.float32), targets


def test_multilabel_probe_learns_and_shuffled_control_stays_at_prior():
    train_x, train_y = linear_multilabel(600, seed=1)
    test_x, test_y = linear_multilabel(300, seed=2)
    probe = fit_linear_probe(train_x, train_y, task="multilabel", **FAST)
    scores = probe.predict_scores(test_x)
    assert scores.shape == test_y.shape and ((scores >= 0) & (scores <= 1)).all()
    assert average_precision_micro(test_y, scores) > 0.95
    assert probe.history[-1] < 0.5 * probe.history[0]

    shuffled = train_y[np.random.default_rng(0).permutation(len(train_y))]
    control = fit_linear_probe(train_x, shuffled, task="multilabel", **FAST)
    prior = test_y.mean()  # AP of uninformative scores
    assert average_precision_micro(test_y, control.predict_scores(test_x)) < prior + 0.1

    soft_margin = fit_linear_probe(train_x, train_y, task="multilabel", loss="multilabel_soft_margin", **FAST)
    assert average_precision_micro(test_y, soft_margin.predict_scores(test_x)) > 0.95


def test_multiclass_probe_standardises_with_train_statistics():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    labels = rng.integers(0, 3, 300)
    feats = (centres[labels] + rng.normal(size=(300, 8))) * 50 + 1000  # far from zero mean, unit scale
    probe = fit_linear_probe(feats[:200], labels[:200], task="multiclass", **FAST)
    np.testing.assert_allclose(probe.mean.numpy(), feats[:200].mean(0), rtol=1e-5)
    np.testing.assert_allclose(probe.std.numpy(), feats[:200].std(0), rtol=1e-4)
    scores = probe.predict_scores(feats[200:])
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
    assert accuracy(labels[200:], probe.predict(feats[200:])) > 0.9
    control = fit_linear_probe(feats[:200], rng.permutation(labels[:200]), task="multiclass", **FAST)
    assert accuracy(labels[200:], control.predict(feats[200:])) < 0.55  # chance is ~1/3


def test_fit_is_deterministic_for_a_seed():
    x, y = linear_multilabel(200, seed=3)
    a = fit_linear_probe(x, y, task="multilabel", seed=5, **FAST)
    b = fit_linear_probe(x, y, task="multilabel", seed=5, **FAST)
    c = fit_linear_probe(x, y, task="multilabel", seed=6, **FAST)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_lr_sweep_picks_the_best_validation_lr():
    train_x, train_y = linear_multilabel(400, seed=1)
    val_x, val_y = linear_multilabel(200, seed=4)
    probe = fit_linear_probe(
        train_x, train_y, val_x, val_y, task="multilabel", lrs=[1e-7, 3e-2], epochs=10, batch_size=64
    )
    assert set(probe.sweep) == {1e-7, 3e-2}
    assert probe.sweep[3e-2] > probe.sweep[1e-7] + 0.1  # a near-zero lr cannot learn in 10 epochs
    assert probe.lr == 3e-2 and probe.val_metric == probe.sweep[3e-2]
    assert average_precision_micro(val_y, probe.predict_scores(val_x)) == pytest.approx(probe.val_metric)


def test_bad_inputs_get_clear_errors():
    x, y = linear_multilabel(20, seed=0)
    with pytest.raises(ValueError, match="task"):
        fit_linear_probe(x, y, task="regression")
    with pytest.raises(ValueError, match="does not suit"):
        fit_linear_probe(x, y, task="multilabel", loss="cross_entropy")
    with pytest.raises(ValueError, match="train_targets has 19 entries"):
        fit_linear_probe(x, y[:19], task="multilabel")
    with pytest.raises(ValueError, match="validation split"):
        fit_linear_probe(x, y, task="multilabel", lrs=[1e-3])
    with pytest.raises(ValueError, match="multi-hot"):
        fit_linear_probe(x, y * 2, task="multilabel")
    x_nan = x.copy()
    x_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="train_feats contains NaN"):
        fit_linear_probe(x_nan, y, task="multilabel")
    probe = fit_linear_probe(x, y, task="multilabel", epochs=1)
    with pytest.raises(ValueError, match="dim 5"):
        probe.predict_scores(np.zeros((2, 5)))
