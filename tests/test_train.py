"""The trainer: epoch order, the denoised KG reaching the recommender, selection, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import diffkg_fast.model.diffkg.encoder as encoder_mod
import diffkg_fast.train.evaluation as evaluation_mod
from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.factored import FactoredScores
from diffkg_fast.eval.ranking import ranking_metrics
from diffkg_fast.model import MODELS, EmbeddingRecommender, EpochReport, bpr_loss
from diffkg_fast.model.registry import register_model
from diffkg_fast.ops.diffusion import Denoiser
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.train import train
from diffkg_fast.train.config import RunConfig, config_defaults, make_config
from diffkg_fast.train.sampling import interactions, sample_negatives
from diffkg_fast.train.selection import SelectionError


@pytest.fixture(scope="module")
def ds():
    # A small vocabulary too (563 entities): the full one (3,573) made this file take 80 s+.
    return build_dataset("synthetic", n_patients=400, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw) -> RunConfig:
    base = {"epoch": 2, "latdim": 16, "dims": [64], "seed": 3}
    base.update(kw)
    keys = config_defaults(base.get("model", "diffkg"))
    return make_config(**{k: v for k, v in base.items() if k in keys})


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------- negative sampling
def _dense_toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    rng = np.random.default_rng(0)
    n_users, n_items = 200, 10
    dense = rng.random((n_users, n_items)) < 0.8
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = False  # >= 1 negative each
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] |= ~dense.any(1)
    m = sp.csr_matrix(dense.astype(np.float32))
    users, items, keys = interactions(m)
    return users, items, keys, n_items


def test_negatives_never_positive_and_reproducible() -> None:
    users, _, keys, n_items = _dense_toy()
    users = users.repeat(20)  # many draws per user, at 80 % density
    a = sample_negatives(users, keys, n_items, torch.Generator().manual_seed(5))
    b = sample_negatives(users, keys, n_items, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < n_items)).all()
    drawn = users * n_items + a
    assert not torch.isin(drawn, keys).any()
    c = sample_negatives(users, keys, n_items, torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)


def test_negatives_reject_a_user_with_every_item() -> None:
    m = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    users, _, keys = interactions(m)
    with pytest.raises(ValueError, match="every item"):
        sample_negatives(users, keys, 3)


# --------------------------------------------------------------------- the denoised KG
def test_training_sees_the_denoised_kg(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[KGCSR, bool]] = []
    real = encoder_mod.rgat_forward

    def recording(E, Rel, W, kg, *args, **kw):
        seen.append((kg, torch.is_grad_enabled() and kw.get("training", False)))
        return real(E, Rel, W, kg, *args, **kw)

    monkeypatch.setattr(encoder_mod, "rgat_forward", recording)
    # keepRate 1 and rebuild_k 5 so that the denoised KG is visibly non-trivial.
    res = train(ds, _cfg(keepRate=1.0, rebuild_k=5), log=_quiet)
    full = KGCSR.from_kg(ds.kg, ds.n_entities, ds.n_relations)
    full_keys = set(map(tuple, full.to_triplets().tolist()))
    training_kgs = [kg for kg, tr in seen if tr]
    steps = -(-ds.train.nnz // 1024)
    assert len(training_kgs) == 2 * 2 * steps  # two graph forwards per step, two epochs
    # cl_pattern 0: every step's first forward (view 1, the BPR one) is that epoch's denoised KG.
    views1 = training_kgs[0::2]
    for epoch in range(2):
        kgs = {id(k) for k in views1[epoch * steps:(epoch + 1) * steps]}
        assert len(kgs) == 1
        kg = views1[epoch * steps]
        assert kg.n_edges == res.history[epoch]["info"]["kg_edges"] > 0
        assert set(map(tuple, kg.to_triplets().tolist())) <= full_keys  # a subset, same rels
    assert views1[0] is not views1[steps]  # a new KG every epoch
    originals = {id(k) for k in training_kgs[1::2]}
    assert len(originals) == 1 and training_kgs[1].n_edges != views1[0].n_edges
    # The best epoch's KG scores the test (restored from its saved state: edge for edge).
    best_kg = views1[res.best_epoch * steps]
    assert (res.model.views()[0].to_triplets() == best_kg.to_triplets()).all()
    h = res.history[0]
    assert h["time"]["diffusion"] > 0 and h["time"]["rebuild"] > 0
    assert all(np.isfinite(v) for v in h["loss"].values())


def test_ablation_never_calls_the_denoiser(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kw):
        raise AssertionError("the denoiser ran in the diffusion-free ablation")

    monkeypatch.setattr(Denoiser, "__init__", boom)
    monkeypatch.setattr(Denoiser, "forward", boom)
    res = train(ds, _cfg(use_diffusion=False), log=_quiet)
    assert res.model.diffusion is None
    assert all(h["time"]["diffusion"] == 0 and h["time"]["rebuild"] == 0 for h in res.history)
    full = KGCSR.from_kg(ds.kg, ds.n_entities, ds.n_relations)
    sampled = np.minimum(full.degree.numpy(), 10).sum()
    assert res.history[0]["info"]["kg_edges"] == sampled  # the original, sampled KG


def test_same_seed_same_metrics(ds) -> None:
    a = train(ds, _cfg(), log=_quiet)
    b = train(ds, _cfg(), log=_quiet)
    assert a.test == b.test and a.val == b.val
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["info"] for h in a.history] == [h["info"] for h in b.history]
    c = train(ds, _cfg(seed=4), log=_quiet)
    assert [h["loss"] for h in c.history] != [h["loss"] for h in a.history]


# --------------------------------------------------------------------- selection
def test_early_stopping_keeps_best_val_epoch_and_tests_once(
        ds, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])  # best at epoch 1, patience 2 → stop at 3
    calls: list[tuple[str, torch.Tensor]] = []

    def fake(score_fn, users, target, exclude=(), **kw):
        s = score_fn(torch.arange(3))
        s = (s.dense() if isinstance(s, FactoredScores) else s).clone()
        if target is ds.test:
            assert len(exclude) == 2  # train and valid excluded at test time
            calls.append(("test", s))
            return {"recall@20": -1.0, "ndcg@20": -1.0}
        assert target is ds.valid and len(exclude) == 1
        calls.append(("val", s))
        return {"recall@20": next(scripted), "ndcg@20": 0.0}

    monkeypatch.setattr(evaluation_mod, "ranking_metrics", fake)
    res = train(ds, _cfg(model="lightgcn", epoch=6, patience=2), log=_quiet)
    assert len(res.history) == 4 and res.best_epoch == 1
    assert res.val["recall@20"] == 0.3
    kinds = [k for k, _ in calls]
    assert kinds == ["val"] * 4 + ["test"]  # test once, at the end
    assert torch.equal(calls[-1][1], calls[1][1])  # tested with the best epoch's state
    assert not torch.equal(calls[-1][1], calls[3][1])


def test_mostpop_through_the_trainer(ds) -> None:
    res = train(ds, _cfg(model="mostpop"), log=_quiet)
    pop = torch.from_numpy(np.asarray(ds.train.sum(axis=0), dtype=np.float32).ravel())
    want = ranking_metrics(lambda u: pop.expand(len(u), -1), None, ds.test,
                           exclude=[ds.train, ds.valid])
    assert res.test == want and res.best_epoch == 0


def test_lightgcn_trains_and_improves_validation(ds) -> None:
    res = train(ds, _cfg(model="lightgcn", epoch=3, lr=1e-2), log=_quiet)
    losses = [h["loss"]["bpr"] for h in res.history]
    assert losses[-1] < losses[0]
    assert res.history[-1]["val"]["recall@20"] > res.history[0]["val"]["recall@20"]


# --------------------------------------------------------------------- fused diffusion ops
DIFFUSION_OPS = ("diffusion_loss", "diffusion_sample", "diffusion_sample_topk")


def test_fused_diffusion_trains_like_the_reference(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch with the fused diffusion ops ("auto") and one with the reference ops: the same
    losses up to float32 re-association (same masks, same draws)."""
    from diffkg_fast.ops import backend as backend_mod

    fused = train(ds, _cfg(epoch=1), log=_quiet)
    for op in DIFFUSION_OPS:
        monkeypatch.setitem(backend_mod._AUTO_IF, (op, "cpu"), lambda: False)
    assert backend_mod.resolve("diffusion_loss", "auto", "cpu").__name__.endswith("reference")
    ref = train(ds, _cfg(epoch=1), log=_quiet)
    for key, want in ref.history[0]["loss"].items():
        assert fused.history[0]["loss"][key] == pytest.approx(want, rel=1e-5, abs=1e-7), key
    # The same denoised KG (measured: equal losses to ~1e-7, the same 3 edges kept).
    assert fused.history[0]["info"] == ref.history[0]["info"]


def test_diffusion_precision_option(ds) -> None:
    res = train(ds, _cfg(epoch=1, diffusion_precision="bf16"), log=_quiet)
    assert np.isfinite(res.history[0]["loss"]["diff"]) and res.history[0]["info"]["kg_edges"] > 0
    with pytest.raises(ValueError, match="diffusion_precision"):
        _cfg(diffusion_precision="fp16")


# --------------------------------------------------------------------- the interface
class _Toy(EmbeddingRecommender):
    """A minimal model written against the interface alone: free tables, BPR."""

    name = "toy_for_tests"
    phases = ("warmup",)

    def __init__(self, n_users, n_items, *, latdim: int = 4, seed: int = 0,
                 device: str = "cpu") -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        g = torch.Generator().manual_seed(seed)
        self.user = torch.nn.Parameter(torch.randn(n_users, latdim, generator=g) * 0.1)
        self.item = torch.nn.Parameter(torch.randn(n_items, latdim, generator=g) * 0.1)
        self.calls = {"epoch_start": [], "forward": 0}

    @classmethod
    def from_dataset(cls, ds, **options):
        return cls(ds.n_users, ds.n_items, **options)

    def on_epoch_start(self, epoch, limit_batches=None):
        self.calls["epoch_start"].append(epoch)
        return EpochReport({"warm": 1.0}, {"warmup": 0.0}, {"note": epoch})

    def forward(self, batch):
        self.calls["forward"] += 1
        u, p, n = self.user[batch.users], self.item[batch.pos], self.item[batch.neg]
        loss = bpr_loss(u, p, n)
        return loss, {"bpr": loss.detach()}

    def _eval_outputs(self):
        return self.user, self.item


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(MODELS, _Toy.name, _Toy)
    return _Toy


def test_the_trainer_drives_any_registered_model(ds, toy_registered) -> None:
    cfg = make_config(model=_Toy.name, epoch=3, latdim=8, lr=0.05, batch=512, seed=2)
    res = train(ds, cfg, log=_quiet)
    model = res.model
    assert isinstance(model, _Toy) and model.calls["epoch_start"] == [0, 1, 2]
    assert model.calls["forward"] == 3 * -(-ds.train.nnz // 512)  # every step through forward
    h = res.history[-1]
    assert set(h["time"]) == {"warmup", "recommender", "evaluation"}
    assert h["info"] == {"note": 2} and h["loss"]["warm"] == 1.0 and "bpr" in h["loss"]
    assert res.history[-1]["val"]["recall@20"] > res.history[0]["val"]["recall@20"]
    with pytest.raises(DataError, match="unknown config key"):
        make_config(model=_Toy.name, dims=[8])  # a DiffKG option: not this model's


def test_register_model_refuses_a_second_model_of_the_same_name(toy_registered) -> None:
    class Other(_Toy):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_model(Other)
    assert register_model(_Toy) is _Toy  # the same class again is fine


def test_an_empty_validation_split_is_an_error_before_training(monkeypatch) -> None:
    ds = build_dataset("synthetic", n_patients=120, n_diag=80, n_proc=40, n_med=20, seed=1)
    ds.valid = sp.csr_matrix(ds.valid.shape, dtype=ds.valid.dtype)
    with pytest.raises(SelectionError, match="empty validation split"):
        train(ds, _cfg(model="lightgcn"), log=_quiet)


def test_a_nan_validation_metric_cannot_select(ds, monkeypatch) -> None:
    monkeypatch.setattr(evaluation_mod, "ranking_metrics",
                        lambda *a, **k: {"recall@20": float("nan"), "n_users": 0})
    with pytest.raises(SelectionError, match="recall@20 of epoch 0 is nan"):
        train(ds, _cfg(model="lightgcn", epoch=1), log=_quiet)


def test_eval_every_validates_the_chosen_epochs_and_the_last(ds) -> None:
    res = train(ds, _cfg(model="lightgcn", epoch=5, eval_every=2), log=_quiet)
    assert [bool(h["val"]) for h in res.history] == [True, False, True, False, True]
    assert res.best_epoch in (0, 2, 4)


def test_valid_metric_ndcg_selects_on_ndcg(ds) -> None:
    res = train(ds, _cfg(model="lightgcn", epoch=4, lr=1e-2, valid_metric="ndcg", topk=10),
                log=_quiet)
    ndcg = [h["val"]["ndcg@10"] for h in res.history]
    assert res.best_epoch == int(np.argmax(ndcg))
    with pytest.raises(DataError, match="valid_metric"):
        _cfg(valid_metric="mrr")
