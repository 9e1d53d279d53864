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


def _offline_runs(tmp_path, monkeypatch, names):
    """Offline runs written by the real machinery, one per name, each with metric auc at steps 0 and 1."""
    monkeypatch.setenv("FM_TRACKING_DIR", str(tmp_path / "offline"))
    folders = {}
    for name in names:
        with tracked_run("pipeline", run_name=name) as run:
            run.log_metrics({"auc": 0.5}, step=0)
            run.log_metrics({"auc": 0.75}, step=1)
        folders[name] = tmp_path / "offline" / run.run_id
    monkeypatch.delenv("FM_TRACKING_DIR")
    return folders


def _active_runs(store):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("pipeline")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_damaged_runs_are_skipped_by_name_and_the_others_imported_once(tmp_path, monkeypatch, capsys):
    """A job killed mid-write leaves a cut-off last record (dropped, with a warning); other damage skips that
    run alone, named with the reason, exit status 1; fixing it and rerunning imports it without duplicates."""
    import shutil

    runs = _offline_runs(tmp_path, monkeypatch, ["good", "torn", "badmeta", "bare"])
    with open(runs["torn"] / "records.jsonl", "a") as f:
        f.write('{"kind": "metric", "key": "auc", "val')
    meta = (runs["badmeta"] / "meta.json").read_text()
    (runs["badmeta"] / "meta.json").write_text("{bad")
    shutil.rmtree(runs["bare"] / "artifacts")  # a copy that drops empty folders: still a run
    (tmp_path / "offline" / "cache").mkdir()
    (tmp_path / "offline" / "cache" / "meta.json").write_text("{}")  # not a run folder
    store = f"sqlite:///{tmp_path / 'store.db'}"

    assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", store]) == 1
    out, err = capsys.readouterr()
    assert f"skipped {runs['badmeta']}: meta.json is corrupt" in err
    assert f"warning: {runs['torn'] / 'records.jsonl'}: dropped its cut-off last line" in err
    assert "Traceback" not in err and "cache" not in err
    assert "imported 3 run(s), 0 already in the store, skipped 1" in out
    client, imported = _active_runs(store)
    by_name = {r.info.run_name: r for r in imported}
    assert sorted(by_name) == ["bare", "good", "torn"] and len(imported) == 3
    assert {r.info.status for r in imported} == {"FINISHED"}
    history = client.get_metric_history(by_name["torn"].info.run_id, "auc")
    assert [m.value for m in history] == [0.5, 0.75]

    for marker in (tmp_path / "offline").glob("*/imported.json"):
        marker.unlink()  # e.g. a read-only or copied folder: the store's offline id tag still says what is there
    assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", store]) == 1
    assert "imported 0 run(s), 3 already in the store, skipped 1" in capsys.readouterr().out
    (runs["badmeta"] / "meta.json").write_text(meta)
    assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", store]) == 0
    assert "imported 1 run(s), 3 already in the store, skipped 0" in capsys.readouterr().out
    assert sorted(r.info.run_name for r in _active_runs(store)[1]) == ["badmeta", "bare", "good", "torn"]


def test_corrupt_record_skips_the_run_and_its_children(tmp_path, monkeypatch, capsys):
    """Damage before the last line is not a partial write: the run and the runs nested in it are skipped."""
    monkeypatch.setenv("FM_TRACKING_DIR", str(tmp_path / "offline"))
    with tracked_run("pipeline", run_name="parent") as parent:
        parent.log_metrics({"auc": 0.5})
        with child_run(parent, run_name="fold0") as child:
            child.log_metrics({"auc": 0.9})
        parent.log_metrics({"auc": 0.75})
    monkeypatch.delenv("FM_TRACKING_DIR")
    records = tmp_path / "offline" / parent.run_id / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join([lines[0], '{"kind": "metric", "key"', *lines[1:]]) + "\n")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", store]) == 1
    err = capsys.readouterr().err
    assert f"skipped {records.parent}: records.jsonl line 2 is corrupt" in err
    assert f"skipped {tmp_path / 'offline' / child.run_id}: its parent run {parent.run_id} was skipped" in err
    assert _active_runs(store)[1] == []


def test_an_mlflow_failure_while_logging_leaves_no_running_run(tmp_path, monkeypatch, capsys):
    """The run created before the failure is discarded (not left RUNNING); the next import logs it once."""
    _offline_runs(tmp_path, monkeypatch, ["good"])
    store = f"sqlite:///{tmp_path / 'store.db'}"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", boom)
        assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", store]) == 1
    assert "MLflow failed on it (OSError: disk full); not imported" in capsys.readouterr().err
    client, active = _active_runs(store)
    assert active == []
    exp = client.get_experiment_by_name("pipeline").experiment_id
    assert {r.info.status for r in client.search_runs([exp], run_view_type=3)} <= {"FAILED"}
    assert track_main(["import", str(tmp_path / "offline"), "--tracking-uri", store]) == 0
    assert [r.info.status for r in _active_runs(store)[1]] == ["FINISHED"]


def test_a_store_kept_inside_the_imported_folder_is_not_taken_for_runs(tmp_path, monkeypatch, capsys):
    """`--tracking-uri DIR` with DIR the offline folder itself: the store's artifact folders (named by run id,
    holding only artifacts/) are no offline runs, so a second import is clean, not 'damaged runs'."""
    offline = tmp_path / "runs"
    monkeypatch.setenv("FM_TRACKING_DIR", str(offline))
    with tracked_run("pipeline", run_name="with-table") as run:
        run.log_table(pd.DataFrame({"x": [1]}), "results")
    monkeypatch.delenv("FM_TRACKING_DIR")
    for _ in range(2):
        assert track_main(["import", str(offline), "--tracking-uri", str(offline)]) == 0
    assert "imported 0 run(s), 1 already in the store, skipped 0" in capsys.readouterr().out
    assert list(offline.glob("artifacts/*/*/artifacts/tables/results.csv")), "the store's artifacts are there"


def test_an_import_killed_midway_is_replaced_not_kept(tmp_path, monkeypatch):
    """A run left RUNNING in the store by an import that was killed (its marker never written) is replaced."""
    offline = tmp_path / "offline"
    monkeypatch.setenv("FM_TRACKING_DIR", str(offline))
    with tracked_run("pipeline", run_name="r") as run:
        run.log_metrics({"auc": 0.5})
    monkeypatch.delenv("FM_TRACKING_DIR")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert track_main(["import", str(offline), "--tracking-uri", store]) == 0
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("pipeline").experiment_id
    (first,) = client.search_runs([exp])
    client.update_run(first.info.run_id, status="RUNNING")  # as if killed before set_terminated
    (offline / run.run_id / "imported.json").unlink()
    assert track_main(["import", str(offline), "--tracking-uri", store]) == 0
    (again,) = client.search_runs([exp])
    assert again.info.run_id != first.info.run_id and again.info.status == "FINISHED"
    assert again.data.metrics["auc"] == 0.5
