"""``max_epoch_steps``: an epoch of at most that many steps, every training row still once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.model.diffkg import DiffKG
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config
from diffkg_fast.train.sampling import PairSampler, UserSampler
from diffkg_fast.train.trainer import batch_lr
from diffkg_fast.utils.epoch_batch import epoch_batch

BATCH = 128


@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=150, n_diag=300, n_proc=150, n_med=60, seed=0)


@given(rows=st.integers(1, 10**7), batch=st.integers(1, 10**5), steps=st.integers(0, 10**4))
def test_epoch_batch_is_the_smallest_that_fits(rows: int, batch: int, steps: int) -> None:
    b = epoch_batch(rows, batch, steps)
    assert b >= batch  # never shrinks
    if steps == 0:
        assert b == batch
        return
    assert -(-rows // b) <= steps  # at most `steps` steps cover every row
    if b > batch:  # grown: one row fewer a batch would need more steps
        assert -(-rows // (b - 1)) > steps


def test_epoch_batch_literal() -> None:
    assert epoch_batch(1000, 64, 0) == 64
    assert epoch_batch(1000, 64, 10) == 100
    assert epoch_batch(1001, 64, 10) == 101  # 10 steps: 9 of 101 and one of 92
    assert epoch_batch(1000, 256, 10) == 256  # 4 steps already: unchanged


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_pair_sampler_visits_every_interaction_once(ds, steps: int) -> None:
    s = PairSampler(ds.train, BATCH, seed=5, max_epoch_steps=steps)
    batches = list(s.batches(s.negatives()))
    assert len(batches) == len(s) <= steps
    keys = torch.cat([b.users * ds.n_items + b.pos for b in batches])
    assert keys.numel() == ds.train.nnz
    assert torch.equal(keys.sort().values, s.keys)


def test_user_sampler_grows_alike(ds) -> None:
    s = UserSampler(ds.train, 16, seed=5, max_epoch_steps=2)
    batches = list(s.batches())
    assert len(batches) == 2
    assert torch.equal(torch.cat([b.users for b in batches]).sort().values, s.users)


def _cfg(**kw):
    return make_config(**{"epoch": 1, "latdim": 8, "dims": [32], "seed": 3, "batch": BATCH,
                          **kw})


def test_train_takes_at_most_that_many_steps(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = DiffKG.forward

    def forward(self, batch):
        sizes.append(batch.users.numel())
        return real(self, batch)

    monkeypatch.setattr(DiffKG, "forward", forward)
    lines: list[str] = []
    train(ds, _cfg(max_epoch_steps=3), log=lines.append)
    assert len(sizes) == 3 and sum(sizes) == ds.train.nnz
    assert sizes[0] == epoch_batch(int(ds.train.nnz), BATCH, 3) > BATCH
    assert any(f"training batch {sizes[0]:,}" in line and "3 steps an epoch" in line
               for line in lines)


def test_a_bound_that_does_not_bind_changes_nothing(ds) -> None:
    """``max_epoch_steps`` at or above ``rows / batch`` is the default run, bit for bit."""
    steps = -(-int(ds.train.nnz) // BATCH)
    a = train(ds, _cfg(), log=lambda _: None)
    b = train(ds, _cfg(max_epoch_steps=steps), log=lambda _: None)
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(),
                                 strict=True):
        assert torch.equal(x, y), name
    assert a.history[0]["loss"] == b.history[0]["loss"]


def test_negative_bound_is_refused_naming_the_key() -> None:
    with pytest.raises(DataError, match="max_epoch_steps"):
        make_config(max_epoch_steps=-1)


def test_memory_estimate_counts_the_grown_batch(ds) -> None:
    def logits(**kw) -> int:
        terms = DiffKG.memory_estimate(ds, _cfg(**kw))
        return next(t.bytes for t in terms if "contrastive" in t.what)

    grown = epoch_batch(int(ds.train.nnz), BATCH, 2)
    assert logits(max_epoch_steps=2) == logits() * grown // BATCH


@pytest.mark.parametrize("scaling", ["none", "sqrt"])
def test_batch_lr_under_each_rule(ds, scaling: str) -> None:
    cfg = _cfg(max_epoch_steps=2, batch_lr_scaling=scaling, lr=0.002).train
    s = PairSampler(ds.train, BATCH, seed=5, max_epoch_steps=2)
    grown = s.batch / BATCH
    assert grown > 4
    want = 0.002 * (grown ** 0.5 if scaling == "sqrt" else 1.0)
    assert batch_lr(cfg, s) == pytest.approx(want, rel=1e-12)
    # where the bound does not bind, both rules give lr
    assert batch_lr(cfg, PairSampler(ds.train, BATCH, seed=5)) == 0.002


def test_train_steps_at_the_scaled_lr(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    real = DiffKG.configure_optimizer

    def configure(self, lr):
        seen.append(lr)
        return real(self, lr)

    monkeypatch.setattr(DiffKG, "configure_optimizer", configure)
    lines: list[str] = []
    train(ds, _cfg(max_epoch_steps=2, batch_lr_scaling="sqrt"), log=lines.append)
    grown = epoch_batch(int(ds.train.nnz), BATCH, 2)
    assert seen == [pytest.approx(1e-3 * (grown / BATCH) ** 0.5, rel=1e-12)]
    assert any(f"learning rate {seen[0]:g}" in line for line in lines)


def test_unknown_lr_rule_is_refused_naming_the_key() -> None:
    with pytest.raises(DataError, match="batch_lr_scaling"):
        make_config(batch_lr_scaling="linear")
