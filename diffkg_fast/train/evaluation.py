"""One evaluation of a trained model on one split, shared by the trainer and ``evaluate``.

- Ranking (every dataset): full ranking over all items, training items excluded (and
  validation items when testing), Recall / NDCG @ 10, 20, 40 over the users with held-out items
  (:func:`~diffkg_fast.eval.ranking.ranking_metrics`).
- Medication metrics (datasets with a ``visit`` split): every held-out visit of the split is
  predicted from what is known when it happens — its own diagnoses and procedures and those of
  the patient's earlier visits (:func:`~diffkg_fast.model.patients.visit_code_matrix`) and the
  medications of its earlier visits (:func:`~diffkg_fast.model.patients.visit_history_meds`),
  each given to a model that reads it (``Recommender.patient_inputs``: ``"codes"`` for DiffKG
  with patient codes, ``"meds"`` for the auto-encoders); the patient's own representation
  otherwise (the popularity for MostPop). A model that cannot score a patient without training
  interactions (``scores_unseen`` false) is refused by the trainer on such a dataset. Jaccard,
  F1, PRAUC, DDI rate and mean set size as SafeDrug computes them, keys prefixed ``med_``, of the
  predicted sets of a set rule (:mod:`diffkg_fast.eval.sets`): without a chosen rule (the
  per-epoch validation) the top ``k``, ``k`` the rounded mean training visit size
  (:func:`~diffkg_fast.eval.medication.default_k`); with the run's
  :class:`~diffkg_fast.eval.set_choice.SetChoice` (chosen on validation by :func:`choose_sets`
  after training) its plain rule, and its DDI-aware rule's metrics as ``safe_*`` on a dataset
  with a ``ddi`` relation (PRAUC reads scores only, so it has no ``safe_`` twin).

Sharded (``dist``, a data-parallel run): each rank scores a contiguous block of the user batches
(the single process's batches, so each is scored with the same shapes and gives the same bits);
the ranking metrics' per-user SUMS and user counts are added over the ranks and divided once
(exact up to float64 summation order; never a mean of the ranks' means); the held-out visits'
scores are gathered in order, and the set metrics computed from them on every rank are the
single process's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.eval.medication import (
    ddi_matrix,
    default_k,
    medication_metrics,
    visit_med_matrix,
)
from diffkg_fast.eval.ranking import KS, ranking_metrics, ranking_sums
from diffkg_fast.eval.set_choice import SetChoice, choose_rules
from diffkg_fast.eval.sets import SetRule, fit_visit_size, select_sets, visit_code_counts
from diffkg_fast.model.base import Patients, Recommender
from diffkg_fast.model.ddi_loss import has_ddi
from diffkg_fast.model.patients import (
    patient_code_matrix,
    visit_code_matrix,
    visit_history_meds,
)
from diffkg_fast.ops.graph import torch_csr
from diffkg_fast.utils.distributed import Dist, block, gather_rows, sum_across

__all__ = ["SPLIT_ID", "VisitArrays", "choose_sets", "ddi_adjacency", "default_rule",
           "evaluate_split", "has_visit_split", "set_metrics", "visit_arrays", "visit_metrics"]

SPLIT_ID = {"valid": 1, "test": 2}


def has_visit_split(ds: KGDataset) -> bool:
    """A dataset whose held-out parts are whole visits (the ``visit`` split)."""
    return ds.visits is not None and bool((np.asarray(ds.visits.split) > 0).any())


def _score_fn(model: Recommender, ds: KGDataset, split: str) -> Callable[[Tensor], Tensor]:
    """Scores of a batch of users for the ranking metrics, from what evaluating ``split`` may
    know of them: their training medications, and the codes of their training visits and of
    the split's own visits."""
    inputs = model.patient_inputs
    if not inputs:
        return model.ranking_scores
    codes = None
    if "codes" in inputs and ds.visits is not None:
        codes = patient_code_matrix(ds.visits, ds.n_users, ds.n_entities, (0, SPLIT_ID[split]))
    meds = sp.csr_matrix(ds.train) if "meds" in inputs else None

    def score(users: Tensor) -> Tensor:
        ids = users.cpu().numpy()
        return model.score_patients(Patients(
            users, None if codes is None else torch_csr(codes[ids]),
            None if meds is None else torch_csr(meds[ids] != 0)))

    return score


@torch.no_grad()
def _visit_scores(model: Recommender, ds: KGDataset, split: str, batch: int,
                  dist: Dist | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(visits × items scores, visit ids)`` of the held-out visits of ``split``; with
    ``dist``, each rank scores its block of the batches and all receive all the scores."""
    assert ds.visits is not None
    sid = SPLIT_ID[split]
    patients = torch.from_numpy(np.asarray(ds.visits.patient, dtype=np.int64))
    inputs = model.patient_inputs
    vids = np.flatnonzero(np.asarray(ds.visits.split) == sid)
    codes = visit_code_matrix(ds.visits, ds.n_entities, sid)[0] if "codes" in inputs else None
    meds = visit_history_meds(ds.visits, ds.n_items, sid)[0] if "meds" in inputs else None
    out = []
    starts = range(0, len(vids), batch)
    d = dist or Dist()
    for lo in (starts[i] for i in block(len(starts), d)):
        part = slice(lo, lo + batch)
        users = patients[vids[part]]
        known = Patients(users, None if codes is None else torch_csr(codes[part]),
                         None if meds is None else torch_csr(meds[part]))
        out.append(model.score_patients(known).float().cpu())
    scores = torch.cat(out) if out else torch.zeros((0, ds.n_items))
    return gather_rows(scores, d).numpy(), vids


def ddi_adjacency(ds: KGDataset) -> np.ndarray | None:
    """The ``n_items × n_items`` 0/1 interaction matrix of the ``ddi`` relation, or ``None``
    without one (or with an empty one)."""
    if not has_ddi(ds):
        return None
    return ddi_matrix(ds.triplets_of("ddi"), ds.n_items)


def default_rule(ds: KGDataset) -> SetRule:
    """The rule without a validation choice: the top ``k``, ``k`` the rounded mean training
    visit size."""
    assert ds.visits is not None
    train_sizes = np.diff(np.asarray(ds.visits.med_ptr))[np.asarray(ds.visits.split) == 0]
    return SetRule("topk", default_k(train_sizes))


class VisitArrays(NamedTuple):
    """The held-out visits of one split: ``scores`` (visits × items), ``truth`` (bool, the
    prescribed medications) and ``n_codes`` (each visit's diagnoses + procedures)."""

    scores: np.ndarray
    truth: np.ndarray
    n_codes: np.ndarray


@torch.no_grad()
def visit_arrays(model: Recommender, ds: KGDataset, split: str,
                 batch: int = 1024, dist: Dist | None = None) -> VisitArrays:
    """Scores, prescriptions and code counts of the held-out visits of ``split`` (``dist``:
    scored sharded, every rank gets them all)."""
    assert ds.visits is not None
    model.eval()
    scores, vids = _visit_scores(model, ds, split, batch, dist)
    truth = visit_med_matrix(ds.visits, ds.n_items, SPLIT_ID[split]).toarray() > 0
    assert len(vids) == truth.shape[0]
    return VisitArrays(scores, truth, visit_code_counts(ds.visits)[vids])


def set_metrics(v: VisitArrays, ds: KGDataset, rule: SetRule) -> dict[str, float]:
    """SafeDrug's per-visit metrics of ``rule``'s sets (:func:`medication_metrics`)."""
    pairs = ds.triplets_of("ddi") if "ddi" in ds.relation_names else np.zeros((0, 2), np.int64)
    pred = select_sets(v.scores, rule, ddi_adjacency(ds), v.n_codes)
    return medication_metrics(pred, v.truth, pairs, scores=v.scores, n_meds=ds.n_items)


def visit_metrics(model: Recommender, ds: KGDataset, split: str, batch: int,
                  sets: SetChoice | None, dist: Dist | None = None) -> dict[str, float]:
    """``med_*`` (and ``safe_*``) metrics of the held-out visits of ``split``."""
    v = visit_arrays(model, ds, split, batch, dist)
    out = {f"med_{k}": x for k, x in set_metrics(
        v, ds, default_rule(ds) if sets is None else sets.plain).items()}
    if sets is not None and has_ddi(ds):
        safe = set_metrics(v, ds, sets.safe)
        del safe["prauc"], safe["n_visits"]  # the scores', the same as med_'s
        out.update({f"safe_{k}": x for k, x in safe.items()})
    return out


def choose_sets(model: Recommender, ds: KGDataset, *, target_ddi: float,
                batch_size: int = 1024, dist: Dist | None = None) -> SetChoice:
    """The plain and DDI-aware set rules of ``model``, chosen on the validation visits
    (:func:`~diffkg_fast.eval.set_choice.choose_rules`); a dataset with a visit split only."""
    if not has_visit_split(ds):
        raise ValueError("set rules are chosen on validation visits: the dataset has no visit "
                         "split")
    assert ds.visits is not None
    v = visit_arrays(model, ds, "valid", batch_size, dist)
    return choose_rules(v.scores, v.truth, ddi_adjacency(ds), v.n_codes,
                        fit_visit_size(ds.visits), int(default_rule(ds).param), target_ddi)


def evaluate_split(model: Recommender, ds: KGDataset, split: str, *, batch_size: int = 1024,
                   device: str = "cpu", sets: SetChoice | None = None,
                   dist: Dist | None = None, users: np.ndarray | None = None,
                   ) -> dict[str, float]:
    """Ranking metrics of ``split`` (``"valid"`` or ``"test"``), plus ``med_*`` (and, with
    ``sets`` and a ``ddi`` relation, ``safe_*``) metrics for a dataset with a visit split
    (module docstring), with the model's current state; ``dist``: sharded over the ranks of a
    data-parallel run, every rank returning the same metrics; ``users``: rank only these users
    (``None``: every user with a target; the visit metrics are always over every visit)."""
    if split not in SPLIT_ID:
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model.eval()
    target = ds.valid if split == "valid" else ds.test
    exclude: list[sp.spmatrix] = [ds.train] if split == "valid" else [ds.train, ds.valid]
    if dist is None or not dist.active:
        out = ranking_metrics(_score_fn(model, ds, split), users, target, exclude=exclude,
                              ks=KS, batch_size=batch_size, device=device)
    else:
        sums, n = ranking_sums(_score_fn(model, ds, split), users, target, exclude=exclude,
                               ks=KS, batch_size=batch_size, device=device,
                               select=lambda n_batches: block(n_batches, dist))
        total = sum_across({**sums, "n_users": float(n)}, dist)
        n = int(total["n_users"])
        out = {k: (total[k] / n if n else float("nan")) for k in sums}
        out["n_users"] = n
    if has_visit_split(ds):
        out.update(visit_metrics(model, ds, split, batch_size, sets, dist))
    return out
