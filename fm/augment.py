"""Multi-crop augmentation of the DINOv2 recipe (2 global + N local crops), domain-agnostic.

The geometric part (random resized crops at the recipe's scales, flips) is shared; the photometric
part is a pluggable callable per crop type, so pathology (H&E jitter) and earth observation
(band-agnostic jitter) reuse the same multi-crop machinery. Inputs are float tensors (C, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torchvision.transforms import v2

Photometric = Callable[[torch.Tensor], torch.Tensor]


def dinov2_photometric() -> tuple[Photometric, Photometric, Photometric]:
    """DINOv2's RGB photometric pipeline for (global crop 1, global crop 2, local crops)."""
    jitter = v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )

    def blur(p: float) -> v2.Transform:
        return v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    global1 = v2.Compose([jitter, blur(1.0)])
    global2 = v2.Compose([jitter, blur(0.1), v2.RandomSolarize(threshold=0.5, p=0.2)])
    local = v2.Compose([jitter, blur(0.5)])
    return global1, global2, local


@dataclass
class MultiCropTransform:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: Sequence[float] = (0.32, 1.0)
    local_scale: Sequence[float] = (0.05, 0.32)
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    photometric: tuple[Photometric, Photometric, Photometric] | None = None  # None = DINOv2 RGB pipeline
    extra_geometric: Photometric | None = None  # e.g. 90-degree rotations for tiles
    _built: dict = field(default_factory=dict, repr=False)

    def _ops(self) -> dict:
        if not self._built:
            g1, g2, loc = self.photometric if self.photometric is not None else dinov2_photometric()
            self._built.update(
                global_crop=v2.RandomResizedCrop(self.global_size, scale=tuple(self.global_scale),
                                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                local_crop=v2.RandomResizedCrop(self.local_size, scale=tuple(self.local_scale),
                                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                flip=v2.RandomHorizontalFlip(p=0.5),
                g1=g1,
                g2=g2,
                loc=loc,
                norm=v2.Normalize(mean=list(self.mean), std=list(self.std)),
            )
        return self._built

    def _crop(self, img: torch.Tensor, crop, photo) -> torch.Tensor:
        ops = self._ops()
        x = ops["flip"](crop(img))
        if self.extra_geometric is not None:
            x = self.extra_geometric(x)
        return ops["norm"](photo(x).clamp(0, 1))

    def __call__(self, img: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """img: float (C, H, W) in [0, 1] -> ([2 global crops], [n_local local crops]). Uses torch's
        global RNG: the batch producer seeds it per batch, which makes every batch reproducible."""
        if img.dtype == torch.uint8:
            img = img.float() / 255.0
        ops = self._ops()
        globals_ = [
            self._crop(img, ops["global_crop"], ops["g1"]),
            self._crop(img, ops["global_crop"], ops["g2"]),
        ]
        locals_ = [self._crop(img, ops["local_crop"], ops["loc"]) for _ in range(self.n_local)]
        return globals_, locals_
