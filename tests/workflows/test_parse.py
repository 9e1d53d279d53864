"""Parse and lint every Nextflow file of workflows/ without the engine.

reftrace (Nextflow's grammar, compiled) parses each `.nf` and `.config` file, resolves includes and
reads process directives; our own checks, built on nfharness, cover what reftrace does not expose:
the wiring between workflow calls and process declarations, resource labels, GPU requests on SLURM,
and the sbatch example. Each check returns a list of problems, so the last test can show on a broken
copy of the pipelines that the checks do catch mistakes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import nfharness as nf
import pytest

reftrace = pytest.importorskip("reftrace", reason="reftrace (dev extra) parses Nextflow files")

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
PIPELINES = ("pathology.nf", "earthobs.nf")
GPU_LABELS = ("process_gpu", "process_gpu_multi")
FM_COMMAND = re.compile(r"\bfm-(train|extract|eval|prepare|track)\b")


def parse_problems(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.nf")):
        module = reftrace.Module.from_file(str(path))
        if isinstance(module, reftrace.ParseError):
            problems.append(f"{path.name}: {module.error}")
    for path in sorted(root.rglob("*.config")):
        result = reftrace.ConfigFile.from_file(str(path))
        if result.error is not None:
            problems.append(f"{path.name}: {result.error.error}")
    listing = reftrace.parse_modules(str(root))
    problems += [f"{u.module_path}: unresolved include {u.includes}" for u in listing.unresolved_includes]
    return problems


def module_problems(root: Path) -> list[str]:
    """One process per module file, named after it, with exactly one configured resource label."""
    base = nf.read_config(root / "conf" / "base.config").block("process")
    labels = {re.sub(r"withLabel:\s*", "", b.name).strip("'\"") for b in base.blocks if b.name.startswith("withLabel")}
    problems = []
    for path in sorted((root / "modules").glob("*.nf")):
        module = reftrace.Module.from_file(str(path))
        if isinstance(module, reftrace.ParseError):
            continue  # reported by parse_problems
        names = [p.name for p in module.processes]
        if names != [path.stem.upper()]:
            problems.append(f"{path.name}: defines {names}, expected one process {path.stem.upper()}")
            continue
        proc_labels = [label.value for label in module.processes[0].labels]
        if len(proc_labels) != 1 or proc_labels[0] not in labels:
            problems.append(f"{path.name}: labels {proc_labels}; need exactly one of {sorted(labels)}")
        (proc,) = nf.parse_module(path)
        for block_name, block in (("script", proc.script), ("stub", proc.stub or "")):
            commands = FM_COMMAND.findall(nf.script_parts(block)[1]) if block.strip() else []
            expected = 1 if block_name == "script" else 0
            if len(commands) != expected:
                problems.append(f"{path.name}: {block_name} runs {len(commands)} fm-* commands, expected {expected}")
    return problems


def wiring_problems(root: Path) -> list[str]:
    """Calls pass as many arguments as the process declares inputs; `.out.x` names a declared emit."""
    processes = {p.name: p for f in (root / "modules").glob("*.nf") for p in nf.parse_module(f)}
    problems = []
    for pipeline in PIPELINES:
        text = (root / pipeline).read_text()
        module = reftrace.Module.from_file(str(root / pipeline))
        included = [item.name for inc in module.includes for item in inc.items]
        calls = nf.process_calls(text, included)
        for name in included:
            if name not in processes:
                problems.append(f"{pipeline}: includes {name}, which no module defines")
            elif not any(call == name for call, _ in calls):
                problems.append(f"{pipeline}: includes {name} but never calls it")
        for name, args in calls:
            if name in processes and len(args) != len(processes[name].inputs):
                problems.append(f"{pipeline}: {name} called with {len(args)} arguments, "
                                f"declares {len(processes[name].inputs)} inputs")
        for name, emit in nf.out_references(text):
            emits = [d.options.get("emit") for d in processes[name].outputs] if name in processes else []
            if emit not in emits:
                problems.append(f"{pipeline}: {name}.out.{emit} is not an emit of {name} ({emits})")
    return problems


def gpu_problems(root: Path) -> list[str]:
    """GPU labels ask for GPUs: `accelerator` in base.config, `--gres=gpu` on SLURM (which ignores it)."""
    problems = []
    base = nf.read_config(root / "conf" / "base.config").block("process")
    slurm = nf.read_config(root / "conf" / "slurm.config").block("process")
    for label in GPU_LABELS:
        name = f"withLabel: '{label}'"
        if "accelerator" not in (base.block(name) or nf.ConfigBlock(name)).assignments:
            problems.append(f"base.config: {label} sets no accelerator")
        options = (slurm.block(name) or nf.ConfigBlock(name)).assignments.get("clusterOptions", "")
        if "--gres=gpu:" not in options:
            problems.append(f"slurm.config: {label} clusterOptions lack --gres=gpu:N ({options!r})")
    return problems


def resume_problems(root: Path) -> list[str]:
    """Lists that feed a task are sorted: `collect` and `toList` emit in task-completion order, which
    differs between a run and its -resume, and Nextflow hashes a list of paths in order, so an unsorted
    list reruns its task (and, for PRETRAIN, every task after it)."""
    problems = []
    for pipeline in PIPELINES:
        for n, line in enumerate((root / pipeline).read_text().splitlines(), 1):
            for m in re.finditer(r"\.(collect|toList)\((.*?)\)", line):
                if "sort: true" not in m.group(2):
                    problems.append(f"{pipeline}: `.{m.group(1)}({m.group(2)})` without `sort: true` (line {n})")
    return problems


def error_strategy(expr: str, exit_status: int, attempt: int) -> str:
    """Evaluate an errorStrategy closure of the form our configs use (nested `cond ? a : b`, `in` a list
    built from ranges and numbers, comparisons of task.exitStatus / task.attempt) for one task."""
    expr = expr.strip()
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1].strip()
    while expr.startswith("(") and nf.matching_close(expr, 0) == len(expr) - 1:
        expr = expr[1:-1].strip()
    q = nf.top_find(expr, "?")
    if q >= 0:
        branches = expr[q + 1 :]
        c = nf.top_find(branches, ":")
        taken = branches[:c] if error_strategy(expr[:q], exit_status, attempt) else branches[c + 1 :]
        return error_strategy(taken, exit_status, attempt)
    python = re.sub(r"\((\d+)\.\.(\d+)\)", r"list(range(\1, \2 + 1))", expr)
    python = re.sub(r"(list\(range\([^)]*\)\))\s*\+\s*(\d+)", r"\1 + [\2]", python)
    python = python.replace("&&", " and ").replace("||", " or ")
    python = python.replace("task.exitStatus", "exit_status").replace("task.attempt", "attempt")
    return eval(python, {"__builtins__": {"list": list, "range": range}}, {"exit_status": exit_status, "attempt": attempt})


def channel_sources(text: str) -> dict[str, str]:
    """`name -> the text of every expression assigned to it` in a workflow file (`x = ...` and `def x = ...`,
    with the `.operator` lines that continue it; branches are joined, as either may run). A limit: order
    is not followed, so a later assignment that overrides a channel on every path is not noticed."""
    assigned: dict[str, str] = {}
    current = None
    for line in nf.strip_comments(text).splitlines():
        m = re.match(r"\s*(?:def\s+)?([a-z_]\w*)\s*=(?!=)\s*(.*)$", line)
        if m:
            current = m.group(1)
            assigned[current] = assigned.get(current, "") + " " + m.group(2)
        elif current and line.strip().startswith("."):
            assigned[current] += " " + line.strip()
        else:
            current = None
    return assigned


def argument_sources(root: Path, pipeline: str) -> dict[str, list[set[str]]]:
    """For each process call of a pipeline, the `PROCESS.out.emit` outputs each argument can carry,
    following channel assignments (a channel that is never fed by the process it should come from,
    e.g. EXTRACT given an empty checkpoint channel instead of PRETRAIN's teacher, shows here)."""
    text = (root / pipeline).read_text()
    module = reftrace.Module.from_file(str(root / pipeline))
    included = [item.name for inc in module.includes for item in inc.items]
    assigned = channel_sources(text)

    def sources(expr: str, seen: frozenset = frozenset()) -> set[str]:
        found = {f"{p}.out.{e}" for p, e in re.findall(r"\b([A-Z_]+)\.out\.(\w+)", expr)}
        for name in set(re.findall(r"\b([a-z_]\w*)\b", expr)) & set(assigned) - seen:
            found |= sources(assigned[name], seen | {name})
        return found

    calls: dict[str, list[set[str]]] = {}
    for name, args in nf.process_calls(text, included):
        calls[name] = [sources(a) for a in args]
    return calls


WIRING = {  # (pipeline, process, argument index) -> outputs that must reach that argument
    ("pathology.nf", "PATHOLOGY_TILE", 1): {"PATHOLOGY_SAMPLESHEET.out.samplesheet"},
    ("pathology.nf", "PATHOLOGY_PRETRAIN", 1): {"PATHOLOGY_TILE.out.tiles"},
    ("pathology.nf", "PATHOLOGY_EXTRACT", 0): {"PATHOLOGY_TILE.out.tiles"},
    ("pathology.nf", "PATHOLOGY_EXTRACT", 3): {"PATHOLOGY_PRETRAIN.out.teacher"},
    ("pathology.nf", "PATHOLOGY_EVAL", 0): {"PATHOLOGY_EXTRACT.out.features"},
    ("pathology.nf", "TRACK", 0): {"PATHOLOGY_PRETRAIN.out.tracking", "PATHOLOGY_EXTRACT.out.tracking",
                                   "PATHOLOGY_EVAL.out.tracking"},
    ("earthobs.nf", "EARTHOBS_PREPARE", 0): {"EARTHOBS_DEMO.out.root"},
    ("earthobs.nf", "EARTHOBS_EVAL", 0): {"EARTHOBS_PREPARE.out.packed"},
    ("earthobs.nf", "EARTHOBS_EVAL", 3): {"EARTHOBS_PRETRAIN.out.teacher"},
    ("earthobs.nf", "TRACK", 0): {"EARTHOBS_PREPARE.out.tracking", "EARTHOBS_PRETRAIN.out.tracking",
                                  "EARTHOBS_EVAL.out.tracking"},
}


def dataflow_problems(root: Path) -> list[str]:
    problems = []
    calls = {pipeline: argument_sources(root, pipeline) for pipeline in PIPELINES}
    for (pipeline, process, index), needed in WIRING.items():
        got = calls[pipeline][process][index]
        if not needed <= got:
            problems.append(f"{pipeline}: argument {index} of {process} never receives {sorted(needed - got)}")
    return problems


def test_every_nextflow_file_parses_and_includes_resolve():
    assert len(list(WORKFLOWS.rglob("*.nf"))) >= 2 + 5
    assert parse_problems(WORKFLOWS) == []


def test_every_config_file_reads_as_blocks_and_assignments():
    for path in WORKFLOWS.rglob("*.config"):
        assert nf.read_config(path).walk(), path
    root = nf.read_config(WORKFLOWS / "nextflow.config")
    assert {"local", "slurm", "test"} <= {b.name for b in root.block("profiles").blocks}
    assert root.includes == ["conf/base.config"]


def test_modules_hold_one_labelled_process_running_one_fm_command():
    assert module_problems(WORKFLOWS) == []


def test_workflow_calls_match_process_declarations():
    assert wiring_problems(WORKFLOWS) == []


def test_gpu_processes_request_gpus_on_slurm():
    assert gpu_problems(WORKFLOWS) == []


def test_each_process_is_fed_by_the_step_before_it():
    """The Python mirror of the wiring (test_pipeline_commands) cannot see the .nf channel logic: this
    traces, in the .nf files themselves, which outputs reach the arguments that matter."""
    assert dataflow_problems(WORKFLOWS) == []


def test_lists_that_feed_a_task_are_sorted_so_resume_finds_it():
    assert resume_problems(WORKFLOWS) == []


def test_a_bad_slide_is_left_out_but_a_broken_run_stops():
    """fm-prepare / fm-extract exit 0 on a bad slide (tested with the real commands in
    test_pipeline_commands), so a non-zero exit of TILE or EXTRACT is a kill (retried once, then that
    slide or shard is dropped) or an error of the whole run (a wrong flag, missing weights, fm-* not
    on PATH), which must stop the pipeline rather than leave an empty run that reports success."""
    process = nf.read_config(WORKFLOWS / "conf" / "base.config").block("process")
    per_slide = process.block("withName: 'PATHOLOGY_TILE|PATHOLOGY_EXTRACT'").assignments["errorStrategy"]
    for status, attempt, expected in [(137, 1, "retry"), (140, 1, "retry"), (104, 1, "retry"), (137, 2, "ignore"),
                                      (2, 1, "finish"), (1, 1, "finish"), (127, 1, "finish"), (2, 2, "finish")]:
        assert error_strategy(per_slide, status, attempt) == expected, (status, attempt)
    default = process.assignments["errorStrategy"]
    assert [error_strategy(default, s, 1) for s in (137, 2, 127)] == ["retry", "finish", "finish"]


def test_the_test_profile_caps_what_tasks_ask_for():
    """conf/base.config reads params.max_* before any profile sets them, so the test profile must set the
    caps themselves (else a task asks a 2-CPU runner for 6 CPUs and 36 GB, and the local executor refuses)."""
    test = nf.read_config(WORKFLOWS / "conf" / "test.config")
    assert test.block("process").assignments["resourceLimits"] == "[cpus: 2, memory: 6.GB, time: 1.h]"
    assert test.block("executor").assignments == {"cpus": "2", "memory": "6.GB"}


def test_multi_node_pretraining_uses_srun_and_matching_slurm_request():
    slurm = nf.read_config(WORKFLOWS / "conf" / "slurm.config").block("process").block("withLabel: 'process_gpu_multi'")
    options = slurm.assignments["clusterOptions"]
    assert "--nodes=${params.pretrain_nodes}" in options
    assert "--ntasks-per-node=${params.pretrain_devices}" in options and "--gres=gpu:${params.pretrain_devices}" in options
    assert slurm.assignments["ext.launcher"].startswith("'srun ")
    for name in ("pathology_pretrain.nf", "earthobs_pretrain.nf"):
        (proc,) = nf.parse_module(WORKFLOWS / "modules" / name)
        assert proc.labels == ["process_gpu_multi"]
        script, _ = nf.render_script(proc.script, {
            "params": {**nf.config_params(WORKFLOWS / "nextflow.config"), "pretrain_data": "ssl4eo:/data"},
            "task": {"cpus": 8, "ext": {"launcher": "srun"}}, "samplesheet": "s.csv", "tile_dirs": nf.Staged(),
            "config": nf.Staged(), "labels": nf.Staged(), "init_weights": nf.Staged(), "runs_dir": "/shared/runs"})
        assert re.search(r"^srun fm-train \w+", script, re.M), script
        assert "--devices 4" in script and "--nodes 1" in script and "--strategy ddp" in script


def test_sbatch_example_requests_one_task_per_gpu():
    path = WORKFLOWS / "examples" / "sbatch_pretrain.sh"
    text = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    command = re.search(r"^srun (fm-train .+?)(?:\n\n|\Z)", text.replace("\\\n", " "), re.M | re.S).group(1)
    argv = shlex.split(command)
    flag = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert argv[:2] == ["fm-train", "pathology"]
    assert flag["--devices"] == sbatch["ntasks-per-node"] == sbatch["gres"].rsplit(":", 1)[1]
    assert flag["--nodes"] == sbatch["nodes"]
    assert flag["--strategy"] == "ddp"


def test_checks_catch_a_broken_pipeline(tmp_path):
    """The checks above fail on mistakes: a typo'd emit, a missing argument, a lost label, no --gres,
    a stray command, an unparsable file."""
    broken = tmp_path / "workflows"
    shutil.copytree(WORKFLOWS, broken)
    pipeline = broken / "pathology.nf"
    text = pipeline.read_text()
    text = text.replace("PATHOLOGY_TILE.out.tiles", "PATHOLOGY_TILE.out.tile", 1)
    text = text.replace("PATHOLOGY_EVAL(ch_features, params.eval_task, labels)", "PATHOLOGY_EVAL(ch_features, params.eval_task)")
    text = text.replace("TRACK(ch_tracking.collect(sort: true)", "TRACK(ch_tracking.collect()")
    pipeline.write_text(text)
    tile = broken / "modules" / "pathology_tile.nf"
    tile.write_text(tile.read_text().replace("    label 'process_medium'\n", "").replace(
        "    fm-prepare pathology \\\\\n", "    fm-eval pathology demo\n    fm-prepare pathology \\\\\n"))
    slurm = broken / "conf" / "slurm.config"
    slurm.write_text(slurm.read_text().replace('"--gres=gpu:1 ', '"'))
    (broken / "modules" / "extra.nf").write_text('process EXTRA {\n    script:\n    """\n    echo\n    """\n}}}\nworkflow {\n  EXTRA(\n')

    wiring = wiring_problems(broken)
    assert any("PATHOLOGY_TILE.out.tile " in p for p in wiring)
    assert any("PATHOLOGY_EVAL called with 2 arguments" in p for p in wiring)
    assert [p.split(" (line")[0] for p in resume_problems(broken)] == ["pathology.nf: `.collect()` without `sort: true`"]

    rewired = tmp_path / "rewired"  # calls and emits intact, but EXTRACT no longer gets PRETRAIN's teacher
    shutil.copytree(WORKFLOWS, rewired)
    text = (rewired / "pathology.nf").read_text()
    (rewired / "pathology.nf").write_text(text.replace("ch_checkpoint = PATHOLOGY_PRETRAIN.out.teacher",
                                                       "ch_checkpoint = Channel.value([])"))
    assert wiring_problems(rewired) == []
    assert dataflow_problems(rewired) == [
        "pathology.nf: argument 3 of PATHOLOGY_EXTRACT never receives ['PATHOLOGY_PRETRAIN.out.teacher']"]
    modules = module_problems(broken)
    assert any("pathology_tile.nf: labels []" in p for p in modules)
    assert any("pathology_tile.nf: script runs 2 fm-* commands" in p for p in modules)
    assert [p.split(" (")[0] for p in gpu_problems(broken)] == ["slurm.config: process_gpu clusterOptions lack --gres=gpu:N"]
    assert any(p.startswith("extra.nf") for p in parse_problems(broken))
