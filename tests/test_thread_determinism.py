"""Same seed, same thread count, same bits (issue 20 §4): at two CPU threads, two training runs
and a run interrupted then resumed end bitwise equal, weights and metrics.

The cause was ``table[index]`` in the losses: its backward, ``index_put_(accumulate=True)``,
adds a repeated index's rows with atomic float adds once the gradient has 32,768 elements
(batch × latdim), in an order set by the threads' timing. :func:`~diffkg_fast.ops.rows.rows`
replaces it. The suite itself runs at one thread (conftest.py), where that op is serial: these
tests set two threads themselves.
"""

from __future__ import annotations

import pytest
import torch
from trainer_checks import same_state

from diffkg_fast.data.build import build_dataset
from diffkg_fast.ops.attention import rgat_aggregate
from diffkg_fast.ops.rows import rows
from diffkg_fast.train import train
from diffkg_fast.train.config import config_defaults, make_config

from helpers import make_graph, tables


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)



# ------------------------------------------------------------------------------ the op
def _lookups(lookup, n_rows: int, n_idx: int, d: int, times: int):
    """Forward and table gradient of ``lookup``, called ``times`` times on the same inputs."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(n_rows, d, generator=g)
    index = torch.randint(0, n_rows, (n_idx,), generator=g)
    grad = torch.randn(n_idx, d, generator=g)
    out = []
    for _ in range(times):
        t = table.clone().requires_grad_()
        y = lookup(t, index)
        y.backward(grad)
        out.append((y.detach(), t.grad))
    return out


# Few rows, long index: both threads add into the same rows all along, so the atomic adds of
# table[index] interleave (measured at two threads on a busy 2-core machine: 20-90 % of calls
# differ from the first). The training-like shape (a 1,024 × 64 batch) differs more rarely
# per call, but over an epoch's steps always (the training test below).
@pytest.mark.parametrize(("n_rows", "n_idx", "d"), [(4, 1 << 18, 1), (8, 1 << 16, 1),
                                                    (1000, 1024, 64)])
def test_rows_backward_same_bits_at_two_threads(two_threads, n_rows, n_idx, d) -> None:
    runs = _lookups(rows, n_rows, n_idx, d, times=20)
    for y, g in runs[1:]:
        assert torch.equal(y, runs[0][0])
        assert torch.equal(g, runs[0][1])
    # Each row's gradient is summed in index order whatever the thread count: one thread's bits.
    torch.set_num_threads(1)
    (y1, g1), = _lookups(rows, n_rows, n_idx, d, times=1)
    assert torch.equal(y1, runs[0][0]) and torch.equal(g1, runs[0][1])


def test_rows_matches_indexing(two_threads) -> None:
    """Forward: the same rows; backward: the same sums up to their order."""
    (y, g), = _lookups(rows, 300, 4096, 16, times=1)
    (y_ref, g_ref), = _lookups(lambda t, i: t[i], 300, 4096, 16, times=1)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    t = torch.randn(7, 3, requires_grad=True)
    idx = torch.tensor([[0, 6], [6, 6]])  # any index shape, as t[idx]
    assert torch.equal(rows(t, idx), t[idx])
    torch.autograd.gradcheck(lambda x: rows(x, idx), t.double().detach().requires_grad_())


# The attention layer's gathers (E[row], p1[rel], ...): the reference, which "auto" runs where
# the extension cannot be built, and "auto" itself (the C++ kernel here: per-thread dRel
# buffers added in thread order). 8 relation rows gathered ~160,000 times: heavy collisions.
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_attention_same_bits_at_two_threads(two_threads, backend) -> None:
    g = make_graph(4000, 4, 80000, seed=1)
    base = tables(g, 16, dtype=torch.float32)
    gy = torch.randn(g.n_entities, 16, generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(5):
        E, Rel, W = (x.clone().requires_grad_() for x in base)
        y = rgat_aggregate(E, Rel, W, g, backend=backend)
        runs.append((y.detach(), *torch.autograd.grad(y, (E, Rel, W), gy)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def ds():
    # 2,242 interactions: 5 batches an epoch.
    return build_dataset("synthetic", n_patients=120, n_diag=300, n_proc=150, n_med=60, seed=0)


class Crash(Exception):
    """Stands for a killed process: raised from the log callback before epoch 1's checkpoint."""


def _crash_at_epoch_1(line: str) -> None:
    if line.startswith("epoch 1 "):
        raise Crash


def _quiet(_: str) -> None:
    pass


def _metrics(res) -> list:
    """What a run reports, less the wall-clock seconds of each phase."""
    hist = [{k: v for k, v in h.items() if k != "time"} for h in res.history]
    return [hist, res.val, res.test, res.best_epoch]


# batch × latdim = 512 × 64 = 32,768: the size where the indexing backward turned parallel.
@pytest.mark.parametrize("model", ["diffkg", "lightgcn"])
def test_two_runs_and_a_resumed_run_same_bits_at_two_threads(two_threads, ds, tmp_path,
                                                            model) -> None:
    base = {"model": model, "epoch": 2, "latdim": 64, "dims": [64], "batch": 512, "seed": 3}
    cfg = make_config(**{k: v for k, v in base.items() if k in config_defaults(model)})
    runs = [train(ds, cfg, log=_quiet) for _ in range(2)]
    with pytest.raises(Crash):
        train(ds, cfg, log=_crash_at_epoch_1, out_dir=tmp_path)
    runs.append(train(ds, cfg, log=_quiet, out_dir=tmp_path, resume=True))
    want = runs[0].model.state_dict()
    for got in runs[1:]:
        state = got.model.state_dict()
        assert state.keys() == want.keys()
        for k in want:
            assert same_state(want[k], state[k]), k
        assert _metrics(got) == _metrics(runs[0])
