"""Domain plugins: each domain package exposes a `Domain` through the entry-point group `fm.domains`,
so `fm-train <domain>` finds it without fm importing any domain package."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "fm.domains"


@dataclass
class Command:
    """One sub-command of a domain (train / extract / prepare, or an eval task)."""

    help: str
    run: Callable[[argparse.Namespace], object]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    default_config: Path | None = None  # a YAML file: enables --config / --set / --print-config


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
