"""Built-in demo images: synthetic textures with hidden classes, so the core recipe runs offline.

The class is the texture (horizontal stripes, vertical stripes, checkerboard, rings); frequency and
phase are random per image, and the colours come from a small palette shared by all classes (plus a
little jitter). A network at initialisation mostly sees colour, so its kNN accuracy on the hidden
class is low. Because many images share a palette entry, colour alone cannot tell two images apart:
self-supervised training has to learn the texture, which is what the learning test measures. Images are made on the fly from their
index (deterministic), nothing is written to disk.
"""

from __future__ import annotations

import numpy as np
import torch

CLASS_NAMES = ("horizontal", "vertical", "checker", "rings")
# (foreground, background) RGB pairs shared by all classes
PALETTE = np.array(
    [
        [[0.9, 0.2, 0.2], [0.1, 0.1, 0.3]],
        [[0.2, 0.8, 0.3], [0.9, 0.9, 0.8]],
        [[0.3, 0.3, 0.9], [0.8, 0.7, 0.2]],
        [[0.95, 0.95, 0.95], [0.2, 0.2, 0.2]],
        [[0.7, 0.3, 0.7], [0.4, 0.8, 0.8]],
        [[0.9, 0.6, 0.2], [0.3, 0.5, 0.3]],
    ]
)


class DemoTextures:
    def __init__(self, n: int = 2048, size: int = 64, seed: int = 0, n_classes: int = 4):
        if not 1 <= n_classes <= len(CLASS_NAMES):
            raise ValueError(f"n_classes must be in 1..{len(CLASS_NAMES)}, got {n_classes}")
        self.n, self.size, self.seed, self.n_classes = n, size, seed, n_classes
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self._grid = (yy, xx)

    def __len__(self) -> int:
        return self.n

    def label(self, index: int) -> int:
        return index % self.n_classes

    def labels(self) -> np.ndarray:
        return np.arange(self.n) % self.n_classes

    def get(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        yy, xx = self._grid
        freq = rng.uniform(3.0, 6.0) * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        cls = self.label(index)
        if cls == 0:
            pattern = np.sin(freq * yy + phase)
        elif cls == 1:
            pattern = np.sin(freq * xx + phase)
        elif cls == 2:
            pattern = np.sin(freq * xx + phase) * np.sin(freq * yy + phase)
        else:
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            pattern = np.sin(freq * np.hypot(yy - cy, xx - cx) + phase)
        weight = (pattern > 0).astype(np.float32)[None]
        fg, bg = PALETTE[rng.integers(len(PALETTE))] + rng.normal(0, 0.03, size=(2, 3))
        fg, bg = fg.astype(np.float32)[:, None, None], bg.astype(np.float32)[:, None, None]
        img = weight * fg + (1 - weight) * bg  # (3, size, size)
        img = img + rng.normal(0, 0.05, size=img.shape).astype(np.float32)
        return torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))
