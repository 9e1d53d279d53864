"""PRETRAIN's run folder: a retried task (Nextflow reruns it in a new work folder) or the task after
`-resume` continues from the checkpoints of the attempt before, instead of step 0.

The real module scripts run with a stand-in `fm-train` that records, per run folder, whether it found a
checkpoint there; that fm-train itself resumes from one is tested in tests/fm/test_ssl_module.py.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import nfharness as nf
import pytest
from test_pipeline_commands import PROFILE, WORKFLOWS, pretrain_runs_dir

FAKE_FM_TRAIN = """#!/bin/bash
# stands in for fm-train: a run folder that holds a checkpoint is resumed
out=""
while [ $# -gt 0 ]; do
    if [ "$1" = --output-dir ]; then out=$2; fi
    shift
done
mkdir -p "$out/checkpoints" "$out/export"
if [ -f "$out/checkpoints/last.ckpt" ]; then echo resumed >>"$out/attempts"; else echo fresh >>"$out/attempts"; fi
touch "$out/checkpoints/last.ckpt"
echo "$out" >"$out/export/teacher.safetensors"
"""


def make_runner(tmp_path: Path, cpus: int = 8, **params) -> nf.Runner:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "fm-train").write_text(FAKE_FM_TRAIN)
    (bin_dir / "fm-train").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work" / uuid.uuid4().hex[:8]  # each runner a work folder of its own, as each attempt
    return nf.Runner(WORKFLOWS, work, {**PROFILE, "outdir": str(tmp_path / "results"), **params},
                     env=env, task={"cpus": cpus})


def pathology_inputs(tmp_path: Path, slides: tuple[str, ...] = ("A", "B")) -> dict:
    sheet = tmp_path / f"sheet-{len(slides)}.csv"
    sheet.write_text("slide_id,patient_id,slide_path\n" + "".join(f"{s},P{s},/data/{s}.svs\n" for s in slides))
    tiles = []
    for s in slides:
        (tmp_path / "tiles" / s).mkdir(parents=True, exist_ok=True)
        if not (tmp_path / "tiles" / s / "coords.h5").exists():
            (tmp_path / "tiles" / s / "coords.h5").write_bytes(f"coords of {s}".encode())
        tiles.append(tmp_path / "tiles" / s)
    return dict(samplesheet=sheet, tile_dirs=tiles, config=[])


def run_folder(task: nf.TaskResult) -> Path:
    """The folder fm-train ran in, as the stand-in wrote it into the teacher the task emits."""
    teacher = task.outputs["teacher"]
    assert not teacher.is_symlink() and teacher.parent.parent.parent == task.workdir, "copied into the task folder"
    return task.workdir / teacher.read_text().strip()  # an absolute path stays as it is


def attempts(task: nf.TaskResult) -> list[str]:
    return (run_folder(task) / "attempts").read_text().split()


def test_a_retried_pathology_pretraining_continues_where_the_attempt_before_stopped(tmp_path):
    runner = make_runner(tmp_path)
    runs = pretrain_runs_dir(runner.params)
    first = runner.run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path), runs_dir=runs)
    assert run_folder(first).parent == tmp_path / "results" / "pretrain" / "runs" / Path(runs).name
    assert attempts(first) == ["fresh"]
    # the retry: a new task folder, more CPUs (cpus may grow with the attempt), the same inputs
    retry = make_runner(tmp_path, cpus=16).run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path), runs_dir=runs)
    assert retry.workdir != first.workdir and run_folder(retry) == run_folder(first)
    assert attempts(retry) == ["fresh", "resumed"]

    # other slides, or another session (a new `nextflow run`, not -resume): a run of its own
    grown = runner.run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path, ("A", "B", "C")), runs_dir=runs)
    assert run_folder(grown) != run_folder(first) and attempts(grown) == ["fresh"]
    later = runner.run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path),
                       runs_dir=pretrain_runs_dir(runner.params, session="another-session"))
    assert run_folder(later).parent.name == "another-session" and attempts(later) == ["fresh"]


@pytest.mark.parametrize("changed", [dict(pretrain_max_steps=500), dict(pretrain_nodes=2), dict(tile_px=448)])
def test_a_pretraining_asked_otherwise_does_not_continue_another_run(tmp_path, changed):
    base = make_runner(tmp_path).run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path),
                                     runs_dir=pretrain_runs_dir(make_runner(tmp_path).params))
    other = make_runner(tmp_path, **changed)
    task = other.run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path), runs_dir=pretrain_runs_dir(other.params))
    assert run_folder(task) != run_folder(base) and attempts(task) == ["fresh"]


def test_the_same_slides_with_other_contents_do_not_continue_another_run(tmp_path):
    """Re-tiled slides (another --min_tissue, --mpp, an edited slide), another samplesheet or another
    config under the same names: the digest is of file contents, so a run of its own."""
    runner = make_runner(tmp_path)
    runs = pretrain_runs_dir(runner.params)
    inputs = pathology_inputs(tmp_path)
    base = run_folder(runner.run("PATHOLOGY_PRETRAIN", **inputs, runs_dir=runs))
    (tmp_path / "tiles" / "A" / "coords.h5").write_bytes(b"coords of A, re-tiled")
    retiled = runner.run("PATHOLOGY_PRETRAIN", **inputs, runs_dir=runs)
    inputs["samplesheet"].write_text(inputs["samplesheet"].read_text().replace("PA,", "P-other,"))
    resheet = runner.run("PATHOLOGY_PRETRAIN", **inputs, runs_dir=runs)
    config = tmp_path / "config.yaml"
    config.write_text("train: {max_steps: 10}\n")
    configured = runner.run("PATHOLOGY_PRETRAIN", **{**inputs, "config": config}, runs_dir=runs)
    config.write_text("train: {max_steps: 20}\n")
    reconfigured = runner.run("PATHOLOGY_PRETRAIN", **{**inputs, "config": config}, runs_dir=runs)
    folders = [base, *(run_folder(t) for t in (retiled, resheet, configured, reconfigured))]
    assert len(set(folders)) == 5 and all(attempts(t) == ["fresh"] for t in (retiled, resheet, configured, reconfigured))


def test_the_runs_folder_is_per_session_in_both_pipelines():
    """`pretrainRunsDir()` in the .nf files (mirrored by pretrain_runs_dir above): a new `nextflow run` is
    another session and must not continue the last one's finished run."""
    for name in ("pathology.nf", "earthobs.nf"):
        text = (WORKFLOWS / name).read_text()
        body = text[text.index("def pretrainRunsDir()"):]
        body = body[: body.index("\n}\n")]
        assert "params.pretrain_resume" in body and "params.pretrain_runs_dir" in body, name
        assert body.rstrip().endswith('return "${file(base).toAbsolutePath()}/${workflow.sessionId}"'), name
        assert "pretrainRunsDir())" in text, f"{name} does not pass the runs folder to PRETRAIN"


def test_without_pretrain_resume_every_attempt_trains_in_its_task_folder(tmp_path):
    runner = make_runner(tmp_path, pretrain_resume=False)
    runs = pretrain_runs_dir(runner.params)
    assert runs == ""
    tasks = [runner.run("PATHOLOGY_PRETRAIN", **pathology_inputs(tmp_path), runs_dir=runs) for _ in range(2)]
    assert [attempts(t) for t in tasks] == [["fresh"], ["fresh"]]
    assert [run_folder(t) for t in tasks] == [t.workdir / "pretrain" for t in tasks]


def test_a_retried_earthobs_pretraining_continues_too(tmp_path):
    runner = make_runner(tmp_path, pretrain_data="demo")
    inputs = dict(labels=[], config=[], init_weights=[], runs_dir=pretrain_runs_dir(runner.params))
    first, retry = (runner.run("EARTHOBS_PRETRAIN", **inputs) for _ in range(2))
    assert run_folder(retry) == run_folder(first) and run_folder(first).name.startswith("earthobs-")
    assert attempts(retry) == ["fresh", "resumed"]
    other = make_runner(tmp_path, pretrain_data="demo", modality="s1")
    task = other.run("EARTHOBS_PRETRAIN", **inputs)
    assert run_folder(task) != run_folder(first) and attempts(task) == ["fresh"]
    # the same file names with other contents: labels, config, initial weights
    folders = {run_folder(first)}
    for name in ("labels", "config", "init_weights"):
        for content in ("one", "two"):
            path = tmp_path / f"{name}.input"
            path.write_text(content)
            task = runner.run("EARTHOBS_PRETRAIN", **{**inputs, name: path})
            assert attempts(task) == ["fresh"], (name, content)
            folders.add(run_folder(task))
    assert len(folders) == 1 + 6
