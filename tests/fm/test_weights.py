"""Each checkpoint format is written from a random tiny model, loaded into a fresh one, and must give
the same forward output (against the foreign library's own forward where it is installed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from data_weights import (
    images,
    meta_hub_state,
    random_backbone,
    random_hf_model,
    randomize_,
    tiny_config,
)
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from fm.backbones import BackboneConfig, build_backbone
from fm.weights import (
    FM_FORMAT,
    WeightsError,
    infer_backbone_config,
    load_backbone_weights,
    load_checkpoint,
    load_state_dict_file,
    save_fm_checkpoint,
)

VARIANTS = {"plain": {}, "reg4": {"num_registers": 4}, "swiglu": {"ffn": "swiglu"},
            "swiglu_reg4": {"ffn": "swiglu", "num_registers": 4}}


def _tokens(backbone, x):
    with torch.no_grad():
        return backbone.forward_tokens(x)["tokens"]


def _load_into_fresh(path, cfg, **kw):
    ckpt = load_checkpoint(path, **kw)
    fresh = build_backbone(cfg).eval()
    load_backbone_weights(fresh, ckpt.backbone_state)
    return fresh, ckpt


# -- Meta DINOv2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_hub_checkpoint_matches_source_and_timm_converter(tmp_path, variant):
    source = random_backbone(seed=10, **VARIANTS[variant])
    with torch.no_grad():
        source.mask_token.normal_()
    meta_sd = meta_hub_state(source)
    torch.save(meta_sd, tmp_path / "dinov2_tiny_pretrain.pth")

    loaded, ckpt = _load_into_fresh(tmp_path / "dinov2_tiny_pretrain.pth", source.cfg)
    x = images()
    assert ckpt.format == "dinov2-meta" and ckpt.backbone_config is None and ckpt.heads == {}
    # register files store cls - pos[0]; folding it back rounds in float32, hence 1e-5
    assert torch.allclose(_tokens(loaded, x), _tokens(source, x), atol=1e-5)
    assert torch.equal(loaded.mask_token, source.mask_token)  # timm's converter drops it; we keep it

    reference = build_backbone(source.cfg).eval()  # independent path: timm's own Meta converter
    reference.vit.load_state_dict(checkpoint_filter_fn(dict(meta_sd), reference.vit))
    assert torch.allclose(reference.vit.forward_features(x), _tokens(loaded, x), atol=1e-6)


@pytest.mark.parametrize("registers", [0, 4])
def test_meta_pos_embed_is_resampled_like_timm(tmp_path, registers):
    big = random_backbone(seed=11, img_size=14 * 37, num_registers=registers)  # hub grid 37x37
    torch.save(meta_hub_state(big), tmp_path / "hub.pth")
    small_cfg = tiny_config(img_size=224, num_registers=registers)
    loaded, _ = _load_into_fresh(tmp_path / "hub.pth", small_cfg)

    reference = build_backbone(small_cfg)
    converted = checkpoint_filter_fn(meta_hub_state(big), reference.vit)
    assert loaded.vit.pos_embed.shape == reference.vit.pos_embed.shape
    assert loaded.vit.pos_embed.shape[1] == 16 * 16 + (0 if registers else 1)
    assert torch.allclose(loaded.vit.pos_embed, converted["pos_embed"], atol=1e-6)


def test_meta_training_checkpoint_teacher_chunks_and_heads(tmp_path):
    teacher, student = random_backbone(seed=12, depth=4), random_backbone(seed=13, depth=4)
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 96), "ibot_head.last_layer.weight": torch.randn(5, 8)}

    def wrap(b):
        return {**{f"backbone.{k}": v for k, v in meta_hub_state(b, chunks=2).items()}, **heads}

    assert "backbone.blocks.1.3.norm1.weight" in wrap(teacher)  # BlockChunk keys carry the global index
    torch.save({"teacher": wrap(teacher), "student": wrap(student)}, tmp_path / "teacher_checkpoint.pth")

    loaded, ckpt = _load_into_fresh(tmp_path / "teacher_checkpoint.pth", teacher.cfg)
    x = images()
    assert ckpt.format == "dinov2-meta-train"
    assert torch.allclose(_tokens(loaded, x), _tokens(teacher, x), atol=1e-6)
    assert not torch.allclose(_tokens(loaded, x), _tokens(student, x), atol=1e-3)
    assert set(ckpt.heads) == {"dino_head", "ibot_head"}
    assert torch.equal(ckpt.heads["dino_head"]["mlp.0.weight"], heads["dino_head.mlp.0.weight"])

    student_loaded, _ = _load_into_fresh(tmp_path / "teacher_checkpoint.pth", teacher.cfg, branch="student")
    assert torch.allclose(_tokens(student_loaded, x), _tokens(student, x), atol=1e-6)


# -- Hugging Face transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_save_pretrained_matches_hf_forward(tmp_path, variant):
    pytest.importorskip("transformers")
    registers, swiglu = VARIANTS[variant].get("num_registers", 0), "ffn" in VARIANTS[variant]
    hf = random_hf_model(registers=registers, swiglu=swiglu)
    with torch.no_grad():
        hf.embeddings.mask_token.normal_()
    hf.save_pretrained(tmp_path)  # writes the v4 key names (attention.attention.query, ...) on disk

    loaded, ckpt = _load_into_fresh(tmp_path / "model.safetensors", tiny_config(**VARIANTS[variant]))
    assert ckpt.format == "hf-dinov2" and ckpt.meta["hf_key_style"] == "v4"
    assert ckpt.meta["hf_config"]["num_attention_heads"] == 2
    x = images()
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
    assert torch.allclose(_tokens(loaded, x), expected, atol=1e-5)
    assert torch.equal(loaded.mask_token, hf.embeddings.mask_token)


@pytest.mark.parametrize("variant", ["plain", "swiglu_reg4"])
def test_hf_v5_in_memory_key_names(tmp_path, variant):
    pytest.importorskip("transformers")
    registers, swiglu = VARIANTS[variant].get("num_registers", 0), "ffn" in VARIANTS[variant]
    hf = random_hf_model(registers=registers, swiglu=swiglu)
    sd = hf.state_dict()
    if not any(".attention.q_proj." in k for k in sd):
        pytest.skip("installed transformers uses v4 names in memory")
    assert not swiglu or any(".mlp.gate_proj." in k for k in sd)
    save_file({f"dinov2.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / "v5.safetensors")

    loaded, ckpt = _load_into_fresh(tmp_path / "v5.safetensors", tiny_config(**VARIANTS[variant]))
    assert ckpt.meta["hf_key_style"] == "v5"
    x = images()
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
    assert torch.allclose(_tokens(loaded, x), expected, atol=1e-5)


# -- timm and our own formats ------------------------------------------------------------------------


def test_timm_state_dict_with_wrappers(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = randomize_(VisionTransformer(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=2,
                                       init_values=1e-5, num_classes=0, dynamic_img_size=True), 14).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "timm.pth")
    loaded, ckpt = _load_into_fresh(tmp_path / "timm.pth", tiny_config())
    x = images()
    assert ckpt.format == "timm"
    assert torch.allclose(_tokens(loaded, x), vit.forward_features(x), atol=1e-6)
    assert torch.equal(loaded.mask_token, torch.zeros(1, 96))


@pytest.mark.parametrize("config_as_object", [False, True])
def test_fm_lightning_checkpoint_uses_teacher_and_config(tmp_path, config_as_object):
    cfg = tiny_config(num_registers=4)
    teacher, student = random_backbone(seed=15, num_registers=4), random_backbone(seed=16, num_registers=4)
    head = torch.nn.Linear(96, 7)
    sd = {**{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
          **{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
          **{f"teacher.dino_head.{k}": v for k, v in head.state_dict().items()},
          **{f"student.dino_head.{k}": v + 1 for k, v in head.state_dict().items()}}
    hp = {"backbone": cfg if config_as_object else cfg.to_dict(), "lr": 1e-3, "output_dir": tmp_path,
          "config": {"crops": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}}
    torch.save({"state_dict": sd, "hyper_parameters": hp, "epoch": 3, "pytorch-lightning_version": "2.6.0",
                "optimizer_states": [{"state": {}}]}, tmp_path / "last.ckpt")

    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert ckpt.format == "fm-lightning" and ckpt.backbone_config == cfg
    assert ckpt.meta["mean"] == [0.5] * 3 and ckpt.meta["std"] == [0.25] * 3
    assert torch.equal(ckpt.heads["dino_head"]["weight"], head.weight)
    loaded = build_backbone(ckpt.backbone_config).eval()
    load_backbone_weights(loaded, ckpt.backbone_state)
    x = images()
    assert torch.equal(_tokens(loaded, x), _tokens(teacher, x))


def test_fm_safetensors_roundtrip(tmp_path):
    source = random_backbone(seed=17, ffn="swiglu")
    heads = {"dino_head": torch.nn.Linear(96, 5), "ibot_head": {"w": torch.arange(6.0)}}
    path = save_fm_checkpoint(tmp_path / "enc.safetensors", source, heads, mean=[0.5] * 3, std=[0.2] * 3,
                              extra_meta={"source": "unit test", "step": 12})
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt = load_checkpoint(path)
    assert ckpt.format == "fm-safetensors" and ckpt.backbone_config == source.cfg
    assert ckpt.meta["mean"] == [0.5] * 3 and ckpt.meta["source"] == "unit test" and ckpt.meta["fm_format"] == FM_FORMAT
    assert torch.equal(ckpt.heads["ibot_head"]["w"], torch.arange(6.0))
    assert torch.equal(ckpt.heads["dino_head"]["bias"], heads["dino_head"].bias)
    loaded = build_backbone(ckpt.backbone_config).eval()
    load_backbone_weights(loaded, ckpt.backbone_state)
    assert torch.equal(_tokens(loaded, images()), _tokens(source, images()))


# -- inference of the architecture ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_infer_backbone_config_rebuilds_same_architecture(variant):
    cfg = tiny_config(in_chans=4, **VARIANTS[variant])
    inferred = infer_backbone_config(build_backbone(cfg).state_dict(), num_heads=2)
    assert inferred.resolved() == cfg.resolved()
    assert (inferred.patch_size, inferred.img_size, inferred.in_chans, inferred.num_registers) == (14, 56, 4,
                                                                                                  cfg.num_registers)


def test_infer_backbone_config_of_real_dinov2_giant_shapes():
    with torch.device("meta"):  # shapes only, no memory
        sd = build_backbone(BackboneConfig(arch="vitg", patch_size=14, img_size=518, num_registers=4)).state_dict()
    inferred = infer_backbone_config(sd)
    assert inferred.arch == "vitg" and inferred.resolved() == {"embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                               "ffn": "swiglu"}
    assert (inferred.img_size, inferred.num_registers) == (518, 4)


# -- errors --------------------------------------------------------------------------------------------


def test_pickled_object_is_refused_with_conversion_hint(tmp_path):
    torch.save({"weights": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "unsafe.pth")
    with pytest.raises(WeightsError, match="refused for security") as err:
        load_state_dict_file(tmp_path / "unsafe.pth")
    assert "argparse.Namespace" in str(err.value) and "save_file" in str(err.value)
    assert "unsafe.pth" in str(err.value)


@pytest.mark.parametrize("name", ["bad.pth", "bad.safetensors", "bad.ckpt"])
def test_corrupt_file_names_the_path(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x02not really a checkpoint" * 10)
    with pytest.raises(WeightsError, match="corrupt") as err:
        load_checkpoint(tmp_path / name)
    assert str(tmp_path / name) in str(err.value)


def test_truncated_torch_file(tmp_path):
    torch.save({"a": torch.randn(100)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:300])
    with pytest.raises(WeightsError, match="cut.pth"):
        load_checkpoint(tmp_path / "cut.pth")


def test_missing_file_and_unknown_layout(tmp_path):
    with pytest.raises(WeightsError, match="not found.*nothing.pth"):
        load_checkpoint(tmp_path / "nothing.pth")
    torch.save({"encoder.weird.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="unrecognised checkpoint layout"):
        load_checkpoint(tmp_path / "odd.pth")
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match="extension"):
        load_checkpoint(tmp_path / "x.npz")


def test_wrong_size_checkpoint_gives_readable_shape_error(tmp_path):
    small = random_backbone(seed=18)  # width 96
    torch.save(meta_hub_state(small), tmp_path / "small.pth")
    wide = build_backbone(tiny_config(embed_dim=128))
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(wide, load_checkpoint(tmp_path / "small.pth").backbone_state)
    text = str(err.value)
    assert "vit.cls_token: model expects (1, 1, 128), checkpoint has (1, 1, 96)" in text
    assert "shape mismatches" in text


def test_missing_keys_are_listed_not_raw_torch_errors():
    state = random_backbone(seed=19).state_dict()
    del state["vit.norm.weight"]
    state["vit.extra"] = torch.zeros(1)
    target = build_backbone(tiny_config())
    with pytest.raises(WeightsError, match=r"missing \['vit.norm.weight'\]; unexpected \['vit.extra'\]"):
        load_backbone_weights(target, state)
    load_backbone_weights(target, state, strict=False)
    assert torch.equal(target.vit.norm.bias, state["vit.norm.bias"])


def test_fm_safetensors_with_bad_metadata(tmp_path):
    save_file({"backbone.x": torch.zeros(1)}, tmp_path / "m.safetensors",
              metadata={"fm_format": FM_FORMAT, "backbone_config": json.dumps({"arch": "vits", "bogus": 1})})
    with pytest.raises(WeightsError, match="metadata"):
        load_checkpoint(tmp_path / "m.safetensors")
