"""Offline tracking for batch pipelines: runs are written as plain files, then imported into MLflow.

Many SLURM jobs writing one SQLite file on a network file system corrupt it. With
`FM_TRACKING_DIR=<dir>` (or a tracking URI `offline:<dir>`) every `fm-*` command writes its runs
(params, metrics, tags, artifacts, status) under <dir>/<run id>/, and one final
`fm-track import <dir>... --tracking-uri URI` replays them into a real store. `OfflineClient`
implements the few MlflowClient methods that fm.tracking uses, so the rest of the code is unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import yaml

from fm.io import atomic_write_text

OFFLINE_SCHEME = "offline:"
PARENT_TAG = "mlflow.parentRunId"


class OfflineClient:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # experiments are created on import; offline, the name is the id
    def get_experiment_by_name(self, name: str):
        return SimpleNamespace(experiment_id=name, lifecycle_stage="active")

    def create_experiment(self, name: str, artifact_location=None) -> str:
        return name

    def _dir(self, run_id: str) -> Path:
        return self.root / run_id

    def _meta(self, run_id: str) -> dict:
        return json.loads((self._dir(run_id) / "meta.json").read_text())

    def create_run(self, experiment_id: str, tags=None, run_name=None):
        run_id = uuid.uuid4().hex
        d = self._dir(run_id)
        (d / "artifacts").mkdir(parents=True)
        meta = {"experiment": experiment_id, "run_name": run_name, "tags": dict(tags or {}),
                "status": "RUNNING", "start_time": int(time.time() * 1000), "end_time": None}
        atomic_write_text(d / "meta.json", json.dumps(meta, indent=1))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), synchronous=None) -> None:
        lines = [json.dumps({"kind": "metric", "key": m.key, "value": m.value, "timestamp": m.timestamp,
                             "step": m.step}) for m in metrics]
        lines += [json.dumps({"kind": "param", "key": p.key, "value": p.value}) for p in params]
        lines += [json.dumps({"kind": "tag", "key": t.key, "value": t.value}) for t in tags]
        if lines:
            with open(self._dir(run_id) / "records.jsonl", "a") as f:
                f.write("\n".join(lines) + "\n")

    def _artifact_dir(self, run_id: str, artifact_path: str | None) -> Path:
        d = self._dir(run_id) / "artifacts" / (artifact_path or "")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        shutil.copy2(local_path, self._artifact_dir(run_id, artifact_path) / Path(local_path).name)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        shutil.copytree(local_dir, self._artifact_dir(run_id, artifact_path), dirs_exist_ok=True)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        target = self._artifact_dir(run_id, str(Path(artifact_file).parent)) / Path(artifact_file).name
        target.write_text(text)

    def log_dict(self, run_id: str, dictionary: dict, artifact_file: str) -> None:
        yaml_file = artifact_file.endswith((".yaml", ".yml"))
        text = yaml.safe_dump(dictionary, sort_keys=False) if yaml_file else json.dumps(dictionary, indent=1)
        self.log_text(run_id, text, artifact_file)

    def set_terminated(self, run_id: str, status: str = "FINISHED", end_time=None) -> None:
        meta = self._meta(run_id)
        meta.update(status=status, end_time=int(time.time() * 1000))
        atomic_write_text(self._dir(run_id) / "meta.json", json.dumps(meta, indent=1))


def _run_dirs(roots: Iterable[str | Path]) -> list[Path]:
    found = []
    for root in roots:
        root = Path(root)
        if (root / "meta.json").is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(p.parent for p in root.rglob("meta.json") if (p.parent / "artifacts").is_dir())
        else:
            raise FileNotFoundError(f"no offline tracking folder at {root}")
    return found


def import_runs(roots: Sequence[str | Path], tracking_uri: str | None = None) -> dict[str, str]:
    """Replay offline runs into the MLflow store at `tracking_uri`; returns {offline id: new run id}.
    Parents are created before their children; a run already imported (marker file) is skipped."""
    from mlflow.entities import Metric, Param, RunTag

    from fm.tracking_store import NO_TRACKING, experiment_id_for, resolve_tracking_uri, store_client

    uri = resolve_tracking_uri(tracking_uri)
    if uri == NO_TRACKING:
        raise ValueError("fm-track import needs a real MLflow store, not 'none': pass --tracking-uri URI")
    if uri.startswith(OFFLINE_SCHEME):
        raise ValueError("fm-track import needs a real MLflow store: pass --tracking-uri (or unset FM_TRACKING_DIR)")
    client = store_client(uri)
    runs = {d.name: (d, json.loads((d / "meta.json").read_text())) for d in _run_dirs(roots)}
    mapping: dict[str, str] = {}

    def depth(run_id: str) -> int:
        parent = runs[run_id][1]["tags"].get(PARENT_TAG)
        return 0 if parent not in runs else 1 + depth(parent)

    for run_id in sorted(runs, key=lambda r: (depth(r), runs[r][1]["start_time"])):
        d, meta = runs[run_id]
        marker = d / "imported.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("tracking_uri") == uri:
                mapping[run_id] = done["run_id"]
                continue
        tags = dict(meta["tags"])
        if tags.get(PARENT_TAG) in mapping:
            tags[PARENT_TAG] = mapping[tags[PARENT_TAG]]
        exp = experiment_id_for(client, uri, meta["experiment"])
        new = client.create_run(exp, tags=tags, run_name=meta["run_name"], start_time=meta["start_time"]).info.run_id
        records = []
        if (d / "records.jsonl").is_file():
            records = [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines() if line]
        params = {r["key"]: r["value"] for r in records if r["kind"] == "param"}
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records if r["kind"] == "metric"]
        run_tags = [RunTag(r["key"], r["value"]) for r in records if r["kind"] == "tag"]
        param_list = [Param(k, v) for k, v in params.items()]
        for i in range(0, max(len(param_list), len(metrics), len(run_tags)), 100):
            client.log_batch(new, metrics=metrics[i : i + 100], params=param_list[i : i + 100],
                             tags=run_tags[i : i + 100])
        if any((d / "artifacts").iterdir()):
            client.log_artifacts(new, str(d / "artifacts"))
        client.set_terminated(new, meta["status"] if meta["status"] != "RUNNING" else "FAILED",
                              end_time=meta["end_time"])
        atomic_write_text(marker, json.dumps({"run_id": new, "tracking_uri": uri}))
        mapping[run_id] = new
    return mapping


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fm-track", description="MLflow helpers for batch pipelines")
    sub = ap.add_subparsers(dest="verb", required=True)
    imp = sub.add_parser("import", help="log offline runs (written with FM_TRACKING_DIR) into an MLflow store")
    imp.add_argument("dirs", nargs="+", help="offline tracking folders")
    imp.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or local SQLite)")
    args = ap.parse_args(argv)
    import os

    os.environ.pop("FM_TRACKING_DIR", None)  # importing must talk to the real store
    try:
        mapping = import_runs(args.dirs, args.tracking_uri)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("FM_DEBUG"):
            raise
        print(f"fm-track: error: {err}\n(set FM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    print(f"imported {len(mapping)} run(s)")
    return 0
