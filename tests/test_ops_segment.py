"""The segment softmax op (KGAT's attention normalisation) against a per-row literal loop:
values, gradients, float64 gradcheck, empty rows, duplicate edges, extreme logits, checks."""

from __future__ import annotations

import math

import pytest
import torch

from diffkg_fast.ops.backend import available
from diffkg_fast.ops.segment import csr_rows, segment_softmax


def _literal(logits: list[float], rowptr: list[int]) -> list[float]:
    """Softmax of each row, written out with ``math`` (no torch)."""
    out = [0.0] * len(logits)
    for h in range(len(rowptr) - 1):
        lo, hi = rowptr[h], rowptr[h + 1]
        if lo == hi:
            continue
        m = max(logits[lo:hi])
        den = sum(math.exp(x - m) for x in logits[lo:hi])
        for e in range(lo, hi):
            out[e] = math.exp(logits[e] - m) / den
    return out


def _graph(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 0 … 5 edges, several empty (the first and the last included)."""
    g = torch.Generator().manual_seed(seed)
    deg = torch.tensor([0, 3, 1, 0, 5, 2, 0, 4, 0])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), deg.cumsum(0)])
    logits = torch.randn(int(rowptr[-1]), generator=g, dtype=torch.float64) * 3
    return logits, rowptr


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_forward_equals_the_per_row_literal(backend: str) -> None:
    logits, rowptr = _graph()
    got = segment_softmax(logits, rowptr, backend=backend)
    want = torch.tensor(_literal(logits.tolist(), rowptr.tolist()), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    sums = torch.zeros(len(rowptr) - 1, dtype=torch.float64).index_add(0, csr_rows(rowptr), got)
    nonempty = rowptr.diff() > 0
    torch.testing.assert_close(sums[nonempty], torch.ones(int(nonempty.sum()),
                                                          dtype=torch.float64))


def test_gradient_equals_the_per_row_literal() -> None:
    logits, rowptr = _graph(1)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
    x = logits.clone().requires_grad_()
    (segment_softmax(x, rowptr) * upstream).sum().backward()
    # d/dx_f sum_e g_e p_e = p_f (g_f - sum_e g_e p_e), e and f in one row.
    p = _literal(logits.tolist(), rowptr.tolist())
    g = upstream.tolist()
    want = [0.0] * len(p)
    for h in range(len(rowptr) - 1):
        lo, hi = int(rowptr[h]), int(rowptr[h + 1])
        dot = sum(g[e] * p[e] for e in range(lo, hi))
        for f in range(lo, hi):
            want[f] = p[f] * (g[f] - dot)
    torch.testing.assert_close(x.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-10,
                               atol=1e-12)


def test_gradcheck_float64() -> None:
    logits, rowptr = _graph(3)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: segment_softmax(v, rowptr), (x,))
    assert torch.autograd.gradgradcheck(lambda v: segment_softmax(v, rowptr), (x,))


def test_duplicate_edges_are_separate_entries() -> None:
    # Two equal logits in a row (a duplicated edge) split the weight, as a COO that is not
    # coalesced would: 1/3 each with a third equal entry, not one merged entry.
    rowptr = torch.tensor([0, 3, 5])
    logits = torch.tensor([0.5, 0.5, 0.5, 2.0, 2.0], dtype=torch.float64)
    got = segment_softmax(logits, rowptr)
    torch.testing.assert_close(got, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.5, 0.5],
                                                 dtype=torch.float64))


def test_extreme_logits_stay_finite() -> None:
    rowptr = torch.tensor([0, 3, 5])
    logits = torch.tensor([1000.0, 999.0, -1000.0, -5000.0, -5001.0])
    got = segment_softmax(logits, rowptr)
    want = torch.tensor(_literal(logits.tolist(), rowptr.tolist()), dtype=torch.float32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_all_rows_empty_and_no_rows() -> None:
    empty = torch.zeros(0)
    assert segment_softmax(empty, torch.zeros(4, dtype=torch.int64)).shape == (0,)
    assert segment_softmax(empty, torch.zeros(1, dtype=torch.int64)).shape == (0,)


def test_int32_offsets_and_float32() -> None:
    logits, rowptr = _graph(4)
    got = segment_softmax(logits.float(), rowptr.int())
    want = segment_softmax(logits, rowptr).float()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rowptr, match", [
    ([1, 3, 5], "from 0"),
    ([0, 3, 4], "from 0"),
    ([0, 4, 3, 5], "non-decreasing"),
])
def test_bad_offsets_are_refused(rowptr: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        segment_softmax(torch.zeros(5), torch.tensor(rowptr))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="1-D"):
        segment_softmax(torch.zeros(2, 2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="floating"):
        segment_softmax(torch.zeros(2, dtype=torch.int64), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="integer"):
        segment_softmax(torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        segment_softmax(torch.zeros(2), torch.tensor([0, 2]), backend="cuda")


def test_registered_as_an_op() -> None:
    assert "reference" in available("segment_softmax")
