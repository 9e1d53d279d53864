"""Parameter groups of the DINOv2 recipe on a tiny student: layer-wise lr decay, patch-embed x0.2,
no weight decay on biases / norms / LayerScale, and the prototype layer flagged for freezing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fm.config
from fm.config import load_yaml, merge
from fm.optim import apply_schedule, param_groups
from fm.ssl_module import build_student

DEPTH = 3
DECAY = 0.9
PATCH_MULT = 0.2


@pytest.fixture(scope="module")
def student() -> torch.nn.ModuleDict:
    cfg = load_yaml(Path(fm.config.__file__).parent / "configs" / "core" / "dinov2_vitl16.yaml")
    model = merge(
        cfg["model"],
        {
            "backbone": {"arch": "vitt", "depth": DEPTH, "embed_dim": 48, "num_heads": 3, "img_size": 32, "patch_size": 8},
            "dino": {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        },
    )
    torch.manual_seed(0)
    return build_student(model)


def _expected_lr_mult(name: str) -> float:
    """DINOv2's get_vit_lr_decay_rate, written out for the names of our timm-based student."""
    if name.startswith("backbone.vit.blocks."):
        i = int(name.split(".")[3])
        return DECAY ** (DEPTH + 1 - (i + 1))
    if "patch_embed" in name:
        return DECAY ** (DEPTH + 1) * PATCH_MULT
    if any(k in name for k in ("pos_embed", "cls_token", "mask_token", "reg_token")):
        return DECAY ** (DEPTH + 1)
    return 1.0  # final norm, heads


def _expected_wd_mult(name: str) -> float:
    leaf = name.split(".")[-1]
    if leaf == "bias" or leaf == "gamma" or ".norm" in name:
        return 0.0
    return 1.0


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_every_trainable_parameter_in_exactly_one_group(student):
    groups = param_groups(student, DEPTH, DECAY, PATCH_MULT)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in student.parameters()}


def test_frozen_parameters_are_left_out(student):
    pos = student["backbone"].vit.pos_embed
    pos.requires_grad_(False)
    try:
        groups = param_groups(student, DEPTH, DECAY, PATCH_MULT)
        assert id(pos) not in _group_of(groups)
    finally:
        pos.requires_grad_(True)


def test_lr_and_wd_multipliers_per_parameter(student):
    groups = _group_of(param_groups(student, DEPTH, DECAY, PATCH_MULT))
    seen = {"gamma": 0, "norm": 0, "block": 0, "patch": 0, "last": 0}
    for name, p in student.named_parameters():
        g = groups[id(p)]
        assert g["lr_mult"] == pytest.approx(_expected_lr_mult(name), rel=1e-9), name
        assert g["wd_mult"] == _expected_wd_mult(name), name
        assert g["is_last_layer"] == name.startswith("dino_head.last_layer."), name
        seen["gamma"] += name.endswith(".gamma")
        seen["norm"] += ".norm" in name
        seen["block"] += ".blocks." in name
        seen["patch"] += "patch_embed" in name
        seen["last"] += "last_layer" in name
    assert seen["gamma"] == 2 * DEPTH and seen["norm"] > 0 and seen["patch"] == 2 and seen["last"] == 2


def test_named_examples(student):
    """A few hand-computed values, independent of the name-matching helper above."""
    groups = _group_of(param_groups(student, DEPTH, DECAY, PATCH_MULT))
    params = dict(student.named_parameters())

    def group(name):
        return groups[id(params[name])]

    assert group("backbone.vit.blocks.0.attn.qkv.weight")["lr_mult"] == pytest.approx(0.729)  # 0.9**3
    assert group("backbone.vit.blocks.2.mlp.fc1.weight")["lr_mult"] == pytest.approx(0.9)
    assert group("backbone.vit.patch_embed.proj.weight")["lr_mult"] == pytest.approx(0.6561 * 0.2)
    assert group("backbone.vit.cls_token")["lr_mult"] == pytest.approx(0.6561)
    assert group("backbone.vit.norm.weight")["lr_mult"] == pytest.approx(1.0)
    assert group("dino_head.mlp.0.weight")["lr_mult"] == pytest.approx(1.0)
    assert group("backbone.vit.blocks.1.ls1.gamma")["wd_mult"] == 0.0
    assert group("backbone.vit.blocks.1.norm2.weight")["wd_mult"] == 0.0
    assert group("backbone.vit.blocks.1.attn.proj.bias")["wd_mult"] == 0.0
    assert group("backbone.vit.blocks.1.attn.proj.weight")["wd_mult"] == 1.0
    assert group("dino_head.last_layer.weight_v")["is_last_layer"]
    assert not group("dino_head.mlp.4.weight")["is_last_layer"]


def test_apply_schedule_sets_products(student):
    groups = param_groups(student, DEPTH, DECAY, PATCH_MULT)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_schedule(opt, lr=1e-3, last_layer_lr=5e-4, weight_decay=0.04)
    for g in opt.param_groups:
        base = 5e-4 if g["is_last_layer"] else 1e-3
        assert g["lr"] == pytest.approx(base * g["lr_mult"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_mult"])


def test_frozen_last_layer_does_not_move(student):
    """With last_layer_lr = 0 (first epoch), an AdamW step changes the MLP but not the prototypes."""
    student = copy.deepcopy(student)
    opt = torch.optim.AdamW(param_groups(student, DEPTH, DECAY, PATCH_MULT))
    apply_schedule(opt, lr=1e-2, last_layer_lr=0.0, weight_decay=0.04)
    head = student["dino_head"]
    before_v = head.last_layer.weight_v.detach().clone()
    before_mlp = head.mlp[0].weight.detach().clone()
    opt.zero_grad()
    head(torch.randn(8, 48)).logsumexp(-1).sum().backward()
    assert head.last_layer.weight_v.grad.abs().sum() > 0
    opt.step()
    torch.testing.assert_close(head.last_layer.weight_v.detach(), before_v, rtol=0, atol=0)
    assert not torch.equal(head.mlp[0].weight.detach(), before_mlp)
    opt.zero_grad()
