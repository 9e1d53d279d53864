"""nextflow_schema.json describes every param of nextflow.config, with the same defaults, and the
default and `test` profile params satisfy it (the checks nf-core lint and nf-schema would make)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nfharness as nf
import pytest

reftrace = pytest.importorskip("reftrace", reason="reftrace (dev extra) parses Nextflow files")

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SCHEMA = json.loads((WORKFLOWS / "nextflow_schema.json").read_text())
PROPS = nf.schema_properties(SCHEMA)


def test_schema_is_a_draft_2020_12_document_of_referenced_groups():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["type"] == "object"
    refs = [entry["$ref"] for entry in SCHEMA["allOf"]]
    assert sorted(refs) == sorted(f"#/$defs/{name}" for name in SCHEMA["$defs"])
    for name, spec in PROPS.items():
        assert spec.get("type") in ("string", "integer", "number", "boolean"), name
        assert len(spec.get("description", "")) > 10, f"{name} needs a description"


def test_schema_and_config_declare_the_same_params_and_defaults():
    defaults = nf.config_params(WORKFLOWS / "nextflow.config")
    assert sorted(defaults) == sorted(PROPS)
    for name, value in defaults.items():
        if value is None:
            assert "default" not in PROPS[name], f"{name}: config default is null, schema says {PROPS[name]['default']!r}"
        else:
            assert PROPS[name].get("default") == value, f"{name}: config {value!r} vs schema {PROPS[name].get('default')!r}"


def test_every_param_the_pipelines_use_is_described():
    used = set()
    for path in WORKFLOWS.rglob("*.nf"):  # reftrace finds params in workflow bodies; the regex those in
        used |= {p.name for p in reftrace.Module.from_file(str(path)).params}  # functions and script blocks
        used |= set(re.findall(r"\bparams\.(\w+)", nf.strip_comments(path.read_text())))
    for path in WORKFLOWS.rglob("*.config"):
        used |= set(re.findall(r"\bparams\.(\w+)", nf.strip_comments(path.read_text())))
    assert used, "found no params at all: the scan is broken"
    assert sorted(used - set(PROPS)) == []
    assert sorted(set(PROPS) - used) == [], "schema describes params no file uses"


@pytest.mark.parametrize("profiles", [(), ("test",), ("test", "local"), ("slurm",)])
def test_profile_params_satisfy_the_schema(profiles):
    params = nf.config_params(WORKFLOWS / "nextflow.config", profiles)
    assert nf.validate_params(params, SCHEMA) == []


def test_test_profile_points_at_shipped_files():
    params = nf.config_params(WORKFLOWS / "nextflow.config", ["test"])
    for name, spec in PROPS.items():
        if spec.get("format") == "file-path" and params[name] is not None:
            assert Path(params[name]).is_file(), f"test profile: params.{name} = {params[name]} does not exist"
    assert params["samplesheet"] == "demo" and params["bigearthnet_root"] == "demo"
    assert params["pretrain_max_steps"] <= 10 and params["pretrain_devices"] == 1


@pytest.mark.parametrize("name, value, complaint", [
    ("tile_px", "224", "not of type integer"),
    ("tile_px", 8, "minimum"),
    ("min_tissue", 1.5, "maximum"),
    ("train_fraction", 0.0, "exclusiveMinimum"),
    ("pretrain_strategy", "deepspeed", "not one of"),
    ("eval_datasets", "bigearthnet,sen12ms", "does not match"),
    ("pretrain_data", "/data/ssl4eo", "does not match"),
    ("max_memory", "lots", "does not match"),
    ("pathology_pretrain", "true", "not of type boolean"),
    ("folds", True, "not of type integer"),
    ("no_such_param", 1, "not described"),
])
def test_validation_rejects_bad_values(name, value, complaint):
    params = {**nf.config_params(WORKFLOWS / "nextflow.config"), name: value}
    problems = nf.validate_params(params, SCHEMA)
    assert len(problems) == 1 and complaint in problems[0], problems
