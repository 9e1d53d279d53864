"""MLflow experiment tracking shared by every `fm-*` command.

Every run talks to MLflow through an explicit `MlflowClient` bound to one run id, never through
MLflow's process-wide "active run": a process that trains, extracts and evaluates several times
then tracks each of its runs, not only the first. The default store is a local SQLite database
(the plain `./mlruns` file store is refused by current MLflow) whose artifacts live beside it.

    with tracked_run("bigearthnet-probe", config=cfg) as run:
        run.log_metrics({"val/map_micro": 0.86}, step=3)
        run.log_table(results_df, "results")
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import numbers
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from fm.termination import TERMINATED
from fm.tracking_store import (  # noqa: F401  (re-exported: the tracking API in one place)
    DB_NAME,
    DEFAULT_STORE_DIR,
    ENV_TRACKING_DIR,
    ENV_TRACKING_URI,
    NO_TRACKING,
    TrackingStoreError,
    experiment_id_for,
    probe_server,
    resolve_tracking_uri,
    safe_uri,
    store_client,
)

PARENT_RUN_TAG = "mlflow.parentRunId"
MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit for one param value
MAX_TAG_VALUE_LENGTH = 8000
PARAMS_PER_BATCH = 100  # MLflow refuses larger batches
METRICS_PER_BATCH = 1000
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
_TRUNCATED = "...[truncated]"

# Runs currently open in this context, innermost last: `nested=True` attaches to the innermost.
_open_runs: contextvars.ContextVar[tuple[TrackedRun, ...]] = contextvars.ContextVar(
    "fm_open_runs", default=()
)


# ---------------------------------------------------------------------------------------------- values


def _plain(value: Any) -> Any:
    """Turn dataclasses, paths, tuples and numpy/torch scalars into YAML-safe plain values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return str(value)


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> `{"a.b.c": "value"}`; lists of mappings get index keys, other lists one JSON value."""
    config = _plain(config)
    flat: dict[str, str] = {}

    def visit(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, v in enumerate(node):
                visit(v, f"{key}.{i}")
        else:
            text = node if isinstance(node, str) else json.dumps(node)
            flat[_KEY_CHARS.sub("_", key)] = _truncate(text, MAX_PARAM_VALUE_LENGTH)

    if not isinstance(config, dict):
        raise TypeError(f"config must be a mapping or dataclass, got {type(config).__name__}")
    visit(config, prefix)
    return flat


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def markdown_table(df, float_format: str = "{:.4f}") -> str:
    """A GitHub-markdown table of a DataFrame (pandas' own `to_markdown` needs the optional `tabulate`)."""

    def cell(value: Any) -> str:
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
            text = "" if value != value else float_format.format(value)  # NaN -> empty cell
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    header = [cell(c) for c in df.columns]
    rows = [[cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    numeric = [df[c].dtype.kind in "iuf" for c in df.columns] if len(df.columns) else []
    rule = ["---:" if is_num else "---" for is_num in numeric]
    lines = ["| " + " | ".join(r) + " |" for r in [header, rule, *rows]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- provenance


@functools.cache
def _fm_version() -> str:
    try:
        return metadata.version("fm-suite")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def _git_commit() -> str:
    """Commit of the repository holding the fm package, else the installed version."""
    package_dir = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"fm-suite=={_fm_version()}"


def _global_rank() -> int:
    """Rank of this process in a distributed job (0 when not distributed): only rank 0 tracks."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


# ---------------------------------------------------------------------------------------------- runs


class TrackedRun:
    """Handle on one MLflow run; every call names the run id explicitly.

    On a non-zero distributed rank the handle is disabled (`run_id` is None) and logging is a no-op,
    so DDP/SLURM workers do not open one run each.
    """

    def __init__(self, client, run_id: str | None, experiment_id: str | None, tracking_uri: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in flatten_config(params).items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"metric {key!r} must be a number, got {value!r}") from err
            items.append(Metric(_KEY_CHARS.sub("_", key), number, now, step or 0))
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if self.enabled and tags:
            items = [RunTag(k, _truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or a whole directory) into the run's artifacts."""
        if not self.enabled:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or directory")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """JSON, or YAML when `artifact_file` ends in .yaml/.yml."""
        if self.enabled:
            self.client.log_dict(self.run_id, _plain(dictionary), artifact_file)

    def log_figure(self, figure, name: str, artifact_path: str = "figures") -> None:
        """Save a matplotlib figure as `<artifact_path>/<name>.png`."""
        if not self.enabled:
            return
        file = name if name.endswith(".png") else f"{name}.png"
        with tempfile.TemporaryDirectory(prefix="fm-figure-") as tmp:
            figure.savefig(Path(tmp) / file, format="png", dpi=120, bbox_inches="tight")
            self.client.log_artifact(self.run_id, str(Path(tmp) / file), artifact_path)

    def log_table(self, df, name: str, artifact_path: str = "tables") -> None:
        """Log a DataFrame as `<name>.csv` (exact values) and `<name>.md` (readable in the MLflow UI)."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory(prefix="fm-table-") as tmp:
            df.to_csv(Path(tmp) / f"{name}.csv", index=False)
            (Path(tmp) / f"{name}.md").write_text(markdown_table(df))
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def __repr__(self) -> str:
        return f"TrackedRun(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"


class tracked_run:  # noqa: N801  (used like a function: `with tracked_run(...) as run`)
    """Open an MLflow run for the `with` block; the block's outcome decides the run's final status.

    On entry the full config goes to params (flattened `a.b.c`) and to `config.yaml`, with tags
    `git_commit`, `fm_version` and `command`. An exception marks the run FAILED, stores the traceback
    as `error.txt` and propagates; Ctrl-C or SIGTERM (see fm.termination) marks it KILLED. `nested=True` makes the run a child
    of the innermost open run (or of `parent`), in the parent's experiment and store.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        config: Any = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
        parent: TrackedRun | None = None,
    ):
        self.experiment = experiment
        self.run_name = run_name
        self.config = config
        self.tracking_uri = tracking_uri
        self.tags = dict(tags or {})
        self.nested = nested or parent is not None
        self.parent = parent
        self.run: TrackedRun | None = None

    def __enter__(self) -> TrackedRun:
        parent = self.parent
        if self.nested and parent is None:
            open_runs = _open_runs.get()
            parent = open_runs[-1] if open_runs else None
            if parent is None:
                warnings.warn(
                    "tracked_run(nested=True) without an open parent run: starting a top-level run",
                    stacklevel=2,
                )
        uri = parent.tracking_uri if parent is not None else resolve_tracking_uri(self.tracking_uri)
        if uri == NO_TRACKING or _global_rank() != 0 or (parent is not None and not parent.enabled):
            self.run = TrackedRun(None, None, None, uri)
        else:
            self.run = self._start(uri, parent)
        _open_runs.set((*_open_runs.get(), self.run))
        return self.run

    def _start(self, uri: str, parent: TrackedRun | None) -> TrackedRun:
        from mlflow.exceptions import MlflowException

        try:
            if parent is None and uri.startswith(("http://", "https://")):
                probe_server(uri)
            client = store_client(uri)
            experiment_id = (
                parent.experiment_id if parent is not None else experiment_id_for(client, uri, self.experiment)
            )
        except (MlflowException, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingStoreError(f"MLflow tracking store {safe_uri(uri)}: {first}") from err
        tags = {
            "git_commit": _git_commit(),
            "fm_version": _fm_version(),
            "command": _truncate(shlex.join(sys.argv), MAX_TAG_VALUE_LENGTH),
            **{k: str(v) for k, v in self.tags.items()},
        }
        if parent is not None:
            tags[PARENT_RUN_TAG] = parent.run_id
        # MLflow draws its random run names from `random`, which training seeds: name the run by its time
        run_name = self.run_name or f"{self.experiment or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        info = client.create_run(experiment_id, tags=tags, run_name=run_name).info
        run = TrackedRun(client, info.run_id, experiment_id, uri)
        if self.config is not None:
            try:
                run.log_params(self.config)
                run.log_text(yaml.safe_dump(_plain(self.config), sort_keys=False), "config.yaml")
            except BaseException:
                client.set_terminated(run.run_id, "FAILED")
                raise
        return run

    def __exit__(self, exc_type, exc, tb) -> bool:
        run = self.run
        _open_runs.set(tuple(r for r in _open_runs.get() if r is not run))
        if run is None or not run.enabled:
            return False
        if exc_type is None or (exc_type is SystemExit and exc.code in (None, 0)):
            status = "FINISHED"
        else:
            killed = issubclass(exc_type, KeyboardInterrupt) or (exc_type is SystemExit and exc.code == TERMINATED)
            status = "KILLED" if killed else "FAILED"
            try:  # killed too: the traceback says where the run was stopped
                run.log_text("".join(traceback.format_exception(exc_type, exc, tb)), "error.txt")
            except Exception as log_error:  # the store itself may be the problem: keep the original error
                warnings.warn(f"could not log error.txt for run {run.run_id}: {log_error}", stacklevel=2)
        run.client.set_terminated(run.run_id, status)
        return False


def child_run(
    parent: TrackedRun, run_name: str | None = None, config: Any = None, **tags: Any
) -> tracked_run:
    """A run nested under `parent` (e.g. one fold x seed of a cross-validated evaluation)."""
    return tracked_run("", run_name=run_name, config=config, tags=tags, parent=parent)


def current_run() -> TrackedRun | None:
    """The innermost run open in this context (what `nested=True` would attach to), or None."""
    open_runs = _open_runs.get()
    return open_runs[-1] if open_runs else None


# ---------------------------------------------------------------------------------------------- lightning


@functools.cache
def _run_bound_logger_class():
    from lightning.pytorch.loggers.logger import Logger
    from lightning.pytorch.utilities import rank_zero_only

    class RunBoundLogger(Logger):
        """A Lightning logger writing per-step metrics into an existing `TrackedRun`.

        Not Lightning's MLFlowLogger: that one builds its own MlflowClient (which refuses our offline
        `offline:` store) and sets process-wide MLflow state. Hyperparameters are skipped (tracked_run
        already logged the full config); the run's status is left to tracked_run, not to `Trainer.fit`.
        """

        def __init__(self, run: TrackedRun, prefix: str = ""):
            super().__init__()
            self.tracked = run
            self._prefix = prefix

        @property
        def name(self) -> str:
            return self.tracked.experiment_id or ""

        @property
        def version(self) -> str:
            return self.tracked.run_id or ""

        @property
        def run_id(self) -> str | None:
            return self.tracked.run_id

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            return None

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            if self.tracked.enabled:
                prefixed = {f"{self._prefix}{k}" if self._prefix else k: v for k, v in metrics.items()}
                self.tracked.log_metrics(prefixed, step=step)

    return RunBoundLogger


def lightning_logger(run: TrackedRun, prefix: str = ""):
    """A Lightning logger bound to `run` (same run id and store), so per-step metrics land in it."""
    return _run_bound_logger_class()(run, prefix=prefix)
