"""DiffKG's recommender and the baselines the trainer runs in the same harness.

:class:`DiffKG` (paper semantics, see ``shared/reference/diffkg-reference.md``)::

    ent        = RGAT(E, Rel, W; kg)                       (layer_num_kg layers, res_lambda)
    [u ; i]    = sum_{l=0..L} A^l [U ; ent[:n_items]]       (LightGCN, A = D^-1/2 (A+I) D^-1/2)
    y_ui       = <u, i>
    loss       = BPR(view 1) + reg sum ||theta||^2 + ssl_reg (InfoNCE_users + InfoNCE_items)

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
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.ops.propagation import lightgcn_propagate

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
    ``len(nodes) × N`` logit matrix (1,024 × 6,350 floats = 26 MB at the default sizes).
    """
    # 1/temp folded into the B × d side: dividing the B × N logits (and its backward) cost
    # ~20 ms of a 260 ms step at the default size.
    z1 = F.normalize(view1[nodes], dim=-1) / temp
    z2 = F.normalize(view2, dim=-1)
    pos = (z1 * z2[nodes]).sum(-1)
    return (torch.logsumexp(z1 @ z2.T, dim=-1) - pos).mean()


class _SymmetricSpMM(torch.autograd.Function):
    """``A @ X`` for a constant SYMMETRIC sparse ``A``, whose backward is ``A @ G`` again.

    ``torch.sparse.mm``'s own backward builds ``A^T`` as a new CSR at every call: measured
    30 ms of a 450 ms BPR step (4 calls per step, 2 layers × 2 views) at the default synthetic
    size on the 2-core CPU. ``norm_adjacency`` is symmetric by construction, so ``A^T = A``.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, torch.sparse.mm(ctx.adj, grad)


def propagate(adj: Tensor, x: Tensor, layers: int) -> Tensor:
    """``sum_{l=0..layers} A^l x`` for the symmetric normalised adjacency ``A``.

    Without gradient this is :func:`~diffkg_fast.ops.propagation.lightgcn_propagate`; with one it
    uses :class:`_SymmetricSpMM` (same values, a cheaper backward). ``A`` must be symmetric.
    """
    if not (torch.is_grad_enabled() and x.requires_grad) or adj.device.type != "cpu":
        return lightgcn_propagate(adj, x, layers)
    out, cur = x, x
    for _ in range(layers):
        cur = _SymmetricSpMM.apply(adj, cur)
        out = out + cur
    return out


class _Scorer(nn.Module):
    """Cached full-catalogue scoring shared by the embedding models.

    ``score`` runs one eval-mode forward per (graph, parameter state) and reuses it for every
    user batch: the cache holds the graph and every parameter's in-place version counter, so an
    optimizer step or ``load_state_dict`` (both in place) invalidates it without bookkeeping.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[KGCSR | None, tuple, tuple[Tensor, Tensor]] | None = None

    def _versions(self) -> tuple:
        return tuple(p._version for p in self.parameters())

    @torch.no_grad()
    def embeddings(self, kg: KGCSR | None = None) -> tuple[Tensor, Tensor]:
        """``(user_emb, item_emb)`` of an eval-mode forward (no dropout), cached."""
        versions = self._versions()
        # The graph itself is held (not its id), so a new graph can never alias a dead one.
        if self._cache is None or self._cache[0] is not kg or self._cache[1] != versions:
            was = self.training
            self.eval()
            emb = self(kg)
            self.train(was)
            self._cache = (kg, versions, (emb[0].detach(), emb[1].detach()))
        return self._cache[2]

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
    """

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 adj: Tensor, cfg: DiffKGConfig, generator: torch.Generator | None = None,
                 ) -> None:
        super().__init__()
        if n_items > n_entities:
            raise ValueError(f"n_items={n_items} > n_entities={n_entities}")
        d = cfg.latdim
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.cfg = cfg
        self.adj = adj
        self.user = nn.Parameter(torch.empty(n_users, d))
        self.entity = nn.Parameter(torch.empty(n_entities, d))
        self.relation = nn.Parameter(torch.empty(n_relations, d))
        self.W = nn.Parameter(torch.empty(2 * d, d))
        with torch.no_grad():
            for p in (self.user, self.entity, self.relation):
                nn.init.xavier_uniform_(p, generator=generator)
            nn.init.xavier_uniform_(self.W, gain=nn.init.calculate_gain("relu"),
                                    generator=generator)

    def forward(self, kg: KGCSR | None, generator: torch.Generator | None = None,
                ) -> tuple[Tensor, Tensor]:
        """``(user_emb U × d, item_emb I × d)`` through the KG ``kg`` (dropout if training)."""
        if kg is None:
            raise ValueError("DiffKG needs a KG for every forward")
        ent = rgat_forward(self.entity, self.relation, self.W, kg, self.cfg.layer_num_kg,
                           self.cfg.res_lambda, dropout=self.cfg.mess_dropout_rate,
                           training=self.training, generator=generator)
        x = torch.cat([self.user, ent[: self.n_items]])
        out = propagate(self.adj, x, self.cfg.gnn_layer)
        return out[: self.n_users], out[self.n_users:]

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor, kg1: KGCSR, kg2: KGCSR,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """BPR on view 1 (``kg1``) + L2 + ``ssl_reg`` InfoNCE between view 1 and view 2 (``kg2``)
        over the batch's users and positive items. Two graph forwards (one when ``ssl_reg=0``).
        """
        u1, i1 = self(kg1, generator)
        bpr = bpr_loss(u1[users], i1[pos], i1[neg])
        reg = l2_reg(self.parameters(), self.cfg.reg)
        total = bpr + reg
        parts = {"bpr": float(bpr.detach()), "reg": float(reg.detach()), "cl": 0.0}
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
