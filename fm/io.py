"""Crash-safe file output shared by every domain: atomic writes and per-item locks.

Many workers (DataLoader processes, SLURM array tasks, several `fm-*` processes on one cohort) may
work on the same output directory. Outputs are written to a temporary file in the same directory and
renamed into place, so a killed process never leaves a half-written result under the final name, and
an exclusive-create lock file keeps two processes off the same item.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def _create_temporary(path: Path) -> Path:
    """A new empty file beside `path`, created with mode 0o666 as a plain file is, so the umask and
    the folder's default ACLs apply (mkstemp's owner-only 0o600 would stick to the result)."""
    for _ in range(100):
        candidate = path.parent / f"{TMP_MARK}{path.name}.{secrets.token_hex(4)}"
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. The
    result has a plain file's permissions: on a shared cluster, the lab must be able to read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temporary(path)
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


def _seconds_from_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _alive_file(directory: Path, host: str, pid: str | int) -> Path:
    return directory / f".alive-{host}-{pid}"


class _Heartbeat(threading.Thread):
    """Once a `period`, touches one `.alive-<host>-<pid>` file in each folder where this process holds
    locks, so another node can tell a live holder (a fresh file) from a dead job or node (its pid cannot
    be checked from there). One file per folder, not per lock: a shard holds 10k slide locks, and
    touching each every minute would load a network file system for nothing."""

    def __init__(self, period: float):
        super().__init__(name="fm-lock-heartbeat", daemon=True)
        self.period, self.mutex = period, threading.Lock()
        self.held: dict[Path, set[Path]] = {}  # folder -> locks held there

    def run(self) -> None:
        while True:
            time.sleep(self.period)
            with self.mutex:
                folders = list(self.held)
            for folder in folders:
                with contextlib.suppress(OSError):
                    os.utime(_alive_file(folder, socket.gethostname(), os.getpid()))

    def update(self, lock: Path, held: bool) -> None:
        alive = _alive_file(lock.parent, socket.gethostname(), os.getpid())
        with self.mutex:
            locks = self.held.setdefault(lock.parent, set())
            (locks.add if held else locks.discard)(lock)
            if held and len(locks) == 1:
                with contextlib.suppress(OSError):
                    alive.touch()
            elif not locks:
                del self.held[lock.parent]
                alive.unlink(missing_ok=True)


_heartbeat: _Heartbeat | None = None
_heartbeat_pid = 0


def _beat(lock: Path, held: bool) -> None:
    global _heartbeat, _heartbeat_pid
    if _heartbeat is None or _heartbeat_pid != os.getpid():  # a forked child has no thread: start its own
        _heartbeat = _Heartbeat(_seconds_from_env("FM_LOCK_HEARTBEAT_S", 60.0))
        _heartbeat_pid = os.getpid()
        _heartbeat.start()
    _heartbeat.update(lock, held)


class ItemLock:
    """Exclusive-create lock file `<path>.lock` holding `host:pid:since`.

    Use as `with ItemLock(p) as got: if got: ...`. `got` is False when another live process holds it.
    A stale lock is broken: on this host, when its pid is gone; from another host, when its holder has
    shown no sign of life (it touches a `.alive-<host>-<pid>` file beside its locks every minute) for
    `$FM_LOCK_STALE_S` seconds (default 900), e.g. a SLURM job killed with SIGKILL or a node that died. Two processes breaking the same stale
    lock at the same instant may both get the item: that costs a duplicate, never a corrupt output
    (outputs are renamed into place whole).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(str(path) + ".lock")
        self.acquired = False

    @staticmethod
    def stale_after() -> float:
        return _seconds_from_env("FM_LOCK_STALE_S", 900.0)

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
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}\n")
                self.acquired = True
                _beat(self.path, held=True)
            except BaseException:  # stopped (SIGTERM) right after creating it: the lock must not stay
                self.acquired = False
                self.path.unlink(missing_ok=True)
                raise
            return True
        return False

    def _read(self) -> tuple[str, str, float, float] | None:
        """(host, pid, since, seconds since its last sign of life), or None while unreadable."""
        try:
            host, pid, since = self.path.read_text().strip().split(":")[:3]
            last = self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        with contextlib.suppress(OSError):
            last = max(last, _alive_file(self.path.parent, host, pid).stat().st_mtime)
        return host, pid, float(since), time.time() - last

    def _is_stale(self) -> bool:
        held = self._read()
        if held is None:
            return False  # being written right now, or unreadable: do not break it
        host, pid, _, silent_s = held
        if host != socket.gethostname():  # another node's pid cannot be checked from here: go by its heartbeat
            if silent_s <= self.stale_after():
                return False
            _alive_file(self.path.parent, host, pid).unlink(missing_ok=True)
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _alive_file(self.path.parent, host, pid).unlink(missing_ok=True)  # the dead holder's, if left
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def holder(self) -> str:
        """Who holds the lock, for messages (and when a lock from another node will be broken)."""
        held = self._read()
        if held is None:
            return f"another process; lock file {self.path}"
        host, pid, since, silent_s = held
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(since))
        who = f"process {pid} on {host} since {when}"
        if host == socket.gethostname():
            return f"{who}; lock file {self.path}"
        return (f"{who}, last sign of life {silent_s / 60:.0f} min ago; lock file {self.path} (broken "
                f"automatically after {self.stale_after() / 60:.0f} min without one; delete it sooner if that "
                f"process is gone)")

    def release(self) -> None:
        if self.acquired:
            _beat(self.path, held=False)
            self.path.unlink(missing_ok=True)
            self.acquired = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
