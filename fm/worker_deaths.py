"""Report a dead DataLoader worker at one known place: the wait for the next batch.

torch installs a SIGCHLD handler that raises "DataLoader worker ... is killed by signal" in the main
thread at whatever line it happens to be running when a worker dies: in the middle of writing an
output file, inside the caller's own recovery code, or during the next loader's run when the old
iterator is not yet garbage-collected. Code that wants to survive a crashing worker (a codec that
segfaults on one corrupt slide) cannot handle an exception that may come from anywhere.

`WorkerDeathGuard` keeps torch's check but only lets it raise while the main thread waits for a batch;
a death signalled at any other moment is remembered and raised when the next wait begins. A worker
that died of SIGTERM means the whole job is being stopped (SLURM signals the process group): that is
raised as `SystemExit(143)`, as fm.termination does in the main process, not as a crash. It also
shuts the iterator's workers down on exit, so their pids never outlive the loop in torch's registry.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

from fm.termination import TERMINATED


class WorkerDeathGuard:
    """`with WorkerDeathGuard(iter(loader)) as guard: for batch in guard: ...` (see the module docstring)."""

    def __init__(self, batches: Iterator[Any]):
        self.batches = batches
        self.waiting = self.pending = False
        self._torch_handler: Any = None
        self._installed = False

    def _on_sigchld(self, signum: int, frame: Any) -> None:
        if self.waiting:
            self._torch_handler(signum, frame)  # raises inside the wait if one of our workers died
        else:
            self.pending = True

    def __enter__(self) -> WorkerDeathGuard:
        handler = signal.getsignal(signal.SIGCHLD)
        # torch sets its handler when the first multi-process iterator starts (main thread only)
        if callable(handler) and threading.current_thread() is threading.main_thread():
            self._torch_handler = handler
            signal.signal(signal.SIGCHLD, self._on_sigchld)
            self._installed = True
        return self

    def __iter__(self) -> WorkerDeathGuard:
        return self

    def __next__(self) -> Any:
        self.waiting = True
        try:
            if self.pending:
                self.pending = False
                self._torch_handler(signal.SIGCHLD, None)
            return next(self.batches)
        except RuntimeError as err:
            if self._terminated():  # SLURM / scancel signal the whole process group: we are being
                raise SystemExit(TERMINATED) from err  # stopped, and no item is to blame
            raise
        finally:
            self.waiting = False

    def _terminated(self) -> bool:
        """Whether a worker died of SIGTERM (torch's message does not always say how it died)."""
        workers = getattr(self.batches, "_workers", [])
        return any(getattr(w, "exitcode", None) == -signal.SIGTERM for w in workers)

    def __exit__(self, *exc: object) -> None:
        try:
            shutdown = getattr(self.batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # joins or kills the workers and drops their pids from torch's registry
        finally:
            if self._installed:
                signal.signal(signal.SIGCHLD, self._torch_handler)
                self._installed = False
