"""YAML configs: a shipped default per domain, a user file on top (`--config`), then `--set a.b=value`
overrides. Keys are checked against the default so a typo is an error that names it, and values are
checked against the default's type."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` (no decimal point) as a float, as YAML 1.2 and users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_symlink():  # e.g. a Nextflow task folder: `defaults:` are siblings of the real file
        path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    base = data.pop("defaults", None)
    if base:  # `defaults: other.yaml` inherits from a sibling file
        parent = load_yaml(path.parent / base)
        return merge(parent, data, where=str(path), new_sections=True)
    return data


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):  # "auto" is Lightning's word for device counts
        return (isinstance(value, int) and not isinstance(value, bool)) or value == "auto"
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def merge(
    base: dict, update: dict, where: str = "config", strict: bool = True, _prefix: str = "", new_sections: bool = False
) -> dict:
    """Deep-merge `update` into a copy of `base`. With strict, unknown keys and wrong types raise.
    `new_sections` lets a shipped config that inherits (`defaults:`) add whole new top-level sections
    (a domain's own settings); keys inside existing sections are still checked."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{_prefix}{key}"
        if key not in out:
            if strict and not (new_sections and not _prefix and isinstance(value, dict)):
                close = [k for k in out if k.lower().startswith(str(key)[:3].lower())]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{where}: unknown key '{dotted}'{hint}; valid keys here: {sorted(out)}")
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict) and out[key]:
            out[key] = merge(out[key], value, where, strict, f"{dotted}.")
        else:
            if strict and not _type_ok(out[key], value):
                raise ConfigError(
                    f"{where}: '{dotted}' expects {type(out[key]).__name__} (default {out[key]!r}), got {value!r}"
                )
            if isinstance(out[key], float) and isinstance(value, int):
                value = float(value)
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """'a.b.c=1e-3' -> {'a': {'b': {'c': 0.001}}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def resolve_config(default_path: str | Path, user_path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    cfg = load_yaml(default_path)
    if user_path:
        cfg = merge(cfg, load_yaml(user_path), where=str(user_path))
    for ov in overrides:
        cfg = merge(cfg, parse_override(ov), where=f"--set {ov}")
    return cfg


def get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def set_value(cfg: dict, dotted: str, value: Any) -> None:
    """Set a key that must exist (flags map onto config keys through this)."""
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key '{dotted}'")
    node[parts[-1]] = value


def apply_flags(args: Any, cfg: dict, mapping: dict[str, str]) -> dict:
    """Copy the command-line flags that were given (not None) onto their config keys (flag -> dotted key),
    and `--tracking-uri` onto `tracking.tracking_uri`: flags win over the config file and `--set`."""
    for flag, key in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_value(cfg, key, value)
    if getattr(args, "tracking_uri", None) and "tracking" in cfg:
        cfg["tracking"]["tracking_uri"] = args.tracking_uri
    return cfg


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
