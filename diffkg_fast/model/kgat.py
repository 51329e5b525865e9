"""KGAT (Wang, He, Cao, Liu, Chua: "KGAT: Knowledge Graph Attention Network for
Recommendation", KDD 2019), on the collaborative knowledge graph (CKG).

The CKG has one node per user and per entity (users ``0 … U-1``, then entity ``j`` as node
``U + j``; items are entities ``0 … n_items-1``) and the edges

    u -> U+i  and  U+i -> u       relation ``ui`` (one id, both directions, as RecBole)
    U+h -> U+t                    every KG triplet (h, r, t), and with ``inverse_relations``
                                  its inverse (t, r + R, h); one relation per (h, t) pair
                                  (:func:`~diffkg_fast.ops.graph.kg_with_inverses`)

With ego embeddings ``e`` (users and entities, d = ``embedding_size``), relation embeddings
``e_r`` and projections ``W_r`` (d × k, k = ``kg_embedding_size``):

    attention   pi(h,r,t) = (e_t W_r) . tanh(e_h W_r + e_r)
                A[h,t]    = exp pi(h,r,t) / sum_{(h,r',t') in CKG} exp pi(h,r',t')
                            (segment softmax over h's out-edges, all relations)
    layer l     s = A e^(l-1)                                    (CSR SpMM)
                e^(l) = dropout(LeakyReLU((e^(l-1) + s) W1 + b1)
                                + LeakyReLU((e^(l-1) * s) W2 + b2))     (bi-interaction)
    output      e* = [e^(0) ‖ e^(1)/|e^(1)| ‖ … ‖ e^(L)/|e^(L)|]  (each layer L2-normalised)
    score       y_ui = <e*_u, e*_i>
    CF loss     BPR(u, i+, i-) + reg_weight (|e*_u| + |e*_i+| + |e*_i-|) / B   (Frobenius norms)
    KG loss     g(h,r,t) = |e_h W_r + e_r - e_t W_r|^2                       (TransR)
                softplus(g(h,r,t) - g(h,r,t-)).mean()
                + reg_weight (|e_h W_r| + |e_r| + |e_t W_r| + |e_t- W_r|) / B

``aggregator_type`` ``gcn``: ``LeakyReLU((e + s) W + b)``; ``graphsage``:
``LeakyReLU([e ‖ s] W + b)``. ``A`` is data to the CF loss: no gradient flows through ``pi``
(RecBole recomputes it under ``no_grad``; the paper's alternating optimisation does the same).

One epoch, RecBole's ``KGATTrainer`` order: the trainer's CF batches (BPR, one uniform negative
per training interaction), then :meth:`KGAT.on_epoch_end`: the KG phase (every KG triplet of the
CKG once, shuffled, ``batch`` at a time, one uniform negative tail each that is not a tail of
the head, as RecBole's ``KGSampler``; the SAME optimizer as the CF phase, as RecBole's trainer)
and the attention refresh (``pi`` for every CKG edge, softmax per head); then validation.
Before the first refresh ``A`` is RecBole's ``init_graph``: per relation the row-normalised
adjacency ``D_r^-1 A_r``, summed over relations (a head with edges of k relations has row sum k).

Defaults and their sources (RecBole 1.2.1 ``properties/model/KGAT.yaml``; the paper, §4.1.3 and
the authors' code ``xiangwang1223/knowledge_graph_attention_network``):

- ``embedding_size`` 64, ``kg_embedding_size`` 64: RecBole and the paper;
- ``layers`` (64, 32, 16): the paper (depth 3, its best); RecBole's yaml has ``[64]``;
- ``mess_dropout`` 0.1: RecBole and the paper; ``reg_weight`` 1e-5: RecBole and the paper;
- ``aggregator_type`` ``bi``: RecBole and the paper;
- LeakyReLU slope 0.01 (RecBole's ``nn.LeakyReLU()``; the authors' TensorFlow code uses 0.2);
  Xavier-normal initialisation, zero biases (RecBole's ``xavier_normal_initialization``);
- ``inverse_relations`` True: the paper and the authors' code; RecBole's ``kg_reverse_r``
  defaults to False (set it True there for parity, or this option False here);
- ``lr`` 1e-3 (Adam) and ``batch`` 1024 from the trainer: RecBole's ``learning_rate`` 0.001 and
  ``train_batch_size`` 2048 (the paper: 1024); the KG phase uses ``batch`` too, as RecBole.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from diffkg_fast.model.base import EmbeddingRecommender, EpochReport, PairBatch, check_options
from diffkg_fast.model.losses import bpr_loss, emb_norm_reg
from diffkg_fast.ops.attention import dropout_mask
from diffkg_fast.ops.graph import KGCSR, csr_offsets, kg_with_inverses
from diffkg_fast.ops.segment import segment_softmax
from diffkg_fast.ops.spmm import csr_spmm
from diffkg_fast.utils.negatives import sample_negatives
from diffkg_fast.utils.seed import rng_stream

__all__ = ["KGAT", "Aggregator", "RelationGroup", "attention_logits", "collaborative_kg",
           "relation_groups", "relation_normalised"]

AGGREGATORS = ("bi", "gcn", "graphsage")
LEAKY_SLOPE = 0.01  # RecBole's nn.LeakyReLU() default


# ---------------------------------------------------------------------- graph
def collaborative_kg(train: sp.spmatrix, kg: np.ndarray, n_users: int, n_entities: int,
                     n_relations: int, inverse_relations: bool = True) -> tuple[KGCSR, Tensor]:
    """The CKG (module docstring) as a head-sorted CSR over ``n_users + n_entities`` nodes, and
    its KG triplets ``(m, 3)`` int64 in ENTITY ids (what the KG phase trains on).

    Relation ids: ``0 … R-1`` stored, ``R … 2R-1`` inverse (with ``inverse_relations``), then
    the user–item relation (``2R``, or ``R`` without inverses): ``2R + 1`` or ``R + 1`` in all.
    """
    edges = kg_with_inverses(kg, n_relations)
    if not inverse_relations:
        # A stored relation always wins its (h, t) pair over an inverse one, so dropping the
        # inverse ids leaves the stored triplets, one per pair.
        edges = edges[edges[:, 1] < n_relations]
    n_kg_rel = 2 * n_relations if inverse_relations else n_relations
    r = sp.csr_matrix(train, copy=True)
    r.sum_duplicates()
    r.eliminate_zeros()
    coo = r.tocoo()
    u = coo.row.astype(np.int64)
    i = coo.col.astype(np.int64) + n_users
    ui = np.full_like(u, n_kg_rel)
    tri = np.concatenate([np.stack([u, ui, i], 1), np.stack([i, ui, u], 1),
                          edges + np.array([n_users, 0, n_users])])
    ckg = KGCSR.from_triplets(tri, n_users + n_entities, n_kg_rel + 1)
    return ckg, torch.from_numpy(np.ascontiguousarray(edges))


def relation_normalised(ckg: KGCSR) -> Tensor:
    """RecBole's initial attention (``KGAT.init_graph``): edge ``(h, r, t)`` weighs
    ``1 / |{t' : (h, r, t') in CKG}|``, the row normalisation within its relation."""
    key = ckg.row * ckg.n_relations + ckg.rel
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].to(torch.float32)


@dataclass(eq=False)
class RelationGroup:
    """The CKG edges of one relation as a CSR over the nodes they touch: ``edges`` their ids,
    ``nodes`` the distinct nodes (sorted), ``rowptr`` / ``tail`` the local CSR (positions in
    ``nodes``), whose entry ``j`` is edge ``edges[j]``. ``W_r`` then projects each node once,
    not once per edge end."""

    rel: int
    edges: Tensor
    nodes: Tensor
    rowptr: Tensor
    tail: Tensor


def relation_groups(ckg: KGCSR) -> list[RelationGroup]:
    """One :class:`RelationGroup` per relation with edges (built once per graph).

    The CKG is sorted by (head, tail) and ``nodes`` is sorted, so a relation's edges taken in
    CKG order are already in (local head, local tail) order: the local CSR needs no sort."""
    out = []
    order = torch.argsort(ckg.rel, stable=True)
    counts = torch.bincount(ckg.rel, minlength=ckg.n_relations).tolist()
    start = 0
    for r, n in enumerate(counts):
        if n == 0:
            continue
        e = order[start:start + n]
        start += n
        nodes, inverse = torch.unique(torch.cat([ckg.row[e], ckg.col[e]]), return_inverse=True)
        out.append(RelationGroup(r, e, nodes, csr_offsets(inverse[:n], len(nodes)),
                                 inverse[n:]))
    return out


def attention_logits(ego: Tensor, rel_emb: Tensor, trans_w: Tensor,
                     groups: Sequence[RelationGroup], n_edges: int) -> Tensor:
    """``pi(h, r, t) = (e_t W_r) . tanh(e_h W_r + e_r)`` of every CKG edge (n_edges,).

    ``ego`` (n_nodes × d), ``rel_emb`` (n_rel × k), ``trans_w`` (n_rel × d × k). The tanh
    depends on the head and relation only, so per relation: ``P = e W_r`` and
    ``T = tanh(P + e_r)`` once per node, then ``pi`` is the sampled product ``T P^T`` at the
    relation's edges (``torch.sparse.sampled_addmm``, an SDDMM: 20-45x faster on the default
    cohort than gathering both ends of every edge and a tanh per edge). A loop over the
    2R + 1 relations."""
    out = ego.new_empty(n_edges)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for g in groups:
            p = ego[g.nodes] @ trans_w[g.rel]
            t = torch.tanh(p + rel_emb[g.rel])
            n = len(g.nodes)
            pattern = torch.sparse_csr_tensor(g.rowptr, g.tail, p.new_zeros(len(g.edges)),
                                              size=(n, n), check_invariants=False)
            out[g.edges] = torch.sparse.sampled_addmm(pattern, t, p.T, beta=0.0).values()
    return out


# ---------------------------------------------------------------------- layers
class Aggregator(nn.Module):
    """One KGAT layer's aggregation of a node ``e`` and its attentive neighbourhood ``s``."""

    def __init__(self, d_in: int, d_out: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        # skip_init: no draw from torch's global RNG; KGAT.reset_parameters initialises.
        if kind == "bi":
            self.W1 = skip_init(nn.Linear, d_in, d_out)
            self.W2 = skip_init(nn.Linear, d_in, d_out)
        elif kind == "gcn":
            self.W = skip_init(nn.Linear, d_in, d_out)
        elif kind == "graphsage":
            self.W = skip_init(nn.Linear, 2 * d_in, d_out)
        else:
            raise ValueError(f"aggregator_type must be one of {AGGREGATORS}, got {kind!r}")

    def forward(self, ego: Tensor, side: Tensor) -> Tensor:
        if self.kind == "bi":
            return (F.leaky_relu(self.W1(ego + side), LEAKY_SLOPE)
                    + F.leaky_relu(self.W2(ego * side), LEAKY_SLOPE))
        if self.kind == "gcn":
            return F.leaky_relu(self.W(ego + side), LEAKY_SLOPE)
        return F.leaky_relu(self.W(torch.cat([ego, side], 1)), LEAKY_SLOPE)


# ---------------------------------------------------------------------- model
class KGAT(EmbeddingRecommender):
    """KGAT (module docstring) on ``train`` (``n_users × n_items``) and the KG ``kg`` (``(n, 3)``
    ``(h, r, t)``, entities ``0 … n_entities-1`` with items first, relations ``< n_relations``).

    Random streams of ``seed``: ``init`` (Xavier-normal tables and weights), ``dropout`` (message
    dropout), ``kg`` (the KG phase's order and negative tails). The attention values are the
    buffer ``attention`` (one per CKG edge, in CSR order), so a state dict scores identically.
    """

    name = "kgat"
    phases = ("kg", "attention")

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 train: sp.spmatrix, kg: np.ndarray, *, embedding_size: int = 64,
                 kg_embedding_size: int = 64, layers: Sequence[int] = (64, 32, 16),
                 mess_dropout: float = 0.1, reg_weight: float = 1e-5,
                 aggregator_type: str = "bi", inverse_relations: bool = True,
                 batch: int = 1024, seed: int = 421, device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        dev = torch.device(device)
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.d, self.k = embedding_size, kg_embedding_size
        self.mess_dropout, self.reg_weight, self.batch = mess_dropout, reg_weight, batch
        ckg, kg_edges = collaborative_kg(train, kg, n_users, n_entities, n_relations,
                                         inverse_relations)
        self.ckg = ckg.to(dev)
        self.groups = relation_groups(self.ckg)
        self.kg_triplets = kg_edges.to(dev)  # (h, r, t) entity ids: the KG phase's data
        # Sorted h * N + t of the KG edges: a sampled tail that is a real one is redrawn.
        self.kg_keys = torch.sort(kg_edges[:, 0] * n_entities + kg_edges[:, 2]).values
        n_rel = ckg.n_relations
        self.user_embedding = nn.Parameter(torch.empty(n_users, embedding_size))
        self.entity_embedding = nn.Parameter(torch.empty(n_entities, embedding_size))
        self.relation_embedding = nn.Parameter(torch.empty(n_rel, kg_embedding_size))
        self.trans_w = nn.Parameter(torch.empty(n_rel, embedding_size * kg_embedding_size))
        dims = [embedding_size, *layers]
        self.aggregators = nn.ModuleList(Aggregator(a, b, aggregator_type)
                                         for a, b in pairwise(dims))
        self.register_buffer("attention", relation_normalised(ckg))
        self.reset_parameters(rng_stream(seed, "init"))
        self.dropout_generator = rng_stream(seed, "dropout")
        self.kg_generator = rng_stream(seed, "kg")
        self._optimizer: torch.optim.Optimizer | None = None
        self._adj: tuple[Tensor, int, Tensor] | None = None  # (source buffer, version, CSR)
        self.to(dev)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """RecBole's ``xavier_normal_initialization``: every table and weight Xavier-normal (the
        projections as their ``n_rel × d·k`` table), biases zero."""
        for p in (self.user_embedding, self.entity_embedding, self.relation_embedding,
                  self.trans_w):
            nn.init.xavier_normal_(p, generator=generator)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> KGAT:
        return cls(ds.n_users, ds.n_items, ds.n_entities, ds.n_relations, ds.train, ds.kg,
                   **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("embedding_size", "kg_embedding_size", "batch"),
                      non_negative=("reg_weight", "seed"), unit=("mess_dropout",),
                      choices={"aggregator_type": AGGREGATORS})
        layers = options.get("layers", ())
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in layers):
            raise ValueError(f"layers must be positive layer sizes, got {list(layers)}")

    # ------------------------------------------------------------------ propagation
    def adjacency(self) -> Tensor:
        """The attentive CKG adjacency ``A`` as a sparse CSR tensor (values: the buffer
        ``attention``), rebuilt only when the buffer changes, so that the SpMM kernel's cached
        transpose serves a whole epoch of backward passes."""
        att = self.attention
        if self._adj is None or self._adj[0] is not att or self._adj[1] != att._version:
            n = self.ckg.n_entities
            with torch.no_grad(), warnings.catch_warnings():
                # The CSR layout is what the SpMM kernels take; its "beta" warning says nothing.
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                adj = torch.sparse_csr_tensor(self.ckg.rowptr, self.ckg.col, att.clone(),
                                              size=(n, n), check_invariants=False)
            self._adj = (att, att._version, adj)
        return self._adj[2]

    def propagate(self) -> tuple[Tensor, Tensor]:
        """``(users, items)`` of ``e*`` (module docstring); message dropout in training mode."""
        ego = torch.cat([self.user_embedding, self.entity_embedding])
        adj = self.adjacency()
        out = [ego]
        for agg in self.aggregators:
            ego = agg(ego, csr_spmm(adj, ego))
            if self.training and self.mess_dropout > 0:
                ego = ego * dropout_mask(tuple(ego.shape), self.mess_dropout,
                                         self.dropout_generator, ego.device, ego.dtype)
            out.append(F.normalize(ego, p=2, dim=1))
        emb = torch.cat(out, 1)
        return emb[:self.n_users], emb[self.n_users:self.n_users + self.n_items]

    def _eval_outputs(self) -> tuple[Tensor, Tensor]:
        return self.propagate()

    def _scoring_key(self) -> object:
        return self.adjacency()

    # ------------------------------------------------------------------ CF phase
    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam over every parameter, kept: the KG phase steps the same optimizer (RecBole's
        ``KGATTrainer`` runs both phases through the trainer's one optimizer)."""
        self._optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        return self._optimizer

    def forward(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """BPR + ``reg_weight`` RecBole ``EmbLoss`` of the batch's final embeddings."""
        users, items = self.propagate()
        u, pos, neg = users[batch.users], items[batch.pos], items[batch.neg]
        bpr = bpr_loss(u, pos, neg)
        reg = self.reg_weight * emb_norm_reg(u, pos, neg, span=batch.span, dist=self.dist)
        return bpr + reg, {"bpr": bpr.detach(), "reg": reg.detach()}

    # ------------------------------------------------------------------ KG phase
    def kg_loss(self, h: Tensor, r: Tensor, t: Tensor, neg: Tensor,
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """TransR with one negative tail per triplet (entity ids), RecBole's
        ``calculate_kg_loss``: softplus of the score gap + ``reg_weight`` EmbLoss.

        The loss is a mean and a sum of norms over the batch, so the batch is taken sorted by
        relation: each relation's heads and tails are projected by one matrix product (a
        per-triplet ``bmm`` with gathered ``W_r``, RecBole's way, is ~6x slower per step,
        bench/bench_kgat.py)."""
        order = torch.argsort(r, stable=True)
        h, r, t, neg = h[order], r[order], t[order], neg[order]
        w = self.trans_w.view(-1, self.d, self.k)
        ents = self.entity_embedding[torch.stack([h, t, neg], 1)]  # B × 3 × d
        counts = torch.bincount(r, minlength=w.shape[0]).tolist()
        # split, not slices: its backward is one concatenation, a slice's a zero-filled copy.
        eh, et, en = torch.cat([x @ w[rel] for rel, x in enumerate(torch.split(ents, counts))]
                               ).unbind(1)
        er = self.relation_embedding[r]
        pos_score = (eh + er - et).pow(2).sum(1)
        neg_score = (eh + er - en).pow(2).sum(1)
        loss = F.softplus(pos_score - neg_score).mean()
        reg = self.reg_weight * emb_norm_reg(eh, er, et, en)
        return loss + reg, {"kg": loss.detach(), "kg_reg": reg.detach()}

    def _kg_epoch(self, limit_batches: int | None) -> dict[str, float]:
        """Every KG triplet once, shuffled, ``batch`` at a time; mean loss parts."""
        if self._optimizer is None:
            raise RuntimeError("the KG phase steps the CF optimizer: call configure_optimizer")
        tri = self.kg_triplets
        perm = torch.randperm(len(tri), generator=self.kg_generator).to(tri.device)
        h, r, t = tri[perm].unbind(1)
        neg = sample_negatives(h.cpu(), self.kg_keys, self.n_entities,
                               self.kg_generator).to(tri.device)
        sums: dict[str, float] = {}
        steps = 0
        for s in range(0, len(tri), self.batch):
            if limit_batches is not None and steps >= limit_batches:
                break
            sl = slice(s, s + self.batch)
            loss, parts = self.kg_loss(h[sl], r[sl], t[sl], neg[sl])
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            steps += 1
        return {key: v / max(steps, 1) for key, v in sums.items()}

    @torch.no_grad()
    def update_attention(self) -> None:
        """RecBole's ``update_attentive_A``: ``pi`` for every CKG edge from the current tables,
        softmax per head, written into the buffer ``attention`` (no gradient)."""
        ego = torch.cat([self.user_embedding, self.entity_embedding])
        logits = attention_logits(ego, self.relation_embedding,
                                  self.trans_w.view(-1, self.d, self.k), self.groups,
                                  self.ckg.n_edges)
        self.attention.copy_(segment_softmax(logits, self.ckg.rowptr))

    def on_epoch_end(self, epoch: int, limit_batches: int | None = None) -> EpochReport:
        """The KG phase, then the attention refresh (RecBole's ``KGATTrainer`` order)."""
        was = self.training
        self.train()
        t0 = time.perf_counter()
        losses = self._kg_epoch(limit_batches)
        t1 = time.perf_counter()
        self.update_attention()
        self.train(was)
        return EpochReport(losses, {"kg": t1 - t0, "attention": time.perf_counter() - t1}, {})

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"dropout": self.dropout_generator.get_state(),
                "kg": self.kg_generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.dropout_generator.set_state(state["dropout"])
        self.kg_generator.set_state(state["kg"])
