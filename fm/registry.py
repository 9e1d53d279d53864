"""String registry of encoders: a name says which architecture, which weights file and which
normalisation, so `fm-extract pathology --encoder pathology/phikon-v2` needs nothing else.

Domain packages add their encoders through the entry-point group `fm.encoders` (each entry point is a
module that calls `register_encoder` on import), so `fm` never imports a domain package. Weights are
never downloaded: `resolve_weights_file` finds a local file or says exactly how to get one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import Tensor

from fm.backbones import BackboneConfig, ViTBackbone, build_backbone
from fm.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsError,
    infer_backbone_config,
    load_backbone_weights,
    load_checkpoint,
)

PLUGIN_GROUP = "fm.encoders"
GENERIC_FILENAMES = {"model.safetensors", "pytorch_model.bin"}  # too generic for a flat $FM_WEIGHTS_DIR lookup


@dataclass
class EncoderSpec:
    """What a registered encoder is and where its weights come from.

    `weights_format` is informational (the loader detects the format from the file); `filenames` are
    the names the weights file may have, in order of preference; `feature` is the default feature."""

    name: str
    backbone: BackboneConfig
    weights_format: str
    filenames: Sequence[str]
    hf_repo: str | None = None
    url: str | None = None
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    licence: str = ""
    feature: str = "cls"
    notes: str = ""

    def __post_init__(self):
        self.filenames = tuple(self.filenames)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"invalid encoder name {self.name!r}: must be non-empty, without spaces")

    @property
    def slug(self) -> str:
        """Directory name under $FM_WEIGHTS_DIR: the name with '/' replaced by '__'."""
        return self.name.replace("/", "__")


class UnknownEncoderError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class WeightsNotFoundError(FileNotFoundError):
    pass


_REGISTRY: dict[str, EncoderSpec] = {}
_plugins_loaded = False


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> EncoderSpec:
    """Add an encoder. Registering an identical spec again is a no-op (modules may be imported twice)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec and not overwrite:
        raise ValueError(f"encoder {spec.name!r} is already registered with a different spec; "
                         "pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_encoder(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY.pop(name)


def load_encoder_plugins(force: bool = False) -> None:
    """Import every module of the `fm.encoders` entry-point group once. A broken plugin is reported
    as a warning; it does not take the other encoders down with it."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as err:  # noqa: BLE001 - any plugin failure must stay contained
            warnings.warn(f"encoder plugin {ep.name!r} ({ep.value}) failed to load: {err!r}", stacklevel=2)


def list_encoders() -> list[str]:
    load_encoder_plugins()
    return sorted(_REGISTRY)


def _unknown(name: str) -> UnknownEncoderError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownEncoderError(f"unknown encoder {name!r}.{hint} Known encoders: {', '.join(sorted(_REGISTRY))}")


def get_encoder_spec(name: str) -> EncoderSpec:
    """A copy of the registered spec (callers may change it freely)."""
    load_encoder_plugins()
    if name not in _REGISTRY:
        raise _unknown(name)
    return copy.deepcopy(_REGISTRY[name])


# -- finding weights files -----------------------------------------------------------------------


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _hf_snapshot_dirs(repo: str) -> list[Path]:
    """Snapshots of `repo` in the HF cache: the one `refs/main` points to first, then newest first."""
    repo_dir = _hf_hub_cache() / f"models--{repo.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return [snapshots / "<revision>"]
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        found = [main] + [p for p in found if p != main]
    return found


def candidate_weight_paths(spec: EncoderSpec) -> list[Path]:
    """Every place `resolve_weights_file` looks, in order."""
    paths: list[Path] = []
    if os.environ.get("FM_WEIGHTS_DIR"):
        root = Path(os.environ["FM_WEIGHTS_DIR"])
        paths += [root / spec.slug / fn for fn in spec.filenames]
        paths += [root / fn for fn in spec.filenames if fn not in GENERIC_FILENAMES]
    if spec.hf_repo:
        paths += [snap / fn for snap in _hf_snapshot_dirs(spec.hf_repo) for fn in spec.filenames]
    torch_hub = Path(torch.hub.get_dir()) / "checkpoints"
    paths += [torch_hub / fn for fn in spec.filenames if fn not in GENERIC_FILENAMES]
    return paths


def _how_to_get(spec: EncoderSpec) -> str:
    root = os.environ.get("FM_WEIGHTS_DIR") or "$FM_WEIGHTS_DIR"
    target = f"{root}/{spec.slug}"
    lines = ["How to get it (fm-suite never downloads weights):"]
    if spec.hf_repo:
        fn = next((f for f in spec.filenames if f.endswith(".safetensors")), spec.filenames[0])
        lines.append(f"  hf download {spec.hf_repo} {fn} --local-dir {target}"
                     "   (huggingface_hub's CLI; log in with `hf auth login` and accept the model's terms if the "
                     "repo is gated)")
    if spec.url:
        lines.append(f"  wget -P {target} {spec.url}")
    if not spec.hf_repo and not spec.url:
        lines.append("  no public source is registered; ask the encoder's provider for the file")
    lines.append(f"Then pass --weights PATH (a file or its directory), or set FM_WEIGHTS_DIR so that "
                 f"{target}/{spec.filenames[0]} exists.")
    if spec.licence:
        lines.append(f"Licence: {spec.licence}")
    return "\n".join(lines)


def resolve_weights_file(spec: EncoderSpec, weights: str | os.PathLike | None = None) -> Path:
    """Find the weights file of `spec` on local disk, or raise WeightsNotFoundError saying where it
    looked and how to obtain the file."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            for fn in spec.filenames:
                if (path / fn).is_file():
                    return path / fn
            raise WeightsNotFoundError(f"directory {path} holds none of {list(spec.filenames)} "
                                       f"(weights for {spec.name!r}).\n{_how_to_get(spec)}")
        raise WeightsNotFoundError(f"weights path {path} does not exist (weights for {spec.name!r}).")
    candidates = candidate_weight_paths(spec)
    for path in candidates:
        if path.is_file():
            return path
    looked = "\n".join(f"  - {p}" for p in candidates)
    unset = "" if os.environ.get("FM_WEIGHTS_DIR") else "\n  (FM_WEIGHTS_DIR is not set)"
    raise WeightsNotFoundError(f"no weights file for encoder {spec.name!r} (expected one of "
                               f"{list(spec.filenames)}). Looked in:\n{looked}{unset}\n{_how_to_get(spec)}")


# -- loading ---------------------------------------------------------------------------------------


PatchEmbedAdapter = Callable[[Tensor, int], Tensor]


@dataclass
class LoadedEncoder:
    """A ready backbone (eval mode) plus what came with it. Unpacks as `backbone, spec = ...`.

    `heads` holds the DINO/iBOT head state dicts of our and Meta's training checkpoints (empty for
    hub/HF/timm weights), so continual pretraining can start from them."""

    backbone: ViTBackbone
    spec: EncoderSpec
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    weights_path: Path | None = None
    checkpoint_format: str = ""
    meta: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        return iter((self.backbone, self.spec))


def _checkpoint_in(path: Path) -> Path:
    """A file as is; in a directory, `model.safetensors` or its only checkpoint file."""
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    found = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".pth", ".pt", ".ckpt", ".bin"})
    if len(found) != 1:
        raise WeightsNotFoundError(f"directory {path} must hold model.safetensors or exactly one checkpoint "
                                   f"file; found {[p.name for p in found]}")
    return found[0]


def _spec_for_file(path: Path, ckpt) -> EncoderSpec:
    config = ckpt.backbone_config
    if config is None:
        heads = (ckpt.meta.get("hf_config") or {}).get("num_attention_heads")
        config = infer_backbone_config(ckpt.backbone_state, num_heads=heads)
    return EncoderSpec(name=str(path), backbone=config, weights_format=ckpt.format, filenames=[path.name],
                       mean=ckpt.meta.get("mean", IMAGENET_MEAN), std=ckpt.meta.get("std", IMAGENET_STD),
                       licence="see the file's provider", notes="loaded from a local file")


def load_encoder(
    name_or_path: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    branch: str = "teacher",
    with_heads: bool = True,
    strict: bool = True,
    patch_embed_adapter: PatchEmbedAdapter | None = None,
    **backbone_overrides,
) -> LoadedEncoder:
    """Build an encoder and load its weights.

    `name_or_path`: a registered name (weights found by `resolve_weights_file`, or `weights`) or a
    checkpoint path (ours carry their config; foreign ones are inferred from shapes). When the file is
    one of ours, its stored config wins over the registry's. `backbone_overrides` are BackboneConfig
    fields (drop_path_rate, img_size, in_chans, ...); if in_chans differs from the checkpoint,
    `patch_embed_adapter(weight, in_chans) -> new weight` converts the first layer. `branch` picks
    teacher/student in training checkpoints; `with_heads=False` drops the heads."""
    name = str(name_or_path)
    load_encoder_plugins()
    if name in _REGISTRY:
        spec = get_encoder_spec(name)
        path = resolve_weights_file(spec, weights)
        ckpt = load_checkpoint(path, branch=branch)
        if ckpt.backbone_config is not None:
            spec.backbone = ckpt.backbone_config
            spec.mean, spec.std = tuple(ckpt.meta.get("mean", spec.mean)), tuple(ckpt.meta.get("std", spec.std))
    elif Path(name).expanduser().exists():
        path = _checkpoint_in(Path(name).expanduser())
        ckpt = load_checkpoint(path, branch=branch)
        spec = _spec_for_file(path, ckpt)
    else:
        err = _unknown(name)
        raise UnknownEncoderError(f"{err} ({name!r} is not an existing file either)")
    try:
        spec.backbone = dataclasses.replace(spec.backbone, **backbone_overrides)
    except TypeError as err:
        fields = sorted(f.name for f in dataclasses.fields(BackboneConfig))
        raise ValueError(f"invalid backbone override {sorted(backbone_overrides)}; valid fields: {fields}") from err
    backbone = build_backbone(spec.backbone)
    state = dict(ckpt.backbone_state)
    key = "vit.patch_embed.proj.weight"
    if key in state and state[key].shape[1] != spec.backbone.in_chans and patch_embed_adapter is not None:
        state[key] = patch_embed_adapter(state[key], spec.backbone.in_chans)
    try:
        load_backbone_weights(backbone, state, strict=strict)
    except WeightsError as err:
        raise WeightsError(f"{path} (encoder {spec.name!r}): {err}") from err
    backbone.eval()
    return LoadedEncoder(backbone, spec, ckpt.heads if with_heads else {}, path, ckpt.format, ckpt.meta)


# -- built-in encoders -----------------------------------------------------------------------------

_DINOV2_SIZES = {"vits14": ("vits", "small"), "vitb14": ("vitb", "base"), "vitl14": ("vitl", "large"),
                 "vitg14": ("vitg", "giant")}


def _register_dinov2() -> None:
    for model, (arch, hf_size) in _DINOV2_SIZES.items():
        for registers in (0, 4):
            stem = f"dinov2_{model}" + ("_reg4" if registers else "")
            hf_repo = f"facebook/dinov2-{'with-registers-' if registers else ''}{hf_size}"
            register_encoder(EncoderSpec(
                name=f"dinov2/{model}" + ("_reg4" if registers else ""),
                backbone=BackboneConfig(arch=arch, patch_size=14, img_size=224, num_registers=registers,
                                        drop_path_rate=0.0),
                weights_format="dinov2-meta",
                filenames=[f"{stem}_pretrain.pth", "model.safetensors"],
                hf_repo=hf_repo,
                url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{model}/{stem}_pretrain.pth",
                licence="Apache-2.0 (Meta DINOv2)",
                notes=f"Meta hub file (pos-embed 37x37 at 518 px, resampled to 224 on load) or HF {hf_repo} "
                      "model.safetensors; pass drop_path_rate=... to train",
            ))


_register_dinov2()
