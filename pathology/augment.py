"""H&E-appropriate photometric and geometric augmentations on float tensors (..., 3, H, W) in [0, 1].

Pathology tiles have no canonical orientation (flips and 90-degree rotations are free) and their
colour varies mainly through staining: jittering the hematoxylin and eosin amounts in stain space
(Tellez et al. 2018, "H&E-jitter") mimics lab-to-lab variation better than hue shifts do. The stain
vectors are Ruifrok & Johnston's (rows: hematoxylin, eosin, DAB optical densities), the same
values scikit-image uses; they are written out here so no extra dependency is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_MIN_INTENSITY = 1.0 / 255.0  # optical density of a fully dark 8-bit pixel stays finite
_GRAY = (0.299, 0.587, 0.114)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (H, E, DAB) of RGB (..., 3, H, W) in [0, 1] (natural-log optical density)."""
    od = -torch.log(rgb.clamp(min=_MIN_INTENSITY))
    return torch.einsum("...chw,cd->...dhw", od, HED_FROM_RGB.to(rgb.dtype))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    od = torch.einsum("...chw,cd->...dhw", hed, RGB_FROM_HED.to(hed.dtype))
    return torch.exp(-od).clamp(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * weights).sum(dim=-3, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, for (..., C, H, W)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-2], shape[-1])
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.reshape(shape)


@dataclass
class HEPhotometric:
    """Random flips, 90-degree rotations, HED jitter, brightness/contrast/saturation, Gaussian blur.

    Magnitudes are at strength 1; `strength` scales them all (0 turns photometric changes off).
    One draw of parameters per call, shared by a batch if a batch is given.
    """

    strength: float = 1.0
    flips: bool = True
    rotate90: bool = True
    hed_sigma: float = 0.05  # stain amount x U(1-s, 1+s) + U(-s, s), per stain
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    generator: torch.Generator | None = None

    def _uniform(self, low: float, high: float, n: int = 1) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != 3 or not x.is_floating_point():
            raise ValueError(
                f"he_photometric expects float (..., 3, H, W) in [0, 1], got {tuple(x.shape)} {x.dtype}"
            )
        if self.flips and self._uniform(0, 1).item() < 0.5:
            x = x.flip(-1)
        if self.flips and self._uniform(0, 1).item() < 0.5:
            x = x.flip(-2)
        if self.rotate90:
            k = int(torch.randint(0, 4, (1,), generator=self.generator).item())
            x = torch.rot90(x, k, dims=(-2, -1))
        s = self.strength
        if s > 0 and self.hed_sigma > 0:
            sigma = self.hed_sigma * s
            scale = self._uniform(1 - sigma, 1 + sigma, 3).to(x.dtype).view(3, 1, 1)
            shift = self._uniform(-sigma, sigma, 3).to(x.dtype).view(3, 1, 1)
            x = hed_to_rgb(rgb_to_hed(x) * scale + shift)
        if s > 0 and self.brightness > 0:
            x = x * self._uniform(1 - self.brightness * s, 1 + self.brightness * s).item()
        if s > 0 and self.contrast > 0:
            mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
            x = mean + (x - mean) * self._uniform(1 - self.contrast * s, 1 + self.contrast * s).item()
        if s > 0 and self.saturation > 0:
            gray = _gray(x)
            x = gray + (x - gray) * self._uniform(1 - self.saturation * s, 1 + self.saturation * s).item()
        x = x.clamp(0.0, 1.0)
        if s > 0 and self.blur_p > 0 and self._uniform(0, 1).item() < self.blur_p:
            x = gaussian_blur(x, float(self._uniform(*self.blur_sigma).item()))
        return x


def he_photometric(
    strength: float = 1.0, generator: torch.Generator | None = None, **overrides
) -> HEPhotometric:
    """The H&E augmentation at `strength`; pass a seeded torch.Generator for reproducible draws."""
    return HEPhotometric(strength=strength, generator=generator, **overrides)
