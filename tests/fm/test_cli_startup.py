"""Start-up cost of the fm-* commands: `--help` and per-slide tiling must not import the deep-learning
stack (torch alone takes seconds), because Nextflow starts one `fm-prepare pathology` per slide."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "lightning", "timm", "mlflow")
REPORT = f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"


def _heavy_modules_after(code: str, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter; the last stdout line lists the heavy modules it imported."""
    proc = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{REPORT}"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_building_every_parser_imports_no_deep_learning_stack():
    """What `--help` of any command, domain or eval task does: build every parser of every verb."""
    code = """
import argparse
from fm.cli import build_parser

def subparsers(parser):
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]

for verb in ("train", "extract", "eval", "prepare"):
    parser = build_parser(verb)
    for domain in subparsers(parser):
        domain.format_help()
        for task in subparsers(domain):
            task.format_help()
"""
    assert _heavy_modules_after(code) == "[]"


def test_tiling_one_slide_imports_no_deep_learning_stack(shared_fixtures, tmp_path):
    """`fm-prepare pathology --slides ID --tracking-uri none` as a Nextflow TILE task runs it (see
    workflows/modules/pathology_tile.nf): tiling needs OpenSlide, not torch, nor MLflow."""
    slide = shared_fixtures / "pathology" / "cmu-1-small-region.svs"
    cohort = tmp_path / "cohort.csv"
    with cohort.open("w", newline="") as f:
        csv.writer(f).writerows([["slide_path", "slide_id", "patient_id"], [str(slide), "cmu1", "P1"]])
    out = tmp_path / "tiles"
    code = f"""
from fm.cli import prepare_main
assert prepare_main(["pathology", "--cohorts", "csv:{cohort}", "--slides", "cmu1", "--output-dir", "{out}",
                     "--tracking-uri", "none"]) == 0
"""
    assert _heavy_modules_after(code) == "[]"
    assert (Path(out) / "cmu1" / "coords.h5").is_file()


def test_every_lazy_reference_resolves():
    """A "module:function" typo would only show when that command runs: resolve them all here."""
    from fm.domains import load_domains

    for domain in load_domains().values():
        commands = {"train": domain.train, "extract": domain.extract, "prepare": domain.prepare,
                    **{f"eval {t}": c for t, c in domain.eval_tasks.items()}}
        for verb, cmd in commands.items():
            if cmd is None:
                continue
            assert callable(cmd.runner()), (domain.name, verb)
            assert cmd.add_args is None or callable(cmd.arg_builder()), (domain.name, verb)
            if cmd.default_config is not None:  # --print-config shows the flags' values
                assert callable(cmd.flag_applier()), (domain.name, verb)

