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
  interactions (``scores_unseen`` false) is refused by the trainer on such a dataset. The
  predicted set is the top ``k`` medications, ``k`` the rounded mean training visit size
  (:func:`~diffkg_fast.eval.medication.default_k`); Jaccard, F1, PRAUC, DDI rate and mean set
  size as SafeDrug computes them, keys prefixed ``med_``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from diffkg_fast.data.dataset import KGDataset
from diffkg_fast.eval.medication import (
    default_k,
    medication_metrics,
    predict_topk,
    visit_med_matrix,
)
from diffkg_fast.eval.ranking import KS, ranking_metrics
from diffkg_fast.model.base import Patients, Recommender
from diffkg_fast.model.patients import (
    patient_code_matrix,
    visit_code_matrix,
    visit_history_meds,
)
from diffkg_fast.ops.graph import torch_csr

__all__ = ["SPLIT_ID", "evaluate_split", "has_visit_split"]

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
        return model.score
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
def _visit_scores(model: Recommender, ds: KGDataset, split: str,
                  batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(visits × items scores, visit ids)`` of the held-out visits of ``split``."""
    assert ds.visits is not None
    sid = SPLIT_ID[split]
    patients = torch.from_numpy(np.asarray(ds.visits.patient, dtype=np.int64))
    inputs = model.patient_inputs
    vids = np.flatnonzero(np.asarray(ds.visits.split) == sid)
    codes = visit_code_matrix(ds.visits, ds.n_entities, sid)[0] if "codes" in inputs else None
    meds = visit_history_meds(ds.visits, ds.n_items, sid)[0] if "meds" in inputs else None
    out = []
    for lo in range(0, len(vids), batch):
        part = slice(lo, lo + batch)
        users = patients[vids[part]]
        known = Patients(users, None if codes is None else torch_csr(codes[part]),
                         None if meds is None else torch_csr(meds[part]))
        out.append(model.score_patients(known).float().cpu())
    return (torch.cat(out).numpy() if out else np.zeros((0, ds.n_items), np.float32)), vids


def evaluate_split(model: Recommender, ds: KGDataset, split: str, *, batch_size: int = 1024,
                   device: str = "cpu") -> dict[str, float]:
    """Ranking metrics of ``split`` (``"valid"`` or ``"test"``), plus ``med_*`` metrics for a
    dataset with a visit split (module docstring), with the model's current state."""
    if split not in SPLIT_ID:
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model.eval()
    target = ds.valid if split == "valid" else ds.test
    exclude: list[sp.spmatrix] = [ds.train] if split == "valid" else [ds.train, ds.valid]
    out = ranking_metrics(_score_fn(model, ds, split), None, target, exclude=exclude,
                          ks=KS, batch_size=batch_size, device=device)
    if has_visit_split(ds):
        assert ds.visits is not None
        scores, vids = _visit_scores(model, ds, split, batch_size)
        train_sizes = np.diff(np.asarray(ds.visits.med_ptr))[np.asarray(ds.visits.split) == 0]
        truth = visit_med_matrix(ds.visits, ds.n_items, SPLIT_ID[split])
        pairs = (ds.triplets_of("ddi") if "ddi" in ds.relation_names
                 else np.zeros((0, 2), np.int64))
        med = medication_metrics(predict_topk(scores, default_k(train_sizes)), truth, pairs,
                                 scores=scores, n_meds=ds.n_items)
        assert len(vids) == truth.shape[0]
        out.update({f"med_{k}": v for k, v in med.items()})
    return out
