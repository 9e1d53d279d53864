"""Host settings for long CPU-heavy runs: scoped torch threads, a fixed glibc mmap threshold."""

from __future__ import annotations

import platform

import pytest
import torch

from fm.host import available_cores, fix_mmap_threshold, intra_op_threads


def test_thread_count_is_scoped_and_restored_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(ValueError):
        with intra_op_threads(before + 2):
            assert torch.get_num_threads() == before + 2
            raise ValueError("inside")
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
    assert 1 <= available_cores() <= (__import__("os").cpu_count() or 1)


def test_heap_threshold_is_fixed_on_glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert fix_mmap_threshold(1 << 20) is True
