"""KGCN (Wang, Zhao, Xie, Li, Guo: "Knowledge Graph Convolutional Networks for Recommender
Systems", WWW 2019), as RecBole 1.2.1 implements it
(``recbole/model/knowledge_aware_recommender/kgcn.py``; the authors' code: hwwang55/KGCN).

The KG is taken as undirected: every triplet ``(h, r, t)`` makes ``t`` a neighbour of ``h`` and
``h`` one of ``t``, both through relation ``r``. At build, every entity gets a fixed receptive
field of ``K = neighbor_sample_size`` neighbours: ``K`` of its neighbours uniformly without
replacement when it has at least ``K``, else ``K`` draws with replacement; an entity without a
neighbour gets itself ``K`` times through a padding relation (id ``n_relations``, a row of its
own). The draw is made once, from the stream ``neighbours``, and kept in the state.

For a user ``u`` and an item ``v``, with ``H = n_iter``: the hop-``h`` entities of ``v`` are the
``K^h`` entities reached through the sampled fields; ``e^0`` are their embeddings. Iteration
``i = 0 … H-1`` updates hops ``h = 0 … H-1-i``::

    pi_u(r)      = <u, Rel_r> / d                              (user–relation score)
    w_{m,k}      = softmax_k pi_u(r_{m,k})                     (over node m's K sampled neighbours)
    n_m          = (1/K) sum_k w_{m,k} e^i_{child k of m}
    sum          e^{i+1}_m = act(W_i (e^i_m + n_m) + b_i)
    concat       e^{i+1}_m = act(W_i [e^i_m ; n_m] + b_i)
    neighbor     e^{i+1}_m = act(W_i n_m + b_i)
    act          = tanh on the last iteration, ReLU before;  v_u = e^H_v,  y_uv = <u, v_u>

(the ``1/K`` and the ``/d`` are RecBole's and the authors' ``reduce_mean``). The item vector
depends on the user, so scoring ranks every item with a forward per (user, item): the hop
embeddings are gathered once per item and shared by a batch of users; only the weights and the
layers above are per user (:meth:`KGCN.score`).

Loss, per batch of (user, positive, negative) triples: RecBole's ``calculate_loss``, a binary
cross-entropy with the positive labelled 1 and the negative 0 (``loss_type="bce"``, the paper's
loss too), ``mean(softplus(-y_pos) ++ softplus(y_neg))``; or BPR (``loss_type="bpr"``, not in
RecBole or the paper); plus ``reg_weight`` times RecBole's ``EmbLoss`` (Frobenius norms, not
squared) of the batch's user vectors and its positive and negative item vectors.

Defaults, RecBole 1.2.1's ``KGCN.yaml``: ``embedding_size`` 64, ``n_iter`` 1, ``aggregator``
``sum``, ``reg_weight`` 1e-7, ``neighbor_sample_size`` 4 (the authors' MovieLens-20M setting has
32 / 2 / sum / 1e-7 / 4); ``loss_type`` ``bce`` (RecBole and the paper); initialisation
Xavier-normal for the tables and the layer weights, zero biases (RecBole's
``xavier_normal_initialization``); ``lr`` 1e-3 and ``batch`` 1024 are the trainer's (RecBole: 1e-3
and ``train_batch_size`` 2048).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkg_fast.model.base import PairBatch, Recommender, check_options
from diffkg_fast.model.losses import bpr_loss, emb_norm_reg
from diffkg_fast.ops.graph import KGCSR
from diffkg_fast.utils.seed import rng_stream

__all__ = ["KGCN", "receptive_field", "sample_neighbourhood"]

AGGREGATORS = ("sum", "concat", "neighbor")
LOSSES = ("bce", "bpr")
# Elements of the largest per-chunk intermediate when scoring (users × items × K^H × d floats):
# 2^25 floats = 128 MB, which keeps the default's 1,024-user batches in one chunk.
SCORE_BUDGET = 2**25


def sample_neighbourhood(kg: np.ndarray, n_entities: int, n_relations: int, k: int,
                         generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(adj_entity, adj_relation)``, each ``n_entities × k`` int64: RecBole's
    ``construct_adj`` (module docstring), vectorised.

    A triplet is a neighbour both ways; a self loop ``(h, r, h)`` counts twice (as in RecBole's
    neighbour lists). An entity without a neighbour gets itself through relation
    ``n_relations``.
    """
    kg = np.asarray(kg, dtype=np.int64).reshape(-1, 3)
    both = np.concatenate((kg, kg[:, [2, 1, 0]]))
    g = KGCSR.from_triplets(both, n_entities, n_relations)
    deg, start = g.degree, g.rowptr[:-1]
    # Without replacement: edges in a random order within each row, the first k kept.
    order = torch.argsort(torch.rand(g.n_edges, generator=generator))
    order = order[torch.argsort(g.row[order], stable=True)]
    slot = start.unsqueeze(1) + torch.arange(k)
    without = order[slot.clamp(max=g.n_edges - 1)] if g.n_edges else slot
    # With replacement (fewer than k neighbours): k uniform positions in the row.
    draws = torch.rand(n_entities, k, generator=generator)
    with_ = start.unsqueeze(1) + (draws * deg.unsqueeze(1)).long().clamp(
        max=(deg - 1).clamp(min=0).unsqueeze(1))
    # An isolated entity's slots point anywhere (clamped in range) and are replaced below.
    edge = torch.where((deg >= k).unsqueeze(1), without, with_).clamp(max=max(g.n_edges - 1, 0))
    has = (deg > 0).unsqueeze(1)
    pad = torch.zeros(1, dtype=torch.int64)  # an empty KG: nothing to index
    col, rel = (g.col, g.rel) if g.n_edges else (pad, pad)
    ent = torch.where(has, col[edge], torch.arange(n_entities).unsqueeze(1))
    rel = torch.where(has, rel[edge], torch.full_like(edge, n_relations))
    return ent.contiguous(), rel.contiguous()


def receptive_field(items: Tensor, adj_entity: Tensor, adj_relation: Tensor,
                    n_iter: int) -> tuple[list[Tensor], list[Tensor]]:
    """Entities per hop ``(…, K^h)`` for ``h = 0 … n_iter`` and relations per hop ``(…,
    K^{h+1})`` for ``h = 0 … n_iter-1``; child ``k`` of node ``m`` of hop ``h`` sits at
    ``m * K + k`` of hop ``h + 1`` (RecBole's ``get_neighbors`` layout)."""
    ents, rels = [items.unsqueeze(-1)], []
    for _ in range(n_iter):
        e = ents[-1]
        rels.append(adj_relation[e].flatten(-2))
        ents.append(adj_entity[e].flatten(-2))
    return ents, rels


class KGCN(Recommender):
    """KGCN on the KG ``kg`` (``(n, 3)`` ``(h, r, t)``, relations in ``[0, n_relations)``, items
    the entities ``0 … n_items-1``). Random streams of ``seed``: ``init`` (tables and layers),
    ``neighbours`` (the receptive fields, drawn once)."""

    name = "kgcn"

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 kg: np.ndarray, *, embedding_size: int = 64, n_iter: int = 1,
                 aggregator: str = "sum", reg_weight: float = 1e-7,
                 neighbor_sample_size: int = 4, loss_type: str = "bce", seed: int = 421,
                 device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.n_iter, self.aggregator, self.reg_weight = n_iter, aggregator, reg_weight
        self.k, self.loss_type, self.dim = neighbor_sample_size, loss_type, embedding_size
        adj_e, adj_r = sample_neighbourhood(kg, n_entities, n_relations, neighbor_sample_size,
                                            rng_stream(seed, "neighbours"))
        # In the state: a resumed or reloaded model keeps the fields it was trained with.
        self.register_buffer("adj_entity", adj_e)
        self.register_buffer("adj_relation", adj_r)
        d = embedding_size
        self.user = nn.Parameter(torch.empty(n_users, d))
        self.entity = nn.Parameter(torch.empty(n_entities, d))
        self.relation = nn.Parameter(torch.empty(n_relations + 1, d))  # + the padding relation
        self.layers = nn.ModuleList(nn.Linear(2 * d if aggregator == "concat" else d, d)
                                    for _ in range(n_iter))
        init = rng_stream(seed, "init")
        with torch.no_grad():
            for p in (self.user, self.entity, self.relation):
                nn.init.xavier_normal_(p, generator=init)
            for layer in self.layers:
                nn.init.xavier_normal_(layer.weight, generator=init)
                nn.init.zeros_(layer.bias)
        self.to(device)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> KGCN:
        return cls(ds.n_users, ds.n_items, ds.n_entities, ds.n_relations, ds.kg, **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("embedding_size", "n_iter", "neighbor_sample_size"),
                      non_negative=("reg_weight", "seed"),
                      choices={"aggregator": AGGREGATORS, "loss_type": LOSSES})

    # ------------------------------------------------------------------ item vectors
    def item_vectors(self, user: Tensor, items: Tensor) -> Tensor:
        """``(B, J, d)`` item vectors of ``items`` as seen by each of ``B`` users (``user``:
        ``B × d`` vectors). ``items``: ``(B, J)`` per user, or ``(J,)`` shared by all users
        (scoring: the hop embeddings are then gathered once)."""
        shared = items.ndim == 1
        ents, rels = receptive_field(items.unsqueeze(0) if shared else items,
                                     self.adj_entity, self.adj_relation, self.n_iter)
        b, j, k = user.shape[0], items.shape[-1], self.k
        table = user @ self.relation.T / self.dim  # B × (R+1): <u, r> / d
        weights = []
        for h, r in enumerate(rels):
            s = table[:, r[0]] if shared else torch.gather(table, 1, r.reshape(b, -1))
            weights.append(torch.softmax(s.view(b, j, k**h, k), dim=-1))
        vecs: list[Tensor] = []
        for i in range(self.n_iter):
            act = torch.tanh if i == self.n_iter - 1 else F.relu
            vecs = [act(self._first(ents[h], ents[h + 1], weights[h]) if i == 0
                        else self._mix(i, vecs[h], vecs[h + 1], weights[h]))
                    for h in range(self.n_iter - i)]
        return vecs[0][:, :, 0]

    def _first(self, own: Tensor, children: Tensor, w: Tensor) -> Tensor:
        """Iteration 0's node update before the activation, ``(B, J, M, d)``, from entity ids
        ``own`` (X, J, M) and ``children`` (X, J, M·K), X 1 (shared by the users) or B, and the
        weights ``w`` (B, J, M, K).

        Its inputs are the embedding table itself, so the layer is applied to the table first:
        ``W [e; n] + b = (W_a e + b) + sum_k (w_k / K) W_b e_k`` (``W_a = W_b = W`` for ``sum``,
        ``W_a = 0`` for ``neighbor``, the two halves of ``W`` for ``concat``), the same value
        with a ``d × d`` product per entity instead of per (user, node); for the shared items of
        scoring the result is laid out item-major (a permuted view), which ``bmm`` writes
        without a copy.
        """
        d, k = self.dim, self.k
        layer = self.layers[0]
        w_own, w_kid = {"sum": (layer.weight, layer.weight),
                        "neighbor": (None, layer.weight),
                        "concat": (layer.weight[:, :d], layer.weight[:, d:])}[self.aggregator]
        t_kid = self.entity @ w_kid.T
        base = layer.bias if w_own is None else torch.addmm(layer.bias, self.entity, w_own.T)
        if w_own is None:
            base = base.expand(self.n_entities, d)
        b, j, m = w.shape[0], w.shape[1], w.shape[2]
        wk = w / k
        if own.shape[0] == 1 and b > 1:
            kids = t_kid[children[0]].view(j * m, k, d)
            z = torch.bmm(wk.permute(1, 2, 0, 3).reshape(j * m, b, k), kids)
            z = z.view(j, m, b, d) + base[own[0]].unsqueeze(2)
            return z.permute(2, 0, 1, 3)
        kids = t_kid[children].view(b, j, m, k, d)
        return torch.einsum("bjmk,bjmkd->bjmd", wk, kids) + base[own]

    def _mix(self, i: int, own: Tensor, children: Tensor, w: Tensor) -> Tensor:
        """Iteration ``i >= 1``'s node update before the activation: ``own`` (B, J, M, d),
        ``children`` (B, J, M·K, d), ``w`` (B, J, M, K)."""
        b, j, m, d = own.shape
        kids = children.reshape(b, j, m, self.k, d)
        agg = torch.einsum("bjmk,bjmkd->bjmd", w, kids) / self.k
        if self.aggregator == "sum":
            z = own + agg
        elif self.aggregator == "neighbor":
            z = agg
        else:
            z = torch.cat((own, agg), dim=-1)
        return self.layers[i](z)

    # ------------------------------------------------------------------ training
    def forward(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of ``loss_type`` + ``reg_weight`` EmbLoss over one batch; positive and
        negative items in one pass (RecBole runs two identical forwards)."""
        u = self.user[batch.users]
        v = self.item_vectors(u, torch.stack((batch.pos, batch.neg), dim=1))
        pos, neg = v[:, 0], v[:, 1]
        ys_pos, ys_neg = (u * pos).sum(-1), (u * neg).sum(-1)
        if self.loss_type == "bce":
            rec = torch.cat((F.softplus(-ys_pos), F.softplus(ys_neg))).mean()
        else:
            rec = bpr_loss(u, pos, neg)
        reg = self.reg_weight * emb_norm_reg(u, pos, neg, span=batch.span, dist=self.dist)
        return rec + reg, {self.loss_type: rec.detach(), "reg": reg.detach()}

    # ------------------------------------------------------------------ scoring
    def score_chunk(self) -> int:
        """Users scored per chunk: the largest intermediate stays under :data:`SCORE_BUDGET`."""
        per_user = self.n_items * self.k**self.n_iter * self.dim
        return max(1, SCORE_BUDGET // per_user)

    @torch.no_grad()
    def score(self, users: Tensor) -> Tensor:
        """``B × n_items``: every item's user-specific vector, a chunk of users at a time."""
        users = users.to(self.user.device)
        items = torch.arange(self.n_items, device=users.device)
        step = self.score_chunk()
        out = []
        for lo in range(0, users.numel(), step):
            u = self.user[users[lo:lo + step]]
            out.append((self.item_vectors(u, items) * u.unsqueeze(1)).sum(-1))
        return torch.cat(out) if out else self.user.new_zeros(0, self.n_items)
