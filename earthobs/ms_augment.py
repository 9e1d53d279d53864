"""Augmentations for multispectral and SAR tensors that do not assume three RGB channels.

Colour jitter, grayscale and solarisation are defined on RGB; here every photometric change acts per
band (or on all bands alike): gain/offset jitter, Gaussian noise, Gaussian blur and optional band
dropout. Geometry is what suits nadir imagery: random resized crops, both flips and 90-degree rotations
(there is no "up" in a satellite scene). Inputs are float tensors (C, H, W), normally already scaled to
[0, 1] by the band normalisation; every random draw takes an optional `torch.Generator`, so a seed
reproduces a view exactly (None uses torch's global RNG, which DataLoader seeds per worker).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(low: float, high: float, generator: torch.Generator | None, shape: Sequence[int] = ()):
    return low + (high - low) * torch.rand(tuple(shape), generator=generator)


def _chance(p: float, generator: torch.Generator | None) -> bool:
    return p > 0 and torch.rand((), generator=generator).item() < p


def _check_image(x: torch.Tensor) -> None:
    if x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float tensor (C, H, W), got {x.dtype} of shape {tuple(x.shape)}")


def crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], generator=None
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random fraction `scale` of the area with an aspect ratio
    drawn log-uniformly from `ratio`; after 10 misses, the largest centred crop within `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator).item()
        aspect = math.exp(_uniform(log_lo, log_hi, generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def random_resized_crop(
    x: torch.Tensor, size: int | Sequence[int], scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), generator=None
) -> torch.Tensor:
    """Crop a random box (see `crop_box`) and resize it to `size` (e.g. BigEarthNet 120 px -> 224 px)."""
    top, left, h, w = crop_box(x.shape[-2], x.shape[-1], scale, ratio, generator)
    return resize(x[:, top : top + h, left : left + w], size)


def random_flip_rotate(
    x: torch.Tensor, hflip_p: float = 0.5, vflip_p: float = 0.5, rot90: bool = True, generator=None
) -> torch.Tensor:
    if _chance(hflip_p, generator):
        x = x.flip(-1)
    if _chance(vflip_p, generator):
        x = x.flip(-2)
    if rot90:
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=generator)), dims=(-2, -1))
    return x


def gain_offset_jitter(
    x: torch.Tensor, contrast: float = 0.2, brightness: float = 0.1, per_band: bool = True, generator=None
) -> torch.Tensor:
    """x' = (x - m) * gain + m + offset with m the band's mean, gain ~ U(1 - contrast, 1 + contrast) and
    offset ~ U(-brightness, brightness); one draw per band, or one for all bands (`per_band=False`)."""
    n = x.shape[0] if per_band else 1
    gain = _uniform(1 - contrast, 1 + contrast, generator, (n, 1, 1)).to(x)
    offset = _uniform(-brightness, brightness, generator, (n, 1, 1)).to(x)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * gain + mean + offset


def gaussian_noise(x: torch.Tensor, std: float = 0.02, generator=None) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=generator).to(x)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every band, radius 3 sigma, reflected borders."""
    radius = min(max(1, math.ceil(3 * sigma)), x.shape[-2] - 1, x.shape[-1] - 1)
    if radius < 1:
        return x
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[0]
    out = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out[0]


def band_dropout(x: torch.Tensor, p: float, fill: float = 0.0, generator=None) -> torch.Tensor:
    """Set each band to `fill` with probability p, never all of them (one survivor is drawn)."""
    if p <= 0:
        return x
    dropped = torch.rand(x.shape[0], generator=generator) < p
    if dropped.all():
        dropped[int(torch.randint(0, x.shape[0], (), generator=generator))] = False
    return torch.where(dropped.to(x.device)[:, None, None], torch.full_like(x, fill), x)


@dataclass
class MSAugmentConfig:
    """One view's augmentation; the defaults are a mild SimCLR/MoCo-style recipe for EO (our choice)."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90: bool = True
    jitter_p: float = 0.8
    contrast: float = 0.2
    brightness: float = 0.1
    per_band: bool = True
    noise_p: float = 0.2
    noise_std: float = 0.02
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    band_dropout_p: float = 0.0
    band_dropout_fill: float = 0.0
    clip: bool = True  # keep values in [0, 1], the range of the normalised input

    @classmethod
    def from_dict(cls, d: dict) -> MSAugmentConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown multispectral augmentation keys: {sorted(unknown)}")
        return cls(**d)


class MultispectralAugment:
    """Crop, flip/rotate, then band-wise photometric changes, then clip; `aug(x, generator)`."""

    def __init__(self, cfg: MSAugmentConfig | dict | None = None):
        if isinstance(cfg, dict):
            cfg = MSAugmentConfig.from_dict(cfg)
        self.cfg = cfg or MSAugmentConfig()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_image(x)
        c = self.cfg
        x = random_resized_crop(x, c.size, c.crop_scale, c.crop_ratio, generator)
        x = random_flip_rotate(x, c.hflip_p, c.vflip_p, c.rot90, generator)
        if _chance(c.jitter_p, generator):
            x = gain_offset_jitter(x, c.contrast, c.brightness, c.per_band, generator)
        if _chance(c.blur_p, generator):
            x = gaussian_blur(x, _uniform(c.blur_sigma[0], c.blur_sigma[1], generator).item())
        if _chance(c.noise_p, generator):
            x = gaussian_noise(x, c.noise_std, generator)
        x = band_dropout(x, c.band_dropout_p, c.band_dropout_fill, generator)
        if c.clip:
            x = x.clamp(0.0, 1.0)
        return x.contiguous()


def ms_two_views(
    x: torch.Tensor,
    student: MultispectralAugment | None = None,
    teacher: MultispectralAugment | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmented views of one scene: (student view, teacher view).
    The student view is the one SoftCon later masks; the teacher view is seen whole."""
    student = student or MultispectralAugment()
    teacher = teacher or student
    return student(x, generator), teacher(x, generator)
