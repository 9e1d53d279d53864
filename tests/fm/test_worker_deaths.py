"""A DataLoader worker killed mid-run is reported at the wait for the next batch, never in the middle
of the caller's own work, and leaves nothing behind that could fire into a later loader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fm.worker_deaths import WorkerDeathGuard


class KillsItsWorker(Dataset):
    """Items 0..n-1, `delay` s each; fetching item `fatal` SIGKILLs the worker (a segfaulting codec, say)."""

    def __init__(self, n: int = 12, fatal: int | None = 9, delay: float = 0.05):
        self.n, self.fatal, self.delay = n, fatal, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay)
        if i == self.fatal:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor([i])


def _loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=2, num_workers=2)


def test_death_is_raised_at_the_wait_not_during_work():
    work_interrupted, seen = [], []
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        with WorkerDeathGuard(iter(_loader(KillsItsWorker()))) as batches:
            for batch in batches:
                seen.extend(batch.view(-1).tolist())
                try:
                    time.sleep(0.5)  # "writing": worker 0 reaches item 9 (and dies) meanwhile
                except RuntimeError:
                    work_interrupted.append(True)
                    raise
    assert not work_interrupted, "torch's SIGCHLD error reached the caller's work"
    assert seen and 9 not in seen


def test_after_a_crash_the_workers_are_gone_and_torch_handler_is_back():
    def crash():
        with WorkerDeathGuard(iter(_loader(KillsItsWorker()))) as batches:
            for _ in batches:
                time.sleep(0.5)  # the worker dies during this work, as in the test above

    with WorkerDeathGuard(iter(_loader(KillsItsWorker(n=2, fatal=None, delay=0.0)))) as warm:
        list(warm)  # torch installs its SIGCHLD handler with the first multi-worker iterator
    handler_before = signal.getsignal(signal.SIGCHLD)
    with pytest.raises(RuntimeError) as dead:
        crash()
    # the failed run's traceback keeps the dead iterator alive, as an `except` block does; its
    # surviving worker must be shut down all the same, and torch's handler be in place again
    iterator = dead.value.__traceback__.tb_next.tb_frame.f_locals["batches"].batches
    assert not any(w.is_alive() for w in iterator._workers)
    assert signal.getsignal(signal.SIGCHLD) is handler_before
    for _ in range(3):  # recovery work while other children exit (each sends a SIGCHLD)
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        time.sleep(0.1)
    with WorkerDeathGuard(iter(_loader(KillsItsWorker(fatal=None, delay=0.0)))) as batches:
        total = sum(int(batch.sum()) for batch in batches)
    assert total == sum(range(12))
