"""Slide-level MIL protocol: k-fold x seed ABMIL members, ensembled on an external cohort.

The Phikon-v2 protocol: frozen features, gated-attention MIL, up to 5,000 tiles sampled per slide,
Adam lr 1e-3, 5 folds x 5 seeds = 25 members whose predicted probabilities are averaged on the test
cohort. We report both the ensemble and a single-model metric (bootstrap 95 % CIs), so the gain of
ensembling is visible: on the test cohort the mean over the members, out of fold one seed's pooled
k-fold predictions (averaged over the seeds), since each slide has one out-of-fold member per seed. Members are trained in
lockstep (`StackedMIL`) from features held on the device, so a step has no disk I/O and no
per-member Python work. Settings and results live in `evaluation.mil_results`; figures and MLflow
logging in `evaluation.mil_report`, applied at the end, so the protocol runs and is tested without a
tracking store.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from evaluation.cv import CVSplit, check_labels, cv_splits, patient_ids
from evaluation.metrics import bootstrap_ci
from evaluation.mil_data import BagSampler, FeatureBank
from evaluation.mil_models import (
    LockstepTraining,
    StackedMIL,
    bf16_autocast,
    build_mil_model,
    fit_lockstep,
    predict_lockstep,
)
from evaluation.mil_results import METRICS, MILConfig, MILResults


def run_mil_protocol(
    bank: FeatureBank,
    labels_df: pd.DataFrame,
    test_df: pd.DataFrame | None = None,
    config: MILConfig | None = None,
    **overrides,
) -> MILResults:
    """Train folds x seeds MIL members on `labels_df` (slide_id, label, [patient_id], [fold]); evaluate.

    `test_df` (slide_id, [label]) is an external cohort predicted by every member; without it the
    out-of-fold predictions are the evaluation. Keyword overrides patch `config` (e.g. epochs=10).
    """
    unknown = set(overrides) - {f.name for f in dataclasses.fields(MILConfig)}
    if unknown:
        raise TypeError(f"unknown MIL protocol option(s) {sorted(unknown)}")
    cfg = dataclasses.replace(config or MILConfig(), **overrides)
    labels = check_labels(labels_df, cfg.folds)
    classes = sorted(labels["label"].unique().tolist())
    if cfg.positive_class is not None:
        if cfg.positive_class not in classes:
            raise ValueError(f"positive_class {cfg.positive_class!r} is not a label; labels are {classes}")
        classes = [c for c in classes if c != cfg.positive_class] + [cfg.positive_class]
    y_cv = labels["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64, copy=True)
    test, y_test = _check_test(test_df, labels, classes)
    rows = bank.rows(labels["slide_id"].tolist() + test["slide_id"].tolist())  # lists slides without features
    n_cv = len(labels)
    splits = cv_splits(labels, cfg.folds, cfg.seeds)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    sampler = BagSampler(bank, device, cfg.features_on_device)
    targets = torch.full((len(bank),), -1, dtype=torch.long)
    targets[torch.from_numpy(rows[:n_cv])] = torch.from_numpy(y_cv)
    targets = targets.to(device)

    n_members, n_classes = len(splits), len(classes)
    member_probs = np.full((n_members, len(rows), n_classes), np.nan, dtype=np.float32)
    group = cfg.parallel_models or n_members
    stacks, histories, timings = [], [], []
    for start in range(0, n_members, group):
        chunk = splits[start : start + group]
        began = time.perf_counter()
        stacked, history = _train_members(chunk, rows[:n_cv], targets, sampler, bank.dim, n_classes, cfg)
        probs = predict_lockstep(stacked, sampler, rows, _lockstep(cfg))
        timings += [(time.perf_counter() - began) / len(chunk)] * len(chunk)
        for j, split in enumerate(chunk):
            oof = np.zeros(len(rows), dtype=bool)
            oof[split.val] = True
            oof[n_cv:] = True
            member_probs[start + j, oof] = probs[j, oof]
        stacks.append(stacked)
        histories.append(history.assign(member=history["member"] + start))
    history = pd.concat(histories, ignore_index=True)
    history.insert(0, "seed", [splits[m].seed for m in history["member"]])
    history.insert(1, "fold", [splits[m].fold for m in history["member"]])

    ensemble = np.concatenate(
        [np.nanmean(member_probs[:, :n_cv], axis=0), member_probs[:, n_cv:].mean(axis=0)]
    )
    runs = _runs_table(splits, member_probs, y_cv, y_test, n_cv, history, timings)
    notes: list[str] = []
    patients = (labels["patient_id"].astype(str).to_numpy(),
                test.get("patient_id", test["slide_id"]).astype(str).to_numpy())
    summary = _summary(splits, member_probs, ensemble, y_cv, y_test, n_cv, runs, cfg, classes, notes, patients)
    predictions = _predictions_table(labels, test, splits, classes, member_probs, ensemble)
    results = MILResults(
        cfg, classes, runs, history.drop(columns="member"), predictions, member_probs, ensemble, summary,
        notes=notes,
    )
    results.attention = _attention(results, stacks, group, bank, sampler, rows, splits, n_cv)
    return results


def _check_test(
    test_df: pd.DataFrame | None, labels: pd.DataFrame, classes: list
) -> tuple[pd.DataFrame, np.ndarray | None]:
    if test_df is None:
        return pd.DataFrame({"slide_id": pd.Series([], dtype=str)}), None
    if "slide_id" not in test_df.columns:
        raise ValueError(f"test table needs a 'slide_id' column; it has {list(test_df.columns)}")
    test = test_df.copy().reset_index(drop=True)
    test["slide_id"] = test["slide_id"].astype(str)
    both = sorted(set(test["slide_id"]) & set(labels["slide_id"]))
    if both:
        raise ValueError(f"slides in both the CV labels and the test cohort: {both[:20]}")
    if "patient_id" in test.columns:
        test["patient_id"] = patient_ids(test)
        _check_patients_apart(test, labels)
    if "label" not in test.columns:
        return test, None
    unknown = sorted(set(test["label"].dropna()) - set(classes), key=str)
    if unknown or test["label"].isna().any():
        found = unknown or "empty labels"
        raise ValueError(f"test labels must be among the training classes {classes}; found {found}")
    return test, test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()


def _check_patients_apart(test: pd.DataFrame, labels: pd.DataFrame) -> None:
    """A patient with slides in the CV and in the test cohort leaks: members trained on their tissue
    would be scored on it. Refused, naming the patients and their slides on both sides."""
    shared = sorted(set(test["patient_id"]) & set(labels["patient_id"]))
    if not shared:
        return

    def slides(table: pd.DataFrame, patient: str) -> str:
        return ", ".join(table.loc[table["patient_id"] == patient, "slide_id"].astype(str))

    listed = [f"{p} (cv: {slides(labels, p)}; test: {slides(test, p)})" for p in shared[:_LISTED]]
    more = f", ... and {len(shared) - _LISTED} more" if len(shared) > _LISTED else ""
    raise ValueError(
        f"{len(shared)} patient(s) have slides both in the CV labels and in the test cohort (patient leakage: "
        f"put all of a patient's slides on one side): {', '.join(listed)}{more}"
    )


_LISTED = 20


def _member_seed(split: CVSplit) -> int:
    return 1000 * split.seed + split.fold


def _lockstep(cfg: MILConfig) -> LockstepTraining:
    names = {f.name for f in dataclasses.fields(LockstepTraining)} - {"patience"}
    return LockstepTraining(patience=cfg.early_stopping_patience, **{n: getattr(cfg, n) for n in names})


def _train_members(
    chunk: list[CVSplit],
    cv_rows: np.ndarray,
    targets: torch.Tensor,
    sampler: BagSampler,
    in_dim: int,
    n_classes: int,
    cfg: MILConfig,
) -> tuple[StackedMIL, pd.DataFrame]:
    """Train one lockstep group; each member is seeded by (seed, fold) for init, order and sampling."""
    devices = [sampler.device] if sampler.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeding here must not reset the caller's random state
        members = []
        for split in chunk:
            torch.manual_seed(_member_seed(split))
            members.append(
                build_mil_model(cfg.model, in_dim, n_classes, **cfg.model_kwargs).to(sampler.device)
            )
        torch.manual_seed(_member_seed(chunk[0]))  # dropout masks
        return fit_lockstep(
            members,
            [cv_rows[s.train] for s in chunk],
            [cv_rows[s.val] for s in chunk],
            sampler,
            targets,
            rngs=[np.random.default_rng([s.seed, s.fold]) for s in chunk],
            seed=_member_seed(chunk[0]),
            settings=_lockstep(cfg),
        )


def _scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    out = {}
    for name, fn in METRICS.items():
        try:
            out[name] = fn(y, probs)
        except ValueError:  # e.g. a validation fold with one class
            out[name] = float("nan")
    return out


def _runs_table(splits, member_probs, y_cv, y_test, n_cv, history, timings) -> pd.DataFrame:
    rows = []
    last = history.groupby("member").last()
    for m, split in enumerate(splits):
        row = {
            "seed": split.seed,
            "fold": split.fold,
            "n_train": len(split.train),
            "n_val": len(split.val),
            "epochs": int(history[history["member"] == m]["epoch"].max()) + 1,
            "best_epoch": int(last.loc[m, "best_epoch"]),
            "train_loss": float(last.loc[m, "train_loss"]),
        }
        row.update({f"val_{k}": v for k, v in _scores(y_cv[split.val], member_probs[m, split.val]).items()})
        if y_test is not None:
            row.update({f"test_{k}": v for k, v in _scores(y_test, member_probs[m, n_cv:]).items()})
        row["seconds"] = timings[m]
        rows.append(row)
    return pd.DataFrame(rows)


def _summary(splits, member_probs, ensemble, y_cv, y_test, n_cv, runs, cfg, classes, notes,
             patients) -> dict[str, float]:
    """Ensemble vs single-model metrics with bootstrap CIs (resampling patients), on the test cohort and
    out-of-fold.

    Single model: on the test cohort the mean of the members' metrics; out of fold, one seed's k-fold
    predictions pooled (a slide has one out-of-fold member per seed), metric averaged over the seeds.
    Spreads over members are sample standard deviations (ddof=1). A point estimate that is defined is
    kept when its bootstrap interval is not (`notes` says why)."""
    summary = {"n_members": len(splits), "n_cv_slides": n_cv, "n_test_slides": member_probs.shape[1] - n_cv}
    for metric in METRICS:
        summary[f"cv/val_{metric}_mean"] = float(runs[f"val_{metric}"].mean())
        summary[f"cv/val_{metric}_std"] = float(runs[f"val_{metric}"].std(ddof=1))
    seeds = sorted({s.seed for s in splits})
    per_seed_oof = np.stack(
        [
            np.nanmean(member_probs[[m for m, s in enumerate(splits) if s.seed == seed], :n_cv], axis=0)
            for seed in seeds
        ],
        axis=1,
    )  # (n_cv, seeds, C)
    views = {"oof": (y_cv, ensemble[:n_cv], per_seed_oof, patients[0])}
    if y_test is not None:
        views["test"] = (y_test, ensemble[n_cv:], member_probs[:, n_cv:].transpose(1, 0, 2), patients[1])
    for split, (y, ens, members, groups) in views.items():
        present = np.unique(y)
        if len(present) < 2:
            notes.append(
                f"{split}: every one of the {len(y)} slides has the label {classes[int(present[0])]!r} (one class "
                "only): AUC is undefined and no bootstrap CI is available; balanced accuracy is the recall "
                "of that class"
            )
        for metric, fn in METRICS.items():

            def mean_member(yy, ss, fn=fn):
                values = [_scores_one(fn, yy, ss[:, k]) for k in range(ss.shape[1])]
                return float(np.mean([v for v in values if np.isfinite(v)])) if np.isfinite(values).any() else np.nan

            point, low, high = _ci(fn, y, ens, cfg, groups)
            s_point, s_low, s_high = _ci(mean_member, y, members, cfg, groups)
            if len(present) >= 2 and np.isfinite(point) and not np.isfinite(low):
                notes.append(f"{split}: no bootstrap CI for {metric} (undefined on every resample)")
            summary.update(
                {
                    f"{split}/ensemble_{metric}": point,
                    f"{split}/ensemble_{metric}_low": low,
                    f"{split}/ensemble_{metric}_high": high,
                    f"{split}/single_{metric}": s_point,
                    f"{split}/single_{metric}_low": s_low,
                    f"{split}/single_{metric}_high": s_high,
                    f"{split}/ensemble_gain_{metric}": point - s_point,
                }
            )
    return summary


def _scores_one(fn, y, probs) -> float:
    try:
        return float(fn(y, probs))
    except ValueError:
        return float("nan")


def _ci(fn, y, scores, cfg, groups) -> tuple[float, float, float]:
    """(point, low, high), resampling whole patients; the point is kept where it is defined even if the
    interval is not."""
    point = _scores_one(fn, y, scores)
    if not np.isfinite(point) or len(np.unique(y)) < 2:  # one class: every resample has one class too
        return point, float("nan"), float("nan")
    try:
        _, low, high = bootstrap_ci(fn, y, scores, n_boot=cfg.n_boot, seed=0, stratified=True, groups=groups)
    except ValueError:
        return point, float("nan"), float("nan")
    return point, low, high


def _predictions_table(labels, test, splits, classes, member_probs, ensemble) -> pd.DataFrame:
    n_cv = len(labels)
    table = pd.DataFrame(
        {
            "slide_id": labels["slide_id"].tolist() + test["slide_id"].tolist(),
            "patient_id": labels["patient_id"].tolist()
            + test.get("patient_id", test["slide_id"]).astype(str).tolist(),
            "split": ["cv"] * n_cv + ["test"] * len(test),
            "label": labels["label"].tolist()
            + (test["label"].tolist() if "label" in test else [None] * len(test)),
        }
    )
    for seed in sorted({s.seed for s in splits}):
        fold = np.full(len(table), -1)
        for s in splits:
            if s.seed == seed:
                fold[s.val] = s.fold
        table[f"fold_seed{seed}"] = fold
    binary = len(classes) == 2
    table["pred"] = [classes[i] for i in ensemble.argmax(1)]
    if binary:  # prob_ensemble and prob_seed*_fold* are the probability of this class
        table["positive_class"] = classes[1]
    columns = {}
    for k, c in enumerate(classes):
        if binary and k == 0:
            continue
        suffix = "" if binary else f"_{c}"
        columns[f"prob_ensemble{suffix}"] = ensemble[:, k]
        for m, s in enumerate(splits):
            columns[f"prob_seed{s.seed}_fold{s.fold}{suffix}"] = member_probs[m, :, k]
    return pd.concat([table, pd.DataFrame(columns)], axis=1)


def _attention(results, stacks, group, bank, sampler, rows, splits, n_cv) -> dict[str, dict]:
    """Member-averaged attention over every tile of a few slides: the most confident correct slide per class."""
    n = results.config.attention_slides
    if not n:
        return {}
    test = "test" in results.predictions["split"].values
    start = n_cv if test else 0
    stop = len(rows) if test else n_cv
    labels = results.predictions["label"].to_numpy()[start:stop]
    probs = results.ensemble_probs[start:stop]
    labelled = not pd.isna(labels).all()
    queues = []
    for k, c in enumerate(results.classes):
        order = np.argsort(-probs[:, k], kind="stable")
        queues.append([p for p in order if labels[p] == c] if labelled else list(order))
    chosen = []
    while len(chosen) < n and any(queues):
        for q in queues:
            while q and q[0] in chosen:
                q.pop(0)
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    out = {}
    with torch.no_grad():
        for pos in chosen:
            row, position = rows[start + pos], start + pos
            x, mask = sampler.gather(torch.tensor([row]), None)
            weights, used = 0.0, 0
            for g, stacked in enumerate(stacks):
                members = [m for m in range(g * group, min((g + 1) * group, len(splits)))]
                keep = [
                    j for j, m in enumerate(members) if position >= n_cv or position in set(splits[m].val)
                ]
                if keep:
                    with bf16_autocast(sampler.device, results.config.amp):
                        _, att = stacked(x, mask, shared_input=True)
                    weights = weights + att[keep, 0].float().sum(0).cpu().numpy()
                    used += len(keep)
            sid = results.predictions["slide_id"].iloc[position]
            out[sid] = {"attention": weights / used, "coords": bank.slide_coords(sid)}
    return out


# ---------------------------------------------------------------------------------------------- reporting
