"""SIGTERM ends a command the way Ctrl-C does: through its cleanup code.

Python's default for SIGTERM is to die on the spot, skipping every `finally`. A SLURM job at its time
limit (SIGTERM, then SIGKILL after KillWait), `scancel`, or Nextflow cancelling a task would leave
lock files that keep the next run off those items, temporaries, and a manifest that misses the items
finished so far. With `exit_on_sigterm()` the signal raises `SystemExit(143)` in the main thread, so
locks are released, temporaries removed and manifests written, and a rerun resumes at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

TERMINATED = 128 + signal.SIGTERM  # the exit status, as a shell reports a process killed by SIGTERM


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # Further SIGTERMs are ignored: the cleanup must finish. They come: SLURM signals every process of
    # the job, and a parent stopping its pool signals its workers again. SIGKILL (SLURM's, after
    # KillWait) still ends a cleanup that hangs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(TERMINATED)


def exit_on_sigterm() -> bool:
    """Install the handler unless someone else's is there (or this is not the main thread, where
    handlers cannot be set); returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _raise_exit)
    return True


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """`exit_on_sigterm()` for the block, the default restored after it (a command run in-process, e.g.
    by a test or a notebook, leaves the process as it found it)."""
    installed = exit_on_sigterm()
    try:
        yield
    finally:
        if installed and signal.getsignal(signal.SIGTERM) in (_raise_exit, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
