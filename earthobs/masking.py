"""Siamese token dropping for SoftCon: the trainable branch sees a random subset of patch tokens.

Only the student is masked; the EMA teacher sees every token. Dropping tokens (rather than replacing
them by a mask token) shortens the sequence, so the student's attention and MLP costs fall with the
drop ratio: this is where SoftCon's memory saving comes from. The ratio SoftCon used is not published.
"""

from __future__ import annotations

import torch

from fm.backbones import ViTBackbone


def num_kept(num_patches: int, drop_ratio: float) -> int:
    """Patch tokens kept for a drop ratio; at least one, so the sequence is never empty."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    return max(1, num_patches - int(round(num_patches * drop_ratio)))


def sample_keep_indices(
    batch: int, num_patches: int, keep: int, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per sample, `keep` distinct patch indices in increasing order, shape (batch, keep)."""
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    indices = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    return indices.to(device) if device is not None else indices


def drop_patch_tokens(
    tokens: torch.Tensor,
    num_prefix: int,
    drop_ratio: float,
    generator: torch.Generator | None = None,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Keep the `num_prefix` leading tokens (CLS, registers) and a random subset of the patch tokens.

    `tokens` must already carry the pos-embed (B, P + N, D), so each kept token still knows where it
    came from. Every sample keeps the same number K of patches (one dense tensor), each its own subset.
    Returns (B, P + K, D), and with `return_indices` also the kept patch indices (B, K).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, P + N, D), got shape {tuple(tokens.shape)}")
    batch, length, dim = tokens.shape
    num_patches = length - num_prefix
    if num_prefix < 0 or num_patches < 1:
        raise ValueError(f"{length} tokens cannot hold {num_prefix} prefix tokens and at least one patch")
    keep = num_kept(num_patches, drop_ratio)
    if keep == num_patches:
        indices = torch.arange(num_patches, device=tokens.device).expand(batch, -1)
        return (tokens, indices) if return_indices else tokens
    indices = sample_keep_indices(batch, num_patches, keep, generator, tokens.device)
    patches = tokens[:, num_prefix:].gather(1, indices.unsqueeze(-1).expand(-1, -1, dim))
    out = torch.cat([tokens[:, :num_prefix], patches], dim=1)
    return (out, indices) if return_indices else out


def masked_forward(
    backbone: ViTBackbone, x: torch.Tensor, drop_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Normed CLS embedding of `x` computed from a random subset of its patch tokens (student branch)."""
    tokens = backbone.embed(x)
    tokens = drop_patch_tokens(tokens, backbone.num_prefix_tokens, drop_ratio, generator)
    for blk in backbone.vit.blocks:
        tokens = backbone._block(blk, tokens)
    return backbone.vit.norm(tokens)[:, 0]
