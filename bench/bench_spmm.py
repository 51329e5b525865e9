"""Benchmark: CSR × dense SpMM of LightGCN on user–item graphs of the published shapes, CPU.

Run ``OMP_NUM_THREADS=2 pytest bench/bench_spmm.py --benchmark-only`` (all 108 cases: long;
``-k "gowalla and d64 and fwd-"`` for one group). Shapes (users + items = nodes; nnz = twice the
interactions, the symmetric normalised adjacency ``D^-1/2 A D^-1/2`` without self loops):

- ``gowalla``: 29,858 + 40,981 = 70,839 nodes, 810,128 interactions, 1.62M nnz;
- ``ifashion`` (Alibaba-iFashion): 114,737 + 30,040 = 144,777 nodes, 1,781,093 / 3.56M;
- ``lastfm``: 23,566 + 48,123 = 71,689 nodes, 3,034,796 / 6.07M.

The graphs are synthetic with those sizes and power-law (Zipf) user and item degrees: a few
items hold a large share of the interactions, as in the real data sets (no download needed).

Groups ``spmm-<shape>-d<d>-<pass>`` (``pass``: ``fwd`` = ``A x``; ``fwdbwd`` = forward and the
gradient ``A^T G``), providers:

- ``reference``: ``torch.sparse.mm`` on the CSR tensor (the ``reference`` backend);
- ``torch_sparse``: ``torch.sparse.mm`` on the COO tensor (LightGCN-PyTorch, RecBole, SSLRec);
- ``scipy``: ``scipy.sparse`` CSR ``@`` numpy (backward: a precomputed ``A^T``);
- ``cpu_kernel``: ``csr_spmm(..., backend="cpu")``, the C++ kernel of csrc/cpu/.

On a CUDA machine the same groups run on the GPU with the providers ``reference``
(``torch.sparse.mm`` on CSR: cuSPARSE), ``torch_sparse`` (COO), ``cuda`` (the kernels of
csrc/cuda/) and ``cupy`` (``cupyx.scipy.sparse`` CSR, cuSPARSE through CuPy; skipped without
CuPy); each timed call synchronizes the device.

Groups ``propagate2-<shape>-d<d>-<pass>``: a whole 2-layer LightGCN sum ``x + A x + A^2 x``
(``lightgcn_propagate``), ``reference`` vs ``cpu_kernel`` / ``cuda`` (the fused
``csr_propagate``).

``extra_info["bytes"]``: the compulsory bytes of one product (the CSR once, ``x`` gathered once,
the output written; twice that with the backward), so GB/s = bytes / time.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffkg_fast.ops.graph import norm_adjacency
from diffkg_fast.ops.propagation import lightgcn_propagate
from diffkg_fast.ops.spmm import csr_spmm, ensure_ops

SHAPES = {
    "gowalla": (29_858, 40_981, 810_128),
    "ifashion": (114_737, 30_040, 1_781_093),
    "lastfm": (23_566, 48_123, 3_034_796),
}
DIMS = (32, 64, 128)
PASSES = ("fwd", "fwdbwd")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNEL = "cuda" if CUDA else "cpu_kernel"
ROUNDS = 20 if CUDA else 5  # GPU calls take well under a millisecond: more rounds
SPMM_PROVIDERS = (("reference", "torch_sparse", "cupy", "cuda") if CUDA
                  else ("reference", "torch_sparse", "scipy", "cpu_kernel"))


@functools.lru_cache(maxsize=1)
def user_item_graph(shape: str) -> tuple[torch.Tensor, sp.csr_matrix]:
    """The normalised adjacency (torch CSR, float32) and its scipy twin, Zipf degrees."""
    n_users, n_items, n_inter = SHAPES[shape]
    rng = np.random.default_rng(0)
    pu = 1.0 / np.arange(1, n_users + 1) ** 0.8
    pi = 1.0 / np.arange(1, n_items + 1) ** 0.9
    draw = int(n_inter * 1.8)
    users = rng.permutation(n_users)[rng.choice(n_users, draw, p=pu / pu.sum())]
    items = rng.permutation(n_items)[rng.choice(n_items, draw, p=pi / pi.sum())]
    keys = rng.permutation(np.unique(users.astype(np.int64) * n_items + items))
    assert len(keys) >= n_inter, (shape, len(keys))
    keys = keys[:n_inter]
    r = sp.csr_matrix((np.ones(n_inter, np.float32), (keys // n_items, keys % n_items)),
                      shape=(n_users, n_items))
    adj = norm_adjacency(r, n_users, n_items, self_loops=False)
    a = sp.csr_matrix((adj.values().numpy(), adj.col_indices().numpy(),
                       adj.crow_indices().numpy()), shape=adj.shape)
    return adj.to(DEVICE), a


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _bytes(adj: torch.Tensor, d: int, bwd: bool) -> int:
    n_rows, n_cols = adj.shape
    csr = 8 * (n_rows + 1) + 12 * adj._nnz()
    return (csr + 4 * d * (n_cols + n_rows)) * (2 if bwd else 1)


def _spmm_case(provider: str, adj: torch.Tensor, a: sp.csr_matrix, x: torch.Tensor, bwd: bool):
    if provider == "scipy":
        xn, a_t = x.numpy(), a.T.tocsr()
        g = np.ones((a.shape[0], x.shape[1]), np.float32)
        return (lambda: (a @ xn, a_t @ g)) if bwd else (lambda: a @ xn)
    if provider == "cupy":
        cp = pytest.importorskip("cupy")
        csp = pytest.importorskip("cupyx.scipy.sparse")
        ca = csp.csr_matrix(a)
        ca_t = csp.csr_matrix(a.T.tocsr())
        cx = cp.asarray(x)
        cg = cp.ones((a.shape[0], x.shape[1]), cp.float32)

        def run_cupy():
            out = (ca @ cx, ca_t @ cg) if bwd else ca @ cx
            cp.cuda.get_current_stream().synchronize()
            return out
        return run_cupy
    if provider == "torch_sparse":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coo = adj.to_sparse_coo().coalesce()
        fn = functools.partial(torch.sparse.mm, coo)
    else:
        fn = functools.partial(csr_spmm, adj, backend={"cpu_kernel": "cpu", "cuda": "cuda"}
                               .get(provider, "reference"))
    return _with_grad(fn, x, bwd)


def _with_grad(fn, x: torch.Tensor, bwd: bool):
    if not bwd:
        def run():
            with torch.no_grad():
                out = fn(x)
            _sync()
            return out
        return run
    xg = x.clone().requires_grad_()

    def run_bwd():
        out = fn(xg)
        out.backward(torch.ones_like(out))
        _sync()
        xg.grad = None
    return run_bwd


@pytest.mark.parametrize("provider", SPMM_PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("d", DIMS, ids=[f"d{d}" for d in DIMS])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_spmm(benchmark, shape: str, d: int, pass_: str, provider: str) -> None:
    ensure_ops()  # the one-time build is not timed
    adj, a = user_item_graph(shape)
    x = torch.randn(adj.shape[1], d, device=DEVICE)
    benchmark.group = f"spmm-{shape}-d{d}-{pass_}"
    benchmark.extra_info.update(nnz=int(adj._nnz()), nodes=adj.shape[0], device=DEVICE,
                                bytes=_bytes(adj, d, pass_ == "fwdbwd"),
                                threads=torch.get_num_threads())
    run = _spmm_case(provider, adj, a, x, pass_ == "fwdbwd")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["reference", KERNEL])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("d", DIMS, ids=[f"d{d}" for d in DIMS])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_propagate2(benchmark, shape: str, d: int, pass_: str, provider: str) -> None:
    ensure_ops()
    adj, _ = user_item_graph(shape)
    x = torch.randn(adj.shape[1], d, device=DEVICE)
    benchmark.group = f"propagate2-{shape}-d{d}-{pass_}"
    benchmark.extra_info.update(nnz=int(adj._nnz()), device=DEVICE,
                                bytes=2 * _bytes(adj, d, pass_ == "fwdbwd"),
                                threads=torch.get_num_threads())
    backend = {"cpu_kernel": "cpu", "cuda": "cuda"}.get(provider, "reference")
    fn = functools.partial(lightgcn_propagate, adj, layers=2, backend=backend)
    run = _with_grad(lambda t: fn(X=t), x, pass_ == "fwdbwd")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
