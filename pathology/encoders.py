"""Pathology encoders for the `fm` registry, loaded through the `fm.encoders` entry point."""

from __future__ import annotations

from fm.backbones import BackboneConfig
from fm.registry import EncoderSpec, register_encoder
from fm.weights import IMAGENET_MEAN, IMAGENET_STD

PHIKON_V2 = register_encoder(EncoderSpec(
    name="pathology/phikon-v2",
    backbone=BackboneConfig(arch="vitl", patch_size=16, img_size=224, num_registers=0, drop_path_rate=0.0),
    weights_format="hf-dinov2",
    filenames=["model.safetensors"],
    hf_repo="owkin/phikon-v2",
    url="https://huggingface.co/owkin/phikon-v2/resolve/main/model.safetensors",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    licence="Owkin non-commercial licence, see model card",
    feature="cls",
    notes="ViT-L/16 DINOv2 (Owkin, arXiv 2409.09173); 224 px tiles at 0.5 um/px; CLS feature (1024-d)",
))
