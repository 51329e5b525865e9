"""Benchmark: one RGAT layer (``rgat_aggregate``, dropout 0.1, normalised) at published KG shapes.

Run ``pytest bench/bench_attention.py --benchmark-only`` (on a CPU: ``OMP_NUM_THREADS=2``; on a
GPU machine ``bench/gpu_suite.sh`` runs it). Shapes (entities = items + KG entities; edges = the
triplets plus their inverses; relations = 2R), synthetic with Zipf head and tail degrees:

- ``alibaba`` (Alibaba-iFashion): 89,196 entities, 558,310 edges, 102 relations;
- ``lastfm`` (Last-FM): 106,389 entities, 929,134 edges, 18 relations.

d = 64. Groups ``rgat-<shape>-<pass>``, ``pass`` one of ``fwd`` (forward, no graph kept),
``bwd`` (the backward alone, on a forward done in the untimed setup) and ``fwdbwd``. Providers:

- ``reference``: the plain-PyTorch reference op (``backend="reference"``): gathers, scatter
  max / sum, index_add; the structure of DiffKG's torch_scatter code;
- ``pyg``: the PyG way, ``torch_geometric.utils.softmax`` + ``torch_geometric.utils.scatter``
  (skipped when torch_geometric is not installed: ``pip install -e '.[bench]'``);
- ``cpu_kernel`` (CPU): the C++ kernels of csrc/cpu/attention_cpu.cpp through the op;
- ``triton`` (CUDA): the Triton kernels of kernels/attention.py through the op, tails through the
  transposed CSR; ``triton_atomic``: the same with atomics for the tail gradients;
  ``triton_deterministic`` (backward passes): the relation gradients from chunk partial sums
  added in order, what ``torch.use_deterministic_algorithms(True)`` runs.

``extra_info``: ``bytes`` = the compulsory bytes of the pass (E and the output once, the CSR
once: forward; grad, E, y, the head and transposed CSR, dE: backward), so GB/s = bytes / time;
on a GPU ``peak_bytes`` = the peak of ``torch.cuda.max_memory_allocated`` over the pass minus
the memory held before it (the inputs and, for ``bwd``, the forward's saved tensors).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _graphs import zipf_kg

from diffkg_fast.ops.attention import NEG_SLOPE, dropout_mask, rgat_aggregate
from diffkg_fast.ops.attention_fused import ensure_ops
from diffkg_fast.ops.graph import KGCSR

SHAPES = {"alibaba": (89_196, 558_310, 102), "lastfm": (106_389, 929_134, 18)}
D = 64
PASSES = ("fwd", "bwd", "fwdbwd")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROVIDERS = (("reference", "pyg", "triton", "triton_atomic", "triton_deterministic") if CUDA
             else ("reference", "pyg", "cpu_kernel"))


@functools.lru_cache(maxsize=1)
def kg_graph(shape: str) -> KGCSR:
    """A head-sorted KG of the shape's size with Zipf degrees, on the benchmark device."""
    return zipf_kg(*SHAPES[shape], DEVICE)


def pyg_rgat(E, Rel, W, kg: KGCSR, *, dropout, training, normalize, generator):
    """The same layer written the PyG way: per-edge logits, ``softmax`` over the head index,
    messages, ``scatter`` sum (what PyG's GATConv does inside ``propagate``)."""
    from torch_geometric.utils import scatter, softmax

    d = E.shape[1]
    row, col, rel = kg.row, kg.col, kg.rel
    logits = ((E[row] @ W[:d] + E[col] @ W[d:]) * Rel[rel]).sum(-1)
    alpha = softmax(F.leaky_relu(logits, NEG_SLOPE), row, num_nodes=kg.n_entities)
    agg = E + scatter(alpha.unsqueeze(1) * E[col], row, 0, dim_size=kg.n_entities, reduce="sum")
    if training and dropout > 0:
        agg = agg * dropout_mask(tuple(agg.shape), dropout, generator, agg.device, agg.dtype)
    return F.normalize(agg, dim=1) if normalize else agg


def _layer(provider: str, monkeypatch: pytest.MonkeyPatch):
    if provider == "pyg":
        pytest.importorskip("torch_geometric")
        return pyg_rgat
    if provider in ("triton_atomic", "triton_deterministic"):
        from diffkg_fast.kernels import attention as kernels

        # The op's CUDA backward looks kernels.rgat_backward up at each call (default "csr").
        kw = {"tails": "atomic"} if provider == "triton_atomic" else {"deterministic": True}
        monkeypatch.setattr(kernels, "rgat_backward",
                            functools.partial(kernels.rgat_backward, **kw))
    backend = {"reference": "reference", "cpu_kernel": "cpu"}.get(provider, "triton")
    return functools.partial(rgat_aggregate, backend=backend)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _bytes(kg: KGCSR, pass_: str) -> int:
    nd = kg.n_entities * D * 4
    csr = 8 * (kg.n_entities + 1) + 16 * kg.n_edges
    fwd = 2 * nd + csr
    bwd = 4 * nd + 2 * csr + 8 * kg.n_edges
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[pass_]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rgat(benchmark, monkeypatch, shape: str, pass_: str, provider: str) -> None:
    if provider == "triton_deterministic" and pass_ == "fwd":
        pytest.skip("the forward has no deterministic variant: it is the triton row")
    ensure_ops()  # the one-time build of the extension is not timed
    layer = _layer(provider, monkeypatch)
    kg = kg_graph(shape)
    kg.by_tail, kg.by_relation  # noqa: B018 (built once per graph, as in training)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    E = torch.randn(kg.n_entities, D, device=DEVICE, generator=gen).requires_grad_()
    Rel = torch.randn(kg.n_relations, D, device=DEVICE, generator=gen).requires_grad_()
    W = (torch.randn(2 * D, D, device=DEVICE, generator=gen) / D**0.5).requires_grad_()
    kw = {"dropout": 0.1, "training": True, "normalize": True}

    def forward():
        return layer(E, Rel, W, kg, generator=torch.Generator(DEVICE).manual_seed(1), **kw)

    benchmark.group = f"rgat-{shape}-{pass_}"
    benchmark.extra_info.update(entities=kg.n_entities, edges=kg.n_edges, d=D, device=DEVICE,
                                bytes=_bytes(kg, pass_), threads=torch.get_num_threads())
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                forward()
            _sync()
        setup = None
    elif pass_ == "fwdbwd":
        def run():
            forward().sum().backward()
            _sync()
        setup = None
    else:
        def setup():
            out = forward()
            _sync()
            return (out,), {}

        def run(out):
            out.sum().backward()
            _sync()
    if CUDA:
        # Peak memory of one pass above what is held before it (inputs, saved tensors).
        args = setup()[0] if setup else ()
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(*args)
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        del args
    benchmark.pedantic(run, setup=setup, rounds=10 if CUDA else 3, iterations=1,
                       warmup_rounds=1)
    E.grad = Rel.grad = W.grad = None
