"""Encoder registry: lookups, plugins, finding weights on disk (never downloading) and load_encoder."""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from data_weights import images, meta_hub_state, random_backbone, tiny_config

from fm import registry
from fm.registry import (
    EncoderSpec,
    UnknownEncoderError,
    WeightsNotFoundError,
    get_encoder_spec,
    list_encoders,
    load_encoder,
    register_encoder,
    resolve_weights_file,
    unregister_encoder,
)
from fm.weights import WeightsError, save_fm_checkpoint


@pytest.fixture
def clean_registry(monkeypatch):
    """Whatever a test registers is gone afterwards; plugins are not loaded from the environment."""
    saved = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_plugins_loaded", True)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """Point every cache the resolver searches into tmp_path."""
    for var in ("FM_WEIGHTS_DIR", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def tiny_spec(name="test/tiny", **kw) -> EncoderSpec:
    base = dict(name=name, backbone=tiny_config(), weights_format="dinov2-meta",
                filenames=["tiny_pretrain.pth", "model.safetensors"], hf_repo="someone/tiny",
                url="https://example.org/tiny_pretrain.pth", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    base.update(kw)
    return EncoderSpec(**base)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


# -- lookups ---------------------------------------------------------------------------------------


def test_builtin_dinov2_specs(clean_registry):
    names = list_encoders()
    for model in ("vits14", "vitb14", "vitl14", "vitg14"):
        assert f"dinov2/{model}" in names and f"dinov2/{model}_reg4" in names
    spec = get_encoder_spec("dinov2/vitl14_reg4")
    assert spec.filenames[0] == "dinov2_vitl14_reg4_pretrain.pth"
    assert spec.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    assert (spec.backbone.arch, spec.backbone.patch_size, spec.backbone.img_size) == ("vitl", 14, 224)
    assert spec.backbone.num_registers == 4 and spec.mean == (0.485, 0.456, 0.406)
    assert get_encoder_spec("dinov2/vitg14").backbone.resolved()["ffn"] == "swiglu"


def test_get_returns_a_copy(clean_registry):
    get_encoder_spec("dinov2/vits14").backbone.img_size = 999
    assert get_encoder_spec("dinov2/vits14").backbone.img_size == 224


def test_unknown_name_suggests_close_matches(clean_registry):
    with pytest.raises(UnknownEncoderError) as err:
        get_encoder_spec("dinov2/vitl14-reg4")
    assert isinstance(err.value, KeyError)
    assert "Did you mean 'dinov2/vitl14_reg4'" in str(err.value)
    assert "dinov2/vits14" in str(err.value)  # lists the known names


def test_register_conflict_and_idempotence(clean_registry):
    register_encoder(tiny_spec())
    register_encoder(tiny_spec())  # same spec again: fine (a plugin module imported twice)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(tiny_spec(url=None))
    register_encoder(tiny_spec(url=None), overwrite=True)
    assert get_encoder_spec("test/tiny").url is None
    unregister_encoder("test/tiny")
    assert "test/tiny" not in list_encoders()


def test_entry_point_plugins_load_once_and_failures_are_contained(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "fm_plugin_ok.py").write_text(
        "from fm.registry import EncoderSpec, register_encoder\n"
        "from fm.backbones import BackboneConfig\n"
        "register_encoder(EncoderSpec(name='plugin/ok', backbone=BackboneConfig(), weights_format='timm',"
        " filenames=['ok.pth']))\n")
    (tmp_path / "fm_plugin_broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint("ok", "fm_plugin_ok", registry.PLUGIN_GROUP),
           EntryPoint("broken", "fm_plugin_broken", registry.PLUGIN_GROUP)]
    calls = []
    monkeypatch.setattr(registry, "entry_points", lambda group: calls.append(group) or eps)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="'broken'.*boom"):
        assert "plugin/ok" in list_encoders()
    assert get_encoder_spec("plugin/ok").filenames == ("ok.pth",)
    assert calls == [registry.PLUGIN_GROUP]  # loaded once, not on every lookup
    monkeypatch.delitem(sys.modules, "fm_plugin_ok", raising=False)


def test_pathology_module_registers_phikon_v2(clean_registry):
    import pathology.encoders

    importlib.reload(pathology.encoders)  # registering the same spec twice is harmless
    spec = get_encoder_spec("pathology/phikon-v2")
    assert (spec.backbone.arch, spec.backbone.patch_size, spec.backbone.num_registers) == ("vitl", 16, 0)
    assert spec.hf_repo == "owkin/phikon-v2" and spec.filenames == ("model.safetensors",)
    assert "non-commercial" in spec.licence and spec.feature == "cls"


# -- finding weights ---------------------------------------------------------------------------------


def test_missing_weights_message_says_where_and_how(no_caches, clean_registry):
    import pathology.encoders

    importlib.reload(pathology.encoders)
    spec = get_encoder_spec("pathology/phikon-v2")
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights_file(spec)
    text = str(err.value)
    assert "hf download owkin/phikon-v2 model.safetensors --local-dir" in text
    assert "--weights PATH" in text and "FM_WEIGHTS_DIR" in text
    assert str(no_caches / "hf" / "hub" / "models--owkin--phikon-v2") in text
    assert "non-commercial" in text
    with pytest.raises(WeightsNotFoundError, match=r"wget -P .*dinov2_vits14_pretrain.pth"):
        resolve_weights_file(get_encoder_spec("dinov2/vits14"))


def test_hf_cache_layout_prefers_refs_main(no_caches):
    spec = tiny_spec()
    repo = no_caches / "hf" / "hub" / "models--someone--tiny"
    old = _touch(repo / "snapshots" / "aaa111" / "model.safetensors")
    main = _touch(repo / "snapshots" / "bbb222" / "model.safetensors")
    os.utime(old, (2e9, 2e9))
    os.utime(old.parent, (2e9, 2e9))  # the older revision is the newest on disk
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb222\n")
    assert resolve_weights_file(spec) == main
    (repo / "refs" / "main").unlink()
    assert resolve_weights_file(spec) == old


def test_fm_weights_dir_and_torch_hub(no_caches, monkeypatch):
    spec = tiny_spec()
    hub_file = _touch(no_caches / "torch" / "hub" / "checkpoints" / "tiny_pretrain.pth")
    assert resolve_weights_file(spec) == hub_file
    root = no_caches / "weights"
    monkeypatch.setenv("FM_WEIGHTS_DIR", str(root))
    _touch(root / "model.safetensors")  # too generic to be trusted at the top level
    flat = _touch(root / "tiny_pretrain.pth")
    assert resolve_weights_file(spec) == flat
    nested = _touch(root / "test__tiny" / "model.safetensors")
    assert resolve_weights_file(spec) == nested


def test_explicit_weights_path(no_caches):
    spec = tiny_spec()
    f = _touch(no_caches / "mine" / "model.safetensors")
    assert resolve_weights_file(spec, f) == f
    assert resolve_weights_file(spec, f.parent) == f
    with pytest.raises(WeightsNotFoundError, match="holds none of"):
        resolve_weights_file(spec, no_caches)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights_file(spec, no_caches / "nope.pth")


# -- load_encoder ------------------------------------------------------------------------------------


def test_load_encoder_by_name_resamples_hub_grid(no_caches, monkeypatch, clean_registry):
    register_encoder(tiny_spec(backbone=tiny_config(img_size=56)))
    source = random_backbone(seed=20, img_size=112)  # "hub" file with an 8x8 grid
    root = no_caches / "weights"
    monkeypatch.setenv("FM_WEIGHTS_DIR", str(root))
    (root / "test__tiny").mkdir(parents=True)
    torch.save(meta_hub_state(source), root / "test__tiny" / "tiny_pretrain.pth")

    encoder = load_encoder("test/tiny", drop_path_rate=0.2)
    backbone, spec = encoder  # unpacks as (backbone, spec)
    assert spec.mean == (0.1, 0.2, 0.3) and backbone.cfg.drop_path_rate == 0.2
    assert encoder.checkpoint_format == "dinov2-meta" and not backbone.training
    assert backbone.vit.pos_embed.shape[1] == 1 + 4 * 4
    loaded, original = backbone.state_dict(), source.state_dict()
    for key in original:
        if key != "vit.pos_embed":
            assert torch.equal(loaded[key], original[key]), key


def test_load_encoder_from_our_checkpoint_path_with_heads(tmp_path, clean_registry):
    source = random_backbone(seed=21, num_registers=4)
    heads = {"dino_head": torch.nn.Linear(96, 4)}
    path = save_fm_checkpoint(tmp_path / "run" / "teacher.safetensors", source, heads, mean=[0.3] * 3, std=[0.1] * 3)
    encoder = load_encoder(path)
    assert encoder.spec.backbone == source.cfg and encoder.spec.mean == (0.3, 0.3, 0.3)
    assert torch.equal(encoder.heads["dino_head"]["weight"], heads["dino_head"].weight)
    x = images()
    with torch.no_grad():
        assert torch.equal(encoder.backbone(x), source(x))
    assert torch.equal(load_encoder(path.parent).backbone.vit.cls_token, source.vit.cls_token)  # directory works
    assert load_encoder(path, with_heads=False).heads == {}


def test_load_encoder_foreign_path_infers_config(tmp_path, clean_registry):
    source = random_backbone(seed=22, ffn="swiglu")
    torch.save(meta_hub_state(source), tmp_path / "dinov2_x.pth")
    encoder = load_encoder(tmp_path / "dinov2_x.pth", num_heads=2)
    assert encoder.spec.backbone.resolved() == source.cfg.resolved()
    x = images()
    with torch.no_grad():
        assert torch.allclose(encoder.backbone(x), source(x), atol=1e-6)


def test_load_encoder_channel_change_needs_adapter(tmp_path, clean_registry):
    source = random_backbone(seed=23)
    torch.save(meta_hub_state(source), tmp_path / "w.pth")
    register_encoder(tiny_spec())
    with pytest.raises(WeightsError, match="patch_embed_adapter"):
        load_encoder("test/tiny", weights=tmp_path / "w.pth", in_chans=4)
    seen = []

    def adapter(weight, in_chans):
        seen.append((tuple(weight.shape), in_chans))
        return torch.cat([weight, weight[:, :1]], dim=1)

    backbone, _ = load_encoder("test/tiny", weights=tmp_path / "w.pth", in_chans=4, patch_embed_adapter=adapter)
    assert seen == [((96, 3, 14, 14), 4)]
    assert torch.equal(backbone.vit.patch_embed.proj.weight[:, 3], source.vit.patch_embed.proj.weight[:, 0])


def test_load_encoder_bad_inputs(tmp_path, clean_registry):
    with pytest.raises(UnknownEncoderError, match="not an existing file"):
        load_encoder(str(tmp_path / "missing.pth"))
    register_encoder(tiny_spec())
    torch.save(meta_hub_state(random_backbone(seed=24)), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="valid fields"):
        load_encoder("test/tiny", weights=tmp_path / "w.pth", no_such_field=1)
    with pytest.raises(WeightsError, match=r"w.pth \(encoder 'test/tiny'\).*shape mismatches"):
        load_encoder("test/tiny", weights=tmp_path / "w.pth", embed_dim=128)
