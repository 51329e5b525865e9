"""One seed fixes every random source."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python's ``random``, numpy's legacy global state and torch (if importable).

    Returns a fresh ``numpy.random.Generator`` built from the same seed, which is what the
    data code uses (it never touches global state itself).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # the data layer works without torch
        pass
    else:
        torch.manual_seed(seed)
    return np.random.default_rng(seed)
