"""DiffKG's recommender side: relation-aware attention over the KG, then LightGCN.

    ent      = RGAT(E, Rel, W; kg)                     (layer_num_kg layers, res_lambda)
    [u ; i]  = sum_{l=0..L} A^l [U ; ent[:n_items]]     (LightGCN, A = D^-1/2 (A+I) D^-1/2)
    u'       = has_train * u + C ent                    (C: row-mean patient codes, optional)

(Jiang et al., WSDM 2024, section 3.1 and 3.4; HKUDS/DiffKG ``Model.py``.) The KG is an argument
of every forward: DiffKG trains one view on the denoised KG and one on the original, and the
public code's bug of passing the denoised KG in the wrong argument slot (upstream issue #10) is
what an explicit argument prevents. The code term ``C ent`` is this package's extension
(``docs/patients-by-codes.md``): without ``codes`` the encoder is DiffKG's as published.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffkg_fast.model.lightgcn import propagate
from diffkg_fast.ops.attention import rgat_forward
from diffkg_fast.ops.backend import has_kernel
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.ops.propagation import const_spmm
from diffkg_fast.ops.spmm import csr_spmm

__all__ = ["Encoded", "KGEncoder"]


class Encoded(NamedTuple):
    """One forward of :class:`KGEncoder`: ``users`` (U × d, with the code term when there is
    one), ``items`` (I × d), ``u_prop`` (U × d, propagated ID embeddings), ``ent`` (the RGAT
    entity table, N × d) and ``codes`` (``C ent``, U × d, or ``None``)."""

    users: Tensor
    items: Tensor
    u_prop: Tensor
    ent: Tensor
    codes: Tensor | None


class KGEncoder(nn.Module):
    """User table ``user`` (U × d), entity table ``entity`` (N × d), relation table
    ``relation`` (2R × d) and attention weight ``W`` (2d × d), Xavier-initialised (``W`` with
    the ReLU gain) from ``generator``, in that order.

    Args:
        adj: ``(U+I) × (U+I)`` normalised user–item adjacency (``ops.graph.norm_adjacency``).
        codes: ``U × N`` row-mean CSR of each patient's TRAINING codes, or ``None``.
        n_relations: rows of the relation table (``2R``: the KG with inverses).
    """

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 adj: Tensor, codes: Tensor | None = None, *, latdim: int = 64,
                 gnn_layer: int = 2, layer_num_kg: int = 1, mess_dropout_rate: float = 0.1,
                 res_lambda: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_items > n_entities:
            raise ValueError(f"n_items={n_items} > n_entities={n_entities}")
        if codes is not None and tuple(codes.shape) != (n_users, n_entities):
            raise ValueError(f"codes must be {n_users} x {n_entities}, got {tuple(codes.shape)}")
        self.n_users, self.n_items = n_users, n_items
        self.gnn_layer, self.layer_num_kg = gnn_layer, layer_num_kg
        self.mess_dropout_rate, self.res_lambda = mess_dropout_rate, res_lambda
        self.adj, self.codes = adj, codes
        # Built once: torch.sparse.mm's backward would rebuild the transpose at every step.
        self.codes_t = None if codes is None else codes.t().to_sparse_csr()
        # Users with no training interaction (held-out patients of the visit split) are isolated
        # in `adj`: their propagated ID embedding is the untrained initial one, so it is masked.
        ij = adj.to_sparse_coo().coalesce().indices()
        linked = torch.zeros(n_users, dtype=torch.bool, device=ij.device)
        linked[ij[0][(ij[0] != ij[1]) & (ij[0] < n_users)]] = True  # an off-diagonal entry
        self.register_buffer("has_train", linked.float().unsqueeze(1), persistent=False)
        self.user = nn.Parameter(torch.empty(n_users, latdim))
        self.entity = nn.Parameter(torch.empty(n_entities, latdim))
        self.relation = nn.Parameter(torch.empty(n_relations, latdim))
        self.W = nn.Parameter(torch.empty(2 * latdim, latdim))
        with torch.no_grad():
            for p in (self.user, self.entity, self.relation):
                nn.init.xavier_uniform_(p, generator=generator)
            nn.init.xavier_uniform_(self.W, gain=nn.init.calculate_gain("relu"),
                                    generator=generator)

    def forward(self, kg: KGCSR, generator: torch.Generator | None = None) -> Encoded:
        """Encode through ``kg``; dropout on the attention output when training."""
        ent = rgat_forward(self.entity, self.relation, self.W, kg, self.layer_num_kg,
                           self.res_lambda, dropout=self.mess_dropout_rate,
                           training=self.training, generator=generator)
        x = torch.cat([self.user, ent[: self.n_items]])
        out = propagate(self.adj, x, self.gnn_layer)
        u_prop, items = out[: self.n_users], out[self.n_users:]
        codes = self.code_term(ent)
        users = u_prop * self.has_train.to(u_prop.dtype)
        return Encoded(users if codes is None else users + codes, items, u_prop, ent, codes)

    def code_term(self, ent: Tensor) -> Tensor | None:
        """``C @ ent`` for the training code matrix ``C`` (``None`` without patient codes)."""
        if self.codes is None:
            return None
        if has_kernel("csr_spmm", ent.device):  # the extension caches C^T itself
            return csr_spmm(self.codes, ent)
        return const_spmm(self.codes, ent, self.codes_t)
