"""The fused RGAT op (``torch.ops.diffkg_fast.rgat_forward`` / ``rgat_backward``) against the
reference ``rgat_aggregate(backend="reference")``: the C++ CPU kernels through the registered
op, and the Triton kernels of ``diffkg_fast.kernels.attention`` under ``TRITON_INTERPRET=1``
(set by conftest.py on a machine without CUDA) and compiled on a GPU (``gpu`` tests).

Graphs (``helpers.make_graph``): odd sizes, isolated heads, degree-1 heads, a 150-edge row
(longer than one edge block), duplicate triplets, self loops.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from diffkg_fast.ops import attention_fused as fused
from diffkg_fast.ops import backend as backend_mod
from diffkg_fast.ops.attention import dropout_mask, rgat_aggregate, rgat_forward

from helpers import assert_close, make_graph, needs_interpreter, tables

CUDA = torch.cuda.is_available()
if (shutil.which("c++") is None and shutil.which("g++") is None) or not is_ninja_available():
    pytest.skip("no C++ compiler or ninja: the extension cannot be built (apt-get install g++; "
                "pip install ninja)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _built():
    fused.ensure_ops()  # the one-time build (~30-60 s) outside any test's own work


def _reference_grads(E, Rel, W, g, gy, **kw):
    E, Rel, W = (t.detach().requires_grad_() for t in (E, Rel, W))
    y = rgat_aggregate(E, Rel, W, g, backend="reference", **kw)
    return (y.detach(), *torch.autograd.grad(y, (E, Rel, W), gy))


def _fused_grads(E, Rel, W, g, gy, backend, **kw):
    E, Rel, W = (t.detach().requires_grad_() for t in (E, Rel, W))
    y = rgat_aggregate(E, Rel, W, g, backend=backend, **kw)
    return (y.detach(), *torch.autograd.grad(y, (E, Rel, W), gy))


def _kw(p: float, normalize: bool, seed: int = 3) -> dict:
    return {"dropout": p, "training": p > 0, "normalize": normalize,
            "generator": torch.Generator().manual_seed(seed)}


# ---------------------------------------------------------------- CPU kernels, through the op

@pytest.mark.parametrize("d", [1, 3, 32, 64, 70])
@pytest.mark.parametrize("p,normalize", [(0.0, True), (0.3, True), (0.2, False)])
def test_cpu_forward_and_gradients_match_reference(d, p, normalize):
    g = make_graph(41, 3, 90, seed=d)
    E, Rel, W = tables(g, d, dtype=torch.float64, seed=d)
    gy = torch.randn(g.n_entities, d, dtype=torch.float64)
    ref = _reference_grads(E, Rel, W, g, gy, **_kw(p, normalize))
    out = _fused_grads(E, Rel, W, g, gy, "cpu", **_kw(p, normalize))
    for name, a, b in zip(("y", "dE", "dRel", "dW"), out, ref, strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-11), name


def test_cpu_float32_matches_reference():
    g = make_graph(57, 4, 200, seed=1)
    E, Rel, W = tables(g, 64, dtype=torch.float32)
    gy = torch.randn(g.n_entities, 64)
    ref = _reference_grads(E, Rel, W, g, gy, **_kw(0.1, True))
    out = _fused_grads(E, Rel, W, g, gy, "cpu", **_kw(0.1, True))
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def _error_vs_float64(fn, E, Rel, W, g, gy, dtype):
    """Max abs error of fn in ``dtype`` against the float64 reference, per output."""
    exact = _reference_grads(E, Rel, W, g, gy)
    got = fn(E.to(dtype), Rel.to(dtype), W.to(dtype), g, gy.to(dtype))
    return [(a.double() - b).abs().max().item() for a, b in zip(got, exact, strict=True)]


@pytest.mark.parametrize("scale", [6.0, -6.0])
def test_cpu_large_logits_tolerance_rule(scale):
    """Logits near ±80 (|s| up to ~80): no inf/NaN, and in float32 the kernel's error against
    the float64 reference is at most twice the float32 reference's error (flash-attention's
    rule) plus 1e-5 of the largest value (where both errors are float32 rounding noise)."""
    g = make_graph(41, 3, 120, seed=5)
    E, Rel, W = tables(g, 32, dtype=torch.float64, scale=scale, seed=5)
    s = (E[g.row] @ (Rel @ W[:32].T).T).gather(1, g.rel[:, None])
    assert s.abs().max() > 40
    gy = torch.randn(g.n_entities, 32, dtype=torch.float64)
    kern = _error_vs_float64(lambda *a: _fused_grads(*a, "cpu"), E, Rel, W, g, gy,
                             torch.float32)
    base = _error_vs_float64(lambda *a: _reference_grads(*a), E, Rel, W, g, gy, torch.float32)
    for name, k, b, v in zip(("y", "dE", "dRel", "dW"), kern, base,
                             _reference_grads(E, Rel, W, g, gy), strict=True):
        assert k == k and k <= 2 * b + 1e-5 * v.abs().max().item(), (name, k, b)


def test_cpu_gradcheck_float64():
    g = make_graph(17, 2, 25, seed=3)
    E, Rel, W = tables(g, 5, seed=3)
    mask = dropout_mask((g.n_entities, 5), 0.3, torch.Generator().manual_seed(0), E.device,
                        E.dtype)

    def f(E, Rel, W):
        return rgat_aggregate(E * mask, Rel, W, g, backend="cpu")

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (E, Rel, W)))


def _op_args(g, d, dtype, mask: bool):
    E, Rel, W = tables(g, d, dtype=dtype)
    p1, p2 = Rel @ W[:d].T, Rel @ W[d:].T
    m = dropout_mask((g.n_entities, d), 0.2, None, E.device, dtype) if mask else None
    return (E, p1, p2, *fused.graph_tensors(g), m, True)


# The CUDA key's kernels are the Triton ones (registered by ensure_ops).
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [False, True])
def test_opcheck(mask, device):
    fused.ensure_ops()
    g = make_graph(23, 3, 40, seed=4).to(device)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a
            for a in _op_args(g, 8, torch.float64, mask)]
    args = (args[0].requires_grad_(), args[1].requires_grad_(), args[2].requires_grad_(),
            *args[3:])
    torch.library.opcheck(torch.ops.diffkg_fast.rgat_forward.default, args)
    y, lse, norm = torch.ops.diffkg_fast.rgat_forward(*args)
    bwd = (torch.randn_like(y), *(a.detach() for a in args[:-2]), y.detach(), lse, norm,
           args[-2], True)
    torch.library.opcheck(torch.ops.diffkg_fast.rgat_backward.default, bwd)


@pytest.mark.parametrize("device", DEVICES)
def test_inside_torch_compile(device):
    g = make_graph(29, 3, 50, seed=6).to(device)
    E, Rel, W = (t.to(device) for t in tables(g, 16, dtype=torch.float32))
    backend = "cpu" if device == "cpu" else "triton"

    def layer(E, Rel, W):
        return rgat_forward(E, Rel, W, g, 2, 0.5, backend=backend)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    args = [t.clone().requires_grad_() for t in (E, Rel, W)]
    out = compiled(*args)
    out.square().sum().backward()
    args_ref = [t.clone().requires_grad_() for t in (E, Rel, W)]
    ref = rgat_forward(*args_ref, g, 2, 0.5, backend="reference")
    ref.square().sum().backward()
    assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(args, args_ref, strict=True):
        assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_auto_uses_the_fused_kernel_on_cpu(monkeypatch):
    g = make_graph(31, 2, 60, seed=2)
    E, Rel, W = tables(g, 32, dtype=torch.float32)
    assert backend_mod.resolve("rgat_aggregate", "auto", "cpu") is fused._rgat_fused
    assert torch.equal(rgat_aggregate(E, Rel, W, g), rgat_aggregate(E, Rel, W, g,
                                                                     backend="cpu"))
    # No extension (e.g. no compiler): "auto" runs the reference.
    monkeypatch.setitem(backend_mod._AUTO_IF, ("rgat_aggregate", "cpu"), lambda: False)
    ref = backend_mod.resolve("rgat_aggregate", "auto", "cpu")
    assert ref is backend_mod._REGISTRY["rgat_aggregate"]["reference"]
    # Half precision on a CPU: the kernels stop at float32, the reference runs.
    Eh, Relh, Wh = (t.to(torch.bfloat16) for t in (E, Rel, W))
    assert torch.equal(rgat_aggregate(Eh, Relh, Wh, g, backend="cpu"),
                       rgat_aggregate(Eh, Relh, Wh, g, backend="reference"))


def test_bad_graph_is_an_error_not_a_crash():
    fused.ensure_ops()
    g = make_graph(23, 3, 40, seed=4)
    E, p1, p2, rowptr, col, rel, *aux, mask, norm = _op_args(g, 8, torch.float32, False)
    bad_col = col.clone()
    bad_col[3] = g.n_entities
    with pytest.raises(RuntimeError, match="col"):
        torch.ops.diffkg_fast.rgat_forward(E, p1, p2, rowptr, bad_col, rel, *aux, mask, norm)
    bad_rel = rel.clone()
    bad_rel[0] = p1.shape[0]
    with pytest.raises(RuntimeError, match="rel"):
        torch.ops.diffkg_fast.rgat_forward(E, p1, p2, rowptr, col, bad_rel, *aux, mask, norm)
    with pytest.raises(RuntimeError, match="P1"):
        torch.ops.diffkg_fast.rgat_forward(E, p1[:, :4], p2, rowptr, col, rel, *aux, mask,
                                           norm)


# ------------------------------------------------- Triton kernels (interpreter on a CPU)

kernels = pytest.importorskip("diffkg_fast.kernels.attention")


def _triton_grads(E, Rel, W, g, gy, p=0.0, normalize=True, tails="csr", deterministic=None):
    """The Triton launchers called directly (CPU tensors work under TRITON_INTERPRET=1)."""
    d = E.shape[1]
    p1, p2 = Rel @ W[:d].T, Rel @ W[d:].T
    mask = (dropout_mask((g.n_entities, d), p, torch.Generator().manual_seed(3), E.device,
                         E.dtype) if p > 0 else None)
    gt = fused.graph_tensors(g)
    y, lse, norm = kernels.rgat_forward(E, p1, p2, *gt[:3], mask, normalize)
    dE, dP1, dP2 = kernels.rgat_backward(gy, E, p1, p2, *gt, y, lse, norm, mask, normalize,
                                         tails=tails, deterministic=deterministic)
    # P1 = Rel W1^T, P2 = Rel W2^T: the chain rule the op leaves to autograd.
    dRel = dP1 @ W[:d] + dP2 @ W[d:]
    dW = torch.cat([dP1.T @ Rel, dP2.T @ Rel])
    return y, dE, dRel, dW


@needs_interpreter
@pytest.mark.parametrize("d,p,normalize,tails", [
    (3, 0.0, True, "csr"), (32, 0.3, True, "atomic"), (70, 0.2, False, "csr"),
    (64, 0.0, True, "atomic")])
def test_triton_interpreter_matches_reference(d, p, normalize, tails):
    g = make_graph(37, 3, 70, seed=d)
    E, Rel, W = tables(g, d, dtype=torch.float64, seed=d)
    gy = torch.randn(g.n_entities, d, dtype=torch.float64)
    ref = _reference_grads(E, Rel, W, g, gy, **_kw(p, normalize))
    out = _triton_grads(E, Rel, W, g, gy, p, normalize, tails)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-11)


@needs_interpreter
def test_triton_interpreter_large_logits_and_float32():
    g = make_graph(31, 2, 60, seed=8)
    E, Rel, W = tables(g, 16, dtype=torch.float64, scale=7.0, seed=8)
    gy = torch.randn(g.n_entities, 16, dtype=torch.float64)
    kern = _error_vs_float64(lambda *a: _triton_grads(*a), E, Rel, W, g, gy, torch.float32)
    base = _error_vs_float64(lambda *a: _reference_grads(*a), E, Rel, W, g, gy, torch.float32)
    for k, b, v in zip(kern, base, _reference_grads(E, Rel, W, g, gy), strict=True):
        assert k == k and k <= 2 * b + 1e-5 * v.abs().max().item(), (k, b)


def test_width_align_is_one_vector_at_most():
    # d arrives divided by its power-of-two alignment, capped at one 16-byte vector of the dtype.
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    assert [kernels.width_align(d, f32) for d in (1, 6, 20, 64, 100, 250)] == [1, 2, 4, 4, 4, 2]
    assert [kernels.width_align(d, bf16) for d in (3, 12, 64, 100)] == [1, 4, 8, 4]
    assert [kernels.width_align(d, f64) for d in (3, 64, 70)] == [1, 2, 2]


@needs_interpreter
@pytest.mark.parametrize("d", [5, 6, 20])  # float32 alignments 1, 2, 4 (d / align = 5, 3, 5)
def test_triton_interpreter_float32_every_alignment(d):
    _assert_float32_kernels_match(make_graph(23, 3, 50, seed=d), d, "csr", "cpu")


def _assert_float32_kernels_match(g, d: int, tails: str, device: str) -> None:
    """The Triton launchers in float32 (dropout 0.2, normalised) against the reference."""
    E, Rel, W = (t.to(device) for t in tables(g, d, dtype=torch.float32, seed=d))
    gy = torch.randn(g.n_entities, d, device=device)
    for a, b in zip(_triton_grads(E, Rel, W, g, gy, 0.2, True, tails),
                    _reference_grads(E, Rel, W, g, gy, **_kw(0.2, True)), strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_interpreter
def test_triton_interpreter_empty_graph_and_chunks():
    # No edges at all: every row is its own (normalised) embedding; dRel = dW = 0.
    g = make_graph(31, 2, 60, seed=8)
    empty = type(g)(torch.zeros_like(g.rowptr), g.col[:0], g.rel[:0], g.n_entities,
                    g.n_relations)
    E, Rel, W = tables(empty, 8)
    gy = torch.randn(g.n_entities, 8, dtype=torch.float64)
    for a, b in zip(_triton_grads(E, Rel, W, empty, gy),
                    _reference_grads(E, Rel, W, empty, gy), strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The relation chunk table covers every edge exactly once.
    r_rowptr = torch.tensor([0, 0, 700, 701, 1300])
    c_rel, c_start, c_end, first, count = kernels._chunk_table(r_rowptr, 1300, 256)
    covered = torch.zeros(1300, dtype=torch.int64)
    for r, s, e in zip(c_rel.tolist(), c_start.tolist(), c_end.tolist(), strict=True):
        assert r_rowptr[r] <= s <= e <= r_rowptr[r + 1]
        covered[s:e] += 1
    assert torch.equal(covered, torch.ones(1300, dtype=torch.int64))
    # Each relation's chunks, as the deterministic sum reads them: first .. first + count - 1.
    assert count.tolist() == [0, 3, 1, 3] and first.tolist() == [0, 0, 3, 4]
    for r in range(4):
        assert (c_rel[first[r]:first[r] + count[r]] == r).all()


class _Spy:
    """A kernel's launches counted (``kernel[grid](...)`` passes through)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_interpreter_deterministic_relation_sums(monkeypatch, dtype):
    # Relations of 2 chunks of 256 edges and an empty one: the partial sums added in chunk
    # order give the reference's dRel / dW, and the atomics' result to rounding.
    g = make_graph(97, 3, 1400, seed=11)
    E, Rel, W = tables(g, 6, dtype=torch.float64, seed=11)
    n_rel = g.n_relations  # with the inverse relations; one more without edges
    Rel = torch.cat([Rel, torch.randn(1, 6, dtype=torch.float64)])
    g = type(g)(g.rowptr, g.col, g.rel, g.n_entities, n_rel + 1)
    E, Rel, W = (t.to(dtype) for t in (E, Rel, W))
    gy = torch.randn(g.n_entities, 6, dtype=torch.float64).to(dtype)
    assert (torch.bincount(g.rel, minlength=n_rel)[:n_rel] > kernels.REL_CHUNK).all()
    spy = _Spy(kernels._rgat_rel_sum_kernel)
    monkeypatch.setattr(kernels, "_rgat_rel_sum_kernel", spy)
    ref = _reference_grads(E, Rel, W, g, gy)
    tol = {"rtol": 1e-10, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 2e-5,
                                                                         "atol": 2e-5}
    det = _triton_grads(E, Rel, W, g, gy, deterministic=True)
    assert spy.launches == 1
    for a, b in zip(det, ref, strict=True):
        assert_close(a, b, **tol)
    assert not det[2][n_rel].any()  # the edgeless relation
    for a, b in zip(_triton_grads(E, Rel, W, g, gy, deterministic=False), det, strict=True):
        assert_close(a, b, **tol)
    assert spy.launches == 1
    # The default follows torch's switch; the atomic tail route has no deterministic form.
    torch.use_deterministic_algorithms(True)
    try:
        _triton_grads(E, Rel, W, g, gy)
        assert spy.launches == 2
        with pytest.raises(RuntimeError, match="deterministic algorithms need tails='csr'"):
            _triton_grads(E, Rel, W, g, gy, tails="atomic")
    finally:
        torch.use_deterministic_algorithms(False)


def _wrapper_args(g, d=5):
    E, Rel, W = tables(g, d, dtype=torch.float64, seed=2)
    return E, Rel @ W[:d].T, Rel @ W[d:].T, list(fused.graph_tensors(g))


@needs_interpreter
def test_triton_wrapper_checks_what_the_cpu_kernel_checks(monkeypatch):
    # The kernels index E and P1 by the graph's values unchecked: on a GPU a bad one is an
    # illegal address. The registered CUDA wrapper (run here on CPU tensors) checks first.
    g = make_graph(23, 3, 40, seed=4)
    E, p1, p2, graph = _wrapper_args(g)
    ref = fused._triton_forward(E, p1, p2, *graph, None, True)
    n, n_rel, nnz = g.n_entities, g.n_relations, graph[1].numel()
    for i, (name, value, match) in enumerate([
            ("rowptr", nnz + 1, "rowptr must run from 0 to nnz"),
            ("col", n, rf"col .* \[0, {n}\)"), ("rel", n_rel, rf"rel .* \[0, {n_rel}\)"),
            ("t_rowptr", -1, "t_rowptr must run"), ("t_edge", nnz, rf"t_edge .* \[0, {nnz}\)"),
            ("row", -1, rf"row .* \[0, {n}\)"), ("r_rowptr", nnz - 1, "r_rowptr must run"),
            ("r_edge", nnz, rf"r_edge .* \[0, {nnz}\)")]):
        bad = list(graph)
        bad[i] = graph[i].clone()
        bad[i][-1 if "rowptr" in name else 3] = value
        with pytest.raises(RuntimeError, match=f"rgat_forward: {match}"):
            fused._triton_forward(E, p1, p2, *bad, None, True)
    with pytest.raises(RuntimeError, match=r"P1 must be \(R, 5\)"):
        fused._triton_forward(E, p1[:, :4], p2, *graph, None, True)
    with pytest.raises(RuntimeError, match=f"rel must be int64 of length {nnz - 1}"):
        fused._triton_forward(E, p1, p2, graph[0], graph[1][:-1], *graph[2:], None, True)
    with pytest.raises(RuntimeError, match=r"mask must be torch\.float64 of shape \(23, 5\)"):
        fused._triton_forward(E, p1, p2, *graph, E[:, :4], True)
    y, lse, norm = ref
    with pytest.raises(RuntimeError, match=r"rgat_backward: lse must be torch\.float64"):
        fused._triton_backward(E, E, p1, p2, *graph, y, lse.float(), norm, None, True)
    # A strided graph tensor is read as the values it holds, not as if its stride were 1.
    strided = list(graph)
    strided[1] = torch.stack([graph[1], torch.full_like(graph[1], 10**9)], 1)[:, 0]
    assert torch.equal(fused._triton_forward(E, p1, p2, *strided, None, True)[0], ref[0])
    # The value checks (one device sync) run once per graph, again after an in-place change
    # (or another graph tensor: the strided call above).
    fused._triton_forward(E, p1, p2, *graph, None, True)
    calls = []
    monkeypatch.setattr(fused, "_check_graph_values", lambda *a: calls.append(a[0]))
    fused._triton_forward(E, p1, p2, *graph, None, True)
    assert calls == []
    graph[2][0] = 0
    fused._triton_forward(E, p1, p2, *graph, None, True)
    assert calls == ["rgat_forward"]


# ------------------------------------------------------------- Triton kernels, compiled (GPU)

def _cuda_problem(n_ent: int, n_tri: int, d: int, dtype: torch.dtype, seed: int):
    """A graph, its tables and an output gradient on the GPU."""
    g = make_graph(n_ent, 7, n_tri, seed=seed).to("cuda")
    E, Rel, W = (t.cuda() for t in tables(g, d, dtype=dtype, seed=seed))
    return g, E, Rel, W, torch.randn(g.n_entities, d, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d", [33, 32, 64, 100])  # float64 alignments 1, 2, 2, 2
@pytest.mark.parametrize("tails", ["csr", "atomic"])
def test_triton_gpu_matches_reference(d, tails):
    g, E, Rel, W, gy = _cuda_problem(301, 3000, d, torch.float64, seed=d)
    ref = _reference_grads(E, Rel, W, g, gy, **_kw(0.0, True))
    for a, b in zip(_triton_grads(E, Rel, W, g, gy, tails=tails), ref, strict=True):
        assert_close(a, b, rtol=1e-9, atol=1e-10)
    # Through the registered op and autograd, with dropout.
    out = _fused_grads(E, Rel, W, g, gy, "triton", **_kw(0.1, True))
    ref = _reference_grads(E, Rel, W, g, gy, **_kw(0.1, True))
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d", [33, 50, 100, 250])  # float32 alignments 1, 2, 4, 2 (compiled)
def test_triton_gpu_float32_every_alignment(d):
    _assert_float32_kernels_match(make_graph(301, 7, 3000, seed=d).to("cuda"), d, "atomic",
                                  "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_gpu_low_precision_tolerance_rule(dtype):
    """Error against the float64 reference at most twice that of the reference run in the same
    precision, plus 1e-5 of the largest value (float32 rounding noise)."""
    g, E, Rel, W, gy = _cuda_problem(301, 3000, 64, torch.float64, seed=1)
    kern = _error_vs_float64(lambda *a: _fused_grads(*a, "triton"), E, Rel, W, g, gy, dtype)
    base = _error_vs_float64(lambda *a: _reference_grads(*a), E, Rel, W, g, gy, dtype)
    for k, b, v in zip(kern, base, _reference_grads(E, Rel, W, g, gy), strict=True):
        assert k == k and k <= 2 * b + 1e-5 * v.abs().max().item(), (k, b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_gpu_deterministic_backward_and_bad_graph():
    g, E, Rel, W, gy = _cuda_problem(3001, 30000, 64, torch.float32, seed=5)
    first = _triton_grads(E, Rel, W, g, gy, deterministic=True)
    for _ in range(3):  # programs finish in another order each run: the sums must not care
        for a, b in zip(_triton_grads(E, Rel, W, g, gy, deterministic=True), first, strict=True):
            assert torch.equal(a, b)
    E, p1, p2, graph = _wrapper_args(make_graph(23, 3, 40, seed=4).to("cuda"))
    graph[1] = graph[1].clone()
    graph[1][3] = 23  # n_entities
    with pytest.raises(RuntimeError, match=r"col holds an index outside \[0, 23\)"):
        torch.ops.diffkg_fast.rgat_forward(E.cuda(), p1.cuda(), p2.cuda(), *graph, None, True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_gpu_on_a_side_stream():
    # Triton launches on the current stream: work queued on a side stream must see its inputs
    # and give the default stream's result.
    g, E, Rel, W, gy = _cuda_problem(301, 3000, 64, torch.float32, seed=2)
    ref = _fused_grads(E, Rel, W, g, gy, "triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = _fused_grads(E, Rel, W, g, gy, "triton")
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_uses_triton_on_cuda():
    assert backend_mod.resolve("rgat_aggregate", "auto", "cuda") is fused._rgat_fused
