"""LightGCN (He et al., SIGIR 2020): free user and item tables smoothed over the user–item graph.

    [u ; i] = sum_{l=0..L} A^l [U ; I]          A = D^-1/2 (A_ui + I) D^-1/2
    y_ui    = <u, i>
    loss    = BPR + reg sum ||theta||^2

The layers are SUMMED, layer 0 included, and the adjacency has self loops: DiffKG's collaborative
side (HKUDS/DiffKG ``Model.py``), so that LightGCN is exactly DiffKG without its KG. (The paper
averages the layers and has no self loops: the average scales every score by ``1/(L+1)^2``,
which keeps a ranking but not the training dynamics of BPR and L2; so this is a variant.)

Defaults (same harness as DiffKG, so that a comparison differs only in the model): ``latdim`` 64
(both the paper and DiffKG's ``Params.py``), ``gnn_layer`` 2 (``Params.py``; the paper's best is
3), ``reg`` 1e-7 (``Params.py``; the paper tunes 1e-4), ``lr`` 1e-3 and ``batch`` 1024 from the
trainer (``Params.py``; the paper: 1e-3 and 2048).

SafeDrug's controllable DDI loss is an option here as in DiffKG (``ddi_loss``, ``target_ddi``,
``kp``, ``ddi_scale``; :mod:`diffkg_fast.model.ddi_loss`), off by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from diffkg_fast.model.base import EmbeddingRecommender, PairBatch, check_options
from diffkg_fast.model.ddi_loss import DDILoss, controlled, ddi_pairs_of, set_size_of
from diffkg_fast.model.losses import bpr_loss, l2_reg
from diffkg_fast.ops.backend import has_kernel
from diffkg_fast.ops.graph import norm_adjacency
from diffkg_fast.ops.propagation import const_spmm, lightgcn_propagate
from diffkg_fast.ops.rows import rows
from diffkg_fast.utils.seed import rng_stream

__all__ = ["LightGCN", "propagate"]


def propagate(adj: Tensor, x: Tensor, layers: int) -> Tensor:
    """``sum_{l=0..layers} A^l x`` for the symmetric normalised adjacency ``A``.

    :func:`~diffkg_fast.ops.propagation.lightgcn_propagate` whenever a kernel backend (the C++ /
    CUDA extension: one fused op, its own backward) serves the device, and without a gradient.
    Left to the reference, with a gradient: :func:`~diffkg_fast.ops.propagation.const_spmm`
    (same values, a backward that does not rebuild ``A^T``). ``A`` must be symmetric.
    """
    if has_kernel("lightgcn_propagate", adj.device) or not (
            torch.is_grad_enabled() and x.requires_grad):
        return lightgcn_propagate(adj, x, layers)
    out, cur = x, x
    for _ in range(layers):
        cur = const_spmm(adj, cur)
        out = out + cur
    return out


class LightGCN(EmbeddingRecommender):
    """LightGCN on the training interactions ``train`` (``n_users × n_items``, nonzero = 1).

    Options: ``latdim`` (embedding size), ``gnn_layer`` (propagation layers), ``reg`` (L2
    weight), ``seed`` (Xavier initialisation, stream ``init``), ``device``, and the DDI loss's
    (``ddi_pairs``: the item ids that interact; ``set_size``: the predicted set's ``k``).
    """

    name = "lightgcn"

    def __init__(self, n_users: int, n_items: int, train: sp.spmatrix,
                 ddi_pairs: np.ndarray | None = None, set_size: int = 1, *, latdim: int = 64,
                 gnn_layer: int = 2, reg: float = 1e-7, ddi_loss: bool = False,
                 target_ddi: float = 0.06, kp: float = 0.05, ddi_scale: float = 5e-4,
                 seed: int = 421, device: str = "cpu") -> None:
        super().__init__()
        self.check_options({"latdim": latdim, "gnn_layer": gnn_layer, "reg": reg,
                            "target_ddi": target_ddi, "kp": kp, "ddi_scale": ddi_scale})
        if ddi_loss and ddi_pairs is None:
            raise ValueError("ddi_loss=True needs ddi_pairs (the KG's 'ddi' relation)")
        self.n_users, self.n_items = n_users, n_items
        self.gnn_layer, self.reg = gnn_layer, reg
        self.adj = norm_adjacency(train, n_users, n_items).to(device)
        self.user = nn.Parameter(torch.empty(n_users, latdim))
        self.item = nn.Parameter(torch.empty(n_items, latdim))
        init = rng_stream(seed, "init")
        with torch.no_grad():
            for p in (self.user, self.item):
                nn.init.xavier_uniform_(p, generator=init)
        self.ddi = None if not ddi_loss else DDILoss(
            ddi_pairs, n_items, set_size, target_ddi=target_ddi, kp=kp, ddi_scale=ddi_scale)
        self.to(device)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> LightGCN:
        """LightGCN for a dataset; with ``ddi_loss``, one without a ``ddi`` relation is a
        :class:`~diffkg_fast.data.errors.DataError`."""
        ddi = options.get("ddi_loss", False)
        return cls(ds.n_users, ds.n_items, ds.train, ddi_pairs_of(ds) if ddi else None,
                   set_size_of(ds) if ddi else 1, **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("latdim", "kp"),
                      non_negative=("gnn_layer", "reg", "ddi_scale"), unit=("target_ddi",))

    def _eval_outputs(self) -> tuple[Tensor, Tensor]:
        out = propagate(self.adj, torch.cat([self.user, self.item]), self.gnn_layer)
        return out[: self.n_users], out[self.n_users:]

    def forward(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """BPR (SafeDrug's controlled loss of it with ``ddi_loss``) + L2, one propagation."""
        u, i = self._eval_outputs()  # no dropout: the training forward is the scoring one
        # rows(), not u[batch.users]: the indexing backward sums at two threads in timing order.
        terms = bpr_loss(rows(u, batch.users), rows(i, batch.pos), rows(i, batch.neg), reduce=False)
        parts = {"bpr": terms.mean().detach()}
        rec = controlled(self.ddi, terms, u, i, batch.users, parts, span=batch.span,
                         dist=self.dist)
        reg = l2_reg(self.parameters(), self.reg)
        parts.update(reg=reg.detach(), cl=torch.zeros((), device=rec.device))
        return rec + reg, parts
