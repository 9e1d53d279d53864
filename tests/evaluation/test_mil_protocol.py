"""The MIL protocol learns hidden instance signal, ensembles honestly, and refuses bad input by name."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from data_mil import make_bags

from evaluation.metrics import balanced_accuracy
from evaluation.mil_data import BagSampler, FeatureBank, epoch_schedule
from evaluation.mil_protocol import run_mil_protocol
from evaluation.mil_report import attention_heatmap, log_mil_results, roc_figure
from evaluation.mil_results import MILConfig, metric_description

FAST = dict(
    folds=3,
    seeds=2,
    epochs=12,
    bag_batch_size=8,
    lr=2e-3,
    n_boot=100,
    device="cpu",
    model_kwargs={"hidden_dim": 64, "attention_dim": 32},
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP threads only add sync overhead (10x slower on a busy 2-core CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohorts():
    train = make_bags(n_bags=120, seed=0)
    test = make_bags(n_bags=80, seed=1, prefix="test")
    coords = {**train.coords, **test.coords}
    bank = FeatureBank.from_arrays({**train.features, **test.features}, coords=coords, encoder="toy")
    return train, test, bank


@pytest.fixture(scope="module")
def abmil(cohorts):
    train, test, bank = cohorts
    return run_mil_protocol(
        bank, train.labels, test.labels[["slide_id", "label"]], attention_slides=20, **FAST
    )


def test_abmil_learns_the_hidden_signal_and_attends_to_it(abmil, cohorts):
    _, test, _ = cohorts
    s = abmil.summary
    assert s["test/ensemble_auc"] > 0.9
    assert s["test/single_auc"] > 0.85
    assert s["test/ensemble_auc_low"] <= s["test/ensemble_auc"] <= s["test/ensemble_auc_high"]
    assert s["oof/ensemble_auc"] > 0.85
    positives = [sid for sid in abmil.attention if test.signal[sid].any()]
    assert len(positives) >= 5
    for sid in positives:
        weights = abmil.attention[sid]["attention"]
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-4)
        fraction = test.signal[sid].mean()  # 4 of 100
        assert weights[test.signal[sid]].sum() > max(0.5, 8 * fraction)
        assert abmil.attention[sid]["coords"].shape == (100, 2)


def test_mean_pooling_is_weaker_because_the_signal_is_diluted(abmil, cohorts):
    train, test, bank = cohorts
    fast = {k: v for k, v in FAST.items() if k != "model_kwargs"}
    mean = run_mil_protocol(bank, train.labels, test.labels, model="mean", attention_slides=0, **fast)
    assert mean.summary["test/ensemble_auc"] < abmil.summary["test/ensemble_auc"] - 0.1
    assert mean.summary["test/ensemble_auc"] > 0.55  # it does see some of the diluted shift


def _labels_independent_of_signal(labels: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Shuffle labels so that, within each true class, exactly half get each label: zero correlation."""
    rng = np.random.default_rng(seed)
    shuffled = labels["label"].to_numpy().copy()
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels["label"].to_numpy() == c))
        shuffled[idx] = np.arange(len(idx)) % 2
    return labels.assign(label=shuffled)


def test_shuffled_labels_stay_at_chance_and_early_stopping_keeps_the_best_epoch(cohorts):
    train, test, bank = cohorts
    shuffled = _labels_independent_of_signal(train.labels, seed=5)
    config = {**FAST, "seeds": 1, "epochs": 15}
    patience = 2
    result = run_mil_protocol(
        bank, shuffled, test.labels, early_stopping_patience=patience, attention_slides=0, **config
    )
    # out-of-fold, predictions and labels are independent: chance. On the test cohort the labels are true
    # and the bags strongly marked, so a random function of them lands off 0.5 by its own chance: wider.
    assert abs(result.summary["oof/ensemble_auc"] - 0.5) < 0.15
    assert abs(result.summary["test/ensemble_auc"] - 0.5) < 0.2
    history = result.history
    # training stops once every member has gone `patience` epochs without a better validation loss
    assert history["epoch"].max() == min(result.runs["best_epoch"].max() + patience, config["epochs"] - 1)
    # the reported predictions come from each member's best validation epoch
    y = shuffled["label"].to_numpy()
    for m, row in result.runs.iterrows():
        val = result.member_probs[m, : len(shuffled)]
        kept = ~np.isnan(val[:, 0])
        loss = -np.mean(np.log(np.clip(val[kept, y[kept]], 1e-7, 1)))
        epochs = history[history["fold"] == row["fold"]]
        assert loss == pytest.approx(epochs["val_loss"].min(), rel=1e-4)
        assert row["best_epoch"] == epochs.loc[epochs["val_loss"].idxmin(), "epoch"]


def test_ensemble_is_the_mean_of_its_members(abmil):
    p = abmil.predictions
    members = [c for c in p.columns if c.startswith("prob_seed")]
    assert len(members) == 6 == len(abmil.runs)
    test = p[p["split"] == "test"]
    np.testing.assert_allclose(test["prob_ensemble"], test[members].mean(axis=1), rtol=1e-5)
    cv = p[p["split"] == "cv"]
    assert (cv[members].notna().sum(axis=1) == 2).all()  # one out-of-fold member per seed
    np.testing.assert_allclose(cv["prob_ensemble"], cv[members].mean(axis=1), rtol=1e-5)
    for row in cv.head(10).itertuples():
        for seed in (0, 1):
            fold = getattr(row, f"fold_seed{seed}")
            assert not np.isnan(getattr(row, f"prob_seed{seed}_fold{fold}"))
    gain = abmil.summary["test/ensemble_auc"] - abmil.summary["test/single_auc"]
    assert abmil.summary["test/ensemble_gain_auc"] == pytest.approx(gain)
    assert abmil.runs[["val_auc", "test_auc"]].notna().all().all()
    assert (p["positive_class"] == abmil.classes[1]).all()  # prob_ensemble is P(classes[1])
    np.testing.assert_allclose(p["prob_ensemble"], abmil.ensemble_probs[:, 1])


def test_reports_say_what_single_model_and_std_mean(abmil):
    s, runs = abmil.summary, abmil.runs
    # one definition of the spread over members: the sample std (ddof=1), in the summary and the markdown
    assert s["cv/val_auc_std"] == pytest.approx(runs["val_auc"].std(ddof=1))
    assert s["cv/val_auc_std"] != pytest.approx(np.std(runs["val_auc"]), rel=1e-3)
    markdown = abmil.to_markdown()
    assert f"| val_auc | {s['cv/val_auc_mean']:.4f} | {s['cv/val_auc_std']:.4f} |" in markdown
    assert "sample standard deviation (ddof=1)" in markdown
    # out of fold, "single" is one seed's pooled k-fold predictions; on the test cohort the member mean
    rows = [line for line in markdown.splitlines() if line.startswith(("| test |", "| oof |"))]
    assert all("member mean" in r for r in rows if r.startswith("| test |"))
    assert all("single seed (k-fold pooled)" in r for r in rows if r.startswith("| oof |"))
    assert "single seed (k-fold pooled)" in metric_description("oof/single_auc")
    assert "member" in metric_description("test/single_auc") and "ddof=1" in metric_description("cv/val_auc_std")


def test_without_a_test_cohort_the_out_of_fold_predictions_are_the_evaluation(cohorts):
    train, _, bank = cohorts
    result = run_mil_protocol(
        bank,
        train.labels,
        model="mean",
        folds=3,
        seeds=1,
        epochs=3,
        n_boot=20,
        device="cpu",
        attention_slides=2,
    )
    assert "test/ensemble_auc" not in result.summary and "oof/ensemble_auc" in result.summary
    assert result.primary_split == "oof" and set(result.predictions["split"]) == {"cv"}
    again = run_mil_protocol(
        bank,
        train.labels,
        model="mean",
        folds=3,
        seeds=1,
        epochs=3,
        n_boot=20,
        device="cpu",
        attention_slides=0,
    )
    np.testing.assert_array_equal(result.ensemble_probs, again.ensemble_probs)  # seeded end to end


def test_unlabelled_test_cohort_and_multiclass_labels(cohorts):
    train, test, bank = cohorts
    three = train.labels.assign(label=np.array(["a", "b", "c"])[np.arange(len(train.labels)) % 3])
    result = run_mil_protocol(
        bank,
        three,
        test.labels[["slide_id"]],
        model="mean",
        folds=2,
        seeds=1,
        epochs=2,
        n_boot=20,
        device="cpu",
        attention_slides=2,
    )
    assert result.classes == ["a", "b", "c"] and result.member_probs.shape == (2, 200, 3)
    assert "test/ensemble_auc" not in result.summary and np.isfinite(result.summary["oof/ensemble_auc"])
    p = result.predictions
    unlabelled = p[p["split"] == "test"]
    assert len(unlabelled) == 80 and unlabelled["label"].isna().all()
    for c in "abc":
        members = [f"prob_seed0_fold{f}_{c}" for f in (0, 1)]
        np.testing.assert_allclose(
            unlabelled[f"prob_ensemble_{c}"], unlabelled[members].mean(axis=1), rtol=1e-5
        )
    np.testing.assert_allclose(result.ensemble_probs.sum(1), 1.0, rtol=1e-5)
    assert set(result.attention) <= set(unlabelled["slide_id"]) and len(result.attention) == 2
    assert len(roc_figure(result).axes) == 3  # one-vs-rest panel per class, on the out-of-fold split


def test_bad_input_is_refused_by_name(cohorts):
    train, test, bank = cohorts
    ghosts = pd.concat([train.labels, pd.DataFrame({"slide_id": ["ghost1", "ghost2"], "label": [0, 1]})])
    with pytest.raises(ValueError, match=r"2 slide\(s\) have no features.*ghost1, ghost2"):
        run_mil_protocol(bank, ghosts, **FAST)
    with pytest.raises(ValueError, match="single class"):
        run_mil_protocol(bank, train.labels.assign(label=1), **FAST)
    with pytest.raises(ValueError, match="both the CV labels and the test cohort"):
        run_mil_protocol(bank, train.labels, train.labels.head(3), **FAST)
    with pytest.raises(ValueError, match=r"training classes \[0, 1\]; found \[7\]"):
        run_mil_protocol(bank, train.labels, test.labels.assign(label=7), **FAST)
    with pytest.raises(TypeError, match="epochz"):
        run_mil_protocol(bank, train.labels, epochz=3)


def test_a_patient_on_both_sides_of_cv_and_test_is_refused(cohorts):
    train, test, bank = cohorts
    leaking = test.labels.head(4).copy()
    leaking.loc[[0, 2], "patient_id"] = train.labels["patient_id"].iloc[[5, 7]].to_numpy()
    with pytest.raises(ValueError, match=r"2 patient\(s\) have slides both in the CV labels and in the test cohort "
                                         r"\(patient leakage.*slide-patient0005 \(cv: slide0005; test: test0000\)"):
        run_mil_protocol(bank, train.labels, leaking, **FAST)


@pytest.mark.parametrize(
    "option, value",
    [("max_tiles", 0), ("max_tiles", -1), ("epochs", 0), ("folds", 1), ("seeds", 0), ("lr", -1e-3), ("lr", 0.0),
     ("n_boot", 0), ("bag_batch_size", 0), ("early_stopping_patience", 0), ("weight_decay", -1.0), ("epochs", 2.5)],
)
def test_nonsense_settings_are_refused_by_name(cohorts, option, value):
    train, _, bank = cohorts
    with pytest.raises(ValueError, match=rf"invalid MIL protocol setting\(s\): {option}={value!r}"):
        MILConfig(**{option: value})
    with pytest.raises(ValueError, match=rf"{option}={value!r}"):
        run_mil_protocol(bank, train.labels, **{**FAST, option: value})  # overrides are checked too
    assert MILConfig(seeds=[3, 7]).seeds == [3, 7] and MILConfig(max_tiles=None).max_tiles is None


def test_a_one_class_test_cohort_keeps_its_defined_metrics_and_says_why_the_rest_is_missing(cohorts):
    import warnings

    train, test, bank = cohorts
    one_class = test.labels[test.labels["label"] == 1].head(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not NumPy / sklearn warnings
        result = run_mil_protocol(bank, train.labels, one_class, model="mean", folds=2, seeds=2, epochs=2,
                                  n_boot=20, device="cpu", attention_slides=1)
        figure = roc_figure(result)
    s = result.summary
    test_rows = result.predictions["split"] == "test"
    expected = balanced_accuracy(np.ones(20, dtype=int), result.ensemble_probs[test_rows.to_numpy()].argmax(1))
    assert s["test/ensemble_balanced_accuracy"] == pytest.approx(expected)  # defined: the recall of class 1
    assert np.isfinite(s["test/single_balanced_accuracy"])
    assert np.isnan(s["test/ensemble_balanced_accuracy_low"]) and np.isnan(s["test/ensemble_auc"])
    assert any("one class only" in n and "AUC is undefined" in n for n in result.notes)
    markdown = result.to_markdown()
    assert f"{expected:.3f} [CI n/a]" in markdown and "one class only" in markdown
    assert "one class only: no ROC" in figure.axes[0].texts[0].get_text()


def _write_h5(path, features, encoder, coords=True):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features.astype(np.float16))
        if coords:
            f.create_dataset("coords", data=np.arange(len(features) * 2).reshape(-1, 2))
        f.attrs["encoder"] = encoder


def test_feature_bank_from_h5_packs_memmaps_and_refuses_foreign_encoders(tmp_path, cohorts):
    train, _, _ = cohorts
    ids = train.labels["slide_id"].tolist()[:6]
    for sid in ids:
        _write_h5(tmp_path / f"{sid}.h5", train.features[sid], "phikon_v2")
    bank = FeatureBank.from_h5_dir(tmp_path, ids)
    assert bank.encoder == "phikon_v2" and bank.dim == 32 and len(bank) == 6
    np.testing.assert_array_equal(bank.slide_features(ids[2]), train.features[ids[2]])
    packed = FeatureBank.from_h5_dir(tmp_path, ids, pack_dir=tmp_path / "pack")
    assert isinstance(packed.features, np.memmap)
    np.testing.assert_array_equal(packed.slide_features(ids[4]), train.features[ids[4]])
    np.testing.assert_array_equal(packed.slide_coords(ids[4]), bank.slide_coords(ids[4]))
    stamp = (tmp_path / "pack" / "features.npy").stat().st_mtime_ns
    FeatureBank.from_h5_dir(tmp_path, ids, pack_dir=tmp_path / "pack")
    assert (tmp_path / "pack" / "features.npy").stat().st_mtime_ns == stamp  # unchanged sources: reused

    with pytest.raises(FileNotFoundError, match="2 slide.*no feature file.*nope1, nope2"):
        FeatureBank.from_h5_dir(tmp_path, [*ids, "nope1", "nope2"])
    _write_h5(tmp_path / f"{ids[3]}.h5", train.features[ids[3]], "dinov2_vitl14")
    with pytest.raises(
        ValueError, match=rf"another encoder than 'phikon_v2'.*{ids[3]}\.h5 \(encoder='dinov2_vitl14'\)"
    ):
        FeatureBank.from_h5_dir(tmp_path, ids)
    with pytest.raises(ValueError, match="another encoder"):
        FeatureBank.from_h5_dir(tmp_path, ids, pack_dir=tmp_path / "pack")  # not hidden by the cached pack
    assert FeatureBank.from_h5_dir(tmp_path, ids[3:4]).encoder == "dinov2_vitl14"


def test_sampler_draws_distinct_instances_of_the_right_slide():
    sizes = {"a": 3, "b": 40, "c": 12}
    features = {
        sid: np.column_stack([np.full(n, i), np.arange(n), np.zeros((n, 2))])
        for i, (sid, n) in enumerate(sizes.items())
    }
    bank = FeatureBank.from_arrays(features)
    sampler = BagSampler(bank)
    x, mask = sampler.gather(torch.tensor([0, 1, 2, 1]), max_tiles=10, generator=sampler.generator(0))
    assert x.shape == (4, 10, 4)
    assert mask.sum(1).tolist() == [3, 10, 10, 10]
    for r, slide in enumerate([0, 1, 2, 1]):
        rows = x[r][mask[r]]
        assert (rows[:, 0] == slide).all()
        assert len(set(rows[:, 1].tolist())) == len(rows)  # no instance twice
    assert not torch.equal(x[1][mask[1]], x[3][mask[3]])  # fresh subset per draw
    full, full_mask = sampler.gather(torch.tensor([1]), max_tiles=None)
    assert full_mask.sum() == 40 and sorted(full[0, :, 1].tolist()) == list(range(40))


def test_epoch_schedule_gives_each_member_a_permutation_of_its_bags():
    rows = [np.arange(10), np.arange(100, 107)]
    rngs = [np.random.default_rng(i) for i in range(2)]
    schedule = epoch_schedule(rows, batch_size=4, rngs=rngs)
    assert schedule.shape == (3, 2, 4)
    first = schedule[:, 0].reshape(-1)
    assert set(first[:10]) == set(range(10))
    second = schedule[:, 1].reshape(-1)
    assert set(second[:7]) == set(range(100, 107)) and set(second) <= set(range(100, 107))


def test_mlflow_logging_has_a_child_run_per_member_and_the_artifacts(abmil, tmp_path):
    from mlflow.tracking import MlflowClient

    from fm.tracking import tracked_run

    with tracked_run("mil-test", run_name="toy") as run:
        log_mil_results(abmil, run)
    client = MlflowClient(run.tracking_uri)
    children = client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(
        f"seed{s}-fold{f}" for s in (0, 1) for f in (0, 1, 2)
    )
    assert "val_auc" in children[0].data.metrics
    parent = client.get_run(run.run_id)
    assert parent.data.metrics["test/ensemble_auc"] == pytest.approx(abmil.summary["test/ensemble_auc"])
    listed = {
        a.path
        for folder in ("tables", "figures", "attention")
        for a in client.list_artifacts(run.run_id, folder)
    }
    assert {"tables/mil_predictions.csv", "tables/mil_runs.csv", "figures/mil_roc.png"} <= listed
    assert "attention/mil_attention.csv" in listed
    curve = client.get_metric_history(children[0].info.run_id, "train_loss")
    assert sorted(m.step for m in curve) == list(range(12))


def test_attention_heatmap_colours_the_attended_tiles():
    coords = np.array([[0, 0], [224, 0], [0, 224], [224, 224]])
    attention = np.array([0.1, 0.7, 0.1, 0.1])
    thumbnail = np.full((28, 28, 3), 255, dtype=np.uint8)
    fig = attention_heatmap(coords, attention, thumbnail, downsample=16)
    overlay = fig.axes[0].images[1].get_array()
    assert overlay[3, 20] == 1.0  # the top-right tile (x 224-448 -> 14-28 px) holds the most attention
    assert overlay[3, 3] < 1.0 and overlay.mask[27, 27] == np.False_
    with pytest.raises(ValueError, match="one attention value each"):
        attention_heatmap(coords, attention[:3], thumbnail, 16)


def test_the_protocol_keeps_a_patients_slides_in_one_fold_and_resamples_patients():
    """Three slides per patient: in every seed's folds a patient's slides share one fold (no patient in
    training and validation at once), and the bootstrap interval resamples patients: wider than with
    the patient ids dropped (each slide its own patient)."""
    cohort = make_bags(n_bags=60, slides_per_patient=3, seed=4)
    bank = FeatureBank.from_arrays(cohort.features, coords=cohort.coords, encoder="toy")
    options = dict(model="mean", folds=3, seeds=2, epochs=2, n_boot=200, device="cpu", attention_slides=0)
    result = run_mil_protocol(bank, cohort.labels, **options)
    folds = result.predictions.merge(cohort.labels[["slide_id", "patient_id"]], on="slide_id", suffixes=("", "_"))
    for column in [c for c in folds.columns if c.startswith("fold_seed")]:
        assert (folds.groupby("patient_id")[column].nunique() == 1).all(), column
    as_slides = run_mil_protocol(bank, cohort.labels.assign(patient_id=cohort.labels["slide_id"]), **options)
    width = {name: r.summary["oof/ensemble_auc_high"] - r.summary["oof/ensemble_auc_low"]
             for name, r in (("patients", result), ("slides", as_slides))}
    assert width["patients"] > width["slides"], width


def test_blank_patient_ids_make_each_such_slide_its_own_patient(cohorts):
    """A blank patient_id cell (a CSV with gaps) must neither crash the protocol at its very end nor merge
    every such slide into one 'nan' patient."""
    train, test, bank = cohorts
    labels = train.labels.copy()
    labels.loc[:9, "patient_id"] = np.nan
    external = test.labels.copy()
    external.loc[:4, "patient_id"] = None
    external.loc[5:6, "patient_id"] = "  "
    result = run_mil_protocol(bank, labels, external, model="mean", folds=3, seeds=1, epochs=2, n_boot=50,
                              device="cpu", attention_slides=0)
    assert np.isfinite(result.summary["test/ensemble_auc_low"])
    patients = result.predictions.set_index("slide_id")["patient_id"]
    assert patients[labels["slide_id"][:10]].tolist() == labels["slide_id"][:10].tolist()
    assert patients[external["slide_id"][:7]].tolist() == external["slide_id"][:7].tolist()
