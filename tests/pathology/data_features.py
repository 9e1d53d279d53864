"""Tiny seeded encoders and feature files for the extraction / task / evaluation tests.

`save_tiny_hf_encoder` writes a randomly initialised HF `Dinov2Model` folder (config.json +
model.safetensors), the format Phikon-v2 is published in; `write_feature_files` writes `<slide>.h5`
files in the exact layout `fm-extract` writes, with features that carry a chosen class signal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pathology.feature_files import FeatureFileWriter


def save_tiny_hf_encoder(path: Path, image_size: int = 64, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                          patch_size=16, image_size=image_size)
    Dinov2Model(config).eval().save_pretrained(path)
    return path


def hf_reference_cls(model_dir: Path, images_uint8) -> np.ndarray:
    """CLS features computed the way the model card says (HF model, ImageNet mean/std, 64 px input):
    an independent reference for what `fm-extract` must write."""
    import torch
    import torch.nn.functional as F
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(model_dir).eval()
    size = model.config.image_size
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=(x - mean) / std).pooler_output.numpy()


def write_feature_files(
    directory: Path,
    labels: dict[str, int],
    patients: dict[str, str] | None = None,
    encoder: str = "tiny-encoder",
    weights_sha256: str | None = None,
    dim: int = 8,
    tiles: int = 12,
    signal: float = 2.0,
    seed: int = 0,
) -> dict[str, Path]:
    """One feature file per slide; tiles of class-k slides are shifted by `signal` along axis k. The
    weights hash defaults to one derived from the encoder's name (another name: other weights)."""
    rng = np.random.default_rng(seed)
    paths = {}
    for i, (slide_id, label) in enumerate(labels.items()):
        features = rng.standard_normal((tiles, dim)).astype(np.float32)
        features[: tiles // 2, label % dim] += signal  # half the tiles carry the class: a job for attention
        coords = np.stack([np.arange(tiles) * 256, np.full(tiles, 256 * i)], axis=1)
        path = directory / f"{slide_id}.h5"
        writer = FeatureFileWriter(path, tiles, dim, "float16")
        writer.write_rows(0, features)
        sha = weights_sha256 or hashlib.sha256(encoder.encode()).hexdigest()
        attrs = dict(encoder=encoder, encoder_weights_sha256=sha, feature="cls", n_tiles=tiles,
                     preprocessing=json.dumps({"tile_px": 224}), slide_id=slide_id,
                     patient_id=(patients or {}).get(slide_id, slide_id), project="", cohort="test")
        writer.commit(coords, {"patch_size": 224, "level0_width": 4096}, attrs)
        paths[slide_id] = path
    return paths
