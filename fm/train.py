"""Run a pretraining job: flags -> config, MLflow run, Lightning Trainer, checkpoints/resume, export.

Domains call `run_pretraining` with their image source and augmentation; everything else
(strategies, precision, SLURM, tracking, resume, continual pretraining) is shared here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from fm.augment import MultiCropTransform
from fm.config import dump
from fm.ssl_data import ImageSource, SSLDataModule
from fm.ssl_module import DINOv2Module
from fm.train_args import CONFIGS_DIR, TRAIN_FLAGS, add_train_args, apply_train_flags  # noqa: F401 (re-export)


@dataclass
class PretrainResult:
    output_dir: Path
    checkpoint: Path | None
    export: Path
    run_id: str | None
    module: DINOv2Module


def _strategy(name: str):
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from timm.models.vision_transformer import Block

        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="SHARD_GRAD_OP")
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return name


def build_module(cfg: dict) -> DINOv2Module:
    t = cfg["train"]
    world = max(int(t["devices"]), 1) * max(int(t["num_nodes"]), 1)
    module = DINOv2Module(cfg, global_batch=cfg["data"]["batch_size"] * world)
    init = cfg["model"]["init"]
    if init:
        from fm.registry import load_encoder

        loaded = load_encoder(init, weights=cfg["model"]["init_weights"], with_heads=True)
        module.init_from(loaded.backbone.state_dict(), loaded.heads)
    if cfg["model"]["compile"] and torch.cuda.is_available() and cfg["train"]["accelerator"] != "cpu":
        for branch in (module.student, module.teacher):
            branch["backbone"].compile()
    return module


def multicrop_from_config(cfg: dict, photometric=None, extra_geometric=None) -> MultiCropTransform:
    c = cfg["crops"]
    return MultiCropTransform(
        global_size=c["global_size"], local_size=c["local_size"], n_local=c["n_local"],
        global_scale=c["global_scale"], local_scale=c["local_scale"], mean=c["mean"], std=c["std"],
        photometric=photometric, extra_geometric=extra_geometric,
    )


def run_pretraining(
    cfg: dict,
    source: ImageSource,
    transform: MultiCropTransform | None = None,
    artifacts: list[Path | tuple[Path, str]] = (),
    callbacks: list = (),
    progress: bool = True,
) -> PretrainResult:
    """Pretrain with the DINOv2 recipe on `source`; see `fit_pretraining` for tracking/resume/export."""
    from fm.weights import save_fm_checkpoint

    L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)
    module = build_module(cfg)
    m = cfg["model"]
    data = SSLDataModule(source, transform or multicrop_from_config(cfg), cfg["data"], m["backbone"]["patch_size"],
                         m["ibot"]["mask_probability"], tuple(m["ibot"]["mask_ratio"]))

    def export(path: Path, module: DINOv2Module, steps: int) -> None:
        heads = {k: v for k, v in module.teacher.items() if k != "backbone"}
        save_fm_checkpoint(path, module.teacher["backbone"], heads, mean=cfg["crops"]["mean"],
                           std=cfg["crops"]["std"], extra_meta={"steps": str(steps)})

    return fit_pretraining(cfg, module, data, export, artifacts=artifacts, callbacks=callbacks, progress=progress)


def fit_pretraining(
    cfg: dict,
    module: DINOv2Module,
    datamodule: L.LightningDataModule,
    export: Callable[[Path, DINOv2Module, int], None],
    artifacts: list[Path | tuple[Path, str]] = (),
    callbacks: list = (),
    progress: bool = True,
    tags: dict | None = None,
) -> PretrainResult:
    """The part every pretraining shares: an MLflow run around a Lightning Trainer (strategy, precision,
    nodes from `cfg["train"]`), checkpoints every `checkpoint_every` steps, resume from
    <output_dir>/checkpoints/last.ckpt, and `export(path, module, steps)` of the final teacher."""
    from fm.tracking import lightning_logger, tracked_run

    t = cfg["train"]
    out = Path(t["output_dir"])
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    max_steps = t["max_steps"] or t["epochs"] * t["epoch_length"]
    resume_from = ckpt_dir / "last.ckpt" if t["resume"] and (ckpt_dir / "last.ckpt").is_file() else None
    tr = cfg["tracking"]
    tags = {"resumed_from": str(resume_from) if resume_from else "", **(tags or {})}
    with tracked_run(tr["experiment"], run_name=tr["run_name"], config=cfg, tracking_uri=tr["tracking_uri"],
                     tags=tags) as run:
        for item in artifacts:  # a path, or (path, folder in the run's artifacts)
            path, folder = item if isinstance(item, tuple) else (item, None)
            run.log_artifact(path, folder)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=t["checkpoint_every"], save_last=True,
                                     save_top_k=-1, filename="step{step:07d}", auto_insert_metric_name=False)
        cbs = [checkpoint, *callbacks]
        if progress:
            cbs.append(TQDMProgressBar(refresh_rate=max(1, t["log_every"])))
        trainer = L.Trainer(
            accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"],
            strategy=_strategy(t["strategy"]), precision=t["precision"], max_steps=max_steps,
            logger=lightning_logger(run), callbacks=cbs, log_every_n_steps=t["log_every"],
            enable_progress_bar=progress, enable_model_summary=False, default_root_dir=out,
            use_distributed_sampler=False, deterministic=False, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        export_path = out / "export" / "teacher.safetensors"
        if trainer.is_global_zero:
            (out / "config.yaml").write_text(dump(cfg))
            export(export_path, module, trainer.global_step)
            run.log_artifact(export_path, "model")
            run.log_artifact(out / "config.yaml")
            run.log_metrics({"final/steps": trainer.global_step})
        last = Path(checkpoint.last_model_path) if checkpoint.last_model_path else None
        return PretrainResult(out, last, export_path, run.run_id, module)
