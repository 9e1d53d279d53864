"""Multi-crop SSL batches that are a pure function of (seed, batch index, rank).

A whole collated batch is produced by one DataLoader worker (`batch_size=None`); worker w makes batches
w, w+W, w+2W... and the DataLoader returns them round-robin, so the stream order never depends on the
number of workers, and a resumed run restarts exactly at the batch after its checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm.augment import MultiCropTransform
from fm.masking import sample_crop_masks


class ImageSource(Protocol):
    """Anything indexable that returns an image (C, H, W), uint8 or float in [0, 1]."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> torch.Tensor: ...


class MultiCropBatches(IterableDataset):
    def __init__(
        self,
        source: ImageSource,
        transform: MultiCropTransform,
        batch_size: int,
        patch_size: int,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
    ):
        if len(source) == 0:
            raise ValueError("the image source is empty: nothing to train on")
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.grid = (transform.global_size // patch_size,) * 2
        self.mask_probability = mask_probability
        self.mask_ratio = tuple(mask_ratio)
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank

    def make_batch(self, k: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, k, self.rank])
        torch.manual_seed(int(rng.integers(2**62)))  # the crop transforms use torch's global RNG
        indices = rng.integers(0, len(self.source), size=self.batch_size)
        crops = [self.transform(self.source.get(int(i))) for i in indices]
        n_global, n_local = len(crops[0][0]), len(crops[0][1])
        global_crops = torch.stack([c[0][g] for g in range(n_global) for c in crops])  # crop-major
        batch = {
            "global_crops": global_crops,
            "masks": torch.from_numpy(
                sample_crop_masks(len(global_crops), self.grid, rng, self.mask_probability, self.mask_ratio)
            ),
            "indices": torch.from_numpy(indices),
            "batch_index": torch.tensor(k),
        }
        if n_local:
            batch["local_crops"] = torch.stack([c[1][j] for j in range(n_local) for c in crops])
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start_batch + worker
        while True:
            yield self.make_batch(k)
            k += n_workers


class SSLDataModule(L.LightningDataModule):
    """Wraps an ImageSource into resumable multi-crop batches for the current rank."""

    def __init__(self, source: ImageSource, transform: MultiCropTransform, data_cfg: dict, patch_size: int,
                 mask_probability: float, mask_ratio: tuple[float, float]):
        super().__init__()
        self.source = source
        self.transform = transform
        self.cfg = data_cfg
        self.patch_size = patch_size
        self.mask_probability = mask_probability
        self.mask_ratio = mask_ratio

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        ds = MultiCropBatches(
            self.source, self.transform, self.cfg["batch_size"], self.patch_size, self.mask_probability,
            self.mask_ratio, seed=self.cfg["seed"], start_batch=start, rank=rank,
        )
        workers = self.cfg["num_workers"]
        return DataLoader(
            ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
