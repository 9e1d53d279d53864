"""Crash-safe outputs: temporaries that killed writers leave behind are found and removed per target."""

from __future__ import annotations

import pytest

from fm.io import ItemLock, atomic_path, remove_stale_temporaries, stale_temporaries


def _killed_writer(path):
    """Leave a temporary behind as a writer SIGKILLed inside `atomic_path` would (keep the returned
    context alive: closing it would clean up)."""
    ctx = atomic_path(path)
    ctx.__enter__().write_text("half")
    return ctx


def test_one_scan_finds_the_temporaries_of_every_target(tmp_path):
    writers = [_killed_writer(tmp_path / name)
               for name in ("TCGA-AA-1.h5", "TCGA-AA-1.h5", "slide.v2.h5", "TCGA-AA-10.h5")]
    (tmp_path / "TCGA-AA-1.h5").write_text("a finished file is not a temporary")
    found = stale_temporaries(tmp_path)
    assert {k: len(v) for k, v in found.items()} == {"TCGA-AA-1.h5": 2, "slide.v2.h5": 1, "TCGA-AA-10.h5": 1}
    assert remove_stale_temporaries(tmp_path / "TCGA-AA-1.h5", found) == 2
    # only that target's temporaries went; the finished file and the others stay
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "TCGA-AA-1.h5" in left and len(left) == 3
    assert remove_stale_temporaries(tmp_path / "slide.v2.h5") == 1  # without a scan: scans its folder
    assert stale_temporaries(tmp_path / "missing") == {}
    del writers


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_lock_holder_names_process_host_and_file(tmp_path):
    first, second = ItemLock(tmp_path / "x.h5"), ItemLock(tmp_path / "x.h5")
    assert first.acquire() and not second.acquire()
    import os
    import socket

    assert f"process {os.getpid()} on {socket.gethostname()}" in second.holder()
    assert str(tmp_path / "x.h5.lock") in second.holder()
    first.release()
    assert second.acquire()

