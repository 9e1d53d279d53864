"""The DINOv2 LightningModule end to end: it learns, it resumes exactly, a crash is tracked as FAILED."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
import torch
from training_callbacks import CrashAt, RecordLosses, RequeuedAt

from evaluation.core_domain import demo_source, texture_knn_accuracy
from fm.config import resolve_config
from fm.ssl_module import DINOv2Module
from fm.train import CONFIGS_DIR, build_module, run_pretraining

TINY = [
    "model.backbone.embed_dim=48", "model.backbone.depth=2", "model.backbone.num_heads=3",
    "model.dino.n_prototypes=64", "model.ibot.n_prototypes=64", "data.batch_size=8", "crops.n_local=2",
    "data.demo_images=64", "train.epochs=1", "train.epoch_length=20", "train.checkpoint_every=1",
]


def tiny_cfg(tmp_path, *extra: str) -> dict:
    return resolve_config(CONFIGS_DIR / "core" / "demo_cpu.yaml", overrides=[*TINY, f"train.output_dir={tmp_path}/run", *extra])


def test_resume_after_crash_gives_identical_losses(tmp_path):
    straight = RecordLosses()
    run_pretraining(tiny_cfg(tmp_path / "a", "train.max_steps=6"), demo_source(tiny_cfg(tmp_path)),
                    callbacks=[straight], progress=False)

    cfg_b = tiny_cfg(tmp_path / "b", "train.max_steps=6")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(cfg_b, demo_source(cfg_b), callbacks=[CrashAt(3)], progress=False)
    assert (tmp_path / "b" / "run" / "checkpoints" / "last.ckpt").is_file()
    failed = mlflow.search_runs(experiment_names=["fm-core"], output_format="list")
    assert any(r.info.status == "FAILED" for r in failed), "a crashed run must be marked FAILED"

    resumed = RecordLosses()
    run_pretraining(cfg_b, demo_source(cfg_b), callbacks=[resumed], progress=False)
    assert sorted(resumed.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert torch.equal(resumed.losses[step], straight.losses[step]), f"step {step} differs after resume"


def test_a_requeued_run_resumes_from_the_preemption_checkpoint(tmp_path):
    """The periodic checkpoint is from step 3; SLURM's warning signal made Lightning save one at step 5
    before the requeue. The rerun continues at step 5 (not 3), with the straight run's losses."""
    straight = RecordLosses()
    run_pretraining(tiny_cfg(tmp_path / "a", "train.max_steps=7"), demo_source(tiny_cfg(tmp_path)),
                    callbacks=[straight], progress=False)
    cfg = tiny_cfg(tmp_path / "b", "train.max_steps=7", "train.checkpoint_every=3")
    with pytest.raises(RuntimeError, match="simulated requeue"):
        run_pretraining(cfg, demo_source(cfg), callbacks=[RequeuedAt(5)], progress=False)
    assert (tmp_path / "b" / "run" / "hpc_ckpt_1.ckpt").is_file()
    resumed = RecordLosses()
    run_pretraining(cfg, demo_source(cfg), callbacks=[resumed], progress=False)
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert torch.equal(resumed.losses[step], straight.losses[step]), f"step {step} differs after the requeue"


def test_starting_over_under_slurm_does_not_resume_from_a_preemption_checkpoint(tmp_path, monkeypatch):
    """train.resume=false starts over: under SLURM, Lightning resumes from <out>/hpc_ckpt_*.ckpt on its own
    whenever it is given no checkpoint, so those are set aside (kept), and the run trains from step 0."""
    cfg = tiny_cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every=3")
    with pytest.raises(RuntimeError, match="simulated requeue"):
        run_pretraining(cfg, demo_source(cfg), callbacks=[RequeuedAt(4)], progress=False)
    for key, value in dict(SLURM_NTASKS="1", SLURM_JOB_NAME="fm", SLURM_NODELIST="localhost", SLURM_PROCID="0",
                           SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_ID="1", SLURM_NTASKS_PER_NODE="1").items():
        monkeypatch.setenv(key, value)  # a SLURM batch job, as Lightning's SLURMEnvironment.detect() sees it
    fresh = tiny_cfg(tmp_path, "train.max_steps=3", "train.checkpoint_every=3", "train.resume=false")
    steps = RecordLosses()
    run_pretraining(fresh, demo_source(fresh), callbacks=[steps], progress=False)
    assert sorted(steps.losses) == [0, 1, 2]
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert [p.name.split("-")[-1] for p in (tmp_path / "run" / "checkpoints" / "set_aside").iterdir()] == ["hpc_ckpt_1.ckpt"]


def test_schedule_follows_config_not_max_steps(tmp_path):
    """Stopping early (max_steps) must not compress the schedules: they span epochs x epoch_length."""
    module = build_module(tiny_cfg(tmp_path, "train.max_steps=3"))
    assert len(module.schedules.lr) == 20


def test_pretraining_learns_texture_classes(tmp_path):
    """kNN on frozen teacher CLS beats the same network at initialisation by a clear margin."""
    cfg = resolve_config(CONFIGS_DIR / "core" / "demo_cpu.yaml",
                         overrides=[f"train.output_dir={tmp_path}/run", "train.max_steps=100"])
    L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)  # as run_pretraining seeds
    init = build_module(cfg).backbone
    init_acc = texture_knn_accuracy(init, cfg)
    result = run_pretraining(cfg, demo_source(cfg), progress=False)
    L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)
    torch.testing.assert_close(build_module(cfg).backbone.vit.cls_token, init.vit.cls_token)  # the same start
    trained_acc = texture_knn_accuracy(result.module.backbone, cfg)
    assert trained_acc > init_acc + 0.15, (init_acc, trained_acc)


def test_teacher_is_ema_of_student(tmp_path):
    cfg = tiny_cfg(tmp_path)
    module = DINOv2Module(cfg)
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in module.teacher.parameters()]
    student = [p.clone() for p in module.student.parameters()]
    opt = torch.optim.SGD(module.student.parameters(), lr=0.0)
    module.optimizer_step(0, 0, opt, optimizer_closure=lambda: None)  # step 0, lr 0: only the EMA moves
    m = module.schedules.at(0)["momentum"]
    for t_old, s, t_new in zip(before, student, module.teacher.parameters()):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s)


def test_continual_pretraining_starts_from_exported_backbone_and_heads(tmp_path):
    """`--from <our export>`: student and teacher start from the exported teacher, heads included."""
    first = run_pretraining(tiny_cfg(tmp_path / "a", "train.max_steps=2"), demo_source(tiny_cfg(tmp_path)),
                            progress=False)
    cfg = tiny_cfg(tmp_path / "b", f"model.init={first.export}")
    module = build_module(cfg)
    source = first.module.teacher
    for branch in (module.student, module.teacher):
        for name in ("backbone", "dino_head"):
            for (key, want), got in zip(source[name].state_dict().items(), branch[name].state_dict().values()):
                assert torch.equal(want, got), f"{name}.{key} not initialised from the export"
    fresh = build_module(tiny_cfg(tmp_path / "c"))
    assert not torch.equal(fresh.student["backbone"].vit.pos_embed, module.student["backbone"].vit.pos_embed)


def test_prototypes_are_frozen_by_their_learning_rate_alone_in_the_first_epoch(tmp_path):
    """As DINOv2 (train.py: last_layer_lr 0 in freeze_last_layer_epochs, nothing else): the prototypes keep
    their gradients, so the per-submodule clipping and Adam's moments see them, and do not move until
    the epoch ends; then they train."""
    from lightning.pytorch.callbacks import Callback

    class Watch(Callback):
        def __init__(self):
            self.weights, self.moments = {}, {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            (name, p), *_ = [(n, p) for n, p in module.student.named_parameters() if "dino_head.last_layer" in n]
            self.weights[trainer.global_step] = p.detach().clone()
            state = trainer.optimizers[0].state.get(p, {})
            self.moments[trainer.global_step] = float(state["exp_avg"].abs().sum()) if "exp_avg" in state else 0.0

    cfg = tiny_cfg(tmp_path, "train.max_steps=4", "train.epoch_length=2", "optim.warmup_epochs=0",
                   "optim.freeze_last_layer_epochs=1", "train.epochs=2")
    L.seed_everything(cfg["train"]["seed"], workers=True, verbose=False)
    start = [p.detach().clone() for n, p in build_module(cfg).student.named_parameters()
             if "dino_head.last_layer" in n][0]
    watch = Watch()
    run_pretraining(cfg, demo_source(cfg), callbacks=[watch], progress=False)
    assert torch.equal(watch.weights[1], start) and torch.equal(watch.weights[2], start)  # frozen in epoch 1
    assert watch.moments[1] > 0  # but their gradients reached the optimizer, as in DINOv2
    assert not torch.equal(watch.weights[4], start)  # and they train from epoch 2 on
