"""Run each process's command, in pipeline order, with the `test` profile's params, without Nextflow.

`run_pathology` and `run_earthobs` mirror the channel wiring of pathology.nf and earthobs.nf: each
step's declared outputs (checked by nfharness.Runner) are the next step's inputs. Three levels:

- stub blocks (default suite, seconds): the wiring, the staging and the output declarations agree;
- every rendered fm-* command line is accepted by the real CLI parser (default suite);
- the real scripts on the generated demo data (`slow`: about 20 fm-* processes, each starting Python,
  torch and Lightning, plus two tiny pretrainings; several minutes on two cores).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shlex
import sys
from pathlib import Path

import nfharness as nf
import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
PROFILE = nf.config_params(WORKFLOWS / "nextflow.config", ["test"])


def optional_file(value):
    """pathology.nf / earthobs.nf `optionalFile`: the file, or [] (nothing staged)."""
    return Path(value) if value else []


def check_slide_row(row: dict, sheet: Path) -> str:
    """pathology.nf `checkSlideRow`."""
    missing = [c for c in ("slide_id", "patient_id", "slide_path") if not row.get(c)]
    assert not missing, f"{sheet}: row {row} lacks {missing}"
    assert row["slide_path"].startswith("/") or re.match(r"^[a-z0-9]+://.+", row["slide_path"]), row
    return row["slide_id"]


def pack_name(dataset: str, root: str) -> str:
    """earthobs.nf `packName`."""
    if dataset != "bigearthnet":
        return dataset
    return "bigearthnet-v2" if (Path(root) / "metadata.parquet").exists() else "bigearthnet-v1"


def train_fraction(params: dict, dataset: str) -> float:
    """earthobs.nf `trainFraction`."""
    return params["eurosat_train_fraction"] if dataset == "eurosat" else params["train_fraction"]


def tracking_uri(params: dict) -> str:
    return params["tracking_uri"] or f"sqlite:///{Path(params['outdir']).absolute()}/mlflow.db"


SESSION = "5f0c3c1e-0000-4000-8000-000000000001"  # workflow.sessionId of the emulated run


def pretrain_runs_dir(params: dict, session: str = SESSION) -> str:
    """pathology.nf / earthobs.nf `pretrainRunsDir`."""
    if not params["pretrain_resume"]:
        return ""
    return f"{Path(params['pretrain_runs_dir'] or Path(params['outdir']) / 'pretrain' / 'runs').absolute()}/{session}"


def run_track(runner: nf.Runner, tracking: list) -> nf.TaskResult | None:
    """TRACK(ch_tracking.collect(sort: true), ...): runs once when any task left a tracking folder."""
    runs = sorted(t for t in tracking if t is not None)
    if runner.params["tracking_direct"] or not runs:
        return None
    return runner.run("TRACK", runs=runs, tracking_uri=tracking_uri(runner.params))


def run_pathology(runner: nf.Runner) -> dict:
    p, tracking = runner.params, []
    if p["samplesheet"] == "demo":
        sheet = runner.run("PATHOLOGY_SAMPLESHEET").outputs["samplesheet"]
    else:
        sheet = Path(p["samplesheet"])
    with open(sheet, newline="") as f:
        slide_ids = [check_slide_row(row, sheet) for row in csv.DictReader(f)]

    tiles = runner.run_each("PATHOLOGY_TILE", [dict(slide_id=s, samplesheet=sheet) for s in slide_ids])
    # .map { slide_id, dir, coords -> tuple(slide_id, dir) }.toSortedList { a, b -> a[0] <=> b[0] }: an
    # untileable slide emits no tuple (optional output)
    pairs = sorted((t.outputs["tiles"][0], t.outputs["tiles"][1]) for t in tiles if t.outputs["tiles"] is not None)
    assert pairs, f"no slide of {sheet} could be tiled"  # .map { pairs -> pairs ?: error(...) }

    checkpoint = []
    if p["pathology_pretrain"]:
        pretrain = runner.run("PATHOLOGY_PRETRAIN", samplesheet=sheet, tile_dirs=[d for _, d in pairs],
                              config=optional_file(p["pathology_config"]), runs_dir=pretrain_runs_dir(p))
        checkpoint = pretrain.outputs["teacher"]
        tracking.append(pretrain.outputs["tracking"])

    size = p["extract_shard_size"]
    shards = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    extracts = runner.run_each("PATHOLOGY_EXTRACT", [dict(
        shard_id=shard[0][0] if len(shard) == 1 else f"{shard[0][0]}..{shard[-1][0]}",
        slide_list=",".join(s for s, _ in shard), tile_dirs=[d for _, d in shard], samplesheet=sheet,
        encoder=p["encoder"], checkpoint=checkpoint, weights=optional_file(p["encoder_weights"]),
    ) for shard in shards])
    tracking += [e.outputs["tracking"] for e in extracts]
    features = sorted(f for e in extracts for f in e.outputs["features"] or [])  # .flatten().collect(sort: true)

    evaluation = None
    if p["eval_task"]:
        assert features, "no slide has features"  # .ifEmpty { error(...) }
        labels = Path(p["eval_task"][4:]) if p["eval_task"].startswith("csv:") else []
        evaluation = runner.run("PATHOLOGY_EVAL", features=features, eval_task=p["eval_task"], labels=labels)
        tracking.append(evaluation.outputs["tracking"])
    return dict(sheet=sheet, slide_ids=slide_ids, tiles=tiles, shards=shards, extracts=extracts, features=features,
                checkpoint=checkpoint, pretrain=pretrain if p["pathology_pretrain"] else None, eval=evaluation, track=run_track(runner, tracking),
                tracking=[t for t in tracking if t is not None])


def run_earthobs(runner: nf.Runner) -> dict:
    p, tracking = runner.params, []
    datasets = [d.strip() for d in p["eval_datasets"].split(",")] if p["eval_datasets"] else []
    packed_dir = str(Path(p["packed_dir"] or f"{p['outdir']}/packed").absolute())
    roots = {}
    if "bigearthnet" in datasets:
        if p["bigearthnet_root"] == "demo":
            found = runner.run("EARTHOBS_DEMO").outputs["root"]
            assert len(found) == 1, f"EARTHOBS_DEMO emitted {found}"
            roots["bigearthnet"] = str(found[0])
        else:
            roots["bigearthnet"] = p["bigearthnet_root"]
    if "eurosat" in datasets:
        roots["eurosat"] = p["eurosat_root"]

    splits = [dict(dataset=d, pack_as=pack_name(d, r), root=r, split=s, fraction=f, packed_dir=packed_dir)
              for d, r in roots.items() for s, f in (("train", train_fraction(p, d)), ("test", ""))]
    prepared = runner.run_each("EARTHOBS_PREPARE", splits)
    tracking += [r.outputs["tracking"] for r in prepared]
    ready = dict(r.outputs["packed"] for r in prepared)  # groupTuple(size: 2) -> (dataset, root, fraction)
    packs = sorted(Path(packed_dir).glob("*/*/*/meta.json"))

    checkpoint = []
    if p["earthobs_pretrain"]:
        pretrain = runner.run("EARTHOBS_PRETRAIN", labels=optional_file(p["pretrain_labels"]),
                              config=optional_file(p["earthobs_config"]), init_weights=optional_file(p["init_weights"]),
                              runs_dir=pretrain_runs_dir(p))
        checkpoint = pretrain.outputs["teacher"]
        tracking.append(pretrain.outputs["tracking"])

    evals = runner.run_each("EARTHOBS_EVAL", [dict(
        dataset=d, root=r, train_fraction=train_fraction(p, d), packed_dir=packed_dir, encoder=p["eo_encoder"] or "", checkpoint=checkpoint,
        weights=optional_file(p["eo_encoder_weights"])) for d, r in ready.items()])
    tracking += [e.outputs["tracking"] for e in evals]
    return dict(roots=roots, packed_dir=Path(packed_dir), packs=packs, prepared=prepared, checkpoint=checkpoint, evals=evals,
                track=run_track(runner, tracking), tracking=[t for t in tracking if t is not None])


def make_runner(tmp_path: Path, stub: bool, **overrides) -> nf.Runner:
    params = {**PROFILE, "outdir": str(tmp_path / "results"), **overrides}
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return nf.Runner(WORKFLOWS, tmp_path / "work", params, env=env, stub=stub)


# ---- stubs: the wiring ----------------------------------------------------------------------------


def test_pathology_pipeline_stubs_feed_each_other(tmp_path):
    out = run_pathology(make_runner(tmp_path, stub=True))
    assert out["slide_ids"] == ["STUB-00", "STUB-01"]
    assert [t.outputs["tiles"][0] for t in out["tiles"]] == out["slide_ids"]
    assert len(out["shards"]) == 1  # 2 slides, shards of 6
    assert sorted(f.name for f in out["features"]) == ["STUB-00.h5", "STUB-01.h5"]
    (extract_dir,) = {f.parent.parent for f in out["features"]}
    assert sorted(p.name for p in (extract_dir / "tiles").iterdir()) == out["slide_ids"]
    assert (extract_dir / "teacher.safetensors").is_symlink()
    assert "--encoder teacher.safetensors" in out["extracts"][0].script
    assert "--slides STUB-00,STUB-01" in out["extracts"][0].script
    assert (out["eval"].workdir / "features" / "STUB-01.h5").is_symlink()
    imported = out["track"].outputs["imported"].read_text().split()
    assert imported == [f"runs{i:02d}/tracking" for i in range(1, len(out["tracking"]) + 1)]
    assert len(imported) == 1 + 1 + 1  # PRETRAIN, EXTRACT, EVAL (TILE records no run: one per slide)
    assert all("--tracking-uri none" in t.script and "FM_TRACKING_DIR" not in t.script for t in out["tiles"])


def test_pathology_pipeline_stubs_without_pretraining_use_the_named_encoder(tmp_path):
    out = run_pathology(make_runner(tmp_path, stub=True, pathology_pretrain=False, extract_shard_size=1,
                                    tracking_direct=True, tracking_uri="http://mlflow:5000"))
    assert len(out["shards"]) == 2 and out["track"] is None
    script = out["extracts"][0].script
    scripts = [s.script for s in [*out["extracts"], out["eval"]]]
    assert all("--tracking-uri http://mlflow:5000" in s and "FM_TRACKING_DIR" not in s for s in scripts)
    assert "--encoder pathology/phikon-v2" in script


def test_earthobs_pipeline_stubs_feed_each_other(tmp_path):
    out = run_earthobs(make_runner(tmp_path, stub=True))
    assert list(out["roots"]) == ["bigearthnet"] and Path(out["roots"]["bigearthnet"]).is_dir()
    assert sorted(p.name for p in (out["packed_dir"] / "bigearthnet-v1" / "s2").iterdir()) == ["test", "train"]
    (evaluation,) = out["evals"]
    assert evaluation.outputs["results"][0] == "bigearthnet"
    assert f"--root {out['roots']['bigearthnet']}" in evaluation.script
    assert f"--packed {out['packed_dir']}" in evaluation.script
    assert "--encoder teacher.safetensors" in evaluation.script
    assert len(out["track"].outputs["imported"].read_text().split()) == 2 + 1 + 1  # two PREPARE, PRETRAIN, EVAL


# ---- the rendered commands against the real CLI parser ---------------------------------------------


def fm_command(script: str) -> list[str]:
    """argv of the one fm-* command of a rendered script, without env assignments and launcher."""
    for line in script.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)
        starts = [i for i, a in enumerate(argv) if a.startswith("fm-")]
        if starts:
            return argv[starts[0] :]
    raise AssertionError(f"no fm-* command in\n{script}")


def cli_parser(verb: str, domain: str):
    """The real argparse parser of `fm-<verb>`, or None while `fm-<verb> <domain>` is not implemented."""
    from fm import cli
    from fm.domains import load_domains

    domains = load_domains()
    implemented = domains.get(domain) and (domains[domain].eval_tasks if verb == "eval" else getattr(domains[domain], verb))
    if not implemented:
        return None
    return cli.build_parser(verb)


@pytest.mark.parametrize("profiles, direct", [(("test",), False), ((), False), ((), True)])
def test_rendered_commands_are_accepted_by_the_cli(tmp_path, profiles, direct):
    """Every flag the modules pass exists in the CLI: renders each script with every optional input
    present, with the test profile or the defaults, tracking offline or direct."""
    params = {**nf.config_params(WORKFLOWS / "nextflow.config", profiles), "outdir": str(tmp_path / "results")}
    params.update({k: v for k, v in PROFILE.items() if params[k] is None})
    params.update(tracking_direct=direct, tracking_uri="http://mlflow:5000" if direct else None)
    checked, missing, rejected = [], set(), []
    for name, argv in commands_for(params, tmp_path):
        verb, domain = argv[0][3:], argv[1]
        if verb == "track":
            continue  # fm-track has no domain parser; its run is checked in the slow test
        parser = cli_parser(verb, domain)
        if parser is None:
            missing.add(f"fm-{verb} {domain}")
            continue
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                rejected.append(f"{name}: `{shlex.join(argv)}`: {stderr.getvalue().strip().splitlines()[-1]}")
        checked.append(name)
    assert rejected == [], "commands the CLI rejects:\n" + "\n".join(rejected)
    if not checked:
        pytest.skip(f"no fm domain implemented yet for: {sorted(missing)}")


def commands_for(params: dict, tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Render every process's script with `params` and plausible inputs (file inputs present)."""
    present = tmp_path / "inputs"
    present.mkdir(exist_ok=True)
    values = dict(slide_id="DEMO-00", shard_id="DEMO-00..DEMO-05", slide_list="DEMO-00,DEMO-01",
                  encoder="pathology/phikon-v2", eval_task="demo", dataset="bigearthnet", pack_as="bigearthnet-v1",
                  root=str(present),
                  split="train", fraction=0.1, train_fraction=1.0, packed_dir=str(present / "packed"),
                  tracking_uri="sqlite:///x.db", runs_dir="/shared/runs")
    variants = {"PATHOLOGY_EVAL": [{"labels": nf.Staged()}, {"eval_task": f"csv:{present}/labels.csv"}]}
    runner = nf.Runner(WORKFLOWS, tmp_path / "unused", params)
    commands = []
    for name, proc in sorted(runner.processes.items()):
        for variant in variants.get(name, [{}]):
            scope: dict = {"params": params, "task": runner.task}
            for decl in [i for d in proc.inputs for i in (d.items or [d])]:
                scope[decl.target] = nf.Staged([f"{decl.target}.file"]) if decl.kind == "path" else values[decl.target]
            script, _ = nf.render_script(proc.script, {**scope, **variant})
            commands.append((name, fm_command(script)))
    return commands


# ---- the real commands on the demo data ------------------------------------------------------------


def require_domain(verb: str, domain: str) -> None:
    from fm.domains import load_domains

    if domain not in load_domains():
        pytest.skip(f"`fm-{verb} {domain}` is not implemented yet (no `{domain}` in the fm.domains entry points)")


def test_a_slide_that_cannot_be_tiled_is_left_out_by_a_task_that_succeeds(tmp_path):
    """The real TILE command on a corrupt slide exits 0 (so errorStrategy keeps the run going) and emits
    no `tiles`, so nothing downstream gets the slide; the manifest says why."""
    require_domain("prepare", "pathology")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + bytes(2000))
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide_id,patient_id,slide_path\nBAD,P0,{tmp_path / 'bad.tif'}\n")
    task = make_runner(tmp_path, stub=False).run("PATHOLOGY_TILE", slide_id="BAD", samplesheet=sheet)
    assert task.outputs["tiles"] is None and task.outputs["thumbnail"] is None
    with open(task.outputs["manifest"], newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["slide_id"] == "BAD" and row["status"] == "failed" and "bad.tif" in row["reason"]


@pytest.mark.slow
def test_pathology_pipeline_commands_run_on_demo_data(tmp_path):
    """The whole pipeline on the demo cohort, one slide of which is corrupt: it is left out of every
    step after TILE and of EVAL (--drop_missing), and the rest runs to the end."""
    require_domain("prepare", "pathology")
    demo = nf.Runner(WORKFLOWS, tmp_path / "sheet-work", {**PROFILE, "outdir": str(tmp_path / "sheet")},
                     env=make_runner(tmp_path, stub=False).env).run("PATHOLOGY_SAMPLESHEET")
    with open(demo.outputs["samplesheet"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(Path(r["slide_path"]).is_file() for r in rows), "the demo samplesheet must name existing slides"
    bad = rows[3]
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(Path(bad["slide_path"]).read_bytes()[:5000])  # a download cut short
    bad["slide_path"] = str(corrupt)
    sheet = tmp_path / "samplesheet.csv"
    with open(sheet, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    out = run_pathology(make_runner(tmp_path, stub=False, samplesheet=str(sheet)))
    assert len(out["slide_ids"]) >= 6
    good = sorted(set(out["slide_ids"]) - {bad["slide_id"]})
    assert sorted(f.stem for f in out["features"]) == good, "one features file per tileable slide"
    assert "--tiled-only" in out["pretrain"].script
    results = out["eval"].outputs["results"].read_text()
    assert results.count("\n") >= 2, f"eval/results.csv holds no result rows:\n{results}"
    assert bad["slide_id"] in (out["eval"].workdir / ".command.out").read_text() + (
        out["eval"].workdir / ".command.err").read_text(), "EVAL says which labelled slide it left out"
    assert_tracked(out, tmp_path)


@pytest.mark.slow
def test_earthobs_pipeline_commands_run_on_demo_data(tmp_path):
    require_domain("train", "earthobs")
    out = run_earthobs(make_runner(tmp_path, stub=False))
    subset = f"train-{PROFILE['train_fraction'] * 100:g}pct-seed{PROFILE['seed']}"  # fm-prepare --fraction naming
    assert {p.parent.name for p in out["packs"]} == {subset, "test"}, out["packs"]
    assert sorted(out["packed_dir"].glob("*/*/*/meta.json")) == out["packs"], "EVAL packed what PREPARE had not"
    (evaluation,) = out["evals"]
    results = evaluation.outputs["results"][1].read_text()
    assert results.count("\n") >= 2, f"results.csv holds no result rows:\n{results}"
    assert_tracked(out, tmp_path)


def assert_tracked(out: dict, tmp_path: Path) -> None:
    """TRACK logged the offline runs of every task that left one into the pipeline's MLflow store."""
    from mlflow.tracking import MlflowClient

    assert out["track"] is not None and out["tracking"], "no task wrote an offline tracking folder"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) >= len(out["tracking"]), f"{len(runs)} runs logged from {len(out['tracking'])} tracking folders"


# ---- the harness itself can fail -------------------------------------------------------------------


def write_module(root: Path, name: str, body: str) -> Path:
    (root / "modules").mkdir(parents=True, exist_ok=True)
    path = root / "modules" / f"{name.lower()}.nf"
    path.write_text(f"process {name} {{\n{body}\n}}\n")
    return path


def test_runner_fails_on_a_missing_declared_output(tmp_path):
    write_module(tmp_path, "HALF", '    input:\n    val x\n\n    output:\n    path "a.txt", emit: a\n'
                 '    path "b/${x}.txt", emit: b\n\n    script:\n    """\n    touch a.txt\n    """')
    runner = nf.Runner(tmp_path, tmp_path / "work", {})
    with pytest.raises(nf.TaskError, match=r"declared output 'b/one.txt' is missing"):
        runner.run("HALF", x="one")


def test_runner_fails_on_a_failing_command_and_name_collisions(tmp_path):
    write_module(tmp_path, "FAILS", '    input:\n    path inputs, stageAs: \'in/*\'\n\n    script:\n    """\n'
                 '    cat in/*\n    false | cat\n    """')
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    for d in ("d1", "d2"):
        (tmp_path / d / "same.txt").write_text(d)
    runner = nf.Runner(tmp_path, tmp_path / "work", {})
    with pytest.raises(nf.TaskError, match="exited with status 1"):  # pipefail, as process.shell sets it
        runner.run("FAILS", inputs=[tmp_path / "d1" / "same.txt"])
    with pytest.raises(nf.TaskError, match="input file name collision"):
        runner.run("FAILS", inputs=[tmp_path / "d1" / "same.txt", tmp_path / "d2" / "same.txt"])


@pytest.mark.parametrize("line, error", [
    ("echo ${params.missing}", "unknown param"),
    ("echo ${params.empty}", "is null"),
    ("echo ${ids.join(',')}", "only plain references"),
    ("echo $(date)", "unescaped \\$"),
    ("echo ${nothing}", "unknown variable"),
    ("printf 'a\\tb'", "not supported"),
])
def test_renderer_refuses_what_it_cannot_render_faithfully(line, error):
    with pytest.raises(nf.NfSyntaxError, match=error):
        nf.render_script(f'"""\n{line}\n"""', {"params": {"empty": None}, "ids": ["a"]})


def test_renderer_matches_groovy_semantics():
    block = '''
    def a = params.flag ? "--flag ${params.n}" : ''
    def b = task.ext.args ?: '--default'
    def c = files ? "--files ${files}" : ''
    def d = none ? "--none ${none}" : 'no-none'
    """
    run ${a} ${b} ${c} ${d} \\\\
        --cpus $task.cpus --dollar \\$HOME --quote \\"x\\"
    """'''
    scope = {"params": {"flag": True, "n": 0.5}, "task": {"cpus": 3, "ext": {}},
             "files": nf.Staged(["x/1.h5", "x/2.h5"]), "none": nf.Staged()}
    script, defs = nf.render_script(block, scope)
    assert script == 'run --flag 0.5 --default --files x/1.h5 x/2.h5 no-none \\\n    --cpus 3 --dollar $HOME --quote "x"\n'
    scope["params"]["flag"], scope["task"]["ext"]["args"] = False, "--given"
    script, _ = nf.render_script(block, scope)
    assert script.startswith("run  --given --files")
