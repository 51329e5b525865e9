"""DiffKG's recommender and the baselines the trainer runs in the same harness.

:class:`DiffKG` (paper semantics, see ``shared/reference/diffkg-reference.md``)::

    ent        = RGAT(E, Rel, W; kg)                       (layer_num_kg layers, res_lambda)
    [u ; i]    = sum_{l=0..L} A^l [U ; ent[:n_items]]       (LightGCN, A = D^-1/2 (A+I) D^-1/2)
    u'         = has_train * u + C ent                      (C: row-mean patient codes, optional)
    y_ui       = <u', i>
    loss       = BPR(u') [+ BPR(C ent)] + reg sum ||theta||^2
                 + ssl_reg (InfoNCE_users + InfoNCE_items)

The code term ``C ent`` (:mod:`diffkg_fast.model.patients`) is this package's extension: without
``codes`` the model is DiffKG as published.

The KG is an argument of every forward, never a model attribute: the trainer passes the denoised
KG of the current epoch (upstream issue #10 is the bug of passing it in the wrong slot).
:class:`LightGCN` is the same collaborative side with a free item table and no KG;
:class:`MostPop` scores every item by its training popularity.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkg_fast.model.config import DiffKGConfig
from diffkg_fast.ops.attention import rgat_forward
from diffkg_fast.ops.backend import resolve
from diffkg_fast.ops.contrastive import logsumexp_mm
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.ops.propagation import const_spmm, lightgcn_propagate
from diffkg_fast.ops.spmm import csr_spmm

__all__ = ["DiffKG", "LightGCN", "MostPop", "bpr_loss", "info_nce", "l2_reg", "propagate"]


def bpr_loss(u: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """``-mean log sigmoid(<u, pos> - <u, neg>)`` over the batch (each argument B × d).

    ``softplus(-x) = -log sigmoid(x)`` without the underflow of ``log(sigmoid(x))``.
    """
    return F.softplus(-((u * pos).sum(-1) - (u * neg).sum(-1))).mean()


def l2_reg(params: Iterable[Tensor], reg: float) -> Tensor:
    """``reg * sum ||theta||^2`` over ``params`` (DiffKG's ``calcRegLoss`` times ``args.reg``)."""
    params = list(params)
    return reg * sum(p.pow(2).sum() for p in params)


def info_nce(view1: Tensor, view2: Tensor, nodes: Tensor, temp: float) -> Tensor:
    """InfoNCE of ``nodes`` between two embedding tables (N × d each).

    With row-normalised ``z1``, ``z2``: ``-mean_n log( exp(<z1_n, z2_n>/temp) /
    sum_m exp(<z1_n, z2_m>/temp) )``, the denominator over ALL ``N`` rows of view 2. Computed as
    ``logsumexp - positive`` (stable for any ``temp``); the only large temporary is the
    ``len(nodes) × N`` logit matrix (1,024 × 6,350 floats = 26 MB at the default sizes), one
    buffer for forward and backward (:func:`~diffkg_fast.ops.contrastive.logsumexp_mm`).
    """
    # 1/temp folded into the B × d side: dividing the B × N logits (and its backward) cost
    # ~20 ms of a 260 ms step at the default size.
    z1 = F.normalize(view1[nodes], dim=-1) / temp
    z2 = F.normalize(view2, dim=-1)
    pos = (z1 * z2[nodes]).sum(-1)
    return (logsumexp_mm(z1, z2) - pos).mean()


def propagate(adj: Tensor, x: Tensor, layers: int) -> Tensor:
    """``sum_{l=0..layers} A^l x`` for the symmetric normalised adjacency ``A``.

    :func:`~diffkg_fast.ops.propagation.lightgcn_propagate` whenever a kernel backend (the C++ /
    CUDA extension: one fused op, its own backward) serves the device, and without a gradient.
    Left to the reference, with a gradient: :func:`~diffkg_fast.ops.propagation.const_spmm`
    (same values, a backward that does not rebuild ``A^T``). ``A`` must be symmetric.
    """
    if _has_kernel("lightgcn_propagate", adj.device) or not (
            torch.is_grad_enabled() and x.requires_grad):
        return lightgcn_propagate(adj, x, layers)
    out, cur = x, x
    for _ in range(layers):
        cur = const_spmm(adj, cur)
        out = out + cur
    return out


def _has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``backend="auto"`` runs a kernel for ``op`` on ``device`` (not the reference)."""
    return resolve(op, "auto", device) is not resolve(op, "reference", device)


class _Scorer(nn.Module):
    """Cached full-catalogue scoring shared by the embedding models.

    ``score`` runs one eval-mode forward per (graph, parameter state) and reuses it for every
    user batch: the cache holds the graph and every parameter's in-place version counter, so an
    optimizer step or ``load_state_dict`` (both in place) invalidates it without bookkeeping.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[KGCSR | None, tuple, tuple[Tensor, ...]] | None = None

    def _versions(self) -> tuple:
        return tuple(p._version for p in self.parameters())

    def _outputs(self, kg: KGCSR | None) -> tuple[Tensor, ...]:
        """Eval-mode tensors the scores need; ``(user_emb, item_emb, …)``."""
        return tuple(self(kg))

    @torch.no_grad()
    def _cached(self, kg: KGCSR | None) -> tuple[Tensor, ...]:
        versions = self._versions()
        # The graph itself is held (not its id), so a new graph can never alias a dead one.
        if self._cache is None or self._cache[0] is not kg or self._cache[1] != versions:
            was = self.training
            self.eval()
            out = tuple(t.detach() for t in self._outputs(kg))
            self.train(was)
            self._cache = (kg, versions, out)
        return self._cache[2]

    def embeddings(self, kg: KGCSR | None = None) -> tuple[Tensor, Tensor]:
        """``(user_emb, item_emb)`` of an eval-mode forward (no dropout), cached."""
        out = self._cached(kg)
        return out[0], out[1]

    @torch.no_grad()
    def score(self, users: Tensor, kg: KGCSR | None = None) -> Tensor:
        """``B × n_items`` scores ``<u, i>`` of ``users`` (LongTensor) with the graph ``kg``."""
        u, i = self.embeddings(kg)
        return u[users.to(u.device)] @ i.T


class DiffKG(_Scorer):
    """User table, entity table, relation table (2R × d) and attention weight W (2d × d).

    Args:
        n_users, n_items, n_entities: sizes; items are the entity rows ``0 … n_items-1``.
        n_relations: rows of the relation table (``2R``: the KG with inverses).
        adj: ``(U+I) × (U+I)`` normalised user–item adjacency (``ops.graph.norm_adjacency``),
            on the model's device.
        cfg: hyper-parameters (``latdim``, ``gnn_layer``, ``layer_num_kg``, ``res_lambda``,
            ``mess_dropout_rate``, ``reg``, ``ssl_reg``, ``temp``).
        generator: RNG of the Xavier initialisation.
        codes: ``U × n_entities`` row-mean CSR of each patient's TRAINING codes
            (:func:`~diffkg_fast.model.patients.patient_code_matrix`), on the model's device;
            ``None``: DiffKG as published (ID embeddings only).
    """

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 adj: Tensor, cfg: DiffKGConfig, generator: torch.Generator | None = None,
                 codes: Tensor | None = None) -> None:
        super().__init__()
        if n_items > n_entities:
            raise ValueError(f"n_items={n_items} > n_entities={n_entities}")
        if codes is not None and tuple(codes.shape) != (n_users, n_entities):
            raise ValueError(f"codes must be {n_users} x {n_entities}, got {tuple(codes.shape)}")
        d = cfg.latdim
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.cfg = cfg
        self.adj = adj
        self.codes = codes
        # Built once: torch.sparse.mm's backward would rebuild the transpose at every step.
        self.codes_t = None if codes is None else codes.t().to_sparse_csr()
        # Users with no training interaction (held-out patients of the visit split) are isolated
        # in `adj`: their propagated ID embedding is the untrained initial one, so it is masked.
        ij = adj.to_sparse_coo().coalesce().indices()
        linked = torch.zeros(n_users, dtype=torch.bool, device=ij.device)
        linked[ij[0][(ij[0] != ij[1]) & (ij[0] < n_users)]] = True  # an off-diagonal entry
        self.register_buffer("has_train", linked.float().unsqueeze(1), persistent=False)
        self.user = nn.Parameter(torch.empty(n_users, d))
        self.entity = nn.Parameter(torch.empty(n_entities, d))
        self.relation = nn.Parameter(torch.empty(n_relations, d))
        self.W = nn.Parameter(torch.empty(2 * d, d))
        with torch.no_grad():
            for p in (self.user, self.entity, self.relation):
                nn.init.xavier_uniform_(p, generator=generator)
            nn.init.xavier_uniform_(self.W, gain=nn.init.calculate_gain("relu"),
                                    generator=generator)

    def encode(self, kg: KGCSR | None, generator: torch.Generator | None = None,
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``(propagated users U × d, propagated items I × d, RGAT entity table N × d)``."""
        if kg is None:
            raise ValueError("DiffKG needs a KG for every forward")
        ent = rgat_forward(self.entity, self.relation, self.W, kg, self.cfg.layer_num_kg,
                           self.cfg.res_lambda, dropout=self.cfg.mess_dropout_rate,
                           training=self.training, generator=generator)
        x = torch.cat([self.user, ent[: self.n_items]])
        out = propagate(self.adj, x, self.cfg.gnn_layer)
        return out[: self.n_users], out[self.n_users:], ent

    def _code_term(self, ent: Tensor) -> Tensor | None:
        """``C @ ent`` for the training code matrix ``C`` (``None`` without patient codes)."""
        if self.codes is None:
            return None
        if _has_kernel("csr_spmm", ent.device):  # the extension caches C^T itself
            return csr_spmm(self.codes, ent)
        return const_spmm(self.codes, ent, self.codes_t)

    def _users(self, u_prop: Tensor, code_term: Tensor | None) -> Tensor:
        """User vectors: ``has_train * u_prop`` plus the code term when there is one."""
        u = u_prop * self.has_train.to(u_prop.dtype)
        return u if code_term is None else u + code_term

    def forward(self, kg: KGCSR | None, generator: torch.Generator | None = None,
                ) -> tuple[Tensor, Tensor]:
        """``(user_emb U × d, item_emb I × d)`` through the KG ``kg`` (dropout if training).

        With patient codes (:mod:`~diffkg_fast.model.patients`) a user is its propagated ID
        embedding plus the mean RGAT embedding of its training diagnoses and procedures.
        """
        u_prop, items, ent = self.encode(kg, generator)
        return self._users(u_prop, self._code_term(ent)), items

    def _outputs(self, kg: KGCSR | None) -> tuple[Tensor, ...]:
        u_prop, items, ent = self.encode(kg)
        return self._users(u_prop, self._code_term(ent)), items, u_prop, ent

    @torch.no_grad()
    def code_users(self, codes: Tensor, kg: KGCSR | None, users: Tensor | None = None,
                   ) -> Tensor:
        """``B × d`` vectors of ``B`` patients given by code rows (``B × n_entities`` CSR).

        ``users`` (B,) adds each row's propagated ID embedding (masked for users without
        training interactions): a known patient plus its codes; ``None``: codes only.
        """
        _, _, u_prop, ent = self._cached(kg)
        u = torch.sparse.mm(codes.to(ent.device), ent)
        if users is not None:
            users = users.to(u.device)
            u = u + u_prop[users] * self.has_train[users]
        return u

    @torch.no_grad()
    def score_codes(self, codes: Tensor, kg: KGCSR | None, users: Tensor | None = None,
                    ) -> Tensor:
        """``B × n_items`` scores of the patients of :meth:`code_users`."""
        return self.code_users(codes, kg, users) @ self._cached(kg)[1].T

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor, kg1: KGCSR, kg2: KGCSR,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """BPR on view 1 (``kg1``) + L2 + ``ssl_reg`` InfoNCE between view 1 and view 2 (``kg2``)
        over the batch's users and positive items. Two graph forwards (one when ``ssl_reg=0``).

        With patient codes, a second BPR term ranks with the code representation ALONE, so that
        a patient known only by codes (held out, or new) is ranked by a trained vector.
        """
        u_prop, i1, ent = self.encode(kg1, generator)
        c = self._code_term(ent)
        u1 = self._users(u_prop, c)
        bpr = bpr_loss(u1[users], i1[pos], i1[neg])
        parts = {"bpr": float(bpr.detach())}
        if c is not None:
            code_bpr = bpr_loss(c[users], i1[pos], i1[neg])
            bpr = bpr + code_bpr
            parts["code_bpr"] = float(code_bpr.detach())
        reg = l2_reg(self.parameters(), self.cfg.reg)
        total = bpr + reg
        parts.update(reg=float(reg.detach()), cl=0.0)
        if self.cfg.ssl_reg > 0:
            u2, i2 = self(kg2, generator)
            cl = (info_nce(u1, u2, users, self.cfg.temp)
                  + info_nce(i1, i2, pos, self.cfg.temp))
            total = total + self.cfg.ssl_reg * cl
            parts["cl"] = float(cl.detach())
        return total, parts


class LightGCN(_Scorer):
    """LightGCN baseline: free user and item tables, the same propagation, BPR + L2, no KG."""

    def __init__(self, n_users: int, n_items: int, adj: Tensor, cfg: DiffKGConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_users, self.n_items, self.cfg, self.adj = n_users, n_items, cfg, adj
        self.user = nn.Parameter(torch.empty(n_users, cfg.latdim))
        self.item = nn.Parameter(torch.empty(n_items, cfg.latdim))
        with torch.no_grad():
            for p in (self.user, self.item):
                nn.init.xavier_uniform_(p, generator=generator)

    def forward(self, kg: KGCSR | None = None, generator: torch.Generator | None = None,
                ) -> tuple[Tensor, Tensor]:
        """``(user_emb, item_emb)``; ``kg`` and ``generator`` are ignored (no KG, no dropout)."""
        out = propagate(self.adj, torch.cat([self.user, self.item]), self.cfg.gnn_layer)
        return out[: self.n_users], out[self.n_users:]

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor, kg1: KGCSR | None = None,
             kg2: KGCSR | None = None, generator: torch.Generator | None = None,
             ) -> tuple[Tensor, dict[str, float]]:
        """BPR + L2 (one forward; the KG arguments exist only for the shared trainer)."""
        u, i = self()
        bpr = bpr_loss(u[users], i[pos], i[neg])
        reg = l2_reg(self.parameters(), self.cfg.reg)
        return bpr + reg, {"bpr": float(bpr.detach()), "reg": float(reg.detach()), "cl": 0.0}


class MostPop(nn.Module):
    """Scores every item by its number of training interactions (same for every user)."""

    def __init__(self, train: sp.spmatrix) -> None:
        super().__init__()
        counts = np.asarray((sp.csr_matrix(train) != 0).sum(axis=0), dtype=np.float32).ravel()
        self.register_buffer("popularity", torch.from_numpy(counts))

    @torch.no_grad()
    def score(self, users: Tensor, kg: KGCSR | None = None) -> Tensor:
        """``B × n_items``: the popularity row repeated for each user."""
        return self.popularity.unsqueeze(0).expand(users.numel(), -1)
