"""YAML configs: strict merging with errors that name the key, `--set` parsing, `defaults:` inheritance,
and every shipped config under fm/configs."""

from __future__ import annotations

from pathlib import Path

import pytest

import fm.config
from fm.backbones import BackboneConfig
from fm.config import ConfigError, get, load_yaml, merge, parse_override, resolve_config, set_value

CONFIG_DIR = Path(fm.config.__file__).parent / "configs"
VITL16 = CONFIG_DIR / "core" / "dinov2_vitl16.yaml"
SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))

BASE = {"optim": {"base_lr": 0.004, "warmup_epochs": 10, "betas": [0.9, 0.999], "fused": False}, "name": "x", "opt": None}


def test_merge_is_deep_and_does_not_mutate():
    out = merge(BASE, {"optim": {"base_lr": 0.001}})
    assert out["optim"] == {"base_lr": 0.001, "warmup_epochs": 10, "betas": [0.9, 0.999], "fused": False}
    assert BASE["optim"]["base_lr"] == 0.004


def test_unknown_key_error_names_dotted_key():
    with pytest.raises(ConfigError, match=r"optim\.base_lrr") as info:
        merge(BASE, {"optim": {"base_lrr": 0.1}}, where="user.yaml")
    assert "user.yaml" in str(info.value)
    assert "base_lr" in str(info.value)  # the valid keys / suggestion are shown


def test_unknown_key_allowed_when_not_strict():
    out = merge(BASE, {"optim": {"extra": 1}}, strict=False)
    assert out["optim"]["extra"] == 1


@pytest.mark.parametrize(
    "update,key,value",
    [
        ({"optim": {"warmup_epochs": "ten"}}, "optim.warmup_epochs", "ten"),
        ({"optim": {"warmup_epochs": 1.5}}, "optim.warmup_epochs", "1.5"),
        ({"optim": {"base_lr": "fast"}}, "optim.base_lr", "fast"),
        ({"optim": {"fused": 1}}, "optim.fused", "1"),
        ({"optim": {"betas": 0.9}}, "optim.betas", "0.9"),
        ({"optim": 3}, "optim", "3"),
    ],
)
def test_wrong_type_error_names_key_and_value(update, key, value):
    with pytest.raises(ConfigError) as info:
        merge(BASE, update)
    message = str(info.value)
    assert f"'{key}'" in message and value in message


def test_int_accepted_for_float_and_converted():
    out = merge(BASE, {"optim": {"base_lr": 2}})
    assert out["optim"]["base_lr"] == 2.0 and isinstance(out["optim"]["base_lr"], float)


def test_null_default_accepts_anything():
    assert merge(BASE, {"opt": {"a": 1}})["opt"] == {"a": 1}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("optim.base_lr=1e-3", {"optim": {"base_lr": 0.001}}),
        ("optim.base_lr=4.0e-3", {"optim": {"base_lr": 0.004}}),
        ("optim.warmup_epochs=5", {"optim": {"warmup_epochs": 5}}),
        ("optim.betas=[0.8, 0.99]", {"optim": {"betas": [0.8, 0.99]}}),
        ("optim.fused=true", {"optim": {"fused": True}}),
        ("opt=null", {"opt": None}),
        ("name=vitl", {"name": "vitl"}),
        ("name=", {"name": ""}),
        ("a.b.c=x=y", {"a": {"b": {"c": "x=y"}}}),
    ],
)
def test_parse_override(text, expected):
    got = parse_override(text)
    assert got == expected
    leaf = got
    while isinstance(leaf, dict) and leaf:
        leaf = next(iter(leaf.values()))
    exp_leaf = expected
    while isinstance(exp_leaf, dict) and exp_leaf:
        exp_leaf = next(iter(exp_leaf.values()))
    assert type(leaf) is type(exp_leaf)  # 1e-3 is a float, 5 stays an int


def test_parse_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="optim.base_lr"):
        parse_override("optim.base_lr")


def test_resolve_config_with_user_file_and_overrides(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  warmup_epochs: 3\ndata:\n  batch_size: 32\n")
    cfg = resolve_config(VITL16, user, ["optim.base_lr=1e-3", "train.epochs=2"])
    assert cfg["optim"]["base_lr"] == pytest.approx(1e-3) and isinstance(cfg["optim"]["base_lr"], float)
    assert cfg["optim"]["warmup_epochs"] == 3 and cfg["data"]["batch_size"] == 32 and cfg["train"]["epochs"] == 2
    assert cfg["optim"]["min_lr"] == pytest.approx(1e-6)  # untouched defaults stay

    with pytest.raises(ConfigError, match=r"'train\.epoch'"):
        resolve_config(VITL16, None, ["train.epoch=2"])
    with pytest.raises(ConfigError, match=r"train\.epochs.*1\.5"):
        resolve_config(VITL16, None, ["train.epochs=1.5"])
    bad_user = tmp_path / "bad.yaml"
    bad_user.write_text("model:\n  dino:\n    n_protoypes: 4\n")
    with pytest.raises(ConfigError, match=r"model\.dino\.n_protoypes") as info:
        resolve_config(VITL16, bad_user)
    assert "bad.yaml" in str(info.value)


def test_user_file_scientific_notation_is_a_float(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` in a file as the string '1e-3'; users write it that way all the
    time (DINOv2's own configs do), so a user file must give the same float as `--set optim.base_lr=1e-3`."""
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  base_lr: 1e-3\n  min_lr: 2E-6\n")
    cfg = resolve_config(VITL16, user)
    assert cfg["optim"]["base_lr"] == pytest.approx(1e-3) and isinstance(cfg["optim"]["base_lr"], float)
    assert cfg["optim"]["min_lr"] == pytest.approx(2e-6)


def test_defaults_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("a:\n  b: 1\n  c: [1, 2]\nd: hello\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\na:\n  b: 5\n")
    (tmp_path / "grandchild.yaml").write_text("defaults: child.yaml\nd: bye\n")
    assert load_yaml(tmp_path / "child.yaml") == {"a": {"b": 5, "c": [1, 2]}, "d": "hello"}
    assert load_yaml(tmp_path / "grandchild.yaml") == {"a": {"b": 5, "c": [1, 2]}, "d": "bye"}
    (tmp_path / "typo.yaml").write_text("defaults: base.yaml\na:\n  bb: 5\n")
    with pytest.raises(ConfigError, match=r"a\.bb") as info:
        load_yaml(tmp_path / "typo.yaml")
    assert "typo.yaml" in str(info.value)


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_yaml(broken)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="listed.yaml.*mapping"):
        load_yaml(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_get_and_set_value():
    cfg = merge(BASE, {})
    assert get(cfg, "optim.warmup_epochs") == 10
    set_value(cfg, "optim.warmup_epochs", 2)
    assert cfg["optim"]["warmup_epochs"] == 2
    with pytest.raises(ConfigError, match="optim.warmup"):
        set_value(cfg, "optim.warmup", 2)


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def test_shipped_configs_found():
    assert VITL16 in SHIPPED and len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_parses_and_merges_strictly(path):
    cfg = load_yaml(path)
    assert cfg, f"{path} is empty"
    if path.parent == VITL16.parent:  # core configs all sit on top of the full ViT-L/16 default
        merged = merge(load_yaml(VITL16), cfg, where=str(path))
        assert merged.keys() == load_yaml(VITL16).keys()
        BackboneConfig.from_dict(merged["model"]["backbone"]).resolved()
    for key, value in _walk(cfg):
        # YAML 1.1 reads '4e-3' (no dot) as a string: a number written that way is a silent bug
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                continue
            pytest.fail(f"{path}: '{key}' = {value!r} is a string that looks like a number")
