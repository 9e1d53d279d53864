"""The DINOv2 recipe as a LightningModule: student + EMA teacher, DINO/iBOT heads, DINO + iBOT +
KoLeo losses, per-step schedules, layer-wise lr decay and per-submodule gradient clipping.

Config is the resolved `model` / `optim` / `crops` / `train` mapping of our YAML configs (see
fm/configs/core/dinov2_vitl16.yaml for every key with DINOv2's ViT-L/16 defaults).
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn

from fm.backbones import BackboneConfig, ViTBackbone, build_backbone
from fm.heads import DINOHead
from fm.losses import TeacherCentering, dino_loss, ibot_patch_loss, koleo_loss
from fm.optim import apply_schedule, param_groups
from fm.schedules import build_schedules


def build_student(model_cfg: dict) -> nn.ModuleDict:
    backbone = build_backbone(BackboneConfig.from_dict(model_cfg["backbone"]))
    d, i = model_cfg["dino"], model_cfg["ibot"]
    modules = {
        "backbone": backbone,
        "dino_head": DINOHead(backbone.embed_dim, d["n_prototypes"], d["hidden_dim"], d["bottleneck_dim"], d["nlayers"]),
    }
    if i["separate_head"]:
        modules["ibot_head"] = DINOHead(
            backbone.embed_dim, i["n_prototypes"], i["hidden_dim"], i["bottleneck_dim"], i["nlayers"]
        )
    return nn.ModuleDict(modules)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over matching parameters (fused)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def fsdp_ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, root: nn.Module) -> None:
    """`ema_update_` for branches trained under FSDP (use_orig_params=True) inside the FSDP unit `root`.

    Outside forward, each parameter is a view of this rank's shard of its unit's flat parameter. Units
    built from identical modules (each ViT Block of teacher and student) have identical flat layouts,
    so their shards pair element by element and the update stays local. The root unit holds the rest
    of both branches (embeddings, norms, heads) in one flat parameter at different offsets: there the
    shard views do not pair (a zip met sizes 0 and 48), so those parameters are updated on the full
    tensors gathered by summon_full_params(recurse=False), each rank writing back its own shard."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def in_units(branch: nn.Module) -> set[int]:
        return {id(p) for unit in FSDP.fsdp_modules(branch) if unit is not root for p in unit.parameters()}

    t_named, s_named = list(teacher.named_parameters()), list(student.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        raise RuntimeError("teacher and student are not wrapped identically: the EMA cannot pair their parameters")
    t_local, s_local = in_units(teacher), in_units(student)
    local_t, local_s, full_names = [], [], set()
    for (name, t), (_, s) in zip(t_named, s_named):
        if (id(t) in t_local) != (id(s) in s_local) or (id(t) in t_local and t.shape != s.shape):
            raise RuntimeError(f"{name}: teacher and student shards differ; the EMA cannot pair them")
        if id(t) in t_local:
            local_t.append(t)
            local_s.append(s.detach())
        else:
            full_names.add(name)
    if local_t:
        torch._foreach_mul_(local_t, momentum)
        torch._foreach_add_(local_t, local_s, alpha=1.0 - momentum)
    if full_names:
        with FSDP.summon_full_params(root, recurse=False, writeback=True):
            # Parameters fetched again here: inside the context they are the unsharded views.
            full_t = [p for n, p in teacher.named_parameters() if n in full_names]
            full_s = [p.detach() for n, p in student.named_parameters() if n in full_names]
            torch._foreach_mul_(full_t, momentum)
            torch._foreach_add_(full_t, full_s, alpha=1.0 - momentum)


def clip_sharded_grad_norm_(parameters, max_norm: float, group, device: torch.device) -> torch.Tensor:
    """`clip_grad_norm_` for gradients sharded across `group` (FSDP): every rank holds a disjoint part
    of each gradient, so the norm is the root of the all-reduced sum of the local squared norms.
    torch's clip_grad_norm_ on the local shards would clip each rank's part by its own, smaller norm."""
    grads = [p.grad for p in parameters if p.grad is not None and p.grad.numel()]
    sq = torch.zeros((), device=device, dtype=torch.float32)
    if grads:
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
    torch.distributed.all_reduce(sq, group=group)
    total = sq.sqrt()
    if grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grad_norm_ formula
        torch._foreach_mul_(grads, coef.to(grads[0].device, grads[0].dtype))
    return total


class DINOv2Module(L.LightningModule):
    def __init__(self, config: dict, global_batch: int | None = None):
        super().__init__()
        self.save_hyperparameters({"config": config, "global_batch": global_batch,
                                   "backbone": config["model"]["backbone"]})
        self.cfg = config
        m, o, t = config["model"], config["optim"], config["train"]
        self.student = build_student(m)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        d, i = m["dino"], m["ibot"]
        self.dino_centering = TeacherCentering(d["n_prototypes"], d["centering"], d["center_momentum"], d["sk_iterations"])
        n_ibot = i["n_prototypes"] if i["separate_head"] else d["n_prototypes"]
        self.ibot_centering = TeacherCentering(n_ibot, d["centering"], d["center_momentum"], d["sk_iterations"])
        batch = global_batch or config["data"]["batch_size"]
        self.schedules = build_schedules(o, m, t["epochs"], t["epoch_length"], batch)
        self.n_global = 2

    # -- initialisation from pretrained weights (continual pretraining) -------------------------
    def init_from(self, backbone_state: dict, heads: dict | None = None) -> None:
        """Load backbone (and, when present, head) weights into student and teacher alike."""
        from fm.weights import load_backbone_weights

        for branch in (self.student, self.teacher):
            load_backbone_weights(branch["backbone"], backbone_state)
            for name, state in (heads or {}).items():
                if name in branch:
                    branch[name].load_state_dict(state)

    @property
    def backbone(self) -> ViTBackbone:
        """The teacher backbone: the one DINOv2 evaluates and exports."""
        return self.teacher["backbone"]

    # -- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg["optim"]
        groups = param_groups(self.student, self.student["backbone"].depth, o["layerwise_decay"], o["patch_embed_lr_mult"])
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        return torch.optim.AdamW(groups, betas=tuple(o["betas"]), fused=fused or None)

    def on_train_batch_start(self, batch, batch_idx):
        s = self.schedules.at(self.global_step)
        apply_schedule(self.optimizers(), s["lr"], s["last_layer_lr"], s["weight_decay"])

    def _heads(self, branch: nn.ModuleDict):
        dino = branch["dino_head"]
        return dino, branch["ibot_head"] if "ibot_head" in branch else dino

    def training_step(self, batch: dict, batch_idx: int):
        step = self.global_step
        s = self.schedules.at(step)
        torch.manual_seed(self.cfg["train"]["seed"] * 1_000_003 + step)  # drop-path draws: reproducible per step
        m = self.cfg["model"]
        glob, masks = batch["global_crops"], batch["masks"]
        local = batch.get("local_crops")
        n_masked_images = int(masks.flatten(1).any(1).sum())

        with torch.no_grad():
            t_tok = self.teacher["backbone"].forward_tokens(glob)
            t_dino, t_ibot = self._heads(self.teacher)
            t_cls_logits = t_dino(t_tok["cls"])
            t_patch_logits = t_ibot(t_tok["patch"][masks.flatten(1)])
            t_cls = self.dino_centering(t_cls_logits, s["teacher_temp"])
            t_patch = self.ibot_centering(t_patch_logits, s["teacher_temp"]) if n_masked_images else t_patch_logits

        s_glob = self.student["backbone"].forward_tokens(glob, masks)
        s_dino, s_ibot = self._heads(self.student)
        s_glob_logits = s_dino(s_glob["cls"])
        s_local_logits = s_dino(self.student["backbone"](local)) if local is not None else None
        s_patch_logits = s_ibot(s_glob["patch"][masks.flatten(1)])

        temp = m["student_temp"]
        loss_dino = dino_loss(s_glob_logits, s_local_logits, t_cls, self.n_global, temp)
        loss_ibot = ibot_patch_loss(s_patch_logits, t_patch, masks, temp)
        loss_koleo = sum(koleo_loss(c) for c in s_glob["cls"].chunk(self.n_global))
        loss = m["dino"]["loss_weight"] * loss_dino + m["ibot"]["loss_weight"] * loss_ibot + m["koleo_weight"] * loss_koleo
        self.log_dict(
            {"train/loss": loss, "train/dino": loss_dino, "train/ibot": loss_ibot, "train/koleo": loss_koleo,
             "sched/lr": s["lr"], "sched/wd": s["weight_decay"], "sched/momentum": s["momentum"],
             "sched/teacher_temp": s["teacher_temp"]},
            prog_bar=False, on_step=True, batch_size=glob.shape[0] // self.n_global,
        )
        self.log("loss", loss, prog_bar=True, on_step=True, logger=False, batch_size=glob.shape[0] // self.n_global)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip each student submodule (backbone, heads) separately, as DINOv2 does."""
        clip = self.cfg["optim"]["clip_grad"]
        if clip and clip > 0:
            root = self._fsdp_root()
            for module in self.student.values():
                if root is None:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
                else:  # sharded gradients: the norm must be summed over ranks (FSDP's own clip is global)
                    clip_sharded_grad_norm_(module.parameters(), clip, root.process_group, self.device)

    def _fsdp_root(self) -> nn.Module | None:
        """The FSDP unit wrapping this module when a Trainer runs it under FSDP, else None."""
        if self._trainer is None:
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = self._trainer.strategy.model
        return model if isinstance(model, FSDP) else None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Step, then the EMA teacher update: teacher = m * teacher + (1 - m) * student with m from the
        cosine momentum schedule. Done here, not in on_train_batch_end, because Lightning's checkpoint
        callback runs before the module's batch-end hook: a checkpoint must hold the updated teacher."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self.schedules.at(step)["momentum"]
        root = self._fsdp_root()
        if root is None:
            ema_update_(self.teacher, self.student, momentum)
        else:
            fsdp_ema_update_(self.teacher, self.student, momentum, root)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses drop path
        return self
