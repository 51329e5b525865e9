"""One seed fixes every random source.

Two kinds of randomness, both derived from the run's one ``seed``:

- global state (python ``random``, numpy's legacy generator, torch's default generator), set by
  :func:`seed_everything`: only code that cannot take a generator draws from it (torch's
  ``nn.Linear`` default initialisation, the denoiser's dropout, as in DiffKG);
- named streams (:func:`rng_stream`): one ``torch.Generator`` per purpose, so that adding a
  draw in one place (a longer evaluation, another negative) never shifts the draws of another.
  A stream's seed is ``seed + 7919 * index`` with its index in :data:`STREAMS`.
"""

from __future__ import annotations

import random

import numpy as np

__all__ = ["STREAMS", "rng_stream", "seed_everything"]

# Append-only: a name's position fixes its stream's seed, so reordering would change every run.
STREAMS = ("init", "neighbours", "dropout", "diffusion", "rebuild", "negatives", "shuffle",
           "kg_quality", "kg", "cl_negatives", "valid_users")
_STRIDE = 7919  # a prime, so that the streams of neighbouring seeds never coincide


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


def rng_stream(seed: int, name: str):  # -> torch.Generator (torch is optional in this module)
    """The CPU ``torch.Generator`` of stream ``name`` (one of :data:`STREAMS`) for ``seed``."""
    import torch

    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}; add it to STREAMS (append only)")
    return torch.Generator().manual_seed(seed + _STRIDE * STREAMS.index(name))
