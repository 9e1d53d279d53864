"""Frozen-encoder evaluation on BigEarthNet (multi-label: micro/macro mAP, F1) and EuroSAT (accuracy).

Protocols on features of the frozen backbone: `linear` (a linear probe on the final CLS; multi-label
BCE or multilabel soft-margin), `knn` (weighted kNN, DINO style) and `last4` (linear probe on the
concatenated CLS of the last 4 blocks, the head SoftCon reports for BigEarthNet). The training subset
(BigEarthNet "10 %") is drawn once from a seed, saved as a list and logged with the results.

Input handling follows the encoder, never the user: its bands (our export metadata, the EO registry,
or RGB = B04/B03/B02 for 3-channel encoders), the SoftCon per-band scaling with the evaluation data
set's statistics (as the SoftCon authors evaluate), the registry's mean/std after that, and a resize
to the encoder's image size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from earthobs.bands import S1_BANDS, canonical_bands
from earthobs.choices import PROTOCOLS
from earthobs.ms_augment import resize
from earthobs.normalize import DATASET_STATS, S1_CLIP_QUANTILES, encoder_norm, stats_spec
from earthobs.readers import EOReadError, no_readable_sample
from earthobs.softcon_module import EXPORT_META_KEY, input_bands_of
from earthobs.ssl_data import to_model_bands
from evaluation import metrics as M
from fm.backbones import ViTBackbone

log = logging.getLogger(__name__)


@dataclass
class EOEncoder:
    """A frozen backbone with what its input needs: bands in order, scaling kind, mean/std, size."""

    backbone: ViTBackbone
    name: str
    bands: tuple[str, ...]
    norm_kind: str = "softcon"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    image_size: int = 224

    def __post_init__(self):
        n = len(self.bands)
        self.mean = tuple(self.mean) or (0.0,) * n
        self.std = tuple(self.std) or (1.0,) * n
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"encoder {self.name}: mean/std have {len(self.mean)}/{len(self.std)} values for {n} bands")

    @property
    def modality(self) -> str:
        return "s1" if set(self.bands) <= set(S1_BANDS) else "s2"


def load_eo_encoder(name_or_path: str, weights: str | None = None) -> EOEncoder:
    """Any registered encoder or checkpoint (ours, SoftCon's, DINOv2's) as an `EOEncoder`.

    A local file gets the input handling of the EO registry entry with its file name (SoftCon's
    `B13_vits14_softcon.pth`, ...); any other file that names no mean/std of its own and takes other than
    3 (RGB) channels gets the EO scaling alone (SoftCon's per-band scaling, identity mean/std), since the
    ImageNet mean/std the core assumes for foreign files are RGB values."""
    from earthobs.encoders import EO_ENCODERS, eo_encoder_for_file
    from fm.registry import get_encoder_spec, load_encoder

    loaded = load_encoder(name_or_path, weights=weights)
    meta = json.loads(loaded.meta.get(EXPORT_META_KEY) or "{}")
    by_file = None
    if not meta and loaded.spec.name not in EO_ENCODERS and loaded.weights_path is not None:
        by_file = eo_encoder_for_file(loaded.weights_path)
        if by_file is not None and len(EO_ENCODERS[by_file].bands) != loaded.backbone.cfg.in_chans:
            by_file = None  # only the name matches
    spec = get_encoder_spec(by_file) if by_file else loaded.spec
    bands = EO_ENCODERS[by_file].bands if by_file else input_bands_of(loaded)
    kind = meta.get("norm_kind") or encoder_norm(spec.name).kind
    mean, std = spec.mean, spec.std
    if len(mean) != len(bands) and "mean" not in loaded.meta:  # the core's RGB defaults on a multispectral file
        log.info("encoder %s: %d input bands, no mean/std of its own: SoftCon scaling only", name_or_path, len(bands))
        mean, std = (), ()
    return EOEncoder(loaded.backbone, str(name_or_path), bands, kind, mean, std, loaded.backbone.cfg.img_size)


class EncoderInput:
    """Raw sensor values (C, H, W) of `data_bands` -> the encoder's input tensor."""

    def __init__(self, encoder: EOEncoder, data_bands: Sequence[str], stats_table: str, image_size: int | None = None):
        self.data_bands = canonical_bands(list(data_bands))
        is_s1 = set(self.data_bands) <= set(S1_BANDS)
        if (encoder.modality == "s1") != is_s1:
            raise ValueError(f"encoder {encoder.name} takes {list(encoder.bands)} but the data holds "
                             f"{list(self.data_bands)}: pick the matching --modality")
        clip = S1_CLIP_QUANTILES if is_s1 and encoder.norm_kind == "softcon" else None
        self.norm = stats_spec(encoder.norm_kind, stats_table, self.data_bands, clip_quantiles=clip)
        self.bands = encoder.bands
        to_model_bands(np.zeros((len(self.data_bands), 1, 1), np.float32), self.data_bands, self.bands)  # fail early
        self.mean = torch.tensor(encoder.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(encoder.std, dtype=torch.float32)[:, None, None]
        self.size = image_size or encoder.image_size

    def __call__(self, raw) -> torch.Tensor:
        x = self.norm.apply(np.asarray(raw, dtype=np.float32))
        x = torch.from_numpy(np.ascontiguousarray(to_model_bands(x, self.data_bands, self.bands)))
        return (resize(x, self.size) - self.mean) / self.std


class _Inputs(Dataset):
    """Encoder inputs of a data set; an unreadable sample becomes an error record, not an exception."""

    def __init__(self, dataset, transform: EncoderInput):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        try:
            sample = self.dataset[i]
            return {"x": self.transform(sample["image"]), "y": torch.as_tensor(sample["label"]), "i": i}
        except (EOReadError, OSError) as err:
            return {"error": f"{type(err).__name__}: {err}", "i": i}


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    out = {"errors": [(it["i"], it["error"]) for it in items if "error" in it]}
    if good:
        out.update(x=torch.stack([it["x"] for it in good]), y=torch.stack([it["y"] for it in good]),
                   i=[it["i"] for it in good])
    return out


@dataclass
class Features:
    cls: np.ndarray  # (N, D) final CLS
    last4: np.ndarray  # (N, 4 D) CLS of the last 4 blocks, concatenated
    labels: np.ndarray  # (N, K) multi-hot or (N,) class ids
    ids: list[str]
    skipped: list[dict] = field(default_factory=list)

    def take(self, ids: Sequence[str]) -> Features:
        where = {i: k for k, i in enumerate(self.ids)}
        rows = [where[i] for i in ids if i in where]
        return Features(self.cls[rows], self.last4[rows], self.labels[rows], [self.ids[r] for r in rows])


def resolve_device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def _location(dataset) -> str:
    """Where a data set's samples come from, for messages: its root or packed folder."""
    inner = getattr(dataset, "dataset", dataset)
    where = getattr(inner, "root", None) or getattr(inner, "path", None)
    return str(where) if where is not None else type(inner).__name__


@torch.no_grad()
def extract_features(encoder: EOEncoder, dataset, transform: EncoderInput, batch_size: int = 64,
                     num_workers: int = 0, device: str = "cpu") -> Features:
    """CLS and last-4-block CLS features of every readable sample (unreadable ones are listed in `skipped`,
    with those a packed cache could not read when packed: --packed reports what a direct read reports)."""
    dev = resolve_device(device)
    backbone = encoder.backbone.to(dev).eval()
    loader = DataLoader(_Inputs(dataset, transform), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    cls, last4, labels, rows = [], [], [], []
    skipped = list(getattr(dataset, "skipped_when_packed", []))
    ids = list(dataset.ids)
    for batch in loader:
        skipped += [{"id": ids[i], "error": e} for i, e in batch["errors"]]
        if "x" not in batch:
            continue
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = backbone.forward_tokens(batch["x"].to(dev), return_blocks=4)
        cls.append(out["cls"].float().cpu())
        last4.append(out["block_cls"].flatten(1).float().cpu())
        labels.append(batch["y"])
        rows += batch["i"]
    for s in skipped:
        log.warning("skipped unreadable sample %s: %s", s["id"], s["error"])
    if not rows:
        raise no_readable_sample(len(ids), _location(dataset), skipped)
    return Features(torch.cat(cls).numpy(), torch.cat(last4).numpy(), torch.cat(labels).numpy(),
                    [ids[r] for r in rows], skipped)


def protocol_scores(protocol: str, train: Features, test: Features, multilabel: bool, cfg: dict,
                    val: Features | None = None, device: str = "cpu") -> np.ndarray:
    """Class scores of `test` (probabilities / kNN votes) from a protocol fitted on `train`."""
    from evaluation.knn import knn_classify, knn_multilabel_scores
    from evaluation.linear_probe import fit_linear_probe

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    if protocol == "knn":
        k, temp = cfg["knn"]["k"], cfg["knn"]["temperature"]
        if multilabel:
            return knn_multilabel_scores(train.cls, train.labels, test.cls, k=k, temperature=temp).numpy()
        _, scores = knn_classify(train.cls, train.labels, test.cls, k=k, temperature=temp,
                                 num_classes=cfg["num_classes"])
        return scores.numpy()
    key = "cls" if protocol == "linear" else "last4"
    lin = cfg["linear"]
    sweep = lin["lrs"] if val is not None and lin["lrs"] else None
    probe = fit_linear_probe(
        getattr(train, key), train.labels, getattr(val, key) if sweep else None, val.labels if sweep else None,
        task="multilabel" if multilabel else "multiclass", epochs=lin["epochs"], lr=lin["lr"],
        weight_decay=lin["weight_decay"], batch_size=lin["batch_size"], seed=cfg["seed"], device=resolve_device(device),
        loss=lin["loss"], lrs=sweep, num_classes=None if multilabel else cfg["num_classes"])
    return probe.predict_scores(getattr(test, key))


def multilabel_report(y: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                      threshold: float = 0.5) -> tuple[dict, pd.DataFrame]:
    metrics = {"map_micro": M.average_precision_micro(y, scores), "map_macro": M.average_precision_macro(y, scores),
               "f1_micro": M.f1_micro(y, scores, threshold), "f1_macro": M.f1_macro(y, scores, threshold)}
    scored = int((y.sum(axis=0) > 0).sum())
    metrics["map_macro_classes"] = scored  # macro AP averages the classes with a positive in the test set
    if scored < len(class_names):
        log.warning("macro mAP averages %d of %d classes: the others have no positive in the test set (published "
                    "BigEarthNet numbers average all 19)", scored, len(class_names))
    per_class = pd.DataFrame({"class": list(class_names), "test_positives": y.sum(axis=0).astype(int),
                              "ap": M.per_class_ap(y, scores)})
    return metrics, per_class


def _accuracy_of_scores(y: np.ndarray, scores: np.ndarray) -> float:
    return M.accuracy(y, scores.argmax(axis=1))


def bootstrap_intervals(y: np.ndarray, scores: np.ndarray, multilabel: bool, n_boot: int, seed: int = 0) -> dict:
    """Percentile 95 % intervals of the headline metrics (`<metric>_low`, `<metric>_high`): micro and macro mAP
    (samples resampled plainly) or accuracy (stratified by class)."""
    if multilabel:
        fns, stratified = {"map_micro": M.average_precision_micro, "map_macro": M.average_precision_macro}, False
    else:
        fns, stratified, y = {"accuracy": _accuracy_of_scores}, True, y.astype(int).ravel()
    out = {}
    for name, fn in fns.items():
        _, low, high = M.bootstrap_ci(fn, y, scores, n_boot=n_boot, seed=seed, stratified=stratified)
        out.update({f"{name}_low": low, f"{name}_high": high})
    return out


def multiclass_report(y: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> tuple[dict, pd.DataFrame]:
    pred = scores.argmax(axis=1)
    y = y.astype(int).ravel()
    metrics = {"accuracy": M.accuracy(y, pred), "balanced_accuracy": M.balanced_accuracy(y, pred)}
    rows = [{"class": c, "test_samples": int((y == k).sum()),
             "accuracy": float((pred[y == k] == k).mean()) if (y == k).any() else float("nan")}
            for k, c in enumerate(class_names)]
    return metrics, pd.DataFrame(rows)


def pr_curve_figure(y: np.ndarray, scores: np.ndarray, class_names: Sequence[str], title: str = ""):
    """Micro-averaged precision-recall curve (bold) over the per-class curves of classes with positives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(7, 5))
    for k, name in enumerate(class_names):
        if y[:, k].any():
            p, r, _ = precision_recall_curve(y[:, k], scores[:, k])
            ax.plot(r, p, lw=0.8, alpha=0.7, label=name[:32])
    p, r, _ = precision_recall_curve(y.ravel(), scores.ravel())
    ax.plot(r, p, lw=2.5, color="black", label="micro average")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def evaluate_features(train: Features, test: Features, protocol: str, multilabel: bool, cfg: dict,
                      class_names: Sequence[str], val: Features | None = None, device: str = "cpu"):
    """Scores and metrics of one protocol: (metrics dict, per-class table, test scores)."""
    scores = protocol_scores(protocol, train, test, multilabel, cfg, val, device)
    if multilabel:
        metrics, per_class = multilabel_report(test.labels, scores, class_names, cfg["threshold"])
    else:
        metrics, per_class = multiclass_report(test.labels, scores, class_names)
    if cfg.get("bootstrap"):
        metrics.update(bootstrap_intervals(test.labels, scores, multilabel, int(cfg["bootstrap"]), cfg.get("seed", 0)))
    return metrics, per_class, scores


# -- the fm-eval tasks -----------------------------------------------------------------------------------
TASKS = {"bigearthnet": True, "eurosat": False}  # task -> multi-label?


def dataset_name(task: str, cfg: dict) -> str:
    """The data set of a task, named as fm-prepare names it (`prepare.resolve_dataset_name`)."""
    from earthobs.prepare import resolve_dataset_name

    return "eurosat" if task == "eurosat" else resolve_dataset_name("bigearthnet", cfg["root"], cfg["version"])


def _subset_path(cfg: dict, name: str, split: str | None) -> Path:
    return Path(cfg["output_dir"]) / "subsets" / f"{name}-{split or 'all'}-{cfg['train_fraction'] * 100:g}pct-seed{cfg['seed']}.txt"


def eval_split(name: str, cfg: dict, split: str | None, subset: bool = False):
    """(data set, saved subset list or None) for one split; with `subset`, only the `train_fraction`
    drawn by `seed`. With `packed_dir` the split (or subset) is packed there once and memory-mapped."""
    from earthobs.bigearthnet import training_subset
    from earthobs.packed import IdSubset, PackedDataset
    from earthobs.prepare import build_dataset, prepare

    root, fraction = cfg["root"], cfg["train_fraction"] if subset else None
    if root is None:
        raise ValueError("--root is required: the data set's folder")
    if cfg["packed_dir"]:
        packed = PackedDataset(prepare(name, root, cfg["packed_dir"], split=split, sensor=cfg["modality"],
                                       fraction=fraction, seed=cfg["seed"], num_workers=cfg["num_workers"],
                                       nan_policy=cfg["nan_policy"]))
        saved = packed.meta["source"].get("subset_file")
        return packed, Path(saved) if saved else None
    dataset = build_dataset(name, root, split=split, sensor=cfg["modality"], nan_policy=cfg["nan_policy"])
    if not subset:
        return dataset, None
    path = _subset_path(cfg, name, split)
    return IdSubset(dataset, training_subset(dataset.ids, fraction=fraction, seed=cfg["seed"], path=path)), path


def evaluate_task(task: str, cfg: dict, encoder: EOEncoder | None = None) -> dict:
    """Run `fm-eval earthobs <task>`: features, protocol, metrics, MLflow run; returns the results."""
    from earthobs.bigearthnet import BEN19_CLASSES, training_subset
    from earthobs.eurosat import EUROSAT_CLASSES
    from evaluation.reporting import results_table, to_markdown
    from fm.io import atomic_path, atomic_write_text
    from fm.tracking import tracked_run

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS)}")
    if cfg["protocol"] not in PROTOCOLS:
        raise ValueError(f"unknown protocol {cfg['protocol']!r}; use one of {PROTOCOLS}")
    if cfg["splits"] not in ("official", "all"):
        raise ValueError(f"--splits must be official or all, got {cfg['splits']!r}")
    if task == "eurosat" and cfg["modality"] != "s2":
        raise ValueError("EuroSAT is Sentinel-2 only: use --modality s2")
    multilabel, classes = TASKS[task], BEN19_CLASSES if task == "bigearthnet" else EUROSAT_CLASSES
    if encoder is None:
        if not cfg["encoder"]:
            raise ValueError("--encoder is required: a registered name or a checkpoint path")
        encoder = load_eo_encoder(cfg["encoder"], cfg["weights"])
    name = dataset_name(task, cfg)
    table = DATASET_STATS["eurosat" if task == "eurosat" else "bigearthnet"][cfg["modality"]]
    opts = dict(batch_size=cfg["batch_size"], num_workers=cfg["num_workers"], device=cfg["device"])
    val = None
    if cfg["splits"] == "all":  # every sample in train and test: a pipeline check, not a benchmark
        log.warning("--splits all: the probe is tested on its own training samples; the numbers are not a benchmark")
        full, _ = eval_split(name, cfg, None)
        subset_file = _subset_path(cfg, name, None)
        ids = training_subset(full.ids, fraction=cfg["train_fraction"], seed=cfg["seed"], path=subset_file)
        test = extract_features(encoder, full, EncoderInput(encoder, full.bands, table, cfg["image_size"]), **opts)
        train = test.take(ids)
    else:
        train_ds, subset_file = eval_split(name, cfg, cfg["train_split"], subset=True)
        test_ds, _ = eval_split(name, cfg, cfg["test_split"])
        transform = EncoderInput(encoder, train_ds.bands, table, cfg["image_size"])
        train, test = extract_features(encoder, train_ds, transform, **opts), extract_features(encoder, test_ds, transform, **opts)
        if cfg["linear"]["lrs"] and cfg["protocol"] != "knn":
            val = extract_features(encoder, eval_split(name, cfg, cfg["val_split"])[0], transform, **opts)
    run_cfg = dict(cfg, num_classes=len(classes))
    metrics, per_class, scores = evaluate_features(train, test, cfg["protocol"], multilabel, run_cfg, classes, val,
                                                   cfg["device"])
    row = {"task": task, "encoder": encoder.name, "protocol": cfg["protocol"], "train_fraction": cfg["train_fraction"],
           "n_train": len(train.ids), "n_test": len(test.ids), "n_skipped": len(train.skipped) + len(test.skipped),
           **metrics}
    results = results_table([row])
    markdown = to_markdown(results)
    out_dir = Path(cfg["output_dir"])  # result files beside MLflow: what pipelines pass downstream
    per_class_name = "per_class_ap" if multilabel else "per_class_accuracy"
    with atomic_path(out_dir / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(out_dir / f"{per_class_name}.csv") as tmp:
        per_class.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "summary.md", markdown + "\n")
    tr = cfg["tracking"]
    run_name = tr["run_name"] or f"{task}-{cfg['protocol']}-{Path(str(encoder.name)).name}"
    with tracked_run(tr["experiment"], run_name=run_name, config=cfg, tracking_uri=tr["tracking_uri"],
                     tags={"task": task, "encoder": encoder.name, "protocol": cfg["protocol"]}) as run:
        run.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        run.log_table(results, "results")
        run.log_table(per_class, per_class_name)
        if subset_file is not None:
            run.log_artifact(subset_file, "subsets")
        skipped = train.skipped + test.skipped
        if skipped:
            run.log_dict({"skipped": skipped}, "skipped.json")
        if multilabel:
            import matplotlib.pyplot as plt

            fig = pr_curve_figure(test.labels, scores, classes, title=f"{task} {cfg['protocol']}: {run_name}")
            run.log_figure(fig, "pr_curves")
            plt.close(fig)
    return {"metrics": metrics, "results": results, "per_class": per_class, "markdown": markdown,
            "subset_file": subset_file, "run_id": run.run_id, "n_train": len(train.ids), "n_test": len(test.ids)}


def demo_probe(backbone: ViTBackbone, cfg: dict, protocol: str = "linear", cache_dir=None) -> dict:
    """Metrics of `protocol` for `backbone` on the generated demo scenes (train split -> test split),
    with the evaluation defaults of eval_bigearthnet.yaml: the before/after check of the CPU demo."""
    import copy

    from earthobs.bigearthnet import BEN19_CLASSES
    from earthobs.ssl_data import modality_bands, training_dataset
    from fm.config import load_yaml

    d = cfg["data"]
    encoder = EOEncoder(copy.deepcopy(backbone).cpu().float(), "demo", modality_bands(d["modality"]),
                        image_size=cfg["views"]["size"])
    splits = [training_dataset(dict(cfg, data=dict(d, split=s)), cache_dir)[0] for s in ("train", "test")]
    transform = EncoderInput(encoder, splits[0].bands, DATASET_STATS["bigearthnet"][d["modality"]])
    train, test = (extract_features(encoder, ds, transform, batch_size=128) for ds in splits)
    eval_cfg = load_yaml(Path(__file__).resolve().parent / "configs" / "eval_bigearthnet.yaml")
    return evaluate_features(train, test, protocol, True, eval_cfg, BEN19_CLASSES)[0]
