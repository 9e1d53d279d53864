"""Crash-safe file output shared by every domain: atomic writes and per-item locks.

Many workers (DataLoader processes, SLURM array tasks, several `fm-*` processes on one cohort) may
work on the same output directory. Outputs are written to a temporary file in the same directory and
renamed into place, so a killed process never leaves a half-written result under the final name, and
an exclusive-create lock file keeps two processes off the same item.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_MARK}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def stale_temporaries(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """Temporaries in `directory`, by the name of the file they were for. One scan serves a whole
    cohort: globbing per output costs O(N) each, O(N^2) for N outputs in one folder (minutes at 10k)."""
    found: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith(TMP_MARK):
            target = entry.name[len(TMP_MARK) :].rpartition(".")[0]  # mkstemp adds ".<random>"
            found.setdefault(target, []).append(Path(entry.path))
    return found


def remove_stale_temporaries(path: str | os.PathLike, found: dict[str, list[Path]] | None = None) -> int:
    """Delete temporaries that killed writers left for `path` (`found`: a `stale_temporaries` scan of
    its folder, for many paths). Call it while holding the item's lock."""
    path = Path(path)
    stale = (found if found is not None else stale_temporaries(path.parent)).get(path.name, [])
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


class ItemLock:
    """Exclusive-create lock file `<path>.lock` holding `host:pid`; stale locks of dead local pids are broken.

    Use as `with ItemLock(p) as got: if got: ...`. `got` is False when another live process holds it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(str(path) + ".lock")
        self.acquired = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._is_stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}\n")
            self.acquired = True
            return True
        return False

    def _is_stale(self) -> bool:
        try:
            host, pid, *_ = self.path.read_text().strip().split(":")
        except (OSError, ValueError):
            return False  # being written right now, or unreadable: do not break it
        if host != socket.gethostname():
            return False  # another node's lock: cannot check its pid
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def holder(self) -> str:
        """Who holds the lock, for messages: a lock left by a dead process on another node is not
        broken automatically (its pid cannot be checked from here), so say where it is."""
        try:
            host, pid, since = self.path.read_text().strip().split(":")[:3]
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(since)))
            who = f"process {pid} on {host} since {when}"
        except (OSError, ValueError):
            who = "another process"
        return f"{who}; lock file {self.path} (delete it if that process is gone)"

    def release(self) -> None:
        if self.acquired:
            self.path.unlink(missing_ok=True)
            self.acquired = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
