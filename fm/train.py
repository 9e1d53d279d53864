"""Run a pretraining job: flags -> config, MLflow run, Lightning Trainer, checkpoints/resume, export.

Domains call `run_pretraining` with their image source and augmentation; everything else
(strategies, precision, SLURM, tracking, resume, continual pretraining) is shared here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.strategies import FSDPStrategy

from fm.augment import MultiCropTransform
from fm.cli import UserError
from fm.config import dump
from fm.skipped_inputs import SKIPPED_DIR, read_skipped, summary
from fm.ssl_data import ImageSource, SSLDataModule
from fm.ssl_module import DINOv2Module
from fm.train_args import CONFIGS_DIR, TRAIN_FLAGS, add_train_args, apply_train_flags  # noqa: F401 (re-export)

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    output_dir: Path
    checkpoint: Path | None
    export: Path
    run_id: str | None
    module: DINOv2Module


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, plus FSDP on CPU processes (gloo) so the FSDP path can be tested on a
    machine without GPUs. Lightning refuses accelerator="cpu" only for the exact FSDPStrategy type
    (accelerator_connector `_check_strategy_and_fallback`) and passes `device_id=root_device.index`,
    which is None on CPU; torch's FSDP then looks for an accelerator and raises "FSDP needs a non-CPU
    accelerator device" (torch/distributed/fsdp/_init_utils.py `_init_device_handle`). On CPU we wrap
    with `device_id=cpu` ourselves; on GPUs nothing differs from FSDPStrategy."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type == "cpu":
            from torch.distributed.fsdp import FullyShardedDataParallel

            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; the base class would warn about it
        return super()._setup_model(model)

    def optimizer_state(self, optimizer) -> dict:
        """On CPU, the full optimizer state without `offload_to_cpu`. torch's FSDP gathers every state
        (exp_avg, exp_avg_sq) into one reused buffer and, with offload_to_cpu, keeps `value.cpu()` instead
        of a clone (_optim_utils.py `_unflatten_orig_param_states`); on CPU that is the buffer itself, so
        every state in the checkpoint came out equal to the last one gathered. On GPUs `.cpu()` copies."""
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the layout Lightning stores (keyed by parameter id)
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def unwrap_fsdp(trainer: L.Trainer) -> None:
    """After FSDP training, give the LightningModule its full parameters and plain submodules on every rank
    (collective: all ranks must call it). Under FSDP each parameter is a view of this rank's shard (1-D,
    often empty) and nested units gather the full state only collectively, so the rank-0 export
    (`module.teacher["backbone"].state_dict()`) would write shards or hang, and evaluating
    `result.module` (as every rank does after DDP) would fail. Costs one full copy of the parameters
    per rank, as DDP holds; the module is then a plain one and must not go back into the Trainer."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module = trainer.lightning_module
    full: list[tuple[torch.nn.Module, str, torch.Tensor, bool]] = []
    with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
        for owner in module.modules():
            if not isinstance(owner, FSDP):
                full += [(owner, n, p.detach().clone(), p.requires_grad) for n, p in owner.named_parameters(recurse=False)]
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FSDP):
                parent._modules[name] = child.module
    for owner, name, tensor, requires_grad in full:
        owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=requires_grad)


def fsdp_unit(module: torch.nn.Module) -> bool | dict:
    """FSDP wrap policy: one unit per ViT Block. Frozen blocks (the EMA teacher's, which never run backward)
    reshard after forward (FULL_SHARD). Under SHARD_GRAD_OP the gathered parameters of a unit are freed only
    in its backward hook; for the teacher that never fires, and FSDP1 then reuses the still-allocated gathered
    copy instead of gathering again: the teacher kept computing with (and checkpointing) the weights of its
    first forward while the EMA went into its shards (seen on 2 CPU processes: teacher blocks unchanged after
    4 steps; pytorch/pytorch#117742). The student keeps SHARD_GRAD_OP."""
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import ShardingStrategy

    if not isinstance(module, Block):
        return False
    if any(p.requires_grad for p in module.parameters()):
        return True
    return {"sharding_strategy": ShardingStrategy.FULL_SHARD}


def _strategy(name: str):
    if name == "fsdp":
        from torch.distributed.fsdp.wrap import CustomPolicy

        return BlockFSDPStrategy(auto_wrap_policy=CustomPolicy(fsdp_unit), sharding_strategy="SHARD_GRAD_OP")
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return name


def check_run_config(cfg: dict) -> None:
    """Values that would fail deep inside training (or, for max_steps 0, silently train the whole
    schedule), refused up front in one line."""
    t, d = cfg["train"], cfg["data"]
    if int(d["batch_size"]) < 1:
        raise UserError(f"--batch-size (data.batch_size) must be at least 1, got {d['batch_size']}")
    if t["max_steps"] is not None and int(t["max_steps"]) < 1:
        raise UserError(f"--max-steps (train.max_steps) must be at least 1, or null for the whole schedule; "
                        f"got {t['max_steps']}")
    out = Path(t["output_dir"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder")
    if t.get("export_every_checkpoint") and t["strategy"] == "fsdp":
        raise UserError("train.export_every_checkpoint is not supported with --strategy fsdp (the teacher is "
                        "sharded while training); the final export is written as usual")
    if cfg["model"]["init_weights"] and not cfg["model"]["init"]:
        raise UserError(f"--weights {cfg['model']['init_weights']} needs --from ENCODER (the encoder those weights "
                        f"are for), or give the file itself to --from")
    crops, chans = cfg.get("crops"), cfg["model"]["backbone"].get("in_chans", 3)
    for key in ("mean", "std"):
        if crops and key in crops and len(crops[key]) != chans:
            raise UserError(f"crops.{key} has {len(crops[key])} values for a backbone of {chans} input channels "
                            f"(model.backbone.in_chans)")


def _describe(backbone) -> str:
    c, spec = backbone.cfg, backbone.cfg.resolved()
    return (f"{c.arch}/{c.patch_size} ({spec['embed_dim']}-d, {spec['depth']} blocks, {c.num_registers} registers, "
            f"{c.in_chans} channels)")


def build_module(cfg: dict) -> DINOv2Module:
    check_run_config(cfg)
    t = cfg["train"]
    world = max(int(t["devices"]), 1) * max(int(t["num_nodes"]), 1)
    module = DINOv2Module(cfg, global_batch=cfg["data"]["batch_size"] * world)
    init = cfg["model"]["init"]
    if init:
        from fm.registry import load_encoder
        from fm.weights import WeightsError

        loaded = load_encoder(init, weights=cfg["model"]["init_weights"], with_heads=True)
        try:
            module.init_from(loaded.backbone.state_dict(), loaded.heads)
        except WeightsError as err:
            raise UserError(
                f"--from {init} is a {_describe(loaded.backbone)} encoder but the config builds a "
                f"{_describe(module.backbone)} one: use a config made for it (e.g. --config "
                f"fm/configs/core/dinov2_vitl14.yaml for dinov2/vitl14) or set model.backbone.* to match "
                f"({str(err).splitlines()[0].rstrip(':')})") from err
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


class ExportEveryCheckpoint(Callback):
    """`train.export_every_checkpoint`: the teacher is also exported beside every periodic checkpoint
    (`export/teacher_step<N>.safetensors`), so a long run can be evaluated while it trains."""

    def __init__(self, every: int, export: Callable, folder: Path):
        self.every, self.export, self.folder = int(every), export, folder

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and trainer.is_global_zero:
            self.export(self.folder / f"teacher_step{step:07d}.safetensors", module, step)


def resume_checkpoint(out: Path) -> Path | None:
    """What a run in `out` resumes from: the newest of checkpoints/last.ckpt and the checkpoints Lightning
    saves on SLURM's warning signal before a requeue (`<out>/hpc_ckpt_<n>.ckpt`; Lightning reads those
    itself only when it is given no checkpoint), so a requeued job loses no steps."""
    found = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _set_aside_preemption_checkpoints(out: Path) -> None:
    """`train.resume=false` starts over, but under SLURM Lightning resumes from `<out>/hpc_ckpt_*.ckpt` by
    itself whenever it is given no checkpoint: move them to checkpoints/set_aside/ (kept, not read)."""
    aside = out / "checkpoints" / "set_aside"
    for path in sorted(out.glob("hpc_ckpt_*.ckpt")):
        aside.mkdir(parents=True, exist_ok=True)
        try:
            path.rename(aside / f"{time.strftime('%Y%m%d-%H%M%S')}-{path.name}")
            print(f"train.resume=false: moved {path.name} to {aside} (a fresh run must not resume from it)")
        except FileNotFoundError:  # another rank of this job moved it first
            continue


def _run_start(folder: Path, resumed: bool) -> float:
    """When this run began, across requeues and resumes (its skipped-input records since then are its own):
    a fresh run notes the time in `folder`/started; a resumed one reads it back."""
    marker = folder / "started"
    if resumed and marker.is_file():
        try:
            return float(marker.read_text())
        except ValueError:
            pass
    now = time.time()
    if not resumed:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(repr(now))
        except OSError:
            pass
    return now if not resumed else 0.0


def _check_resumable(path: Path, module: L.LightningModule) -> None:
    """A checkpoint this model cannot continue from (another architecture or head size in the same
    --output-dir, a damaged file) is refused in one line with the ways out, before Lightning's
    state-dict traceback."""
    from fm.weights import SAFE_GLOBALS

    way_out = "start over in this folder with --set train.resume=false, or use another --output-dir"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as err:  # truncated, not a checkpoint, refused by weights_only
        raise UserError(f"cannot resume from {path}: not a readable training checkpoint "
                        f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                        f"{way_out}") from err
    want = module.state_dict()
    differ = [k for k in sorted(set(saved) | set(want))
              if k not in saved or k not in want or tuple(saved[k].shape) != tuple(want[k].shape)]
    if differ:
        k = differ[0]
        shapes = f"checkpoint {tuple(saved[k].shape) if k in saved else 'none'}, config " \
                 f"{tuple(want[k].shape) if k in want else 'none'}"
        raise UserError(f"cannot resume from {path}: it is a run of another model ({len(differ)} tensors differ, "
                        f"e.g. {k}: {shapes}); {way_out}")


def _report_skipped(folder: Path, since: float, run) -> None:
    """Say at the end of a run which inputs (across all workers and ranks) were unreadable and replaced."""
    entries = read_skipped(folder, since) if folder.is_dir() else []
    run.log_metrics({"data/skipped_inputs": len(entries)})
    if entries:
        log.warning(summary(entries, folder))
        listing = folder / "this_run.json"
        listing.write_text(json.dumps(entries, indent=1))
        run.log_artifact(listing, "skipped")


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
    check_run_config(cfg)
    max_steps = t["max_steps"] if t["max_steps"] is not None else t["epochs"] * t["epoch_length"]
    resume_from = resume_checkpoint(out) if t["resume"] else None
    if resume_from is not None:
        _check_resumable(resume_from, module)
    elif not t["resume"]:
        _set_aside_preemption_checkpoints(out)
    run_start = _run_start(out / SKIPPED_DIR, resumed=resume_from is not None)
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
        if t.get("export_every_checkpoint"):
            cbs.append(ExportEveryCheckpoint(t["checkpoint_every"], export, out / "export"))
        if progress:
            cbs.append(TQDMProgressBar(refresh_rate=max(1, t["log_every"])))
        trainer = L.Trainer(
            accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"],
            strategy=_strategy(t["strategy"]), precision=t["precision"], max_steps=max_steps,
            logger=lightning_logger(run), callbacks=cbs, log_every_n_steps=t["log_every"],
            enable_progress_bar=progress, enable_model_summary=False, default_root_dir=out,
            use_distributed_sampler=False, deterministic=False, num_sanity_val_steps=0,
        )
        skipped = getattr(getattr(datamodule, "source", None), "skipped", None)
        if skipped is not None:
            skipped.folder = out / SKIPPED_DIR
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        if isinstance(trainer.strategy, FSDPStrategy):
            unwrap_fsdp(trainer)
        export_path = out / "export" / "teacher.safetensors"
        if trainer.is_global_zero:
            (out / "config.yaml").write_text(dump(cfg))
            export(export_path, module, trainer.global_step)
            run.log_artifact(export_path, "model")
            run.log_artifact(out / "config.yaml")
            run.log_metrics({"final/steps": trainer.global_step})
            _report_skipped(out / SKIPPED_DIR, run_start, run)
        last = Path(checkpoint.last_model_path) if checkpoint.last_model_path else None
        return PretrainResult(out, last, export_path, run.run_id, module)
