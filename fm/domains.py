"""Domain plugins: each domain package exposes a `Domain` through the entry-point group `fm.domains`,
so `fm-train <domain>` finds it without fm importing any domain package.

Every command builds the parsers of every domain, so a domain module must stay light (no torch at
import): a command may name its run function (or argument builder) as "module:function", imported
only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "fm.domains"


def _resolve(ref: Any) -> Any:
    """`ref` itself, or the object a "package.module:name" string names (imported on first use)."""
    if not isinstance(ref, str):
        return ref
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{ref!r} is not a 'module:function' reference")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Command:
    """One sub-command of a domain (train / extract / prepare, or an eval task).

    `run`, `add_args` and `apply_flags` are callables or "module:function" strings (resolved on first
    use: see `runner`, `arg_builder`, `flag_applier`)."""

    help: str
    run: Callable[[argparse.Namespace], object] | str
    add_args: Callable[[argparse.ArgumentParser], None] | str | None = None
    default_config: Path | None = None  # a YAML file: enables --config / --set / --print-config
    # (args, cfg) -> cfg with the flags applied, for --print-config; default: `run.apply_flags` if set
    apply_flags: Callable[[argparse.Namespace, dict], dict] | str | None = None

    def runner(self) -> Callable[[argparse.Namespace], object]:
        return _resolve(self.run)

    def arg_builder(self) -> Callable[[argparse.ArgumentParser], None] | None:
        return _resolve(self.add_args)

    def flag_applier(self) -> Callable[[argparse.Namespace, dict], dict] | None:
        """What --print-config applies; given explicitly, it spares importing the run function's module."""
        if self.apply_flags is not None:
            return _resolve(self.apply_flags)
        return getattr(self.runner(), "apply_flags", None)


@dataclass
class Domain:
    name: str
    help: str
    train: Command | None = None
    extract: Command | None = None
    prepare: Command | None = None
    eval_tasks: dict[str, Command] = field(default_factory=dict)
    configs_dir: Path | None = None  # shipped configs, parsed by the test suite


_DOMAINS: dict[str, Domain] | None = None


def load_domains() -> dict[str, Domain]:
    global _DOMAINS
    if _DOMAINS is None:
        found: dict[str, Domain] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            domain = ep.load()
            if not isinstance(domain, Domain):
                raise TypeError(f"entry point {ep.name!r} ({ep.value}) is not an fm.domains.Domain")
            found[domain.name] = domain
        _DOMAINS = found
    return _DOMAINS
