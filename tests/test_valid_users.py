"""``valid_users``: validation on a fixed uniform sample of users; the test ranking complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.eval.ranking import ranking_metrics
from diffkg_fast.train import train
from diffkg_fast.train.config import make_config
from diffkg_fast.train.evaluation import evaluate_split
from diffkg_fast.train.trainer import validation_users


@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=150, n_diag=300, n_proc=150, n_med=60, seed=0)


def _cfg(**kw):
    return make_config(**{"epoch": 1, "latdim": 8, "dims": [32], "seed": 3, "batch": 128, **kw})


def _with_target(ds) -> np.ndarray:
    return np.flatnonzero(ds.valid.getnnz(axis=1) > 0)


def test_the_sample_is_fixed_by_the_seed(ds) -> None:
    everyone = _with_target(ds)
    assert validation_users(ds, _cfg().train) is None
    assert validation_users(ds, _cfg(valid_users=len(everyone)).train) is None
    a = validation_users(ds, _cfg(valid_users=40).train)
    assert a is not None and len(a) == 40 == len(np.unique(a))
    assert np.all(np.diff(a) > 0) and np.isin(a, everyone).all()
    assert np.array_equal(a, validation_users(ds, _cfg(valid_users=40).train))
    assert not np.array_equal(a, validation_users(ds, _cfg(valid_users=40, seed=4).train))


def test_sample_mean_is_unbiased(ds) -> None:
    """Over many seeds' samples, the mean of the sampled Recall@20 is the all-users value
    (fixed scores), within 5 standard errors of the draws."""
    scores = torch.rand(ds.n_users, ds.n_items, generator=torch.Generator().manual_seed(0))

    def recall(users):
        return ranking_metrics(lambda u: scores[u], users, ds.valid, exclude=[ds.train],
                               ks=(20,))["recall@20"]

    full = recall(None)
    draws = np.array([recall(validation_users(ds, _cfg(valid_users=20, seed=s).train))
                      for s in range(300)])
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(draws.mean() - full) < 5 * se
    assert draws.std() > 0  # the samples differ


def test_training_validates_on_the_sample_and_tests_everyone(ds) -> None:
    lines: list[str] = []
    res = train(ds, _cfg(valid_users=40), log=lines.append)
    users = validation_users(ds, _cfg(valid_users=40).train)
    assert res.history[0]["val"]["n_users"] == 40
    again = evaluate_split(res.model, ds, "valid", users=users)
    assert {k: res.val[k] for k in again} == again  # the logged figures are those users'
    assert res.test["n_users"] == int((ds.test.getnnz(axis=1) > 0).sum())
    assert any("fixed sample of 40 users" in line for line in lines)


def test_a_sample_of_everyone_is_the_default_run(ds) -> None:
    a = train(ds, _cfg(), log=lambda _: None)
    b = train(ds, _cfg(valid_users=10**6), log=lambda _: None)
    assert a.history[0]["val"] == b.history[0]["val"] and a.test == b.test


def test_negative_is_refused_naming_the_key() -> None:
    with pytest.raises(DataError, match="valid_users"):
        make_config(valid_users=-1)
