"""Offline tracking (FM_TRACKING_DIR) and `fm-track import`: what batch pipelines rely on."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from fm.tracking import child_run, tracked_run  # noqa: E402
from fm.tracking_offline import main as track_main  # noqa: E402


def test_offline_runs_import_with_params_metrics_artifacts_and_nesting(tmp_path, monkeypatch):
    offline = tmp_path / "offline"
    monkeypatch.setenv("FM_TRACKING_DIR", str(offline))
    with tracked_run("pipeline", run_name="parent", config={"a": {"b": 1}}) as parent:
        parent.log_metrics({"auc": 0.5}, step=0)
        parent.log_metrics({"auc": 0.75}, step=1)
        parent.log_table(pd.DataFrame({"x": [1, 2]}), "results")
        with child_run(parent, run_name="fold0") as child:
            child.log_metrics({"val_auc": 0.9})
    try:
        with tracked_run("pipeline", run_name="broken"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    monkeypatch.delenv("FM_TRACKING_DIR")
    assert not (tmp_path / "fm-runs").exists()
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert track_main(["import", str(offline), "--tracking-uri", store]) == 0

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("pipeline")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"parent", "fold0", "broken"}
    assert runs["parent"].data.params["a.b"] == "1"
    assert [m.value for m in client.get_metric_history(runs["parent"].info.run_id, "auc")] == [0.5, 0.75]
    assert runs["fold0"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
    assert runs["broken"].info.status == "FAILED"
    artifacts = {a.path for a in client.list_artifacts(runs["parent"].info.run_id, "tables")}
    assert artifacts == {"tables/results.csv", "tables/results.md"}

    # importing again does not duplicate runs
    assert track_main(["import", str(offline), "--tracking-uri", store]) == 0
    assert len(client.search_runs([exp.experiment_id])) == 3


def test_lightning_logger_writes_into_an_offline_run(tmp_path, monkeypatch):
    """fm-train under a pipeline (FM_TRACKING_DIR): Lightning's per-step metrics land in the offline run."""
    import json

    from fm.tracking import lightning_logger

    monkeypatch.setenv("FM_TRACKING_DIR", str(tmp_path / "offline"))
    with tracked_run("pipeline", run_name="train") as run:
        lightning_logger(run).log_metrics({"train/loss": 1.5}, step=3)
    records = (tmp_path / "offline" / run.run_id / "records.jsonl").read_text().splitlines()
    metrics = [json.loads(r) for r in records if json.loads(r)["kind"] == "metric"]
    assert [(m["key"], m["value"], m["step"]) for m in metrics] == [("train/loss", 1.5, 3)]
