"""Channel-adapted ViTs: start a multispectral or SAR backbone from weights trained on other bands.

DINOv2 weights see RGB; SoftCon's released ViTs see 13 Sentinel-2 L1C bands or 2 Sentinel-1 bands;
a BigEarthNet model sees 12 bands. Only the patch-embed kernel and the pos-embed grid depend on the
input, so adapting a checkpoint means rewriting those two tensors and loading the rest unchanged.
Bands are matched by name, never by position, so a wrong band order cannot pass silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from timm.layers import resample_patch_embed

from earthobs.bands import canonical_bands
from earthobs.choices import INIT_MODES
from fm.backbones import BackboneConfig, ViTBackbone, build_backbone
from fm.weights import WeightsError, load_backbone_weights, load_checkpoint

log = logging.getLogger(__name__)

RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")  # red, green, blue as Sentinel-2 bands

PATCH_KEY = "vit.patch_embed.proj.weight"
POS_KEY = "vit.pos_embed"


def _band_list(bands: Sequence[str], what: str) -> list[str]:
    if isinstance(bands, str):
        raise ValueError(f"{what} must be a sequence of band names, got the string {bands!r}")
    if not bands:
        raise ValueError(f"{what} is empty")
    return list(canonical_bands(list(bands)))


def fresh_patch_kernels(
    embed_dim: int, in_chans: int, patch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random kernels drawn as torch's Conv2d default (kaiming-uniform, a=sqrt(5)): bound 1/sqrt(fan_in),
    which is what a freshly built timm ViT starts from."""
    bound = 1.0 / math.sqrt(in_chans * patch_size * patch_size)
    shape = (embed_dim, in_chans, patch_size, patch_size)
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


def adapt_patch_embed(
    weight: torch.Tensor,
    target_bands: Sequence[str],
    mode: str,
    source_bands: Sequence[str] = RGB_BANDS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn a patch-embed kernel (D, S, p, p) over `source_bands` into one over `target_bands` (D, C, p, p).

    - `random`: fresh kernels, the checkpoint's are ignored.
    - `rgb_map`: each source kernel goes to the target channel of the same band, all others are zero;
      an input carrying only the source bands then gives exactly the source model's embedding.
      Every source band must be among the targets.
    - `repeat`: source kernels tiled over the C channels (channel c gets kernel c mod S), scaled by S/C
      so the summed response keeps its scale (timm's `adapt_input_conv` convention).
    - `band_select`: like `rgb_map`, but target bands the source lacks get fresh random kernels.

    The bias does not depend on the input channels and stays as it is.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"unknown patch-embed init mode {mode!r}; choose one of {INIT_MODES}")
    if weight.ndim != 4:
        raise ValueError(f"patch-embed weight must be (D, C, p, p), got shape {tuple(weight.shape)}")
    targets = _band_list(target_bands, "target_bands")
    sources = _band_list(source_bands, "source_bands")
    dim, n_src, ph, pw = weight.shape
    if n_src != len(sources):
        raise ValueError(
            f"patch-embed weight has {n_src} input channels but source_bands names {len(sources)}: {sources}"
        )
    n_tgt = len(targets)
    if mode == "random":
        return fresh_patch_kernels(dim, n_tgt, ph, generator).to(weight.dtype)
    if mode == "repeat":
        index = torch.arange(n_tgt) % n_src
        return weight[:, index] * (n_src / n_tgt)

    shared = [b for b in sources if b in targets]
    if mode == "rgb_map":
        missing = [b for b in sources if b not in targets]
        if missing:
            raise ValueError(
                f"rgb_map needs every source band among the target bands; missing {missing} "
                f"(targets: {targets}); use band_select, repeat or random instead"
            )
        out = torch.zeros(dim, n_tgt, ph, pw, dtype=weight.dtype)
    else:  # band_select
        if not shared:
            log.warning("band_select: no band of %s is in the checkpoint (%s); all kernels random", targets, sources)
        out = fresh_patch_kernels(dim, n_tgt, ph, generator).to(weight.dtype)
    for band in shared:
        out[:, targets.index(band)] = weight[:, sources.index(band)]
    return out


def channel_adapted_backbone(
    backbone_cfg: BackboneConfig | dict,
    state: Mapping[str, torch.Tensor] | None,
    target_bands: Sequence[str],
    init_mode: str = "rgb_map",
    source_bands: Sequence[str] = RGB_BANDS,
    generator: torch.Generator | None = None,
) -> ViTBackbone:
    """Build a backbone over `target_bands` and fill it from `state` (our layout: `vit.<timm key>` plus
    `mask_token`), whose patch embed sees `source_bands`.

    The patch kernel is adapted by `init_mode` unless source and target bands already agree (then it is
    copied, whatever the mode says), its spatial size is resampled if the patch size differs, the
    pos-embed is resampled to the model grid, and every other tensor must match the model exactly.
    With `state=None` the backbone keeps its fresh initialisation.
    """
    if isinstance(backbone_cfg, dict):
        backbone_cfg = BackboneConfig.from_dict(backbone_cfg)
    targets = _band_list(target_bands, "target_bands")
    model = build_backbone(replace(backbone_cfg, in_chans=len(targets)))
    if state is None:
        return model
    state = dict(state)
    for key in (PATCH_KEY, POS_KEY):
        if key not in state:
            raise KeyError(f"checkpoint state lacks {key!r}; is it in our layout (vit.<timm key>)?")

    weight = state[PATCH_KEY]
    if list(weight.shape[-2:]) != [model.patch_size, model.patch_size]:
        weight = resample_patch_embed(weight, [model.patch_size, model.patch_size])
    sources = _band_list(source_bands, "source_bands")
    if sources != targets:
        weight = adapt_patch_embed(weight, targets, init_mode, sources, generator)
    elif weight.shape[1] != len(targets):
        raise ValueError(f"patch-embed weight has {weight.shape[1]} channels for bands {targets}")
    state[PATCH_KEY] = weight
    # The mask token only matters for masked-image pretraining; a state without one keeps the fresh zeros.
    state.setdefault("mask_token", model.mask_token.detach().clone())
    load_backbone_weights(model, state, strict=True)  # resamples the pos-embed grid (37x37 -> 16x16)
    return model


def band_adapter(
    target_bands: Sequence[str], mode: str = "band_select", source_bands: Sequence[str] = RGB_BANDS,
    generator: torch.Generator | None = None,
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`patch_embed_adapter` for `fm.registry.load_encoder`: adapt any registered encoder's first layer
    from `source_bands` to `target_bands` (pass `in_chans=len(target_bands)` as override)."""
    targets = _band_list(target_bands, "target_bands")

    def adapt(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
        if in_chans != len(targets):
            raise ValueError(f"model takes {in_chans} channels but {len(targets)} target bands were named")
        return adapt_patch_embed(weight, targets, mode, source_bands, generator)

    return adapt


# -- SoftCon released checkpoints ------------------------------------------------------------------
# zhu-xlab/softcon README: `B13_vit{s,b}14_softcon.pth` (13-band S2 L1C) and `B2_vit{s,b}14_softcon.pth`
# (S1 [VV, VH]) are plain state dicts of Meta's DINOv2 `DinoVisionTransformer` built with img_size=224,
# patch 14, block_chunks=0, init_values=1e-5, no registers: Meta keys (equal to timm's) at top level,
# a 16x16+1 pos-embed and a `mask_token`. torchgeo serves `*_softcon_enc.pth` copies of the same
# weights in timm layout (no mask token); fm.weights reads both.
SOFTCON_IN_CHANS = {"s2": 13, "s1": 2}


def load_softcon_checkpoint(path: str | Path, modality: str) -> dict[str, torch.Tensor]:
    """Read a released SoftCon ViT file and return its backbone state in our layout
    (`vit.<timm key>` + `mask_token`), checked against the modality's channel count."""
    if modality not in SOFTCON_IN_CHANS:
        raise ValueError(f"unknown SoftCon modality {modality!r}; use one of {sorted(SOFTCON_IN_CHANS)}")
    state = load_checkpoint(path).backbone_state
    if PATCH_KEY not in state:
        raise WeightsError(f"{path}: no patch embedding ({PATCH_KEY}) found; not a SoftCon ViT checkpoint")
    channels = state[PATCH_KEY].shape[1]
    if channels != SOFTCON_IN_CHANS[modality]:
        raise WeightsError(
            f"{path}: patch embedding takes {channels} bands, but SoftCon {modality} models take "
            f"{SOFTCON_IN_CHANS[modality]}"
        )
    return state
