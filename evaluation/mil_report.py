"""Figures and MLflow logging of a finished MIL protocol: ROC curves, attention heatmaps over slide
thumbnails, and one parent run with a child run per member (`log_mil_results`)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from evaluation.mil_results import MILResults


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
        if (y == k).any() and (y != k).any():
            fpr, tpr, _ = roc_curve(y == k, results.ensemble_probs[rows, k])
            ax.plot(fpr, tpr, color="tab:red", lw=2, label="ensemble")
        else:  # a one-class split has no ROC curve
            ax.text(0.5, 0.5, "one class only: no ROC", ha="center", va="center", transform=ax.transAxes)
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        ax.set(
            xlabel="false positive rate", ylabel="true positive rate", title=f"{split}: {results.classes[k]}"
        )
        if ax.get_legend_handles_labels()[0]:
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
