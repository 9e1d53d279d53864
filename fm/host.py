"""Host-side settings for long CPU-heavy runs: torch's thread count, and a heap that does not creep.

Threads: a CPU forward pass next to N DataLoader worker processes must leave those N cores to the
workers; torch's default (one thread per core) oversubscribes them, and its spinning threads then
make the forward several times slower (a ViT-T extraction on 2 cores: 18 tiles/s with 2 threads and
1 worker, 33 tiles/s with 1 thread).

Heap: glibc raises its mmap threshold every time a large block is freed, so later large blocks
(activations, tile batches) come from the heap, where fragmentation keeps them resident. A CPU
extraction run grew by ~11 MB per batch with the default (550 MB over 50 batches of 32 tiles) and
stayed flat with a fixed threshold, which turns that adjustment off.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

import torch

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def available_cores() -> int:
    """Cores this process may run on (the SLURM/cgroup CPU set, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `threads` for the block (None: unchanged), restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Blocks of `nbytes` and more are always mmapped, hence returned to the OS when freed (glibc
    only; elsewhere a no-op that returns False). Process-wide: call it from command entry points."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
