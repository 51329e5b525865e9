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


@pytest.fixture
def reference_ops(monkeypatch):
    """Every kernel backend off for the test: ``backend="auto"`` runs each op's plain-PyTorch
    reference. Read from the backend registry, so a newly registered kernel is covered too."""
    import diffkg_fast.ops  # noqa: F401 (registers every backend)
    from diffkg_fast.ops import backend

    for op, impls in backend._REGISTRY.items():
        for name in impls:
            if name != "reference":
                monkeypatch.setitem(backend._AUTO_IF, (op, name), lambda: False)
