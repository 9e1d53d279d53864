"""Tracking: every run in a process is recorded, with its config, metrics, artifacts and final status."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from fm import tracking
from fm.tracking import (
    child_run,
    flatten_config,
    lightning_logger,
    markdown_table,
    resolve_tracking_uri,
    tracked_run,
)

matplotlib.use("Agg")

CONFIG = {
    "model": {"arch": "vits", "patch_size": 14, "drop_path_rate": 0.1},
    "data": {"cohorts": ["tcga", "cptac"], "root": Path("/data/slides")},
    "optim": {"lr": 1e-3, "schedule": {"warmup_epochs": 10}},
    "long": "x" * 7000,
}


def _client(run) -> MlflowClient:
    return MlflowClient(tracking_uri=run.tracking_uri)


def _artifact_text(run, path: str) -> str:
    local = _client(run).download_artifacts(run.run_id, path)
    return Path(local).read_text()


def test_config_is_flattened_to_params_and_stored_as_yaml():
    with tracked_run("exp", run_name="r", config=CONFIG) as run:
        pass
    data = _client(run).get_run(run.run_id).data
    assert data.params["model.arch"] == "vits"
    assert data.params["model.patch_size"] == "14"
    assert data.params["optim.schedule.warmup_epochs"] == "10"
    assert data.params["data.cohorts"] == '["tcga", "cptac"]'
    assert data.params["data.root"] == "/data/slides"
    assert len(data.params["long"]) == tracking.MAX_PARAM_VALUE_LENGTH
    assert yaml.safe_load(_artifact_text(run, "config.yaml"))["optim"]["schedule"] == {"warmup_epochs": 10}
    assert {"git_commit", "fm_version", "command"} <= set(data.tags)


def test_more_than_one_batch_of_params_is_logged():
    config = {f"group{g}": {f"p{i}": i for i in range(60)} for g in range(3)}  # 180 params > 100 per batch
    with tracked_run("exp", config=config) as run:
        pass
    params = _client(run).get_run(run.run_id).data.params
    assert len(params) == 180 and params["group2.p59"] == "59"


def test_metrics_per_step_are_retrievable():
    with tracked_run("exp") as run:
        for step in range(5):
            run.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    history = _client(run).get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(5)]
    with pytest.raises(ValueError, match="acc"):
        with tracked_run("exp") as bad:
            bad.log_metrics({"acc": "high"})


def test_exception_marks_run_failed_with_traceback():
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run("exp", config={"a": 1}) as run:
            raise RuntimeError("boom")
    assert _client(run).get_run(run.run_id).info.status == "FAILED"
    error = _artifact_text(run, "error.txt")
    assert "RuntimeError: boom" in error and "Traceback" in error


def test_keyboard_interrupt_and_sigterm_mark_runs_killed_other_exits_failed():
    from fm.termination import TERMINATED

    with pytest.raises(KeyboardInterrupt):
        with tracked_run("exp") as run:
            raise KeyboardInterrupt
    assert _client(run).get_run(run.run_id).info.status == "KILLED"
    with pytest.raises(SystemExit):
        with tracked_run("exp") as run:
            raise SystemExit(TERMINATED)  # what fm.termination raises on SIGTERM
    assert _client(run).get_run(run.run_id).info.status == "KILLED"
    with pytest.raises(SystemExit):
        with tracked_run("exp") as run:
            raise SystemExit(1)
    assert _client(run).get_run(run.run_id).info.status == "FAILED"


def test_several_runs_in_one_process_are_all_tracked():
    run_ids = []
    for seed in range(3):
        with tracked_run("exp", run_name=f"seed{seed}", config={"seed": seed}) as run:
            run.log_metrics({"auc": 0.5 + seed / 10})
        run_ids.append(run.run_id)
    assert len(set(run_ids)) == 3
    client = _client(run)
    for seed, run_id in enumerate(run_ids):
        info = client.get_run(run_id)
        assert info.info.status == "FINISHED"
        assert info.data.params["seed"] == str(seed)
        assert info.data.metrics["auc"] == pytest.approx(0.5 + seed / 10)


def test_nested_runs_carry_the_parent_tag():
    with tracked_run("cv", run_name="parent") as parent:
        with tracked_run("ignored", run_name="fold0", nested=True, config={"fold": 0}) as fold0:
            assert tracking.current_run() is fold0
        with child_run(parent, "fold1", {"fold": 1}) as fold1:
            fold1.log_metrics({"auc": 0.7})
        assert tracking.current_run() is parent
    client = _client(parent)
    for child in (fold0, fold1):
        run = client.get_run(child.run_id)
        assert run.data.tags[tracking.PARENT_RUN_TAG] == parent.run_id
        assert run.info.experiment_id == parent.experiment_id
        assert run.info.status == "FINISHED"
    assert tracking.PARENT_RUN_TAG not in client.get_run(parent.run_id).data.tags
    assert tracking.current_run() is None


def test_failing_child_does_not_end_the_parent():
    with tracked_run("cv") as parent:
        with pytest.raises(ValueError):
            with tracked_run("cv", nested=True) as child:
                raise ValueError("bad fold")
        parent.log_metrics({"survived": 1})
    client = _client(parent)
    assert client.get_run(child.run_id).info.status == "FAILED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_log_table_writes_csv_and_markdown():
    df = pd.DataFrame({"task": ["msi", "her2"], "auc": [0.91234, 0.8], "n": [10, 20]})
    with tracked_run("exp") as run:
        run.log_table(df, "results")
    csv = pd.read_csv(_client(run).download_artifacts(run.run_id, "tables/results.csv"))
    pd.testing.assert_frame_equal(csv, df)
    md = _artifact_text(run, "tables/results.md").splitlines()
    assert md[0] == "| task | auc | n |"
    assert md[1] == "| --- | ---: | ---: |"
    assert md[2] == "| msi | 0.9123 | 10 |"
    assert md[3] == "| her2 | 0.8000 | 20 |"


def test_markdown_table_escapes_pipes_and_blanks_nan():
    df = pd.DataFrame({"name": ["a|b"], "value": [float("nan")]})
    assert markdown_table(df).splitlines()[2] == "| a\\|b |  |"


def test_log_figure_writes_png_and_other_artifacts(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    extra = tmp_path / "notes.txt"
    extra.write_text("hello")
    with tracked_run("exp") as run:
        run.log_figure(fig, "roc")
        run.log_artifact(extra, "misc")
        run.log_dict({"a": [1, 2]}, "summary.json")
        run.log_text("text", "t/x.txt")
        with pytest.raises(FileNotFoundError, match="missing.bin"):
            run.log_artifact(tmp_path / "missing.bin")
    plt.close(fig)
    png = Path(_client(run).download_artifacts(run.run_id, "figures/roc.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert _artifact_text(run, "misc/notes.txt") == "hello"
    assert _artifact_text(run, "summary.json").replace(" ", "").replace("\n", "") == '{"a":[1,2]}'


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/fm-runs/mlflow.db"
    with tracked_run("my exp") as run:
        run.log_text("x", "a.txt")
    assert run.tracking_uri == uri
    assert (tmp_path / "fm-runs" / "mlflow.db").is_file()
    stored = list((tmp_path / "fm-runs" / "artifacts").rglob("a.txt"))
    assert len(stored) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm-runs"]  # nothing else lands in cwd


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////from/env.db")
    assert resolve_tracking_uri() == "sqlite:////from/env.db"
    assert resolve_tracking_uri("http://server:5000") == "http://server:5000"
    assert resolve_tracking_uri(tmp_path / "store") == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert resolve_tracking_uri(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.db'}"


def test_flatten_config_rejects_non_mappings_and_cleans_keys():
    assert flatten_config({"a": [{"b": 1}, {"b": 2}], "c d+e": None}) == {
        "a.0.b": "1",
        "a.1.b": "2",
        "c d_e": "null",
    }
    with pytest.raises(TypeError, match="mapping"):
        flatten_config([1, 2])


def test_non_zero_rank_opens_no_run(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with tracked_run("exp", config={"a": 1}) as run:
        run.log_metrics({"x": 1.0})
        run.log_table(pd.DataFrame({"a": [1]}), "t")
    assert run.run_id is None and not run.enabled
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("exp") is None


def test_lightning_metrics_land_in_our_run():
    import lightning.pytorch as pl
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()  # would clash with our params if the logger logged them
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(32, 2), torch.randn(32, 1))
    with tracked_run("exp", config={"lr": 0.5}) as run:
        trainer = pl.Trainer(
            max_epochs=1,
            logger=lightning_logger(run),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
        assert _client(run).get_run(run.run_id).info.status == "RUNNING"  # Lightning does not end our run
        run.log_metrics({"after_fit": 1.0})
    stored = _client(run).get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"lr": "0.5"}
    steps = [m.step for m in _client(run).get_metric_history(run.run_id, "train_loss")]
    assert len(steps) == 8 and len(set(steps)) == 8


def test_parallel_processes_share_a_new_store(tmp_path):
    """Workers started together on a store that does not exist yet: one creates it, all runs are tracked."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    script = (
        "import sys; from fm.tracking import tracked_run\n"
        "with tracked_run('cohort', run_name=sys.argv[2], tracking_uri=sys.argv[1]) as run:\n"
        "    run.log_metrics({'done': 1.0})\n"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, uri, f"worker{i}"]) for i in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cohort").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["worker0", "worker1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_none_records_nothing_and_the_offline_folder_comes_first(tmp_path, monkeypatch):
    from fm.tracking import NO_TRACKING, resolve_tracking_uri
    from fm.tracking_offline import main as track_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    assert resolve_tracking_uri(None) == NO_TRACKING and resolve_tracking_uri("OFF") == NO_TRACKING
    monkeypatch.setenv("FM_TRACKING_DIR", str(tmp_path / "offline"))
    assert resolve_tracking_uri(None).endswith("offline")  # a pipeline task's folder wins over the environment
    assert resolve_tracking_uri("none") == NO_TRACKING  # the flag wins over both
    with tracked_run("x", tracking_uri="none") as run:
        run.log_metrics({"a": 1.0})
    assert not run.enabled and sorted(p.name for p in tmp_path.iterdir()) == []  # no store made anywhere
    (tmp_path / "offline").mkdir()
    assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", "none"]) == 2
