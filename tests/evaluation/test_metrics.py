"""Metrics against independent reference computations (pair counting, step-wise PR) and hand values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from evaluation import metrics


def reference_auc(y, s) -> float:
    """Count positive/negative pairs: a win scores 1, a tie 1/2."""
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def reference_ap(y, s) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds, from the highest score down."""
    y, s = list(y), list(s)
    n_pos = sum(y)
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        selected = [a for a, b in zip(y, s) if b >= t]
        tp = sum(selected)
        recall, precision = tp / n_pos, tp / len(selected)
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def test_hand_computed_values():
    y, s = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]
    assert metrics.binary_auc(y, s) == pytest.approx(0.75)
    assert metrics.per_class_ap(y, s)[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.75)
    # classes: 0 -> tp 1 fp 1 fn 0 ; 1 -> tp 0 fp 0 fn 1 ; 2 -> no positives, no predictions (skipped)
    y_ml = np.array([[1, 0, 0], [0, 1, 0]])
    s_ml = np.array([[0.9, 0.2, 0.1], [0.6, 0.4, 0.3]])
    assert metrics.f1_micro(y_ml, s_ml) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert metrics.f1_macro(y_ml, s_ml) == pytest.approx((2 / 3 + 0.0) / 2)
    assert metrics.f1_macro(y_ml, s_ml, threshold=0.35) == pytest.approx((2 / 3 + 1.0) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_matches_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, 50) / 5  # many ties
    assert metrics.binary_auc(y, s) == pytest.approx(reference_auc(y, s))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_stepwise_formula(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((40, 4)) < 0.3).astype(int)
    y[0] = 1
    y[:, 3] = 0  # a class without positives: skipped by macro, NaN per class
    s = np.round(rng.random((40, 4)) + 0.5 * y, 1)  # informative scores, with ties
    per_class = metrics.per_class_ap(y, s)
    expected = [reference_ap(y[:, c], s[:, c]) for c in range(3)]
    np.testing.assert_allclose(per_class[:3], expected)
    assert np.isnan(per_class[3])
    assert metrics.average_precision_macro(y, s) == pytest.approx(np.mean(expected))
    assert metrics.average_precision_micro(y, s) == pytest.approx(reference_ap(y.ravel(), s.ravel()))


def test_average_precision_agrees_with_sklearn_micro():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    y = (rng.random((100, 6)) < 0.25).astype(int)
    s = rng.random((100, 6)) + y * rng.random((100, 6))
    assert metrics.average_precision_micro(y, s) == pytest.approx(
        average_precision_score(y, s, average="micro")
    )


def test_multiclass_auc_ovr_matches_reference_and_accepts_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    logits = rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[y]  # unnormalised scores are fine
    expected = np.mean([reference_auc(y == c, logits[:, c]) for c in range(4)])
    assert metrics.multiclass_auc_ovr(y, logits) == pytest.approx(expected)
    assert metrics.multiclass_auc_ovr(torch.from_numpy(y), torch.from_numpy(logits)) == pytest.approx(
        expected
    )


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="both classes"):
        metrics.binary_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.binary_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="3 samples but y_score has 2"):
        metrics.binary_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="outside"):
        metrics.multiclass_auc_ovr([0, 5], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="multi-hot"):
        metrics.average_precision_micro([[0, 2]], [[0.1, 0.2]])


def test_bootstrap_ci_brackets_point_and_narrows_with_more_samples():
    def sample(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n)
        return y, rng.normal(size=n) + y

    y_small, s_small = sample(60, 1)
    point, low, high = metrics.bootstrap_ci(metrics.binary_auc, y_small, s_small, n_boot=300)
    assert point == pytest.approx(metrics.binary_auc(y_small, s_small))
    assert low < point < high
    y_big, s_big = sample(1200, 2)
    _, big_low, big_high = metrics.bootstrap_ci(metrics.binary_auc, y_big, s_big, n_boot=300)
    assert big_high - big_low < 0.5 * (high - low)
    assert metrics.bootstrap_ci(metrics.binary_auc, y_small, s_small, n_boot=300) == (point, low, high)


def test_bootstrap_skips_single_class_resamples_and_handles_multilabel():
    y = np.array([0] * 10 + [1])  # plain resampling often drops the only positive
    s = np.linspace(0, 1, 11)
    point, low, high = metrics.bootstrap_ci(metrics.binary_auc, y, s, n_boot=200, stratified=False)
    assert point == 1.0 and low == high == 1.0
    rng = np.random.default_rng(0)
    y_ml = (rng.random((80, 5)) < 0.3).astype(int)
    s_ml = rng.random((80, 5)) + y_ml
    point, low, high = metrics.bootstrap_ci(metrics.average_precision_micro, y_ml, s_ml, n_boot=200)
    assert low <= point <= high and high - low > 0


def test_a_grouped_bootstrap_resamples_patients_not_their_slides():
    """Three identical slides per patient carry one patient's evidence: resampling patients gives exactly
    the interval of one slide per patient (same seed), while resampling slides one by one is narrower."""
    rng = np.random.default_rng(0)
    y1 = np.array([0] * 30 + [1] * 30)
    s1 = rng.random(60) + 0.3 * y1
    patients = np.arange(60)
    y3, s3, p3 = np.tile(y1, 3), np.tile(s1, 3), np.tile(patients, 3)
    single = metrics.bootstrap_ci(metrics.binary_auc, y1, s1, n_boot=300, seed=3)
    grouped = metrics.bootstrap_ci(metrics.binary_auc, y3, s3, n_boot=300, seed=3, groups=p3)
    assert grouped == pytest.approx(single, abs=1e-12)
    naive = metrics.bootstrap_ci(metrics.binary_auc, y3, s3, n_boot=300, seed=3)
    assert naive[2] - naive[1] < 0.75 * (grouped[2] - grouped[1])
    with pytest.raises(ValueError, match="groups has 3 entries for 180 samples"):
        metrics.bootstrap_ci(metrics.binary_auc, y3, s3, groups=[1, 2, 3])
    with pytest.raises(ValueError, match="groups has missing ids"):
        metrics.bootstrap_ci(metrics.binary_auc, y1, s1, groups=[None, *range(59)])
    mixed = [*range(30), *map(str, range(30))]  # 1 and "1" are two patients, not one
    assert metrics.bootstrap_ci(metrics.binary_auc, y1, s1, n_boot=300, seed=3, groups=mixed) == pytest.approx(single)


def test_one_vs_rest_auc_refuses_non_integer_labels():
    with pytest.raises(ValueError, match="class indices"):
        metrics.multiclass_auc_ovr(np.array([0.0, 1.0, 2.7]), np.eye(3))


def test_bootstrap_is_the_percentile_interval_of_class_stratified_resamples():
    """Against a hand-written loop with the same generator: each class resampled to its own count, the
    2.5th and 97.5th percentiles of the resampled metric (pins the level and the stratification)."""
    rng = np.random.default_rng(7)
    y = np.array([0] * 25 + [1] * 15)
    s = rng.random(40) + 0.4 * y
    point, low, high = metrics.bootstrap_ci(metrics.binary_auc, y, s, n_boot=400, seed=11)
    draw, values = np.random.default_rng(11), []
    for _ in range(400):
        idx = np.concatenate([draw.choice(np.flatnonzero(y == c), size=(y == c).sum(), replace=True) for c in (0, 1)])
        values.append(metrics.binary_auc(y[idx], s[idx]))
    assert point == metrics.binary_auc(y, s)
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
