"""Shared fixtures of the benchmarks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Training benchmarks run on one thread: the 2-core machine is shared, and one thread makes
    per-phase times comparable between runs (bench/results/cpu-epoch-memory.txt)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
