"""The denoised KG's quality measures and the denoiser's passes per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffkg_fast.model.diffkg.diffusion as diffusion_mod
import diffkg_fast.model.diffkg.quality as quality_mod
from diffkg_fast.data.build import build_dataset
from diffkg_fast.model.diffkg.quality import KGQuality
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.train import make_config, train


def _graph() -> KGCSR:
    rng = np.random.default_rng(0)
    kg = np.stack([rng.integers(0, 40, 300), rng.integers(0, 3, 300), rng.integers(0, 40, 300)], 1)
    return KGCSR.from_kg(kg, 40, 3)


def test_precision_is_the_share_of_picks_that_are_edges() -> None:
    g = _graph()
    q = KGQuality(g, seed=1)
    edges = set(zip(g.row.tolist(), g.col.tolist(), strict=True))
    rows = torch.arange(40)
    picks = torch.randint(0, 40, (40, 3), generator=torch.Generator().manual_seed(2))
    want = np.mean([(int(r), int(c)) in edges for r in rows for c in picks[r]])
    assert q.precision(rows, picks) == pytest.approx(want)


def test_mask_recovery_against_a_literal_count(monkeypatch) -> None:
    g = _graph()
    q = KGQuality(g, seed=1, n_rows=25)
    assert len(q.rows) == 25 and len(set(q.rows.tolist())) == 25
    for r, h in zip(q.rows.tolist(), q.hidden.tolist(), strict=True):  # a real edge of its row
        assert h in g.col[g.rowptr[r]:g.rowptr[r + 1]].tolist()
    # A denoiser that puts the hidden edge first for the even rows and last for the odd ones.
    scores = torch.rand(25, 40, generator=torch.Generator().manual_seed(3))
    scores[torch.arange(25), q.hidden] = torch.where(torch.arange(25) % 2 == 0, 9.0, -9.0)
    monkeypatch.setattr(quality_mod, "sample", lambda *a, **k: scores.clone())
    out = q.mask_recovery(denoiser=torch.nn.Identity(), schedule=None, sampling_steps=0)
    assert out["mask_recovery@10"] == pytest.approx(13 / 25)
    # The baseline: in-degree order, visible edges excluded, written out row by row.
    indeg = np.bincount(g.col.numpy(), minlength=40)
    hits = 0
    for r, h in zip(q.rows.tolist(), q.hidden.tolist(), strict=True):
        visible = set(g.col[g.rowptr[r]:g.rowptr[r + 1]].tolist()) - {h}
        order = [c for c in np.argsort(-indeg, kind="stable") if c not in visible]
        hits += h in order[:10]
    assert out["mask_recovery_popularity@10"] == pytest.approx(hits / 25)


def test_mask_recovery_in_blocks_is_the_one_block_value(monkeypatch) -> None:
    """Rows in blocks (a large KG's memory bound) measure what one block does."""
    g = _graph()
    q = KGQuality(g, seed=1, n_rows=25)
    mix = torch.rand(40, 40, generator=torch.Generator().manual_seed(4))
    calls: list[int] = []

    def rowwise(denoiser, x, *a, **k):  # each row's scores from that row alone
        calls.append(x.shape[0])
        return x @ mix

    monkeypatch.setattr(quality_mod, "sample", rowwise)
    whole = q.mask_recovery(denoiser=torch.nn.Identity(), schedule=None, sampling_steps=0)
    assert calls == [25]
    monkeypatch.setattr(quality_mod, "BLOCK_ELEMENTS", 4 * 40)
    blocks = q.mask_recovery(denoiser=torch.nn.Identity(), schedule=None, sampling_steps=0)
    assert calls[1:] == [4] * 6 + [1]
    assert blocks == whole and 0 < whole["mask_recovery@10"] < 1


def test_diffusion_passes_multiply_the_denoiser_steps(monkeypatch) -> None:
    ds = build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30, seed=0)
    calls: list[int] = []
    real = diffusion_mod.diffusion_loss

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(diffusion_mod, "diffusion_loss", counting)
    base = {"epoch": 1, "latdim": 8, "dims": [16], "batch": 64, "seed": 1}
    one = train(ds, make_config(**base), log=lambda _: None)
    n_one = len(calls)
    three = train(ds, make_config(**base, diffusion_passes=3), log=lambda _: None)
    assert n_one == -(-ds.n_entities // 64) and len(calls) - n_one == 3 * n_one
    assert one.history[0]["loss"] != three.history[0]["loss"]
    info = one.history[0]["info"]
    assert 0.0 <= info["rebuild_precision"] <= 1.0 and "mask_recovery@10" in info
