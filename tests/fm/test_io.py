"""Crash-safe outputs: temporaries that killed writers leave behind are found and removed per target."""

from __future__ import annotations

import pytest

from fm.io import ItemLock, atomic_path, atomic_write_text, remove_stale_temporaries, stale_temporaries


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


def test_outputs_get_the_permissions_of_a_plain_file(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "features.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = (tmp_path / "features.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640  # not a temporary's 0o600


def test_lock_holder_names_process_host_and_file(tmp_path):
    first, second = ItemLock(tmp_path / "x.h5"), ItemLock(tmp_path / "x.h5")
    assert first.acquire() and not second.acquire()
    import os
    import socket

    assert f"process {os.getpid()} on {socket.gethostname()}" in second.holder()
    assert str(tmp_path / "x.h5.lock") in second.holder()
    first.release()
    assert second.acquire()



def _foreign_lock(tmp_path, silent_s: float, alive_silent_s: float | None = None):
    """A lock of process 4242 on another node, last touched `silent_s` ago (its alive file, if any,
    `alive_silent_s` ago)."""
    import os
    import time

    lock = tmp_path / "slide.h5.lock"
    lock.write_text(f"node-17:4242:{time.time() - 3600:.0f}\n")
    os.utime(lock, (time.time() - silent_s,) * 2)
    alive = tmp_path / ".alive-node-17-4242"
    if alive_silent_s is not None:
        alive.touch()
        os.utime(alive, (time.time() - alive_silent_s,) * 2)
    return lock, alive


def test_another_nodes_lock_is_broken_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("FM_LOCK_STALE_S", "600")
    # the lock file is old, but its holder's alive file was touched a minute ago: a live process
    lock, alive = _foreign_lock(tmp_path, silent_s=3000, alive_silent_s=60)
    mine = ItemLock(tmp_path / "slide.h5")
    assert not mine.acquire()
    assert "process 4242 on node-17" in mine.holder() and "last sign of life 1 min ago" in mine.holder()
    assert "broken automatically after 10 min" in mine.holder()
    # its heartbeat stopped 11 minutes ago (a job killed with SIGKILL, a dead node): broken and taken
    _foreign_lock(tmp_path, silent_s=3000, alive_silent_s=660)
    assert mine.acquire()
    assert not alive.exists()
    import os

    assert lock.read_text().split(":")[1] == str(os.getpid())
    mine.release()
    # no alive file at all (a holder that died right after locking): the lock's own age counts
    _foreign_lock(tmp_path, silent_s=60)
    assert not mine.acquire()
    _foreign_lock(tmp_path, silent_s=700)
    assert mine.acquire()
    mine.release()


def test_a_held_lock_shows_signs_of_life(tmp_path, monkeypatch):
    """The holder's heartbeat keeps one alive file per folder fresh, and removes it with the last lock."""
    import os
    import socket
    import time

    from fm import io

    monkeypatch.setenv("FM_LOCK_HEARTBEAT_S", "0.05")
    monkeypatch.setattr(io, "_heartbeat", None)  # a fresh thread with the short period
    locks = [ItemLock(tmp_path / f"slide-{i}.h5") for i in range(3)]
    assert all(lock.acquire() for lock in locks)
    alive = tmp_path / f".alive-{socket.gethostname()}-{os.getpid()}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name] + [lk.path.name for lk in locks])
    os.utime(alive, (time.time() - 3600,) * 2)
    time.sleep(0.5)
    assert time.time() - alive.stat().st_mtime < 5, "the heartbeat did not touch the alive file"
    for lock in locks[:2]:
        lock.release()
    assert alive.exists()
    locks[2].release()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_local_holders_lock_and_alive_file_go(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = tmp_path / "slide.h5.lock"
    lock.write_text(f"{socket.gethostname()}:{pid}:0\n")
    alive = tmp_path / f".alive-{socket.gethostname()}-{pid}"
    alive.touch()
    mine = ItemLock(tmp_path / "slide.h5")
    assert mine.acquire()
    assert not alive.exists() and lock.read_text().split(":")[1] == str(os.getpid())
    mine.release()
