"""SoftCon continual pretraining as a LightningModule built on the core DINOv2 module.

`SoftConModule` subclasses `fm.ssl_module.DINOv2Module`, so schedules, layer-wise lr decay, the
per-step lr/wd hook, per-submodule gradient clipping, the EMA teacher update, `init_from` and the
checkpoint format are the core's. What it adds (our reconstruction of SoftCon, arXiv 2405.20462, which
published no training code; every constant sits in `model.softcon` of the config):
- a projector head on each branch (student and its EMA copy);
- the student sees its view with a fraction `mask_ratio` of patch tokens dropped (Siamese masking,
  `earthobs.masking.masked_forward`), the teacher sees the other view whole;
- loss = `SoftConLoss` (instance InfoNCE on the batch similarity matrix + lambda x soft term with
  targets from the cosine similarity of multi-hot labels; unlabelled rows fall back to the identity);
- with `dinov2_weight > 0` the core DINOv2 loss (DINO + iBOT + KoLeo, the parent's `training_step`
  on the same two views) is added: continual DINOv2, which needs no labels.

`run_softcon_pretraining` mirrors `fm.train.run_pretraining` (MLflow run, checkpoints, resume, export)
with this module and the EO data module.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from earthobs.bands import S1_BANDS, S2_L1C_BANDS, S2_L2A_BANDS, canonical_bands
from earthobs.masking import masked_forward
from earthobs.models import RGB_BANDS, channel_adapted_backbone
from earthobs.softcon_loss import SoftConLoss
from earthobs.ssl_data import modality_bands
from fm.backbones import ViTBackbone
from fm.heads import projection_mlp
from fm.ssl_module import DINOv2Module

log = logging.getLogger(__name__)
EXPORT_META_KEY = "earthobs"  # JSON metadata in our exports: input bands, modality, normalisation
_BANDS_BY_COUNT = {3: RGB_BANDS, 13: S2_L1C_BANDS, 12: S2_L2A_BANDS, 2: S1_BANDS}


class ProjectorHead(nn.Module):
    """MLP projector from the CLS embedding to the contrastive space: Linear, [BatchNorm], GELU, ...,
    Linear. The batch norm (batch statistics always, as in SimCLR / MoCo v3 projectors, also in the
    teacher branch) removes what all images share: a freshly initialised ViT with LayerScale 1e-5 gives
    nearly identical CLS vectors, whose cosine similarities are flat to first order, so a contrastive
    loss alone would not move them."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, nlayers: int = 3,
                 batch_norm: bool = True):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, out_dim, nlayers, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def softcon_loss_from_config(sc: dict) -> SoftConLoss:
    return SoftConLoss(temperature=sc["temperature"], soft_weight=sc["soft_weight"], soft_mode=sc["soft_mode"],
                       bce_scale=sc["bce_scale"], bce_bias=sc["bce_bias"], learnable_bce=sc["learnable_bce"],
                       symmetric=sc["symmetric"], soft_temperature=sc["soft_temperature"])


class SoftConModule(DINOv2Module):
    def __init__(self, config: dict, global_batch: int | None = None):
        super().__init__(config, global_batch)
        sc = config["model"]["softcon"]
        self.dinov2_weight = float(sc["dinov2_weight"])
        self.mask_ratio = float(sc["mask_ratio"])
        self.symmetric_views = bool(sc["symmetric_views"])
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"model.softcon.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        student = self.student
        if self.dinov2_weight <= 0:  # no DINOv2 term: its heads would only cost memory and EMA time
            for name in ("dino_head", "ibot_head"):
                if name in student:
                    del student[name]
        student["softcon_head"] = ProjectorHead(student["backbone"].embed_dim, **sc["projector"])
        self.teacher = copy.deepcopy(student)  # same order of parameters as the student: EMA pairs them
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.softcon_loss = softcon_loss_from_config(sc)

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        extra = [p for p in self.softcon_loss.parameters() if p.requires_grad]  # learnable BCE scale/bias
        if extra:
            optimizer.add_param_group({"params": extra, "lr_mult": 1.0, "wd_mult": 0.0, "is_last_layer": False,
                                       "lr": 0.0, "weight_decay": 0.0})
        return optimizer

    def _softcon_terms(self, student_view: torch.Tensor, teacher_view: torch.Tensor, labels) -> dict:
        with torch.no_grad():
            target = self.teacher["softcon_head"](self.teacher["backbone"](teacher_view))
        online = self.student["softcon_head"](masked_forward(self.student["backbone"], student_view, self.mask_ratio))
        return self.softcon_loss(online, target, labels)

    def training_step(self, batch: dict, batch_idx: int):
        glob = batch["global_crops"]
        b = glob.shape[0] // 2  # crop-major: rows [0, b) are the student views, [b, 2b) the teacher views
        if self.dinov2_weight > 0:
            # The parent's step seeds the RNG for this step, logs train/dino, ibot, koleo and sched/*, and
            # returns the weighted DINOv2 loss; train/loss is logged again below with the total (same
            # arguments, so Lightning keeps the last value).
            dinov2 = super().training_step(batch, batch_idx)
        else:
            torch.manual_seed(self.cfg["train"]["seed"] * 1_000_003 + self.global_step)
            dinov2 = None
        labels = batch.get("labels")
        terms = self._softcon_terms(glob[:b], glob[b:], labels)
        if self.symmetric_views:
            swapped = self._softcon_terms(glob[b:], glob[:b], labels)
            terms = {k: 0.5 * (terms[k] + swapped[k]) for k in terms}
        loss = terms["loss"] if dinov2 is None else terms["loss"] + self.dinov2_weight * dinov2
        s = self.schedules.at(self.global_step)
        metrics = {"train/loss": loss, "train/softcon": terms["loss"], "train/instance": terms["instance"],
                   "train/soft": terms["soft"], "sched/lr": s["lr"], "sched/wd": s["weight_decay"],
                   "sched/momentum": s["momentum"]}
        if dinov2 is not None:
            metrics["train/dinov2"] = dinov2
        if labels is not None:
            metrics["train/labelled_fraction"] = float(labels.flatten(1).any(1).float().mean())
        self.log_dict(metrics, prog_bar=False, on_step=True, batch_size=b)
        self.log("loss", loss, prog_bar=True, on_step=True, logger=False, batch_size=b)
        return loss


# -- building: band adaptation of the initial weights ----------------------------------------------------


def input_bands_of(loaded) -> tuple[str, ...]:
    """Input bands of a loaded encoder: our export metadata, the EO registry, else by channel count
    (3 = RGB as B04/B03/B02, 13 = S2 L1C, 12 = S2 L2A, 2 = S1 [VV, VH])."""
    meta = loaded.meta.get(EXPORT_META_KEY)
    if meta:
        return canonical_bands(json.loads(meta)["bands"])
    from earthobs.encoders import EO_ENCODERS

    if loaded.spec.name in EO_ENCODERS:
        return EO_ENCODERS[loaded.spec.name].bands
    channels = loaded.backbone.cfg.in_chans
    if channels not in _BANDS_BY_COUNT:
        raise ValueError(f"encoder {loaded.spec.name!r} takes {channels} input channels and names no bands; "
                         f"known counts: {sorted(_BANDS_BY_COUNT)}")
    return _BANDS_BY_COUNT[channels]


def resolve_init_mode(mode: str, source: Sequence[str], target: Sequence[str]) -> str:
    """`auto`: rgb_map when every source band is an input band (DINOv2 RGB -> 13-band S2), else repeat."""
    if mode != "auto":
        return mode
    return "rgb_map" if set(source) <= set(target) else "repeat"


def build_softcon_module(cfg: dict) -> SoftConModule:
    """The module for `cfg`, its input channels set from `data.modality`, initialised from `model.init`
    (a registered encoder or a checkpoint) with the patch embedding adapted by `model.init_mode`."""
    from fm.registry import load_encoder
    from fm.weights import WeightsError

    m, t = cfg["model"], cfg["train"]
    bands = modality_bands(cfg["data"]["modality"])
    m["backbone"]["in_chans"] = len(bands)
    world = max(int(t["devices"]), 1) * max(int(t["num_nodes"]), 1)
    module = SoftConModule(cfg, global_batch=cfg["data"]["batch_size"] * world)
    if m["init"]:
        loaded = load_encoder(m["init"], weights=m["init_weights"])
        source = input_bands_of(loaded)
        mode = resolve_init_mode(m["init_mode"], source, bands)
        try:
            adapted = channel_adapted_backbone(module.student["backbone"].cfg, loaded.backbone.state_dict(), bands,
                                               mode, source, torch.Generator().manual_seed(t["seed"]))
        except WeightsError as err:
            raise ValueError(f"--init {m['init']} does not fit model.backbone {m['backbone']}: {err}") from err
        heads = {}
        for name, state in loaded.heads.items():
            own = module.student[name].state_dict() if name in module.student else None
            if own is not None and all(k in state and state[k].shape == v.shape for k, v in own.items()):
                heads[name] = state
            else:
                log.info("init: head %r of %s not used (absent from or different in this model)", name, m["init"])
        module.init_from(adapted.state_dict(), heads)
        log.info("initialised from %s (%s bands %s -> %s, mode %s)", m["init"], loaded.checkpoint_format,
                 list(source), list(bands), mode)
    if m["compile"]:
        for branch in (module.student, module.teacher):
            branch["backbone"].compile()
    return module


def save_eo_checkpoint(path: str | Path, backbone: ViTBackbone, bands: Sequence[str], norm_stats: str | None,
                       heads: dict | None = None, norm_kind: str = "softcon", extra_meta: dict | None = None) -> Path:
    """Our export (fm safetensors) plus the EO metadata evaluation needs: bands, modality, scaling.
    Scaling to [0, 1] is done by `earthobs.normalize`, so the registry's mean/std are the identity."""
    from fm.weights import save_fm_checkpoint

    bands = canonical_bands(list(bands))
    if len(bands) != backbone.cfg.in_chans:
        raise ValueError(f"{len(bands)} bands named for a backbone with {backbone.cfg.in_chans} input channels")
    info = {"bands": list(bands), "modality": "s1" if set(bands) <= set(S1_BANDS) else "s2",
            "norm_kind": norm_kind, "norm_stats": norm_stats}
    return save_fm_checkpoint(path, backbone, heads, mean=(0.0,) * len(bands), std=(1.0,) * len(bands),
                              extra_meta={EXPORT_META_KEY: json.dumps(info), **(extra_meta or {})})


# -- the pretraining run ---------------------------------------------------------------------------------


def run_softcon_pretraining(cfg: dict, source=None, callbacks: Sequence = (), progress: bool = True,
                            cache_dir: str | Path | None = None):
    """Pretrain with SoftCon; tracked in MLflow; resumes from <output_dir>/checkpoints/last.ckpt.
    `source` (an `earthobs.ssl_data.EOSource`) overrides `data.source`."""
    from earthobs.ssl_data import MultispectralViews, SoftConDataModule, training_source
    from fm.train import fit_pretraining

    t, d = cfg["train"], cfg["data"]
    source = source if source is not None else training_source(cfg, cache_dir)
    bands = modality_bands(d["modality"])
    table = source.norm.source
    L.seed_everything(t["seed"], workers=True, verbose=False)
    module = build_softcon_module(cfg)
    m = cfg["model"]
    n_local = cfg["views"]["n_local"] if module.dinov2_weight > 0 else 0
    mask_p = m["ibot"]["mask_probability"] if module.dinov2_weight > 0 else 0.0
    data = SoftConDataModule(source, MultispectralViews(cfg["views"], n_local), d, m["backbone"]["patch_size"],
                             mask_p, tuple(m["ibot"]["mask_ratio"]))

    def export(path: Path, module: SoftConModule, steps: int) -> None:
        heads = {k: v for k, v in module.teacher.items() if k != "backbone"}
        save_eo_checkpoint(path, module.teacher["backbone"], bands, table, heads, extra_meta={"steps": str(steps)})

    tags = {"data": str(d["source"]), "n_train_images": str(len(source)), "norm_stats": table}
    return fit_pretraining(cfg, module, data, export, callbacks=callbacks, progress=progress, tags=tags)
