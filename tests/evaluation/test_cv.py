"""Patient-level k-fold x seed splits: no leakage, full coverage, seed-driven, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation.cv import assign_folds, check_labels, cv_splits


def _labels(n_patients=40, slides_per_patient=(1, 2, 3), n_classes=2, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = p % n_classes
        for s in range(rng.choice(slides_per_patient)):
            rows.append({"slide_id": f"p{p}-s{s}", "patient_id": f"p{p}", "label": f"class{label}"})
    return pd.DataFrame(rows)


def test_no_patient_in_two_folds_and_every_slide_validated_once_per_seed():
    labels = _labels()
    splits = cv_splits(labels, n_folds=5, seeds=3)
    assert len(splits) == 15
    for seed in range(3):
        members = [s for s in splits if s.seed == seed]
        val = np.concatenate([s.val for s in members])
        assert sorted(val.tolist()) == list(range(len(labels)))  # each slide in exactly one val fold
        for s in members:
            assert not set(s.train) & set(s.val)
            assert len(s.train) + len(s.val) == len(labels)
            train_patients = set(labels["patient_id"].iloc[s.train])
            assert not train_patients & set(labels["patient_id"].iloc[s.val])  # no patient on both sides
            assert labels["label"].iloc[s.val].nunique() == 2  # stratified: both classes in every fold


def test_seed_s_reshuffles_with_seed_s_and_is_reproducible():
    labels = _labels()
    assert np.array_equal(assign_folds(labels, 5, seed=3), assign_folds(labels, 5, seed=3))
    assert not np.array_equal(assign_folds(labels, 5, seed=0), assign_folds(labels, 5, seed=1))
    by_list = cv_splits(labels, 5, seeds=[7])
    assert np.array_equal(by_list[2].val, np.flatnonzero(assign_folds(labels, 5, seed=7) == 2))


def test_fixed_fold_column_overrides_shuffling():
    labels = _labels()
    patients = labels["patient_id"].str[1:].astype(int)
    labels["fold"] = patients % 4
    splits = cv_splits(labels, n_folds=5, seeds=2)
    assert len(splits) == 8  # the task's 4 folds, for each seed
    for s in splits:
        assert set(labels["fold"].iloc[s.val]) == {s.fold}


def test_fixed_folds_that_split_a_patient_are_refused():
    labels = _labels(slides_per_patient=(2,))
    labels["fold"] = np.arange(len(labels)) % 3
    with pytest.raises(ValueError, match="more than one fold: p0"):
        cv_splits(labels, 3, 1)


def test_without_patient_ids_each_slide_is_its_own_group():
    labels = _labels(slides_per_patient=(1,)).drop(columns="patient_id")
    folds = assign_folds(labels, 4, seed=0)
    assert np.bincount(folds).tolist() == [10, 10, 10, 10]


def test_single_class_is_a_clear_error():
    labels = _labels()
    labels["label"] = "tumour"
    with pytest.raises(ValueError, match="single class 'tumour'"):
        cv_splits(labels, 5, 1)


def test_class_with_fewer_patients_than_folds_suggests_fewer_folds():
    labels = _labels(n_patients=40)
    rare = labels[labels["patient_id"].isin(["p1", "p3", "p5"])]
    labels = pd.concat([labels[labels["label"] == "class0"], rare])
    with pytest.raises(ValueError, match=r"'class1': 3 patients.*folds=3 or fewer"):
        cv_splits(labels, 5, 1)
    assert len(cv_splits(labels, 3, 1)) == 3


def test_bad_tables_are_refused_with_names():
    labels = _labels()
    with pytest.raises(ValueError, match="'label' column"):
        check_labels(labels.drop(columns="label"))
    dup = pd.concat([labels, labels.iloc[:1]])
    with pytest.raises(ValueError, match="more than once.*p0-s0"):
        check_labels(dup)
    empty = labels.copy()
    empty.loc[3, "label"] = None
    with pytest.raises(ValueError, match=f"without a label: {empty.loc[3, 'slide_id']}"):
        check_labels(empty)
