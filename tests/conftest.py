"""Shared test fixtures: real inputs from ../shared/fixtures (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: the tests' tensors are tiny, and OpenMP threads spinning against DataLoader
# workers (or a busy machine) made steps 10-100x slower; one thread is fast and predictable.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = Path(os.environ.get("FM_SHARED_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_FIXTURES} (set FM_SHARED_FIXTURES)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    """One cache dir per test session: generated demo data is written once and reused."""
    return tmp_path_factory.mktemp("fm-cache")


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch, session_cache_dir):
    """Every test gets its own MLflow store; nothing leaks into the user's home or cwd."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FM_CACHE_DIR", str(session_cache_dir))
