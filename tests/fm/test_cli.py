"""The command-line front end: domains found through entry points, configs, flags, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fm.cli import eval_main, train_main
from fm.config import load_yaml
from fm.domains import load_domains

REPO = Path(__file__).resolve().parents[2]


def test_console_script_lists_domains():
    out = subprocess.run([str(Path(sys.executable).parent / "fm-train"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "core" in out.stdout


def test_domain_help_shows_training_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["core", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--set", "--print-config", "--devices", "--nodes", "--strategy", "--from"):
        assert flag in text


def test_print_config_applies_config_file_overrides_and_flags(tmp_path, capsys):
    user = tmp_path / "mine.yaml"
    user.write_text("optim:\n  base_lr: 0.123\n")
    code = train_main(["core", "--config", str(user), "--set", "train.epochs=7", "--devices", "3", "--print-config"])
    assert code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["base_lr"] == 0.123
    assert cfg["train"]["epochs"] == 7
    assert cfg["train"]["devices"] == 3


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "optim.base_lrr=1"], "optim.base_lrr"),
        (["--set", "train.epochs=many"], "train.epochs"),
        (["--config", "/nonexistent/cfg.yaml"], "/nonexistent/cfg.yaml"),
    ],
)
def test_bad_config_input_names_the_value(argv, needle, capsys):
    assert train_main(["core", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unknown_encoder_is_a_clear_error(tmp_path, capsys):
    code = train_main(["core", "--from", "dinov2/vitl15", "--output-dir", str(tmp_path), "--max-steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "dinov2/vitl15" in err and "dinov2/vitl14" in err


def test_eval_requires_a_task(capsys):
    with pytest.raises(SystemExit) as e:
        eval_main([])
    assert e.value.code == 2


def test_every_shipped_config_parses():
    """All YAML configs under any package's configs/ load (with `defaults:` inheritance checked strictly)."""
    configs = sorted(p for pkg in ("fm", "pathology", "earthobs", "evaluation") for p in (REPO / pkg).rglob("configs/**/*.yaml"))
    configs += sorted((REPO / "fm" / "configs").rglob("*.yaml"))
    assert configs, "no shipped configs found"
    for path in set(configs):
        assert isinstance(load_yaml(path), dict), path
    for domain in load_domains().values():
        for cmd in [domain.train, domain.extract, domain.prepare, *domain.eval_tasks.values()]:
            if cmd is not None and cmd.default_config is not None:
                assert cmd.default_config.is_file(), (domain.name, cmd.default_config)


def test_fm_demo_reports_bad_input_in_one_line(tmp_path, capsys):
    """fm-demo ends like the fm-* commands: one line and status 2 (it showed tracebacks)."""
    from fm.demo import main as demo_main

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert demo_main(["--output-dir", str(a_file), "--only", "earthobs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fm-demo: error:") and str(a_file) in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        demo_main(["--steps", "-1"])
    assert "argument --steps: expected a whole number >= 1" in capsys.readouterr().err
