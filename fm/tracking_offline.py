"""Offline tracking for batch pipelines: runs are written as plain files, then imported into MLflow.

Many SLURM jobs writing one SQLite file on a network file system corrupt it. With
`FM_TRACKING_DIR=<dir>` (or a tracking URI `offline:<dir>`) every `fm-*` command writes its runs
(params, metrics, tags, artifacts, status) under <dir>/<run id>/, and one final
`fm-track import <dir>... --tracking-uri URI` replays them into a real store. `OfflineClient`
implements the few MlflowClient methods that fm.tracking uses, so the rest of the code is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from fm.io import atomic_write_text

OFFLINE_SCHEME = "offline:"
PARENT_TAG = "mlflow.parentRunId"
RUN_ID_TAG = "fm.offline_run_id"  # on each imported run: a rerun finds what the store already has
RUN_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, the offline run folder's name
STATUSES = {"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"}
META_FIELDS = {"experiment": str, "run_name": (str, type(None)), "tags": dict, "status": str, "start_time": int,
               "end_time": (int, type(None))}
RECORD_FIELDS = {"metric": {"key": str, "value": (int, float), "timestamp": int, "step": int},
                 "param": {"key": str, "value": str}, "tag": {"key": str, "value": str}}


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


class DamagedRun(ValueError):
    """An offline run folder that cannot be imported as it is; the message says why."""


@dataclass
class ImportReport:
    """What `import_runs` did, by offline run id: runs logged now, runs the store already had (a rerun), run
    folders skipped with the reason (by folder), and warnings such as a dropped cut-off record."""

    imported: dict[str, str] = field(default_factory=dict)
    already: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _is_run_dir(d: Path) -> bool:
    """A folder named like a run id holding meta.json or records.jsonl is a run (a copy may lose an empty
    artifacts/, a killed job may leave no meta.json); under another name it needs meta.json and one of
    records.jsonl or artifacts/, so that other folders with a meta.json (packed caches) are not taken for runs.
    A run-id folder with only artifacts/ is an MLflow store's own artifact folder (a store kept inside the
    imported folder, e.g. fm-runs/), not an offline run."""
    has = [(d / name).exists() for name in ("meta.json", "records.jsonl", "artifacts")]
    return any(has[:2]) if RUN_ID.fullmatch(d.name) else has[0] and any(has[1:])


def _run_dirs(roots: Iterable[str | Path]) -> list[Path]:
    found = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"no offline tracking folder at {root}")
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            if _is_run_dir(d) or (d == root and (d / "meta.json").is_file()):
                found.append(d)
                dirnames.clear()  # a run's artifacts hold no runs
            dirnames.sort()
    return found


def _check(obj, fields: dict, what: str) -> dict:
    if not isinstance(obj, dict):
        raise DamagedRun(f"{what} is not a JSON object")
    bad = [k for k, kind in fields.items() if not isinstance(obj.get(k), kind) or isinstance(obj.get(k), bool)]
    if bad:
        raise DamagedRun(f"{what} has a missing or invalid {', '.join(bad)}")
    return obj


def _read_run(d: Path) -> tuple[dict, list[dict], str | None]:
    """(meta, records, warning), all checked before anything is created in the store, so that a damaged run is
    skipped whole instead of leaving a half-logged run behind. Only a cut-off last record without its newline,
    what a job killed mid-write leaves, is dropped (with the warning); any other damage raises DamagedRun."""
    def read(name: str) -> bytes:
        try:
            return (d / name).read_bytes()
        except FileNotFoundError as err:
            raise DamagedRun(f"no {name} (the job was killed while creating the run?)") from err
        except OSError as err:
            raise DamagedRun(f"unreadable {name}: {err}") from err

    text = read("meta.json")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise DamagedRun(f"meta.json is corrupt: {err}") from err
    lines = read("records.jsonl").split(b"\n") if (d / "records.jsonl").exists() else []
    _check(meta, META_FIELDS, "meta.json")
    if meta["status"] not in STATUSES or not meta["experiment"]:
        raise DamagedRun(f"meta.json has an invalid status {meta['status']!r} or an empty experiment")
    records, warning = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if n == len(lines):  # the text after the last newline: a write cut off
                warning = f"{d / 'records.jsonl'}: dropped its cut-off last line {n} (the job was killed while logging)"
                continue
            raise DamagedRun(f"records.jsonl line {n} is corrupt: {err}") from err
        kind = record.get("kind") if isinstance(record, dict) else None
        records.append(_check(record, RECORD_FIELDS.get(kind, {"kind": ()}), f"records.jsonl line {n}"))
    return meta, records, warning


def _discard(client, run_id: str) -> None:
    """A half-logged run must neither stay RUNNING nor pass for imported: untag it, mark it FAILED, delete it.
    Best effort (the store may be what failed); the next import logs the run afresh."""
    for step in (lambda: client.delete_tag(run_id, RUN_ID_TAG), lambda: client.set_terminated(run_id, "FAILED"),
                 lambda: client.delete_run(run_id)):
        with contextlib.suppress(Exception):
            step()


def _import_one(client, uri: str, d: Path, meta: dict, records: list[dict], tags: dict) -> tuple[str, bool]:
    """(MLflow run id, whether it was logged now). A run the store already has under its offline id tag (an
    earlier import, even one whose marker file could not be written) is not logged twice; a RUNNING one is an
    import killed midway and is replaced. A failure after create_run discards the partial run."""
    from mlflow.entities import Metric, Param, RunTag

    from fm.tracking_store import experiment_id_for

    exp = experiment_id_for(client, uri, meta["experiment"])
    for old in client.search_runs([exp], f"tags.`{RUN_ID_TAG}` = '{d.name}'"):
        if old.info.status != "RUNNING":
            return old.info.run_id, False
        _discard(client, old.info.run_id)
    new = client.create_run(exp, tags={**tags, RUN_ID_TAG: d.name}, run_name=meta["run_name"],
                            start_time=meta["start_time"]).info.run_id
    try:
        params = [Param(k, v) for k, v in {r["key"]: r["value"] for r in records if r["kind"] == "param"}.items()]
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records if r["kind"] == "metric"]
        run_tags = [RunTag(r["key"], r["value"]) for r in records if r["kind"] == "tag"]
        for i in range(0, max(len(params), len(metrics), len(run_tags)), 100):
            client.log_batch(new, metrics=metrics[i : i + 100], params=params[i : i + 100], tags=run_tags[i : i + 100])
        if (d / "artifacts").is_dir() and any((d / "artifacts").iterdir()):
            client.log_artifacts(new, str(d / "artifacts"))
        client.set_terminated(new, meta["status"] if meta["status"] != "RUNNING" else "FAILED",
                              end_time=meta["end_time"])
    except BaseException:
        _discard(client, new)
        raise
    return new, True


def import_runs(roots: Sequence[str | Path], tracking_uri: str | None = None) -> ImportReport:
    """Replay offline runs into the MLflow store at `tracking_uri`, parents before their children. Each run is
    read and checked first; a damaged one, or one MLflow fails on, is skipped with the reason (and so are its
    children) while the others are imported. Reruns log nothing twice (marker file, offline id tag)."""
    from fm.tracking_store import NO_TRACKING, resolve_tracking_uri, store_client

    uri = resolve_tracking_uri(tracking_uri)
    if uri == NO_TRACKING:
        raise ValueError("fm-track import needs a real MLflow store, not 'none': pass --tracking-uri URI")
    if uri.startswith(OFFLINE_SCHEME):
        raise ValueError("fm-track import needs a real MLflow store: pass --tracking-uri (or unset FM_TRACKING_DIR)")
    report, runs = ImportReport(), {}
    for d in _run_dirs(roots):
        try:
            meta, records, warning = _read_run(d)
        except DamagedRun as err:
            report.skipped[str(d)] = str(err)
            continue
        runs[d.name] = (d, meta, records)
        report.warnings += [warning] if warning else []
    if not runs:
        return report
    client = store_client(uri)
    failed = {Path(folder).name for folder in report.skipped}

    def depth(run_id: str) -> int:
        n, seen = 0, {run_id}
        while (run_id := runs[run_id][1]["tags"].get(PARENT_TAG)) in runs and run_id not in seen:
            n, seen = n + 1, seen | {run_id}
        return n

    for run_id in sorted(runs, key=lambda r: (depth(r), runs[r][1]["start_time"])):
        d, meta, records = runs[run_id]
        ids = {**report.already, **report.imported}
        tags, parent = dict(meta["tags"]), meta["tags"].get(PARENT_TAG)
        if parent in failed:
            report.skipped[str(d)] = f"its parent run {parent} was skipped"
            failed.add(run_id)
            continue
        tags.update({PARENT_TAG: ids[parent]} if parent in ids else {})
        marker = d / "imported.json"
        with contextlib.suppress(Exception):  # no marker, or an unreadable one: ask the store
            done = json.loads(marker.read_text())
            if done.get("tracking_uri") == uri:
                report.already[run_id] = done["run_id"]
                continue
        try:
            new, logged = _import_one(client, uri, d, meta, records, tags)
        except Exception as err:
            report.skipped[str(d)] = f"MLflow failed on it ({type(err).__name__}: {err}); not imported"
            failed.add(run_id)
            continue
        (report.imported if logged else report.already)[run_id] = new
        with contextlib.suppress(OSError):  # a read-only folder: the tag in the store still records the import
            atomic_write_text(marker, json.dumps({"run_id": new, "tracking_uri": uri}))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when every run is in the store, 1 when some run folders were skipped (each named with the
    reason; the others are imported, and rerunning after a fix duplicates nothing), 2 on bad arguments."""
    ap = argparse.ArgumentParser(prog="fm-track", description="MLflow helpers for batch pipelines")
    sub = ap.add_subparsers(dest="verb", required=True)
    imp = sub.add_parser("import", help="log offline runs (written with FM_TRACKING_DIR) into an MLflow store")
    imp.add_argument("dirs", nargs="+", help="offline tracking folders")
    imp.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or local SQLite)")
    args = ap.parse_args(argv)
    os.environ.pop("FM_TRACKING_DIR", None)  # importing must talk to the real store
    try:
        report = import_runs(args.dirs, args.tracking_uri)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("FM_DEBUG"):
            raise
        print(f"fm-track: error: {err}\n(set FM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    for warning in report.warnings:
        print(f"fm-track: warning: {warning}", file=sys.stderr)
    for folder, reason in report.skipped.items():
        print(f"fm-track: skipped {folder}: {reason}", file=sys.stderr)
    print(f"imported {len(report.imported)} run(s), {len(report.already)} already in the store, "
          f"skipped {len(report.skipped)}")
    if report.skipped:
        print(f"fm-track: error: {len(report.skipped)} run folder(s) not imported (see above); fix or remove them "
              "and run the same command again: runs already imported are not duplicated", file=sys.stderr)
        return 1
    return 0
