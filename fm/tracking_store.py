"""Where MLflow runs go: the tracking URI a command resolves to, a client for it (a new SQLite database
created under a lock), the experiment, and a fast, one-line failure when a server does not answer."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from fm.io import ItemLock
from fm.tracking_offline import OFFLINE_SCHEME, OfflineClient

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
NO_TRACKING = "none"  # --tracking-uri none: the run is not recorded
ENV_TRACKING_DIR = "FM_TRACKING_DIR"  # offline: runs written as files, imported later by `fm-track import`
DEFAULT_STORE_DIR = "fm-runs"
DB_NAME = "mlflow.db"


def resolve_tracking_uri(flag: str | os.PathLike | None = None) -> str:
    """Pick the store: explicit flag, then `$MLFLOW_TRACKING_URI`, then `sqlite:///<cwd>/fm-runs/mlflow.db`.

    A bare path is accepted too: `*.db`/`*.sqlite` is taken as the database file, anything else as the
    directory that holds `mlflow.db`. `none` (or `off`) records nothing.
    """
    if flag and str(flag).lower() in ("none", "off"):
        return NO_TRACKING
    if not flag and os.environ.get(ENV_TRACKING_DIR):  # offline mode for batch pipelines (before the env URI)
        return OFFLINE_SCHEME + str(Path(os.environ[ENV_TRACKING_DIR]).expanduser().resolve())
    value = str(flag) if flag else os.environ.get(ENV_TRACKING_URI, "")
    if value.lower() in ("none", "off"):
        return NO_TRACKING
    if value.startswith(OFFLINE_SCHEME):
        return value
    if not value:
        db = Path.cwd().resolve() / DEFAULT_STORE_DIR / DB_NAME
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.\-]+:", value) or value == "databricks":
        return value  # already a URI (sqlite:, http:, postgresql:, databricks, file:)
    else:
        path = Path(value).expanduser().resolve()
        db = path if path.suffix in {".db", ".sqlite", ".sqlite3"} else path / DB_NAME
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


class TrackingStoreError(ValueError):
    """The tracking store cannot be used (server down, refused backend): one line naming the URI."""


PROBE_TIMEOUT_S = 5.0


def safe_uri(uri: str) -> str:
    """`uri` without the password of a user:password@ part, for messages."""
    return re.sub(r"//([^/@:]+):[^/@]*@", r"//\1:***@", uri)


def probe_server(uri: str) -> None:
    """An http(s) store that does not answer fails now, in seconds, not after MLflow's retries (minutes)
    and a traceback. The probe goes through MLflow's own client (its TLS, certificate and credential
    settings), without retries; any HTTP answer means the server is there."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=PROBE_TIMEOUT_S,
                     raise_on_status=False)
    except Exception as err:  # no HTTP answer at all: refused, unknown host, TLS failure, timeout
        found = re.findall(r"\[Errno [^\]]+\][^\"')]*|CERTIFICATE_VERIFY_FAILED[^\"')]*|timed out", str(err))
        reason = found[-1].strip() if found else type(err).__name__
        raise TrackingStoreError(f"cannot reach the MLflow tracking server {safe_uri(uri)} ({reason}); start it, "
                                 "or log to a local store (--tracking-uri DIR or sqlite:///path/mlflow.db)") from err


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in {"", ":memory:"} else Path(path)


def store_client(uri: str):
    """A client for `uri`. MlflowClient creates a new SQLite database's tables as it is built, and two
    processes doing that at once corrupt the schema, so a new database is created under a lock."""
    from mlflow import MlflowClient

    if uri.startswith(OFFLINE_SCHEME):
        return OfflineClient(uri[len(OFFLINE_SCHEME) :])
    db = sqlite_path(uri)
    lock = ItemLock(db) if db is not None else None
    if lock is None or (db.exists() and not lock.path.exists()):
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 300
    while not lock.acquire():  # another process is creating the tables: wait for it
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited 300 s for the lock {lock.path} on the MLflow database {db}")
        time.sleep(0.2)
    try:
        return MlflowClient(tracking_uri=uri)
    finally:
        lock.release()


def experiment_id_for(client, uri: str, name: str) -> str:
    """Id of experiment `name`, created if missing; a SQLite store keeps its artifacts beside the database."""
    from mlflow.exceptions import MlflowException

    if not name:
        raise ValueError("an MLflow experiment name must not be empty")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = sqlite_path(uri)
        location = None
        if db is not None:
            location = (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9_.\-]", "_", name)).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process may have created it meanwhile
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} in {uri} is deleted; restore it (`mlflow experiments restore`)"
            " or choose another experiment name"
        )
    return experiment.experiment_id
