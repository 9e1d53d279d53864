"""Session fixtures for the pathology tests (generated slides, tiled demo cohort)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("pathology_test_data", Path(__file__).with_name("data.py"))
test_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_data)


@pytest.fixture(scope="session")
def test_slides(tmp_path_factory) -> dict[str, Path]:
    return test_data.make_test_slides(tmp_path_factory.mktemp("slides"))


@pytest.fixture(scope="session")
def cmu_slide(shared_fixtures) -> Path:
    path = shared_fixtures / "pathology" / "cmu-1-small-region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def demo_tiles(session_cache_dir, tmp_path_factory):
    """The demo cohort tiled once per session: (records, tiling output folder)."""
    from pathology.demo_slides import demo_cohort
    from pathology.tiling import tile_cohort

    records = demo_cohort(session_cache_dir)
    out = tmp_path_factory.mktemp("demo-tiles")
    table = tile_cohort(records, out)
    assert (table.status == "ok").all(), table
    return records, out
