"""Classification metrics for frozen-feature evaluations, with bootstrap confidence intervals.

Conventions: `y_true` holds integer class ids (binary / multiclass) or a multi-hot (N, C) matrix
(multi-label); `scores` are any monotone confidence (probabilities or logits) unless a threshold is
involved. Averages over classes skip classes that the metric cannot score (no positives, or no
negatives for AUC) instead of silently counting them as 0 or 1; the docstrings say which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import rankdata


def as_numpy(values: Any, name: str = "values") -> np.ndarray:
    """Accept numpy arrays, lists or (CPU/GPU) torch tensors; refuse NaN/inf with a clear message."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_same_length(y_true: np.ndarray, other: np.ndarray, other_name: str) -> None:
    if len(y_true) != len(other):
        raise ValueError(f"y_true has {len(y_true)} samples but {other_name} has {len(other)}")


def binary_auc(y_true: Any, y_score: Any) -> float:
    """ROC AUC = probability that a random positive outranks a random negative (ties count one half)."""
    y = as_numpy(y_true, "y_true").ravel()
    s = as_numpy(y_score, "y_score").astype(np.float64).ravel()
    _check_same_length(y, s, "y_score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"binary y_true must hold 0/1 (or bool) values, got {np.unique(y)[:5]}")
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes in y_true, got {n_pos} positives and {n_neg} negatives")
    ranks = rankdata(s)  # average ranks for ties -> ties count one half (Mann-Whitney U)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multiclass_auc_ovr(y_true: Any, scores: Any) -> float:
    """Macro one-vs-rest AUC over the classes present in `y_true` (scores need not sum to one)."""
    raw = as_numpy(y_true, "y_true").ravel()
    y = raw.astype(np.int64)
    if not np.array_equal(raw, y):
        raise ValueError("y_true must hold class indices (integers), got non-integer values")
    s = as_numpy(scores, "scores")
    _check_same_length(y, s, "scores")
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {s.shape}")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"y_true has labels outside [0, {s.shape[1]}) for scores with {s.shape[1]} columns")
    present = np.unique(y).tolist()
    if len(present) < 2:
        raise ValueError(f"one-vs-rest AUC needs at least 2 classes in y_true, got {present}")
    return float(np.mean([binary_auc(y == c, s[:, c]) for c in present]))


def accuracy(y_true: Any, y_pred: Any) -> float:
    y = as_numpy(y_true, "y_true").ravel()
    p = as_numpy(y_pred, "y_pred").ravel()
    _check_same_length(y, p, "y_pred")
    if y.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(y == p))


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean recall over the classes present in `y_true` (robust to class imbalance)."""
    y = as_numpy(y_true, "y_true").ravel()
    p = as_numpy(y_pred, "y_pred").ravel()
    _check_same_length(y, p, "y_pred")
    if y.size == 0:
        raise ValueError("balanced accuracy of an empty set is undefined")
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def _multilabel(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = as_numpy(y_true, "y_true")
    s = as_numpy(scores, "scores").astype(np.float64)
    if y.ndim == 1:
        y, s = y[:, None], s.reshape(-1, 1)
    if y.shape != s.shape:
        raise ValueError(f"multi-label y_true {y.shape} and scores {s.shape} must have the same shape")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multi-label y_true must be multi-hot (0/1 values only)")
    return y.astype(bool), s


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise AP: sum over distinct score thresholds of (recall gain) x (precision at that threshold)."""
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # tied scores share one threshold
    tp = np.cumsum(y)[last_of_tie]
    predicted = last_of_tie + 1
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * tp / predicted))


def per_class_ap(y_true: Any, scores: Any) -> np.ndarray:
    """Average precision of each class (column); NaN for classes without any positive."""
    y, s = _multilabel(y_true, scores)
    return np.array([_average_precision(y[:, c], s[:, c]) for c in range(y.shape[1])])


def average_precision_micro(y_true: Any, scores: Any) -> float:
    """AP over all (sample, class) pairs pooled: BigEarthNet's headline "micro mAP"."""
    y, s = _multilabel(y_true, scores)
    if not y.any():
        raise ValueError("micro AP needs at least one positive label")
    return _average_precision(y.ravel(), s.ravel())


def average_precision_macro(y_true: Any, scores: Any) -> float:
    """Mean of per-class AP over the classes with at least one positive (others have no defined AP)."""
    ap = per_class_ap(y_true, scores)
    if np.isnan(ap).all():
        raise ValueError("macro AP needs at least one class with a positive label")
    return float(np.nanmean(ap))


def _f1_counts(y_true: Any, scores: Any, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, s = _multilabel(y_true, scores)
    pred = s >= threshold
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    return tp, fp, fn


def f1_micro(y_true: Any, scores: Any, threshold: float = 0.5) -> float:
    """F1 of pooled counts, predicting a label where `scores >= threshold` (0.5 suits probabilities)."""
    tp, fp, fn = (c.sum() for c in _f1_counts(y_true, scores, threshold))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 1.0  # nothing to find and nothing predicted


def f1_macro(y_true: Any, scores: Any, threshold: float = 0.5) -> float:
    """Mean per-class F1; classes with no positives and no predictions (F1 undefined) are skipped."""
    tp, fp, fn = _f1_counts(y_true, scores, threshold)
    denominator = 2 * tp + fp + fn
    defined = denominator > 0
    if not defined.any():
        return 1.0
    return float(np.mean(2 * tp[defined] / denominator[defined]))


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_score: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
    groups: Any = None,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval `(point, low, high)` at level 1 - alpha.

    Samples are resampled with replacement. `stratified` keeps each class's count fixed (1-D labels
    only; multi-label targets are resampled plainly). With `groups` (e.g. the patient of each slide)
    whole groups are resampled, stratified by each group's first label: the slides of one patient are
    not independent evidence, and resampling them one by one gives too narrow an interval. Resamples
    where the metric is undefined (one class only, or the metric raises ValueError / returns NaN) are
    skipped.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y = as_numpy(y_true, "y_true")
    s = as_numpy(y_score, "y_score")
    _check_same_length(y, s, "y_score")
    point = float(metric_fn(y, s))
    rng = np.random.default_rng(seed)
    if groups is None:  # each sample is its own group
        members = None
        units = np.arange(len(y))
    else:
        raw = list(groups)
        if len(raw) != len(y):
            raise ValueError(f"groups has {len(raw)} entries for {len(y)} samples")
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in raw):
            raise ValueError("groups has missing ids: give every sample its group (e.g. the slide id)")
        g = np.array([f"{type(v).__name__}:{v}" for v in raw])  # 1 and "1" are different groups
        _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
        order = np.argsort(first)  # groups in order of first appearance
        members = [np.flatnonzero(inverse == k) for k in order]
        units = np.sort(first)  # a group's first sample stands for it when stratifying
    unit_labels = y[units]
    strata = (
        [np.flatnonzero(unit_labels == c) for c in np.unique(unit_labels)]
        if stratified and y.ndim == 1 else [np.arange(len(units))]
    )
    values = []
    for _ in range(n_boot):
        drawn = np.concatenate([rng.choice(st, size=st.size, replace=True) for st in strata])
        idx = drawn if members is None else np.concatenate([members[k] for k in drawn])
        if y.ndim == 1 and np.unique(y[idx]).size < 2:
            continue
        try:
            value = float(metric_fn(y[idx], s[idx]))
        except ValueError:
            continue
        if np.isfinite(value):
            values.append(value)
    if not values:
        raise ValueError(f"no valid bootstrap resample out of {n_boot}: the metric is undefined on every one")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(low), float(high)
