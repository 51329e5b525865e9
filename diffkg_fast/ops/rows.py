"""Row lookup ``table[index]`` whose gradient has the same bits on every run.

Advanced indexing ``table[index]`` differentiates into ``index_put_(accumulate=True)``. On a CPU
with more than one thread, once the gradient has ``at::internal::GRAIN_SIZE`` = 32,768 elements
(a batch of 512 rows of 64), that op adds the rows of a repeated index with atomic float adds:
their order follows the threads' timing, and float addition is not associative, so two runs of
one seed at two threads ended ~1e-8 apart in every weight (issue 20 §4). ``F.embedding`` reads the
same rows; its CPU backward splits the *table's rows* between the threads, each adding its rows'
gradients in index order (no two threads write one row, so the bits are those of one thread),
and its CUDA backward adds repeated rows without atomics (a leader warp per row up to 3,072
indices, sorted segments past that; by torch's design, not measured here: no GPU).
``index_select`` would be as exact on a CPU, but its backward (``index_add_``) uses atomics on
CUDA.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["rows"]


def rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 2-D ``table`` and an integer ``index`` of any shape (shape
    ``index.shape + (d,)``), with a backward that does not depend on thread timing."""
    return F.embedding(index, table)
