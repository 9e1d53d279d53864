"""Slide-level MIL protocol: k-fold x seed ABMIL members, ensembled on an external cohort.

The Phikon-v2 protocol: frozen features, gated-attention MIL, up to 5,000 tiles sampled per slide,
Adam lr 1e-3, 5 folds x 5 seeds = 25 members whose predicted probabilities are averaged on the test
cohort. We report both the ensemble and the mean single-member metric (bootstrap 95 % CIs), so the
gain of ensembling is visible, and the cross-validated out-of-fold metrics. Members are trained in
lockstep (`StackedMIL`) from features held on the device, so a step has no disk I/O and no
per-member Python work. MLflow logging is one thin function at the end (`log_mil_results`), so the
protocol itself runs and is tested without a tracking store.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from evaluation.cv import CVSplit, check_labels, cv_splits
from evaluation.metrics import balanced_accuracy, binary_auc, bootstrap_ci, multiclass_auc_ovr
from evaluation.mil_data import BagSampler, FeatureBank
from evaluation.mil_models import (
    LockstepTraining,
    StackedMIL,
    bf16_autocast,
    build_mil_model,
    fit_lockstep,
    predict_lockstep,
)
from evaluation.reporting import format_ci, to_markdown


@dataclass
class MILConfig:
    """Protocol settings; defaults follow Phikon-v2 where it states them (model, lr, tiles, folds, seeds)."""

    model: str = "abmil"
    model_kwargs: dict = field(default_factory=dict)
    folds: int = 5
    seeds: int = 5
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-5  # not stated by Phikon-v2; CLAM's Adam default
    max_tiles: int | None = 5000  # instances sampled per bag per training step
    eval_max_tiles: int | None = None  # None: predict from every tile
    bag_batch_size: int = 1
    early_stopping_patience: int | None = None  # on the member's validation fold (optimistic for CV metrics)
    positive_class: object = None  # binary tasks: which label is "positive" (default: the larger sorted)
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    parallel_models: int | None = None  # members per lockstep group; None = all at once
    features_on_device: bool | None = None  # None: when they fit
    eval_tile_budget: int = 500_000  # member x tile rows per prediction batch
    n_boot: int = 1000
    attention_slides: int = 3


@dataclass
class MILResults:
    """Everything one protocol run produced; `predictions` rows align with `member_probs` axis 1."""

    config: MILConfig
    classes: list
    runs: pd.DataFrame  # one row per member: seed, fold, sizes, epochs, val/test metrics
    history: pd.DataFrame  # per member and epoch: train (and val) loss
    predictions: pd.DataFrame  # slide_id, split, label, per-member and ensemble probabilities
    member_probs: np.ndarray  # (M, n_slides, C); NaN for CV slides that were in a member's training set
    ensemble_probs: np.ndarray  # (n_slides, C): test = mean of all members, CV = mean of out-of-fold members
    summary: dict[str, float]
    attention: dict[str, dict] = field(default_factory=dict)  # slide_id -> {"attention", "coords"}

    @property
    def primary_split(self) -> str:
        return "test" if "test/ensemble_auc" in self.summary else "oof"

    def _with_ci(self, key: str) -> str:
        return format_ci(self.summary[key], self.summary[key + "_low"], self.summary[key + "_high"])

    def to_markdown(self) -> str:
        rows = []
        for split in ("test", "oof"):
            for metric in ("auc", "balanced_accuracy"):
                key = f"{split}/ensemble_{metric}"
                if key not in self.summary:
                    continue
                rows.append(
                    {
                        "split": split,
                        "metric": metric,
                        "ensemble (95% CI)": self._with_ci(key),
                        "single member mean (95% CI)": self._with_ci(f"{split}/single_{metric}"),
                        "ensemble gain": self.summary[f"{split}/ensemble_gain_{metric}"],
                    }
                )
        cv = self.runs[["val_auc", "val_balanced_accuracy"]].agg(["mean", "std"]).T.reset_index()
        cv.columns = ["per-member validation metric", "mean", "std"]
        cfg = self.config
        head = (
            f"MIL protocol: {cfg.model}, {cfg.folds} folds x {cfg.seeds} seeds = {len(self.runs)} members, "
            f"classes {self.classes}, {cfg.epochs} epochs, lr {cfg.lr}, max_tiles {cfg.max_tiles}\n\n"
        )
        return head + to_markdown(pd.DataFrame(rows)) + "\n" + to_markdown(cv)


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
    summary = _summary(splits, member_probs, ensemble, y_cv, y_test, n_cv, runs, cfg)
    predictions = _predictions_table(labels, test, splits, classes, member_probs, ensemble)
    results = MILResults(
        cfg, classes, runs, history.drop(columns="member"), predictions, member_probs, ensemble, summary
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
    if "label" not in test.columns:
        return test, None
    unknown = sorted(set(test["label"].dropna()) - set(classes), key=str)
    if unknown or test["label"].isna().any():
        found = unknown or "empty labels"
        raise ValueError(f"test labels must be among the training classes {classes}; found {found}")
    return test, test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()


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


def _auc(y: np.ndarray, probs: np.ndarray) -> float:
    return binary_auc(y, probs[:, 1]) if probs.shape[1] == 2 else multiclass_auc_ovr(y, probs)


def _balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return balanced_accuracy(y, probs.argmax(1))


METRICS = {"auc": _auc, "balanced_accuracy": _balanced_accuracy}


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


def _summary(splits, member_probs, ensemble, y_cv, y_test, n_cv, runs, cfg) -> dict[str, float]:
    """Ensemble vs mean single-member metrics with bootstrap CIs, on the test cohort and out-of-fold."""
    summary = {"n_members": len(splits), "n_cv_slides": n_cv, "n_test_slides": member_probs.shape[1] - n_cv}
    for metric in METRICS:
        summary[f"cv/val_{metric}_mean"] = float(runs[f"val_{metric}"].mean())
        summary[f"cv/val_{metric}_std"] = float(runs[f"val_{metric}"].std(ddof=0))
    seeds = sorted({s.seed for s in splits})
    per_seed_oof = np.stack(
        [
            np.nanmean(member_probs[[m for m, s in enumerate(splits) if s.seed == seed], :n_cv], axis=0)
            for seed in seeds
        ],
        axis=1,
    )  # (n_cv, seeds, C)
    views = {"oof": (y_cv, ensemble[:n_cv], per_seed_oof)}
    if y_test is not None:
        views["test"] = (y_test, ensemble[n_cv:], member_probs[:, n_cv:].transpose(1, 0, 2))
    for split, (y, ens, members) in views.items():
        for metric, fn in METRICS.items():

            def mean_member(yy, ss, fn=fn):
                return float(np.nanmean([_scores_one(fn, yy, ss[:, k]) for k in range(ss.shape[1])]))

            point, low, high = _ci(fn, y, ens, cfg)
            s_point, s_low, s_high = _ci(mean_member, y, members, cfg)
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
        return fn(y, probs)
    except ValueError:
        return float("nan")


def _ci(fn, y, scores, cfg) -> tuple[float, float, float]:
    try:
        return bootstrap_ci(fn, y, scores, n_boot=cfg.n_boot, seed=0, stratified=True)
    except ValueError:
        return float("nan"), float("nan"), float("nan")


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


def roc_figure(results: MILResults):
    """ROC of the ensemble (bold) and of each member (faint) on the primary split, one panel per positive class."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    split = results.primary_split
    rows = (results.predictions["split"] == ("test" if split == "test" else "cv")).to_numpy()
    y = results.predictions.loc[rows, "label"].map({c: i for i, c in enumerate(results.classes)}).to_numpy()
    positives = [1] if len(results.classes) == 2 else list(range(len(results.classes)))
    fig = Figure(figsize=(4.5 * len(positives), 4.5))
    for panel, k in enumerate(positives):
        ax = fig.add_subplot(1, len(positives), panel + 1)
        for member in results.member_probs[:, rows, k]:
            kept = ~np.isnan(member)
            if (y[kept] == k).any() and (y[kept] != k).any():
                fpr, tpr, _ = roc_curve(y[kept] == k, member[kept])
                ax.plot(fpr, tpr, color="tab:blue", alpha=0.15, lw=0.8)
        fpr, tpr, _ = roc_curve(y == k, results.ensemble_probs[rows, k])
        ax.plot(fpr, tpr, color="tab:red", lw=2, label="ensemble")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        ax.set(
            xlabel="false positive rate", ylabel="true positive rate", title=f"{split}: {results.classes[k]}"
        )
        ax.legend(loc="lower right")
    return fig


def attention_heatmap(
    coords: np.ndarray,
    attention: np.ndarray,
    thumbnail: np.ndarray,
    downsample: float,
    tile_size: float | None = None,
    cmap: str = "inferno",
    alpha: float = 0.5,
):
    """Attention percentiles of tiles (level-0 top-left `coords`) drawn over a slide thumbnail.

    `downsample` = level-0 pixels per thumbnail pixel; `tile_size` (level-0 pixels) defaults to the
    smallest spacing between tile coordinates. Percentiles, not raw weights: softmax attention is
    heavy-tailed, and ranks show where the model looks on every slide alike.
    """
    from matplotlib.figure import Figure

    coords = np.asarray(coords, dtype=np.float64)
    attention = np.asarray(attention, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2 or len(coords) != len(attention):
        raise ValueError(
            f"coords {coords.shape} must be (N, 2) with one attention value each ({attention.shape})"
        )
    if tile_size is None:
        steps = np.diff(np.unique(coords[:, 0]))
        tile_size = float(steps.min()) if steps.size else 256.0
    ranks = np.argsort(np.argsort(attention, kind="stable"), kind="stable") / max(len(attention) - 1, 1)
    height, width = thumbnail.shape[:2]
    overlay = np.full((height, width), np.nan)
    side = max(1, int(round(tile_size / downsample)))
    for (x, y), value in zip((coords[:, :2] / downsample).astype(int), ranks):
        overlay[max(y, 0) : y + side, max(x, 0) : x + side] = value
    fig = Figure(figsize=(8, 8 * height / max(width, 1) + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumbnail)
    image = ax.imshow(np.ma.masked_invalid(overlay), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.04, label="attention percentile")
    ax.set_axis_off()
    return fig


def log_mil_results(
    results: MILResults, run, thumbnails: dict | None = None, log_members: bool = True
) -> None:
    """Log a protocol run into an open `fm.tracking` run, with one child run per fold x seed member.

    `thumbnails` maps slide_id -> (thumbnail array, downsample) for the attention heatmaps (the domain
    that owns the slides provides them); attention values are logged as tables either way.
    """
    from fm.tracking import child_run

    run.log_params(
        {"mil": dataclasses.asdict(results.config), "mil_classes": [str(c) for c in results.classes]}
    )
    run.log_metrics({k: v for k, v in results.summary.items() if np.isfinite(v)})
    run.log_table(results.runs, "mil_runs")
    run.log_table(results.history, "mil_history")
    run.log_table(results.predictions, "mil_predictions")
    run.log_text(results.to_markdown(), "mil_summary.md")
    run.log_figure(roc_figure(results), "mil_roc")
    tables = []
    for sid, item in results.attention.items():
        table = pd.DataFrame({"slide_id": sid, "attention": item["attention"]})
        if item["coords"] is not None:
            table["x"], table["y"] = item["coords"][:, 0], item["coords"][:, 1]
            if thumbnails and sid in thumbnails:
                thumbnail, downsample = thumbnails[sid]
                figure = attention_heatmap(item["coords"], item["attention"], thumbnail, downsample)
                run.log_figure(figure, f"attention_{sid}", artifact_path="attention")
        tables.append(table)
    if tables:
        run.log_table(pd.concat(tables, ignore_index=True), "mil_attention", artifact_path="attention")
    if not log_members:
        return
    for row in results.runs.itertuples(index=False):
        name = f"seed{row.seed}-fold{row.fold}"
        with child_run(run, run_name=name, seed=row.seed, fold=row.fold) as child:
            child.log_params({"seed": row.seed, "fold": row.fold, "n_train": row.n_train, "n_val": row.n_val})
            values = {
                k: v
                for k, v in row._asdict().items()
                if k not in ("seed", "fold", "train_loss") and np.isfinite(v)
            }  # the curve has train_loss
            child.log_metrics(values)
            curves = results.history[
                (results.history["seed"] == row.seed) & (results.history["fold"] == row.fold)
            ]
            _log_curves(child, curves)


def _log_curves(run, curves: pd.DataFrame) -> None:
    """Per-epoch losses of one member in a single batch (one store round trip instead of one per epoch)."""
    from mlflow.entities import Metric

    if not getattr(run, "enabled", False):
        return
    now = int(time.time() * 1000)
    metrics = [
        Metric(name, float(value), now, int(epoch))
        for name in ("train_loss", "val_loss")
        for epoch, value in zip(curves["epoch"], curves[name])
        if np.isfinite(value)
    ]
    run.client.log_batch(run.run_id, metrics=metrics)
