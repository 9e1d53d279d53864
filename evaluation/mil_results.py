"""What the MIL protocol is run with and what it returns: `MILConfig` (checked on creation, so a bad
setting fails with its name, not later as an empty bag or an obscure KeyError), `MILResults` with its
markdown summary, the slide-level metrics on predicted probabilities, and what each summary key means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from evaluation.metrics import balanced_accuracy, binary_auc, multiclass_auc_ovr
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

    def __post_init__(self) -> None:
        """Refuse settings that would train on empty bags or crash later with an obscure error."""
        problems = [
            f"{name}={getattr(self, name)!r} (must be an integer >= {least}{', or None' * optional})"
            for name, least, optional in _INTEGER_MINIMA
            if not _is_int_at_least(getattr(self, name), least, optional)
        ]
        if not isinstance(self.seeds, (int, np.integer)) and _is_seed_list(self.seeds):
            problems = [p for p in problems if not p.startswith("seeds=")]  # an explicit list of seeds
        for name, strict in (("lr", True), ("weight_decay", False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and np.isfinite(value) and (value > 0 if strict else value >= 0)
            if not ok:
                problems.append(f"{name}={value!r} (must be a number {'> 0' if strict else '>= 0'})")
        if problems:
            raise ValueError(f"invalid MIL protocol setting(s): {'; '.join(problems)}")


# (field, minimum, None allowed): folds >= 2 (one fold leaves nothing to validate on), max_tiles >= 1
# (0 tiles is an empty bag), early_stopping_patience None (off) or >= 1
_INTEGER_MINIMA = (
    ("folds", 2, False),
    ("seeds", 1, False),
    ("epochs", 1, False),
    ("max_tiles", 1, True),
    ("eval_max_tiles", 1, True),
    ("bag_batch_size", 1, False),
    ("early_stopping_patience", 1, True),
    ("parallel_models", 1, True),
    ("eval_tile_budget", 1, False),
    ("n_boot", 1, False),
    ("attention_slides", 0, False),
)


def _is_int_at_least(value, least: int, optional: bool) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least


def _is_seed_list(value) -> bool:
    try:
        return len(value) > 0 and all(_is_int_at_least(v, 0, False) for v in value)
    except TypeError:
        return False


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
    notes: list[str] = field(default_factory=list)  # why a metric or interval is missing, and similar

    @property
    def primary_split(self) -> str:
        return "test" if "test/ensemble_auc" in self.summary else "oof"

    def _with_ci(self, key: str) -> str:
        point, low, high = (self.summary[key + suffix] for suffix in ("", "_low", "_high"))
        if not np.isfinite(point):
            return "undefined"
        if not (np.isfinite(low) and np.isfinite(high)):
            return f"{point:.3f} [CI n/a]"
        return format_ci(point, low, high)

    def to_markdown(self, notes: bool = True) -> str:
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
                        "single model (95% CI)": self._with_ci(f"{split}/single_{metric}"),
                        "single model is": SINGLE_MODEL_LABEL[split],
                        "ensemble gain": self.summary[f"{split}/ensemble_gain_{metric}"],
                    }
                )
        cv = pd.DataFrame(
            {
                "per-member validation metric": [f"val_{m}" for m in METRICS],
                "mean": [self.summary[f"cv/val_{m}_mean"] for m in METRICS],
                "std": [self.summary[f"cv/val_{m}_std"] for m in METRICS],
            }
        )
        cfg = self.config
        n, n_seeds = len(self.runs), self.runs["seed"].nunique()
        head = (
            f"MIL protocol: {cfg.model}, {cfg.folds} folds x {cfg.seeds} seeds = {n} members, "
            f"classes {self.classes}, {cfg.epochs} epochs, lr {cfg.lr}, max_tiles {cfg.max_tiles}\n\n"
        )
        legend = (
            f"test: ensemble = mean probability of the {n} members, single model = mean of the {n} members' "
            "metrics. " if "test/ensemble_auc" in self.summary else ""
        ) + (
            f"oof (out-of-fold): ensemble = each slide's mean probability over its {n_seeds} out-of-fold "
            "members (one per seed), single model = one seed's k-fold validation predictions pooled, metric "
            f"averaged over the {n_seeds} seeds. std = sample standard deviation (ddof=1) over the {n} members.\n"
        )
        if len(self.classes) == 2:
            legend += f"Binary probabilities (prob_* in predictions.csv) are of class {self.classes[1]!r}.\n"
        text = head + to_markdown(pd.DataFrame(rows)) + "\n" + to_markdown(cv) + "\n" + legend
        if notes and self.notes:
            text += "\nNotes:\n" + "".join(f"- {note}\n" for note in self.notes)
        return text


SINGLE_MODEL_LABEL = {"test": "member mean", "oof": "single seed (k-fold pooled)"}


def metric_description(key: str) -> str:
    """What a summary key measures, in words (the `description` column of results tables)."""
    split, _, name = key.partition("/")
    if not name:
        return {"n_members": "members trained (folds x seeds)", "n_cv_slides": "labelled slides in the CV",
                "n_test_slides": "slides of the test cohort"}.get(key, "")
    if split == "cv":
        what = name.removeprefix("val_").rsplit("_", 1)[0]
        if name.endswith("_std"):
            return f"sample std (ddof=1) of the members' validation-fold {what}"
        return f"mean of the members' validation-fold {what}"
    where = {"test": "test cohort", "oof": "out-of-fold"}.get(split, split)
    if name.startswith("ensemble_gain_"):
        return f"{where}: ensemble minus single model ({name.removeprefix('ensemble_gain_')})"
    if name.startswith("ensemble_"):
        ensemble = {"test": "mean probability of all members",
                    "oof": "each slide's mean probability over its out-of-fold members (one per seed)"}
        return f"{where}: {name.removeprefix('ensemble_')} of the ensemble ({ensemble.get(split, '')})"
    if name.startswith("single_"):
        single = {"test": "mean over the members (single member mean)",
                  "oof": "single seed (k-fold pooled): one seed's validation folds pooled, mean over seeds"}
        return f"{where}: {name.removeprefix('single_')} of a single model ({single.get(split, '')})"
    return ""


def _auc(y: np.ndarray, probs: np.ndarray) -> float:
    return binary_auc(y, probs[:, 1]) if probs.shape[1] == 2 else multiclass_auc_ovr(y, probs)


def _balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return balanced_accuracy(y, probs.argmax(1))


METRICS = {"auc": _auc, "balanced_accuracy": _balanced_accuracy}
