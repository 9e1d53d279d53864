"""Tiny seeded models and their weights written in foreign checkpoint layouts, for loader tests.

Meta's DINOv2 code is not installable, so Meta-layout files are written from a timm model by the
inverse of the documented key mapping (tests cross-check them with timm's own converter). HF files
are written by transformers itself when it is installed.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fm.backbones import BackboneConfig, ViTBackbone, build_backbone

DIM, HEADS, DEPTH, PATCH, IMG = 96, 2, 2, 14, 56  # 96 makes DINOv2's and timm's SwiGLU widths agree (256)


def tiny_config(**overrides) -> BackboneConfig:
    base = dict(arch="vits", embed_dim=DIM, num_heads=HEADS, depth=DEPTH, patch_size=PATCH, img_size=IMG,
                drop_path_rate=0.0)
    base.update(overrides)
    return BackboneConfig(**base)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter distinct random values, so a swapped or skipped tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            is_norm_scale = re.search(r"(norm\w*|layernorm)\.weight$", name) is not None
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return module


def random_backbone(seed: int = 0, **overrides) -> ViTBackbone:
    return randomize_(build_backbone(tiny_config(**overrides)), seed).eval()


def images(seed: int = 1, batch: int = 2, size: int = IMG, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def meta_hub_state(backbone: ViTBackbone, seed: int = 2, chunks: int = 0) -> dict[str, torch.Tensor]:
    """Meta DINOv2 hub keys for `backbone`'s weights. Register models keep the CLS position in
    pos_embed (the CLS token is stored without it); SwiGLU uses w12/w3; `chunks` > 0 writes
    BlockChunk keys `blocks.<chunk>.<global index>.`."""
    sd = backbone.state_dict()
    out = {"mask_token": sd["mask_token"].clone()}
    per_chunk = -(-backbone.depth // chunks) if chunks else 0
    for key, value in sd.items():
        if not key.startswith("vit."):
            continue
        k = key[len("vit."):]
        k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if backbone.cfg.ffn == "swiglu" else k
        if chunks and (m := re.match(r"blocks\.(\d+)\.", k)):
            k = f"blocks.{int(m.group(1)) // per_chunk}.{k[len('blocks.'):]}"
        out[k] = value.clone()
    if "reg_token" in out:
        cls_pos = torch.randn(1, 1, out["cls_token"].shape[-1], generator=torch.Generator().manual_seed(seed))
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
    return out


def hf_config_kwargs(registers: int = 0, swiglu: bool = False) -> dict:
    kw = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMG,
              patch_size=PATCH, use_swiglu_ffn=swiglu, attn_implementation="eager")
    if registers:
        kw["num_register_tokens"] = registers
    return kw


def random_hf_model(registers: int = 0, swiglu: bool = False, seed: int = 3):
    """A randomised transformers Dinov2Model / Dinov2WithRegistersModel (needs transformers)."""
    import transformers as tf

    kw = hf_config_kwargs(registers, swiglu)
    attn = kw.pop("attn_implementation")
    if registers:
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**kw))
    else:
        model = tf.Dinov2Model(tf.Dinov2Config(**kw))
    model.set_attn_implementation(attn)
    return randomize_(model, seed).eval()
