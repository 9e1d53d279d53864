"""Patient-level stratified k-fold x seed splits for slide-level evaluation.

Slides of one patient are never split across folds (they share tissue, scanner and label), so a
model is never validated on a patient it was trained on. Each seed reshuffles the folds with that
seed; a task's fixed `fold` column overrides the shuffling (every seed then reuses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

_LISTED = 20


@dataclass(frozen=True)
class CVSplit:
    """One member of the ensemble: train on `train`, validate on fold `fold` (row positions in labels)."""

    seed: int
    fold: int
    train: np.ndarray
    val: np.ndarray

    @property
    def name(self) -> str:
        return f"seed{self.seed}-fold{self.fold}"


def patient_ids(table: pd.DataFrame):
    """Patient ids as text; a blank cell makes that slide its own patient (not one 'nan' patient of all)."""
    blank = table["patient_id"].isna() | (table["patient_id"].astype(str).str.strip() == "")
    return table["patient_id"].where(~blank, table["slide_id"]).astype(str)


def check_labels(labels: pd.DataFrame, n_folds: int | None = None) -> pd.DataFrame:
    """Validate a labels table (slide_id, label, optional patient_id / fold); return a clean copy.

    Raises on missing columns, duplicate slides, empty labels, a single class, and (when the folds
    are to be drawn) any class with fewer patients than folds.
    """
    for column in ("slide_id", "label"):
        if column not in labels.columns:
            raise ValueError(f"labels table needs a {column!r} column; it has {list(labels.columns)}")
    labels = labels.copy()
    labels["slide_id"] = labels["slide_id"].astype(str)
    if "patient_id" not in labels.columns:
        labels["patient_id"] = labels["slide_id"]  # no patient ids: each slide is its own patient
    labels["patient_id"] = patient_ids(labels)
    dupes = labels.loc[labels["slide_id"].duplicated(), "slide_id"].unique().tolist()
    if dupes:
        raise ValueError(f"slides listed more than once in the labels: {_show(dupes)}")
    empty = labels.loc[labels["label"].isna(), "slide_id"].tolist()
    if empty:
        raise ValueError(f"slides without a label: {_show(empty)}")
    classes = labels["label"].unique()
    if len(classes) < 2:
        raise ValueError(
            f"labels have a single class {classes[0]!r} ({len(labels)} slides): a classifier needs at least two"
        )
    if n_folds is not None and "fold" not in labels.columns:
        if n_folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
        patients = labels.groupby("label")["patient_id"].nunique()
        small = patients[patients < n_folds]
        if len(small):
            worst = int(small.min())
            detail = ", ".join(f"{c!r}: {n} patients" for c, n in small.items())
            hint = f"use folds={worst} or fewer" if worst >= 2 else "merge or drop that class"
            raise ValueError(f"too few patients for {n_folds}-fold CV ({detail}); {hint}")
    if "fold" in labels.columns:
        _check_fixed_folds(labels)
    return labels.reset_index(drop=True)


def _check_fixed_folds(labels: pd.DataFrame) -> None:
    if labels["fold"].isna().any():
        raise ValueError(
            f"fold column has empty values for slides {_show(labels.loc[labels['fold'].isna(), 'slide_id'].tolist())}"
        )
    folds_per_patient = labels.groupby("patient_id")["fold"].nunique()
    leaking = folds_per_patient[folds_per_patient > 1].index.tolist()
    if leaking:
        raise ValueError(f"fixed folds put these patients in more than one fold: {_show(leaking)}")
    if labels["fold"].nunique() < 2:
        raise ValueError("the fold column names a single fold: cross-validation needs at least 2")


def assign_folds(labels: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Validation fold (0..n_folds-1) of every row: stratified by label, grouped by patient, shuffled by `seed`."""
    labels = check_labels(labels, n_folds)
    if "fold" in labels.columns:
        return pd.factorize(labels["fold"], sort=True)[0].astype(np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    y = pd.factorize(labels["label"], sort=True)[0]
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), y, groups=labels["patient_id"])):
        folds[val] = fold
    return folds


def cv_splits(labels: pd.DataFrame, n_folds: int = 5, seeds: int | Sequence[int] = 5) -> list[CVSplit]:
    """All folds x seeds members (seed-major order); the folds of seed s are drawn with seed s."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("need at least one seed")
    splits = []
    for seed in seed_list:
        folds = assign_folds(labels, n_folds, seed)
        for fold in range(int(folds.max()) + 1):
            splits.append(CVSplit(seed, fold, np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)))
    return splits


def _show(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:_LISTED])
    return shown + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
