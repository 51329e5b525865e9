"""SafeDrug's controllable DDI loss (model/ddi_loss.py): a literal computation on a toy DDI
graph, the switch, and the option on DiffKG and LightGCN (training, bad input)."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.model import DiffKG, LightGCN
from diffkg_fast.model.ddi_loss import DDILoss, set_size_of
from diffkg_fast.train import make_config, train

# Five medications; 0-1, 2-3 and 1-4 interact.
PAIRS = np.array([[0, 1], [2, 3], [1, 4]])
SCORES = [[3.0, 2.0, 1.0, 0.0, -1.0],   # top 3 {0, 1, 2}: 0-1 interacts: 1 of 3 pairs
          [1.5, 0.0, 3.0, 1.0, 2.5]]    # top 3 {2, 4, 0}: no pair interacts
OWNER = [0, 1, 0]                        # three BPR triples: patient 0 twice, patient 1 once
REC = [0.7, 0.4, 0.9]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_controlled_loss_by_hand() -> None:
    """Every number of the loss from its definition, one pair and one patient at a time."""
    loss_fn = DDILoss(PAIRS, 5, 3, target_ddi=0.3, kp=0.1, ddi_scale=0.01)
    scores = torch.tensor(SCORES, dtype=torch.float64, requires_grad=True)
    rec = torch.tensor(REC, dtype=torch.float64, requires_grad=True)
    loss, parts = loss_fn(rec, torch.tensor(OWNER), scores)
    # Set boundaries: midway between the 3rd and 4th best scores.
    tau = [(1.0 + 0.0) / 2, (1.5 + 1.0) / 2]
    p = [[_sigmoid(s - t) for s in row] for row, t in zip(SCORES, tau, strict=True)]
    # Σ_i Σ_j A_ij p_i p_j counts each interacting pair twice (SafeDrug's batch_neg).
    penalty = [sum(2 * pr[a] * pr[b] for a, b in PAIRS) for pr in p]
    rate = [1 / 3, 0.0]
    beta = [max(0.0, 1 - (rate[0] - 0.3) / 0.1), 1.0]  # patient 0 over the target: 2/3
    assert beta[0] == pytest.approx(2 / 3)
    assert parts["ddi_rate"].item() == pytest.approx(np.mean(rate))  # pooled: 1 of 6 pairs
    assert parts["ddi_beta"].item() == pytest.approx(np.mean(beta))
    assert parts["ddi"].item() == pytest.approx(np.mean(penalty))
    want = (np.mean([beta[u] * r for u, r in zip(OWNER, REC, strict=True)])
            + np.mean([(1 - b) * 0.01 * pen for b, pen in zip(beta, penalty, strict=True)]))
    assert loss.item() == pytest.approx(want)
    # Gradients: each triple weighs β of its patient; the boundary is a constant, so
    # d/ds_ui = (1 - β_u) c / U · 2 Σ_j A_ij p_uj · p_ui (1 - p_ui).
    loss.backward()
    assert rec.grad.tolist() == pytest.approx([beta[u] / 3 for u in OWNER])
    adj = np.zeros((5, 5))
    adj[PAIRS[:, 0], PAIRS[:, 1]] = adj[PAIRS[:, 1], PAIRS[:, 0]] = 1
    for u in range(2):
        for i in range(5):
            want = ((1 - beta[u]) * 0.01 / 2 * 2 * sum(adj[i, j] * p[u][j] for j in range(5))
                    * p[u][i] * (1 - p[u][i]))
            assert scores.grad[u, i].item() == pytest.approx(want, abs=1e-15), (u, i)


@pytest.mark.parametrize(("rate", "beta"), [(0.0, 1.0), (0.06, 1.0), (0.085, 0.5), (0.11, 0.0),
                                            (0.5, 0.0)])
def test_switch_is_safedrugs_with_max(rate: float, beta: float) -> None:
    """β = 1 up to the target, then 1 - (rate - target)/kp, floored at 0 (SafeDrug's script
    has min(0, …): rate 0.5 would give β = -7.8)."""
    got = DDILoss(PAIRS, 5, 3, target_ddi=0.06, kp=0.05, ddi_scale=5e-4).beta(
        torch.tensor([rate], dtype=torch.float64))
    assert got.item() == pytest.approx(beta)


def test_under_the_target_the_loss_is_the_mean_recommendation_loss() -> None:
    loss_fn = DDILoss(PAIRS, 5, 3, target_ddi=0.5, kp=0.05, ddi_scale=5e-4)
    rec = torch.tensor(REC)
    loss, parts = loss_fn(rec, torch.tensor(OWNER), torch.tensor(SCORES))
    assert parts["ddi_beta"].item() == 1.0 and loss.item() == rec.mean().item()


# ------------------------------------------------------------------ on the models
@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30,
                         split="visit")


@pytest.fixture(scope="module")
def tiny_without_ddi():
    return build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30,
                         split="visit", ddi=False)


def _run(ds, **opts):
    extra = {} if opts.get("model") == "lightgcn" else {"dims": [16]}
    cfg = make_config(epoch=1, latdim=8, seed=1, **extra, **opts)
    return train(ds, cfg, log=lambda _: None)


def test_target_one_trains_exactly_as_without_the_loss(tiny) -> None:
    """β = 1 in every batch (no rate exceeds 1): the same bits as DiffKG without the option;
    a target of 0 switches the penalty on and changes training."""
    plain = _run(tiny)
    same = _run(tiny, ddi_loss=True, target_ddi=1.0)
    assert same.history[0]["loss"]["ddi_beta"] == 1.0
    assert same.history[0]["loss"]["total"] == plain.history[0]["loss"]["total"]
    assert same.test == plain.test
    on = _run(tiny, ddi_loss=True, target_ddi=0.0, ddi_scale=0.05)
    assert on.history[0]["loss"]["ddi_beta"] < 1.0
    assert on.history[0]["loss"]["total"] != plain.history[0]["loss"]["total"]
    assert {"ddi", "ddi_rate", "code_ddi", "code_ddi_rate"} <= set(on.history[0]["loss"])


def test_lightgcn_takes_the_option() -> None:
    # The interaction split: LightGCN cannot score the visit split's held-out patients.
    ds = build_dataset("synthetic", n_patients=150, n_diag=100, n_proc=50, n_med=30)
    plain = _run(ds, model="lightgcn")
    on = _run(ds, model="lightgcn", ddi_loss=True, target_ddi=0.0, ddi_scale=0.05)
    assert on.history[0]["loss"]["ddi_beta"] < 1.0
    assert on.history[0]["loss"]["total"] != plain.history[0]["loss"]["total"]


@pytest.mark.parametrize("cls", [DiffKG, LightGCN])
def test_a_dataset_without_ddi_pairs_is_refused(cls, tiny_without_ddi) -> None:
    with pytest.raises(DataError, match="field 'ddi_loss': needs the KG's 'ddi' relation, and "
                                        "dataset 'synthetic' has an empty one"):
        cls.from_dataset(tiny_without_ddi, ddi_loss=True)
    cls.from_dataset(tiny_without_ddi)  # without the option: fine


def test_cli_refuses_ddi_loss_without_ddi(tiny_without_ddi, tmp_path, capsys) -> None:
    data = tmp_path / "noddi.npz"
    tiny_without_ddi.save(data)
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--data", str(data), "--ddi_loss", "true", "--epoch", "1",
                     "--no-progress", "--no-plot"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: field 'ddi_loss': needs the KG's 'ddi'")


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("target_ddi", 1.5, "target_ddi must be in [0, 1]"),
    ("kp", 0.0, "kp must be > 0"),
    ("ddi_scale", -1.0, "ddi_scale must be >= 0"),
])
def test_bad_ddi_options_are_refused(key: str, value: float, needle: str) -> None:
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        make_config(**{key: value})
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        make_config(model="lightgcn", **{key: value})


def test_set_size_is_the_mean_training_visit_size(tiny) -> None:
    v = tiny.visits
    sizes = np.diff(v.med_ptr)[np.asarray(v.split) == 0]
    assert set_size_of(tiny) == int(np.floor(sizes.mean() + 0.5))
