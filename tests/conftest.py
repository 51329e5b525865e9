"""Shared fixtures: every test is seeded; paths of the bundled data; the Triton interpreter on a
machine without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, i.e. when a kernel module is first
# imported: set it before any test imports one, on machines where the kernels cannot compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffkg_fast.data.codes import bundled_path
from diffkg_fast.utils.seed import seed_everything


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    seed_everything(0)


@pytest.fixture(scope="session")
def mimic3_demo_dir():
    """The bundled MIMIC-III demo tables (ODbL, see diffkg_fast/data/bundled/NOTICE)."""
    return bundled_path("mimic3-demo")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Test graphs are tiny: with 2 OpenMP threads on a busy 2-core machine every small op
    waits at a barrier (measured: test_ops_attention.py 28 s vs 6 s single-threaded; a 2-epoch
    training run of tests/test_train.py 14 s vs 3.4 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
