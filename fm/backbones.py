"""ViT backbones built with timm, plus what the DINOv2 recipe needs on top of timm's forward.

timm's `VisionTransformer` gives us the architectures, LayerScale, registers, SDPA attention and
pos-embed resampling (`dynamic_img_size`, so 224 px global and 96/98 px local crops go through one
model). We add three things timm lacks: a learned mask token for iBOT, batch-subset stochastic depth
(DINOv2's form: a dropped residual is not computed at all, which saves ~drop_path of the block FLOPs),
and access to the CLS token of the last blocks for the `last4` evaluation protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

# Architectures as in DINOv2 (facebookresearch/dinov2 vision_transformer.py) / timm's *_dinov2 models.
ARCHS: dict[str, dict] = {
    "vitt": dict(embed_dim=192, depth=12, num_heads=3),  # not a DINOv2 size; for tests and CPU demos
    "vits": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl": dict(embed_dim=1024, depth=24, num_heads=16),
    "vitg": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


@dataclass
class BackboneConfig:
    """Everything needed to rebuild a backbone; stored in our checkpoints and in the encoder registry."""

    arch: str = "vitl"
    patch_size: int = 16
    img_size: int = 224  # size of the pos-embed grid; other sizes are resampled on the fly
    in_chans: int = 3
    num_registers: int = 0
    drop_path_rate: float = 0.3
    drop_path_mode: str = "subset"  # "subset" (DINOv2: dropped residuals not computed) | "per_sample"
    layerscale_init: float = 1e-5
    # Overrides of the arch table (tiny test models); None keeps the table's value.
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    ffn: str | None = None  # "mlp" or "swiglu"; None = the arch's default
    extra: dict = field(default_factory=dict)

    def resolved(self) -> dict:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown backbone arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        spec = dict(ARCHS[self.arch])
        for key in ("embed_dim", "depth", "num_heads", "ffn"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        spec.setdefault("ffn", "mlp")
        return spec

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown backbone config keys: {sorted(unknown)}")
        return cls(**d)


class ViTBackbone(nn.Module):
    """A timm ViT (`self.vit`, keys identical to timm/Meta) with a mask token and DINOv2 drop path."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        spec = cfg.resolved()
        ffn_kwargs = {}
        if spec["ffn"] == "swiglu":  # DINOv2 giant: fused SwiGLU, hidden = 2/3 * 4 * 2 * dim
            ffn_kwargs = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.66667 * 2)
        elif spec["ffn"] != "mlp":
            raise ValueError(f"unknown ffn {spec['ffn']!r}; use 'mlp' or 'swiglu'")
        self.vit = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            embed_dim=spec["embed_dim"],
            depth=spec["depth"],
            num_heads=spec["num_heads"],
            mlp_ratio=ffn_kwargs.pop("mlp_ratio", cfg.mlp_ratio),
            init_values=cfg.layerscale_init,
            reg_tokens=cfg.num_registers,
            no_embed_class=cfg.num_registers > 0,  # timm's convention for DINOv2 register models
            dynamic_img_size=True,
            drop_path_rate=0.0,  # we apply stochastic depth ourselves (batch-subset form)
            block_fn=DropPathBlock,
            **ffn_kwargs,
        )
        self.embed_dim = spec["embed_dim"]
        self.depth = spec["depth"]
        self.patch_size = cfg.patch_size
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self.drop_path_rate = cfg.drop_path_rate
        if cfg.drop_path_mode not in ("subset", "per_sample"):
            raise ValueError(f"unknown drop_path_mode {cfg.drop_path_mode!r}; use 'subset' or 'per_sample'")
        self.drop_path_mode = cfg.drop_path_mode

    def compile(self, **kwargs) -> None:  # noqa: A003 - mirrors nn.Module.compile
        """torch.compile the token forward (what training and extraction call), not just `forward`."""
        self.forward_tokens = torch.compile(self.forward_tokens, **kwargs)

    # -- uniform model API (timm style) -------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS embedding after the final norm: the feature every evaluation uses by default."""
        return self.forward_tokens(x)["cls"]

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_tokens(x, masks)["tokens"]

    def no_weight_decay(self) -> set[str]:
        return {"vit.pos_embed", "vit.cls_token", "vit.reg_token", "mask_token"}

    # -- DINOv2 forward ------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, replace masked patches by the mask token, add prefix tokens and pos-embed."""
        vit = self.vit
        tokens = vit.patch_embed(x)  # B, H, W, C with dynamic_img_size
        if masks is not None:
            if masks.shape != tokens.shape[:3]:
                raise ValueError(f"mask shape {tuple(masks.shape)} != patch grid {tuple(tokens.shape[:3])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        return vit.norm_pre(tokens)

    def forward_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, return_blocks: int = 0
    ) -> dict[str, torch.Tensor]:
        """Return `cls`, `patch` and `tokens` (all normed); with `return_blocks=n` also `block_cls`:
        the normed CLS of each of the last n blocks, shape (B, n, D)."""
        tokens = self.embed(x, masks)
        block_cls = []
        first_kept = self.depth - return_blocks
        for i, blk in enumerate(self.vit.blocks):
            tokens = self._block(blk, tokens)
            if i >= first_kept:
                block_cls.append(self.vit.norm(tokens[:, 0]))
        tokens = self.vit.norm(tokens)
        out = {"tokens": tokens, "cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :]}
        if return_blocks:
            out["block_cls"] = torch.stack(block_cls, dim=1)
        return out

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rate = self.drop_path_rate
        if not self.training or rate <= 0.0 or x.shape[0] < 2:
            return blk(x)
        return blk(x, drop_path=(rate, self.drop_path_mode))  # a DropPathBlock, possibly inside an FSDP unit


class DropPathBlock(Block):
    """timm's Block whose forward can apply our stochastic depth (`drop_path=(rate, mode)`).

    The drop path must run inside the block's own forward: FSDP wraps each Block and gathers its
    parameters only around that forward. Calling blk.attn / blk.mlp from outside (as `_block` did)
    met the sharded 1-D views under FSDP ("mat2 must be a matrix, got 1-D tensor"). Same modules and
    state-dict keys as Block, same ops and random draws as before."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                drop_path: tuple[float, str] | None = None) -> torch.Tensor:
        if drop_path is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        rate, mode = drop_path
        residual = _subset_residual if mode == "subset" else _per_sample_residual
        x = residual(x, lambda t: self.ls1(self.attn(self.norm1(t), attn_mask=attn_mask, is_causal=is_causal)), rate)
        return residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), rate)


def _subset_residual(x: torch.Tensor, residual, drop_rate: float) -> torch.Tensor:
    """Stochastic depth in DINOv2's batch-subset form: compute the residual branch only for a random
    subset of (1 - drop_rate) of the samples and add it scaled by B / subset, leaving the others as is.
    Same expectation as per-sample drop path, but the dropped samples cost no FLOPs."""
    b = x.shape[0]
    keep = max(int(b * (1.0 - drop_rate)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    r = residual(x[idx])
    return torch.index_add(x, 0, idx, r.to(x.dtype), alpha=b / keep)


def _per_sample_residual(x: torch.Tensor, residual, drop_rate: float) -> torch.Tensor:
    """Classic drop path: the residual is computed for every sample, then zeroed for dropped ones."""
    keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= drop_rate).to(x.dtype) / (1.0 - drop_rate)
    return x + residual(x) * keep


def build_backbone(cfg: BackboneConfig | dict) -> ViTBackbone:
    if isinstance(cfg, dict):
        cfg = BackboneConfig.from_dict(cfg)
    return ViTBackbone(cfg)
