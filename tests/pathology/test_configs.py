from __future__ import annotations

import dataclasses
import inspect

import yaml

from pathology.tiling import CONFIG_PATH, tile_cohort, tiling_defaults
from pathology.tissue import TissueParams

CONFIG_DIR = CONFIG_PATH.parent


def test_every_shipped_config_parses_to_a_mapping():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert files
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_tiling_config_matches_the_code_defaults():
    config = tiling_defaults()
    signature = inspect.signature(tile_cohort).parameters
    for key in ("tile_px", "target_mpp", "min_tissue", "workers"):
        assert config[key] == signature[key].default, key
    tissue = {f.name: f.default for f in dataclasses.fields(TissueParams)}
    assert config["tissue"] == tissue
    assert TissueParams(**config["tissue"]) == TissueParams()
