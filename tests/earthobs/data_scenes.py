"""Seeded in-memory multispectral scenes: a fast, file-free training source for the SoftCon unit tests.

Four classes differ in texture (oriented stripes, blocks, smooth blobs, fine speckle) and only slightly
in spectrum, under a per-scene, per-band gain nuisance larger than the spectral differences; a scene
holds one class or two split by a random line (multi-label, as in BigEarthNet). (The learning tests
use the generated BigEarthNet demo scenes; a short CPU run does not learn these textures.)
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from earthobs.bands import BIGEARTHNET_S2_BANDS

CLASSES = ("stripes", "blocks", "blobs", "speckle")
# A vegetation-like base spectrum (reflectance x 1e4, BigEarthNet band order) and small class tints.
BASE = np.array([400, 450, 700, 550, 1100, 2400, 2800, 3000, 3100, 3000, 2200, 1300], np.float32)
TINT = np.array([1.06, 0.97, 1.00, 0.96], np.float32)


def _texture(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        theta, period = rng.uniform(0, np.pi), rng.uniform(5, 8)
        t = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == 1:
        period = rng.integers(8, 12)
        ox, oy = rng.integers(0, period, 2)
        t = np.where((((xx + ox) % period) < period // 2) ^ (((yy + oy) % period) < period // 2), 1.0, -1.0)
    elif kind == 2:
        t = gaussian_filter(rng.standard_normal((size, size)), 3.0)
    else:
        t = rng.standard_normal((size, size))
    t = t - t.mean()
    return (0.3 * t / (t.std() + 1e-6)).astype(np.float32)


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int]]:
    gain = rng.uniform(0.75, 1.25, size=(len(BASE), 1, 1)).astype(np.float32)  # per-scene, per-band nuisance
    if rng.random() < 0.4:
        classes, region = [int(rng.integers(len(CLASSES)))], np.zeros((size, size), np.int64)
    else:
        classes = [int(c) for c in rng.choice(len(CLASSES), 2, replace=False)]
        yy, xx = np.mgrid[0:size, 0:size]
        while True:
            cx, cy = rng.uniform(size / 3, 2 * size / 3, 2)
            phi = rng.uniform(0, 2 * np.pi)
            region = (((xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)) > 0).astype(np.int64)
            if 0.25 <= region.mean() <= 0.75:
                break
    image = np.zeros((len(BASE), size, size), np.float32)
    for k, c in enumerate(classes):
        m = region == k
        image[:, m] = BASE[:, None] * TINT[c] * (1 + _texture(c, rng, size)[m])[None]
    return np.clip(image * gain, 1, 20000), classes


class TextureScenes:
    """`n` scenes of `size` px in the 12 BigEarthNet bands (raw DN), multi-hot labels over CLASSES;
    the interface of our EO data sets (`bands`, `ids`, `load_image`, `load_label`, items)."""

    bands = BIGEARTHNET_S2_BANDS

    def __init__(self, n: int, size: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        scenes = [_scene(rng, size) for _ in range(n)]
        self.images = np.stack([s[0] for s in scenes])
        self.labels = np.zeros((n, len(CLASSES)), np.float32)
        for i, (_, classes) in enumerate(scenes):
            self.labels[i, classes] = 1.0
        self.ids = [f"scene-{seed}-{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int) -> np.ndarray:
        return self.images[i]

    def load_label(self, i: int) -> np.ndarray:
        return self.labels[i]

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.images[i]), "label": torch.from_numpy(self.labels[i]), "id": self.ids[i]}
