"""SoftCon training batches: two multispectral views of each scene plus its multi-hot labels.

The batch stream reuses the core's `MultiCropBatches` (a whole batch is a pure function of seed, batch
index and rank, so a resumed run continues with exactly the batch after its checkpoint, whatever the
number of workers). What changes for earth observation:
- the image source normalises raw sensor values per band (`earthobs.normalize`) and puts them in the
  model's band order (a zero B10 is inserted for 12-band BigEarthNet / L2A data);
- the views come from `MultispectralAugment` (no RGB colour jitter); "global crop" 0 is the student's
  view (masked later by Siamese token dropping), crop 1 the teacher's full view;
- the batch carries `labels` (B, K) multi-hot and `has_label` (B,) for the soft term.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from earthobs.bands import S1_BANDS, S2_L1C_BANDS, canonical_bands, to_13_bands, to_band_order
from earthobs.ms_augment import MultispectralAugment
from earthobs.normalize import DATASET_STATS, S1_CLIP_QUANTILES, NormSpec, stats_spec
from earthobs.readers import EOReadError
from fm.skipped_inputs import SkippedInputs
from fm.ssl_data import MultiCropBatches

MAX_REPLACEMENTS = 16  # unreadable samples replaced in a row before a batch gives up
_REPLACEMENT_STEP = 7919  # a prime: the replacements of a sample spread over the data set

MODALITY_BANDS: dict[str, tuple[str, ...]] = {"s2": S2_L1C_BANDS, "s1": S1_BANDS}
DATA_KINDS = ("demo", "bigearthnet", "ssl4eo")


def modality_bands(modality: str) -> tuple[str, ...]:
    """Model input bands: 13-band S2 L1C (SoftCon's order) or S1 [VV, VH]."""
    if modality not in MODALITY_BANDS:
        raise ValueError(f"unknown modality {modality!r}; use one of {sorted(MODALITY_BANDS)}")
    return MODALITY_BANDS[modality]


def to_model_bands(x, have: Sequence[str], want: Sequence[str]):
    """Reorder normalised channels to the model's bands; a missing B10 becomes a zero plane."""
    have, want = canonical_bands(list(have)), canonical_bands(list(want))
    if have == want:
        return x
    if len(want) == 13 and "B10" not in have:
        return to_band_order(to_13_bands(x, have), S2_L1C_BANDS, want)
    return to_band_order(x, have, want)


def parse_data_source(text: str) -> tuple[str, str | None]:
    """'demo' | 'bigearthnet:ROOT' | 'ssl4eo:ROOT' -> (kind, root)."""
    kind, _, root = text.partition(":")
    if kind not in DATA_KINDS:
        raise ValueError(f"--data {text!r}: the kind must be one of {DATA_KINDS} (e.g. ssl4eo:/data/ssl4eo-s12)")
    if kind != "demo" and not root:
        raise ValueError(f"--data {text!r}: give the data root as {kind}:ROOT")
    if root and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"--data {text!r}: folder {root} does not exist")
    return kind, (str(Path(root).expanduser()) if root else None)


class EOSource:
    """`ImageSource` over an EO data set (raw reader or packed cache): `get(i)` is the normalised image
    in the model's bands, `label(i)` the multi-hot vector (zeros when unlabelled)."""

    def __init__(self, dataset, norm: NormSpec, bands: Sequence[str], num_classes: int | None = None,
                 use_labels: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"the training data set {type(dataset).__name__} is empty")
        data_bands = getattr(dataset, "bands", None)
        if data_bands is None:
            raise ValueError(f"{type(dataset).__name__} does not say which bands it holds (.bands)")
        self.dataset, self.norm, self.use_labels = dataset, norm, use_labels
        self.data_bands, self.bands = canonical_bands(list(data_bands)), canonical_bands(list(bands))
        if norm.bands != self.data_bands:
            raise ValueError(f"normalisation is for bands {list(norm.bands)} but the data holds {list(self.data_bands)}")
        to_model_bands(np.zeros((len(self.data_bands), 1, 1), np.float32), self.data_bands, self.bands)  # fail early
        self.num_classes = num_classes or self._label_width()
        self.skipped = SkippedInputs("sample")  # samples found unreadable (keyed by index)
        self.replaced: dict[int, int] = {}  # sample -> the one read in its place by the last get()

    def __len__(self) -> int:
        return len(self.dataset)

    def _raw_image(self, i: int) -> np.ndarray:
        ds = self.dataset
        if hasattr(ds, "load_image"):
            return ds.load_image(i)
        return np.asarray(ds[i]["image"])

    def _label_width(self) -> int:
        """Classes per label, from the first sample whose label can be read."""
        errors = []
        for j in range(min(len(self.dataset), MAX_REPLACEMENTS + 1)):
            try:
                return int(np.asarray(self._raw_label(j)[0]).shape[-1])
            except (EOReadError, OSError) as err:
                errors.append(err)
        raise EOReadError(getattr(errors[-1], "path", "?"), f"no label of the first {len(errors)} training samples "
                          f"could be read; the last: {errors[-1]}")

    def _name(self, i: int) -> str:
        ids = getattr(self.dataset, "ids", None)
        return f"{type(self.dataset).__name__} sample {i}" + (f" ({ids[i]})" if ids is not None else "")

    def _raw_label(self, i: int) -> tuple[np.ndarray, bool]:
        ds = self.dataset
        if hasattr(ds, "rows") and hasattr(ds, "labels"):  # packed cache: no image read needed
            row = int(ds.rows[i])
            has = bool(ds.has_label[row]) if getattr(ds, "has_label", None) is not None else True
            return np.asarray(ds.labels[row]), has
        if hasattr(ds, "load_label"):
            out = ds.load_label(i)
            return out if isinstance(out, tuple) else (out, True)
        sample = ds[i]
        return np.asarray(sample["label"]), bool(sample.get("has_label", True))

    def get(self, i: int) -> torch.Tensor:
        """The image of sample `i`; a sample that cannot be read (a missing band file, a corrupt GeoTIFF)
        is replaced by the first readable of a fixed sequence of others, so one bad patch never stops a
        training run and a batch stays a pure function of its seed. `label(i)` follows the replacement."""
        errors = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            j = (i + attempt * _REPLACEMENT_STEP) % len(self.dataset)
            try:
                raw = self._raw_image(j)
                if self.use_labels:
                    self._raw_label(j)  # a patch whose label file is unreadable is replaced too
            except (EOReadError, OSError) as err:
                errors.append(err)
                self.skipped.note(j, self._name(j), err)
                continue
            if j == i:
                self.replaced.pop(i, None)
            else:
                self.replaced[i] = j
            x = self.norm.apply(np.asarray(raw, dtype=np.float32))
            return torch.from_numpy(np.ascontiguousarray(to_model_bands(x, self.data_bands, self.bands)))
        raise EOReadError(getattr(errors[-1], "path", "?"), f"{len(errors)} training samples in a row could not be "
                          f"read (from sample {i}); the last: {errors[-1]}")

    def label(self, i: int) -> tuple[torch.Tensor, bool]:
        """(multi-hot, labelled?); all zeros when unlabelled or when labels are switched off."""
        if not self.use_labels:
            return torch.zeros(self.num_classes), False
        y, has = self._raw_label(self.replaced.get(i, i))
        y = torch.as_tensor(np.asarray(y, dtype=np.float32))
        if y.shape != (self.num_classes,):
            raise ValueError(f"sample {i} of {type(self.dataset).__name__}: label shape {tuple(y.shape)}, "
                             f"expected ({self.num_classes},) multi-hot")
        return (y, has) if has else (torch.zeros_like(y), False)


class MultispectralViews:
    """The crops a SoftCon batch needs: [student view, teacher view] and optional local views (for the
    DINOv2 term). Exposes `global_size` like the core's MultiCropTransform."""

    def __init__(self, views_cfg: dict, n_local: int = 0):
        student = dict(views_cfg["student"], size=views_cfg["size"])
        teacher = dict(views_cfg["teacher"], size=views_cfg["size"])
        self.student, self.teacher = MultispectralAugment(student), MultispectralAugment(teacher)
        self.local = MultispectralAugment(dict(views_cfg["local"], size=views_cfg["local_size"])) if n_local else None
        self.global_size, self.n_local = views_cfg["size"], n_local

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        local = [self.local(x) for _ in range(self.n_local)] if self.local is not None else []
        return [self.student(x), self.teacher(x)], local


class SoftConBatches(MultiCropBatches):
    """Core multi-crop batches over an `EOSource`, with `labels` (B, K) and `has_label` (B,) added."""

    def make_batch(self, k: int) -> dict[str, torch.Tensor]:
        batch = super().make_batch(k)
        labels = [self.source.label(int(i)) for i in batch["indices"]]
        batch["labels"] = torch.stack([y for y, _ in labels])
        batch["has_label"] = torch.tensor([h for _, h in labels])
        return batch


class SoftConDataModule(L.LightningDataModule):
    """Resumable SoftCon batches for the current rank (same contract as fm.ssl_data.SSLDataModule)."""

    def __init__(self, source: EOSource, views: MultispectralViews, data_cfg: dict, patch_size: int,
                 mask_probability: float = 0.0, mask_ratio: tuple[float, float] = (0.1, 0.5)):
        super().__init__()
        self.source, self.views, self.cfg = source, views, data_cfg
        self.patch_size, self.mask_probability, self.mask_ratio = patch_size, mask_probability, tuple(mask_ratio)

    def batches(self, start: int = 0, rank: int = 0) -> SoftConBatches:
        return SoftConBatches(self.source, self.views, self.cfg["batch_size"], self.patch_size,
                              self.mask_probability, self.mask_ratio, seed=self.cfg["seed"],
                              start_batch=start, rank=rank)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        ds = self.batches(trainer.global_step if trainer else 0, trainer.global_rank if trainer else 0)
        workers = self.cfg["num_workers"]
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False, prefetch_factor=4 if workers else None)


def training_dataset(cfg: dict, cache_dir: str | os.PathLike | None = None):
    """The training data set named by `data.source` and the key of its statistics table.

    With `data.packed_dir` the split is packed there once (`earthobs.prepare.prepare`) and read from the
    memory map; the generated demo scenes are always packed, under the cache dir. `data.nan_policy`
    says what NaN/nodata pixels of the GeoTIFFs do (raise: the patch fails; zero: filled with 0)."""
    from earthobs.packed import PackedDataset
    from earthobs.prepare import build_dataset, prepare, resolve_dataset_name

    d = cfg["data"]
    kind, root = parse_data_source(d["source"])
    if d["labels"] and kind != "ssl4eo":
        raise ValueError(f"--labels is for SSL4EO-S12 data; {kind} data carries its own labels (data.use_labels)")
    packed = d["packed_dir"]
    if kind == "demo":
        from earthobs.demo_scenes import cache_root, demo_bigearthnet

        root = demo_bigearthnet(cache_dir=cache_dir, n=d["demo_scenes"])  # generated once, then reused
        name, stats, kwargs = "bigearthnet-v1", "bigearthnet", {"split": d["split"]}
        packed = packed or str(cache_root(cache_dir) / "packed" / root.name)
    elif kind == "bigearthnet":
        name = resolve_dataset_name("bigearthnet", root)  # as fm-prepare names it, so its caches are found
        stats, kwargs = "bigearthnet", {"split": d["split"]}
    else:
        name, stats = "ssl4eo-s12", "ssl4eo-s12"
        kwargs = {"labels": d["labels"]} if d["labels"] else {}
    if kind != "demo":  # the generated scenes have no invalid pixels
        kwargs["nan_policy"] = d["nan_policy"]
    if packed:
        return PackedDataset(prepare(name, root, packed, sensor=d["modality"], **kwargs)), stats
    return build_dataset(name, root, sensor=d["modality"], **kwargs), stats


def training_source(cfg: dict, cache_dir: str | os.PathLike | None = None) -> EOSource:
    """The `EOSource` of `cfg`: its data set, scaled the SoftCon way with the data set's statistics
    (or `data.norm_stats`), in the bands of `data.modality`."""
    d = cfg["data"]
    if not d["source"]:
        raise ValueError("no training data: pass --data demo | bigearthnet:ROOT | ssl4eo:ROOT")
    dataset, stats_key = training_dataset(cfg, cache_dir)
    table = d["norm_stats"] or DATASET_STATS[stats_key][d["modality"]]
    clip = S1_CLIP_QUANTILES if d["modality"] == "s1" else None
    norm = stats_spec("softcon", table, list(dataset.bands), clip_quantiles=clip)
    return EOSource(dataset, norm, modality_bands(d["modality"]), use_labels=d["use_labels"])
