"""sampled_logsumexp: the one-buffer backend against the reference (bitwise), gradcheck, edges."""

from __future__ import annotations

import math

import pytest
import torch

from diffkg_fast.ops import contrastive as contrastive_mod
from diffkg_fast.ops.contrastive import sampled_logsumexp


def _inputs(b, k, d, n_nodes, *, dtype=torch.float32, seed=0):
    """Rows a (B × d), b (k × d), pos (B,), node ids and negatives drawn from ``n_nodes`` ids,
    so that some negatives are their row's own node and some repeat."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, d, generator=g, dtype=dtype) * 3
    c = torch.randn(k, d, generator=g, dtype=dtype)
    pos = torch.randn(b, generator=g, dtype=dtype) * 3
    nodes = torch.randint(0, n_nodes, (b,), generator=g)
    negatives = torch.randint(0, n_nodes, (k,), generator=g)
    return a, c, pos, nodes, negatives


def _run(inputs, backend, weights, shift):
    a, c, pos, nodes, negatives = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (a, c, pos)]
    out = sampled_logsumexp(*leaves, nodes, negatives, shift, backend=backend)
    (out * weights).sum().backward()
    return (out.detach(), *(t.grad for t in leaves))


CASES = [(1, 1, 1, 1), (7, 13, 3, 5), (64, 301, 64, 40), (130, 6, 17, 9), (0, 5, 4, 3),
         (33, 20, 8, 2)]


@pytest.mark.parametrize("b,k,d,n_nodes", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_bytes", [1, None])  # 1: chunks of 8 rows
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_backend_is_bitwise_the_reference(monkeypatch, b, k, d, n_nodes, dtype,
                                              chunk_bytes, threads):
    if chunk_bytes is not None:
        monkeypatch.setattr(contrastive_mod, "_CHUNK_BYTES", chunk_bytes)
    inputs = _inputs(b, k, d, n_nodes, dtype=dtype, seed=b + k)
    w = torch.randn(b, dtype=dtype, generator=torch.Generator().manual_seed(1))
    shift = math.log(50 / max(k, 1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want = _run(inputs, "cpu", w, shift), _run(inputs, "reference", w, shift)
    finally:
        torch.set_num_threads(before)
    for name, x, y in zip(("lse", "grad a", "grad b", "grad pos"), got, want, strict=True):
        assert torch.equal(x, y), name


def test_rows_whose_every_negative_is_masked() -> None:
    """Every negative the row's own node: the denominator is the positive alone."""
    a, c, pos, _, _ = _inputs(4, 3, 5, 1)
    nodes, negatives = torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    out = sampled_logsumexp(a.requires_grad_(True), c, pos, nodes, negatives, 0.7)
    assert torch.equal(out, pos)
    out.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_gradcheck_float64() -> None:
    a, c, pos, nodes, negatives = _inputs(9, 7, 4, 6, dtype=torch.float64, seed=3)
    args = [t.requires_grad_(True) for t in (a, c, pos)]
    assert torch.autograd.gradcheck(
        lambda x, y, z: sampled_logsumexp(x, y, z, nodes, negatives, 0.3), args)


def test_no_grad_and_retained_graph() -> None:
    inputs = _inputs(12, 9, 4, 7, seed=5)
    with torch.no_grad():
        plain = sampled_logsumexp(*inputs, 0.2)
    a = inputs[0].clone().requires_grad_(True)
    out = sampled_logsumexp(a, *inputs[1:], 0.2)
    assert torch.equal(out.detach(), plain)
    out.sum().backward(retain_graph=True)
    first = a.grad.clone()
    a.grad = None
    out.sum().backward()  # the kept logits were consumed: recomputed
    assert torch.equal(a.grad, first)


def test_argument_errors() -> None:
    a, c, pos, nodes, negatives = _inputs(4, 3, 5, 6)
    with pytest.raises(ValueError, match="must be"):
        sampled_logsumexp(a, c[:, :2], pos, nodes, negatives, 0.0)
    with pytest.raises(ValueError, match="negatives"):
        sampled_logsumexp(a, c, pos, nodes, negatives[:2], 0.0)
