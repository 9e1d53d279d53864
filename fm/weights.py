"""Read any ViT checkpoint people actually have and convert it to our backbone layout.

Users bring weights from Meta's DINOv2 hub or training runs, from Hugging Face (`Dinov2Model`, e.g.
Phikon-v2; key names changed between transformers v4 and v5), from timm, or from our own runs. Every
format is converted to the state dict of `fm.backbones.ViTBackbone` (`vit.<timm key>` + `mask_token`),
so the rest of the suite sees one layout. Files are read with safetensors or `torch.load(...,
weights_only=True)` only: a checkpoint that needs arbitrary unpickling is refused, not executed.
"""

from __future__ import annotations

import json
import math
import pathlib
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from fm.backbones import ARCHS, BackboneConfig, ViTBackbone
from fm.io import atomic_path

FM_FORMAT = "fm-suite/v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
# Plain-data classes our own Lightning checkpoints may hold in hyper_parameters; constructing them runs no code.
SAFE_GLOBALS = [BackboneConfig, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
DINOV2_HEAD_DIM = 64  # every DINOv2 size uses 64-dim heads; fallback when the arch table has no match


class WeightsError(ValueError):
    """A checkpoint that cannot be read, is refused, or does not fit the model."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint converted to our layout.

    `format` is one of: fm-safetensors, fm-lightning, fm-state-dict, dinov2-meta, dinov2-meta-train,
    hf-dinov2, timm. `backbone_config` is None when the file does not carry one (foreign formats)."""

    backbone_state: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]]
    format: str
    backbone_config: BackboneConfig | None
    meta: dict = field(default_factory=dict)


# -- reading files -------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[Any, dict[str, str]]:
    """Return (loaded object, safetensors metadata or {}) with errors that name the file."""
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file (corrupt or truncated?): {err}") from err
    if suffix not in TORCH_SUFFIXES:
        raise WeightsError(f"{path}: unknown checkpoint extension {suffix!r}; expected .safetensors or one of "
                           f"{sorted(TORCH_SUFFIXES)}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as err:
        text = str(err)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if refused:
            raise WeightsError(
                f"{path} is refused for security: it contains a pickled Python object "
                f"({refused.group(1)}) that torch.load(weights_only=True) will not execute. Convert it once, "
                "in an environment you trust: `sd = torch.load(path, weights_only=False)`, take the model "
                "state dict (name -> tensor) and save it with `safetensors.torch.save_file(sd, "
                "'model.safetensors')`; then load the .safetensors file."
            ) from err
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                           f"{text.strip().splitlines()[-3:]}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {err}") from err


def load_state_dict_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely. Returns the stored mapping as is: name -> tensor for plain state
    dicts, or the wrapper (`{"state_dict": ...}`, `{"teacher": ...}`, Lightning's dict) for others."""
    obj, _ = _read_file(Path(path))
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a mapping of tensors, found {type(obj).__name__}")
    return dict(obj)


# -- format conversion ---------------------------------------------------------------------------


def _tensors(d: Mapping) -> dict[str, Tensor]:
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _unwrap(obj: Any, branch: str, path: Path) -> dict[str, Tensor]:
    """Descend through checkpoint wrappers to the mapping that holds the tensors."""
    current = obj
    for _ in range(4):
        if not isinstance(current, Mapping):
            break
        if _tensors(current):
            return _tensors(current)
        nxt = next((current[k] for k in (branch, "teacher", "model", "state_dict", "module", "student")
                    if isinstance(current.get(k), Mapping)), None)
        if nxt is None:
            break
        current = nxt
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(f"{path}: found no state dict (name -> tensor) in the checkpoint; top level: {keys}")


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _split_backbone_and_heads(sd: dict[str, Tensor], branch: str) -> tuple[dict, dict, dict]:
    """Pick the teacher/student branch and split `backbone.*` from `<head>.*` keys."""
    info: dict = {}
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
    branches = {k.split(".", 1)[0] for k in sd if ".backbone." in k and k.split(".", 1)[0] in ("teacher", "student")}
    if branches:
        chosen = branch if branch in branches else sorted(branches)[0]
        sd, info["branch"] = _strip(sd, chosen + "."), chosen
    heads: dict[str, dict[str, Tensor]] = {}
    if any(k.startswith("backbone.") for k in sd):
        for k, v in sd.items():
            if not k.startswith("backbone."):
                name, rest = k.split(".", 1) if "." in k else (k, "")
                heads.setdefault(name, {})[rest] = v
        sd = _strip(sd, "backbone.")
    return sd, heads, info


def _fold_cls_pos(out: dict[str, Tensor]) -> None:
    """Meta/HF register models add pos-embed to CLS; timm's (ours) keep it on patches only."""
    pos = out["vit.pos_embed"]
    out["vit.cls_token"] = out["vit.cls_token"] + pos[:, :1]
    out["vit.pos_embed"] = pos[:, 1:]


def _from_meta_or_timm(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    out, ignored = {}, []
    for k, v in sd.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # BlockChunk: blocks.<chunk>.<global i>.
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)  # SwiGLU (giant)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        if k == "mask_token":
            out[k] = v
        elif k == "register_tokens":
            out["vit.reg_token"] = v
        elif k.startswith(("head.", "fc_norm.", "head_drop.")):
            ignored.append(k)
        else:
            out["vit." + k] = v
    if "register_tokens" in sd:
        _fold_cls_pos(out)
    return out, ignored


_HF_MODULES = {  # per-layer module names, transformers v4 and v5 -> timm
    "norm1": "norm1", "norm2": "norm2", "layer_scale1": "ls1", "layer_scale2": "ls2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2", "mlp.down_proj": "mlp.fc2",
}
_HF_FUSED = {  # parts concatenated (dim 0) into one timm tensor, in this order
    "attention.attention.query": ("attn.qkv", 0), "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "attention.q_proj": ("attn.qkv", 0), "attention.k_proj": ("attn.qkv", 1), "attention.v_proj": ("attn.qkv", 2),
    "mlp.gate_proj": ("mlp.fc1", 0), "mlp.up_proj": ("mlp.fc1", 1),  # v5 split of SwiGLU weights_in
}
_HF_TOP = {
    "embeddings.cls_token": "vit.cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "vit.reg_token", "embeddings.position_embeddings": "vit.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "vit.patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "vit.patch_embed.proj.bias",
    "layernorm.weight": "vit.norm.weight", "layernorm.bias": "vit.norm.bias",
}


def _from_hf(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str]:
    if any(k.startswith("dinov2.") for k in sd):
        sd = _strip(sd, "dinov2.")
    out, ignored, parts = {}, [], {}
    style = "v5" if any(".attention.q_proj." in k for k in sd) else "v4"
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k)
        if m is None:
            ignored.append(k)
            continue
        layer, module, param = m.groups()
        param = "gamma" if param == "lambda1" else param
        if module in _HF_MODULES:
            out[f"vit.blocks.{layer}.{_HF_MODULES[module]}.{param}"] = v
        elif module in _HF_FUSED:
            target, index = _HF_FUSED[module]
            parts.setdefault(f"vit.blocks.{layer}.{target}.{param}", {})[index] = v
        else:
            ignored.append(k)
    for key, pieces in parts.items():
        expected = 3 if ".attn.qkv." in key else 2
        if sorted(pieces) != list(range(expected)):
            raise WeightsError(f"HF checkpoint has only parts {sorted(pieces)} of {key} (expected {expected})")
        out[key] = torch.cat([pieces[i] for i in range(expected)], dim=0)
    if "vit.reg_token" in out:
        _fold_cls_pos(out)
    return out, ignored, style


def _to_our_layout(sd: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], str, dict]:
    """Detect the key style of a backbone state dict and convert it. Returns (state, style, info)."""
    if "vit.cls_token" in sd:
        return dict(sd), "fm", {}
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in sd):
        out, ignored, style = _from_hf(sd)
        return out, "hf", {"ignored_keys": ignored, "hf_key_style": style}
    if "cls_token" in sd and any(k.startswith("blocks.") for k in sd):
        meta_marks = ("mask_token" in sd or "register_tokens" in sd
                      or any(re.match(r"blocks\.\d+\.(\d+\.|mlp\.w12)", k) for k in sd))
        out, ignored = _from_meta_or_timm(sd)
        info: dict = {"ignored_keys": ignored}
        if "mask_token" not in out:  # timm has none; zeros is DINOv2's own initial value
            out["mask_token"] = torch.zeros(1, out["vit.cls_token"].shape[-1], dtype=out["vit.cls_token"].dtype)
            info["mask_token"] = "absent in checkpoint; initialised to zeros"
        return out, ("meta" if meta_marks else "timm"), info
    raise WeightsError(f"{path}: unrecognised checkpoint layout (not DINOv2/Meta, HF Dinov2Model, timm or "
                       f"fm-suite); first keys: {sorted(sd)[:8]}")


def _config_from_hparams(hparams: Any, path: Path) -> BackboneConfig | None:
    if not isinstance(hparams, Mapping):
        return None
    candidates = [hparams.get("backbone")] + [v.get("backbone") for v in hparams.values() if isinstance(v, Mapping)]
    for cfg in candidates:
        if isinstance(cfg, BackboneConfig):
            return cfg
        if isinstance(cfg, Mapping):
            try:
                return BackboneConfig.from_dict(dict(cfg))
            except (TypeError, ValueError) as err:
                raise WeightsError(f"{path}: hyper_parameters['backbone'] is not a valid BackboneConfig: {err}") from err
    return None


def _norm_stats(hparams: Any) -> dict:
    """Training mean/std from our hyper-parameters (top level, or the recipe's `config.crops`)."""
    if not isinstance(hparams, Mapping):
        return {}
    crops = (hparams.get("config") or {}).get("crops") if isinstance(hparams.get("config"), Mapping) else None
    for source in (hparams, crops or {}):
        if isinstance(source.get("mean"), Sequence) and isinstance(source.get("std"), Sequence):
            return {"mean": [float(x) for x in source["mean"]], "std": [float(x) for x in source["std"]]}
    return {}


def _load_fm_safetensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> LoadedCheckpoint:
    if meta["fm_format"] != FM_FORMAT:
        raise WeightsError(f"{path}: written as {meta['fm_format']!r}; this version reads {FM_FORMAT!r}")
    try:
        config = BackboneConfig.from_dict(json.loads(meta["backbone_config"]))
        decoded = {k: (json.loads(v) if k in ("mean", "std") else v) for k, v in meta.items()}
    except (KeyError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: fm-suite metadata is incomplete or invalid: {err}") from err
    state = _strip(tensors, "backbone.")
    heads: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith("backbone."):
            name, rest = k.split(".", 1)
            heads.setdefault(name, {})[rest] = v
    return LoadedCheckpoint(state, heads, "fm-safetensors", config, decoded)


def load_checkpoint(path: str | Path, branch: str = "teacher") -> LoadedCheckpoint:
    """Read any supported checkpoint and convert its backbone to our layout.

    `branch` picks teacher or student where a file holds both (ours, Meta training); the teacher is
    the default because DINOv2 evaluates the teacher."""
    path = Path(path)
    obj, st_meta = _read_file(path)
    if "fm_format" in st_meta:
        return _load_fm_safetensors(path, obj, st_meta)
    sd, heads, meta = _split_backbone_and_heads(_unwrap(obj, branch, path), branch)
    state, style, info = _to_our_layout(sd, path)
    meta.update(info, source=str(path))
    config = None
    if isinstance(obj, Mapping) and ("hyper_parameters" in obj or "pytorch-lightning_version" in obj):
        config = _config_from_hparams(obj.get("hyper_parameters"), path)
        meta.update(_norm_stats(obj.get("hyper_parameters")))
    if style == "hf":
        hf_config = path.with_name("config.json")
        if hf_config.is_file():
            meta["hf_config"] = json.loads(hf_config.read_text())
    if style == "fm":
        fmt = "fm-lightning" if "branch" in meta or config is not None else "fm-state-dict"
    elif style == "meta":
        fmt = "dinov2-meta-train" if heads or "branch" in meta else "dinov2-meta"
    else:
        fmt = {"hf": "hf-dinov2", "timm": "timm"}[style]
    return LoadedCheckpoint(state, heads, fmt, config, meta)


# -- config inference and loading into a model ---------------------------------------------------


def infer_backbone_config(state: Mapping[str, Tensor], num_heads: int | None = None) -> BackboneConfig:
    """Rebuild the architecture from tensor shapes (our layout). Heads cannot be seen in shapes: they
    come from `num_heads`, else the DINOv2 arch with this width, else width / 64."""
    try:
        dim = state["vit.cls_token"].shape[-1]
        patch_w = state["vit.patch_embed.proj.weight"]
        fc1, fc2 = state["vit.blocks.0.mlp.fc1.weight"], state["vit.blocks.0.mlp.fc2.weight"]
        pos = state["vit.pos_embed"]
    except KeyError as err:
        raise WeightsError(f"cannot infer the architecture: state has no {err.args[0]!r}") from err
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"vit\.blocks\.(\d+)\.", k)))
    registers = state["vit.reg_token"].shape[1] if "vit.reg_token" in state else 0
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    grid_tokens = pos.shape[1] - (0 if registers else 1)
    side = math.isqrt(grid_tokens)
    if side * side != grid_tokens:
        raise WeightsError(f"cannot infer image size: pos_embed has {grid_tokens} patch positions (not a square)")
    arch = next((a for a, s in ARCHS.items() if s["embed_dim"] == dim), "vitt")
    table = ARCHS[arch]
    heads = num_heads or (table["num_heads"] if table["embed_dim"] == dim else max(dim // DINOV2_HEAD_DIM, 1))
    return BackboneConfig(
        arch=arch, patch_size=patch_w.shape[-1], img_size=side * patch_w.shape[-1], in_chans=patch_w.shape[1],
        num_registers=registers, drop_path_rate=0.0,
        embed_dim=None if table["embed_dim"] == dim else dim,
        depth=None if table["depth"] == depth else depth,
        num_heads=None if table["num_heads"] == heads else heads,
        mlp_ratio=4.0 if swiglu else fc1.shape[0] / dim,
        ffn=None if (table.get("ffn", "mlp") == "swiglu") == swiglu else ("swiglu" if swiglu else "mlp"),
    )


def _resample_pos_embed(backbone: ViTBackbone, pos: Tensor, antialias: bool) -> Tensor:
    vit = backbone.vit
    target = vit.pos_embed
    if pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return pos  # same grid, or a width mismatch that the shape check reports
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    old = pos.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if side * side != old:
        return pos
    return resample_abs_pos_embed(pos, new_size=list(vit.patch_embed.grid_size), old_size=[side, side],
                                  num_prefix_tokens=prefix, antialias=antialias)


def load_backbone_weights(
    backbone: ViTBackbone, state: Mapping[str, Tensor], strict: bool = True, antialias: bool = True
):
    """Load a state dict in our layout, resampling pos-embed to the model's grid (bicubic, timm's
    default antialias). Shape and key mismatches raise a WeightsError that lists them."""
    state = dict(state)
    if "vit.pos_embed" in state:
        state["vit.pos_embed"] = _resample_pos_embed(backbone, state["vit.pos_embed"], antialias)
    expected = backbone.state_dict()
    bad = [(k, tuple(expected[k].shape), tuple(v.shape)) for k, v in state.items()
           if k in expected and expected[k].shape != v.shape]
    if bad:
        lines = "\n".join(f"  {k}: model expects {e}, checkpoint has {g}" for k, e, g in bad[:20])
        hint = ""
        if any(k == "vit.patch_embed.proj.weight" and e[1] != g[1] for k, e, g in bad):
            hint = "\n(input channels differ: adapt the patch embedding, e.g. load_encoder(patch_embed_adapter=...))"
        raise WeightsError(f"checkpoint does not fit the model ({len(bad)} shape mismatches):\n{lines}{hint}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise WeightsError(f"checkpoint keys do not match the model: missing {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}; unexpected {unexpected[:10]}"
                           f"{' ...' if len(unexpected) > 10 else ''}")
    return backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def save_fm_checkpoint(
    path: str | Path,
    backbone: ViTBackbone,
    heads: Mapping[str, nn.Module | Mapping[str, Tensor]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write our exported format: safetensors with `backbone.*` + `<head>.*` keys and the metadata
    needed to rebuild and normalise (config, mean, std, source). Atomic."""
    path = Path(path)
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for name, head in (heads or {}).items():
        if name == "backbone" or "." in name:
            raise ValueError(f"invalid head name {name!r}: must not be 'backbone' or contain '.'")
        sd = head.state_dict() if isinstance(head, nn.Module) else head
        tensors.update({f"{name}.{k}": v for k, v in sd.items()})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"fm_format": FM_FORMAT, "backbone_config": json.dumps(backbone.cfg.to_dict()),
            "mean": json.dumps([float(x) for x in mean]), "std": json.dumps([float(x) for x in std]),
            "source": "fm-suite"}
    for k, v in (extra_meta or {}).items():
        if k in ("fm_format", "backbone_config", "mean", "std"):
            raise ValueError(f"extra_meta may not override the reserved key {k!r}")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
