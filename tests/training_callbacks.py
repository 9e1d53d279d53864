"""Lightning callbacks the training tests share: record per-step losses, crash at a given step."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class RecordLosses(Callback):
    def __init__(self):
        self.losses: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].detach().clone()


class CrashAt(Callback):
    """Raises at the start of step `step`, after the checkpoint of step `step` was written: a kill."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class RequeuedAt(CrashAt):
    """What SLURM's warning signal does to a run under Lightning: at the start of step `step`, save the
    pre-emption checkpoint (<default_root_dir>/hpc_ckpt_<n>.ckpt, as Lightning's SIGUSR1 handler does),
    then stop as the requeued job's old allocation would."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
            raise RuntimeError("simulated requeue")
