"""KGIN (Wang, Huang, Zhao, Zhang, He, Chua: "Learning Intents behind Interactions with Knowledge
Graph for Recommendation", WWW 2021), as RecBole 1.2.1 implements it
(``recbole/model/knowledge_aware_recommender/kgin.py``; the authors' code:
huangtinglin/Knowledge_Graph_based_Intent_Network, ``modules/KGIN.py``).

Tables: users ``U``, entities ``E`` (items first), relations ``Rel`` (``R``, or ``2R`` with
``kg_reverse_r``), intent keys ``L`` (``n_factors × d``) and intent logits ``W`` (``n_factors ×
|Rel|``). With ``e^0 = E``, ``u^0 = U``, per hop ``l = 0 … context_hops-1``::

    intent p        e_p        = sum_r softmax(W_p)_r Rel_r                (intents over relations)
    entity          a_h        = mean_{(h, r, t) in KG} Rel_r ⊙ e^l_t     (relational path-aware)
    user            beta_u     = softmax_p <u^l, L_p>                     (user–intent attention)
                    b_u        = mean_{i in N(u)} e^l_i
                    c_u        = (sum_p beta_u,p e_p) ⊙ b_u + b_u
    next layer      e^{l+1}    = normalize(dropout(a)),  u^{l+1} = normalize(dropout(c))
    output          e* = sum_{l=0..L} e^l,  u* = sum_{l=0..L} u^l         (residual sum)
    score           y_ui = <u*_u, e*_i>
    loss            BPR + reg_weight (||u*_B|| + ||e*_pos|| + ||e*_neg||) / B
                    + sim_regularity cor(W)

``cor`` is the intent independence loss over the rows of ``W`` (``ind``): ``cosine``, the sum over
intent pairs of their squared cosine; ``distance``, the sum over pairs of their distance
correlation; ``mi``, ``-sum_p log softmax_q(<w_p, w_q> / temperature)_p`` over normalised rows.
As in RecBole and the authors' code, ``beta`` attends with ``L``, a table of its own (the paper
writes ``<e_u, e_p>``), and the regulariser is RecBole's ``EmbLoss``: Frobenius norms, not
squared, of the batch's propagated embeddings (:func:`~diffkg_fast.model.losses.emb_norm_reg`).

KG edges. The stored triplets as they are, ``(h, r, t)`` aggregated into ``h`` (RecBole's
``kg_graph``; ``kg_reverse_r`` false, RecBole's default); with ``kg_reverse_r`` the inverses
``(t, r + R, h)`` too, as the authors' ``inverse_r`` (their default) and RecBole's data option of
that name. Several relations between one pair are all kept (no de-duplication). The mean is
``torch_scatter.scatter_mean`` written with ``index_add_`` (a head without an edge gets 0); the
user mean is one CSR product (:func:`~diffkg_fast.ops.spmm.csr_spmm`, the extension's kernel)
with the ``users × items`` matrix of ``1/deg(u)``, so no ``interactions × d`` message table is
built (it was 80% of a training step on the default cohort).

Dropout, when training only, from the stream ``dropout`` (RecBole's ``GraphConv.forward``):

- when ``node_dropout_rate > 0``: the KG keeps ``int(n_edges * node_dropout_rate)`` edges drawn
  uniformly without replacement (RecBole's and the authors' ``edge_sampling``: the rate is the
  fraction KEPT, whatever its name; RecBole's 0.1 keeps a tenth), and each interaction of the
  user mean is dropped with probability ``mess_dropout_rate``, the kept ones scaled by ``1/(1-p)``
  (RecBole's ``SparseDropout(p=mess_dropout_rate)``);
- message dropout ``mess_dropout_rate`` on ``a`` and ``c`` at every hop, before normalising.

RecBole samples the edges in evaluation too (its ``GraphConv`` never checks ``training``); here,
as in the authors' ``generate()``, scoring uses the whole KG and no dropout.

Defaults, RecBole 1.2.1's ``KGIN.yaml`` unless said: ``embedding_size`` 64, ``reg_weight`` 1e-5,
``node_dropout_rate`` 0.1, ``mess_dropout_rate`` 0.1, ``sim_regularity`` 1e-4, ``context_hops``
3, ``n_factors`` 4, ``ind`` ``cosine`` (the authors' default is ``distance``), ``temperature``
0.2 (``mi`` only); ``kg_reverse_r`` false (RecBole's data default; the authors' ``inverse_r``
is true); initialisation Xavier-uniform for every table (RecBole's
``xavier_uniform_initialization``, the authors' ``initializer``); ``lr`` 1e-3 and ``batch`` 1024
are the trainer's (RecBole: 1e-3 and ``train_batch_size`` 2048; the authors: 1e-4, 1024).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkg_fast.model.base import EmbeddingRecommender, PairBatch, check_options
from diffkg_fast.model.losses import bpr_loss, emb_norm_reg
from diffkg_fast.ops.attention import dropout_mask
from diffkg_fast.ops.spmm import csr_spmm
from diffkg_fast.utils.seed import rng_stream

__all__ = ["KGIN", "independence_loss", "kgin_propagate", "scatter_mean"]

IND = ("cosine", "distance", "mi")


def scatter_mean(src: Tensor, index: Tensor, n: int) -> Tensor:
    """``torch_scatter.scatter_mean(src, index, dim=0, dim_size=n)``: row ``k`` is the mean of
    the rows of ``src`` whose ``index`` is ``k``, 0 where there is none."""
    out = src.new_zeros(n, src.shape[1]).index_add_(0, index, src)
    count = torch.zeros(n, dtype=src.dtype, device=src.device).index_add_(
        0, index, src.new_ones(index.shape))
    return out / count.clamp(min=1).unsqueeze(1)


def independence_loss(w: Tensor, ind: str, temperature: float = 0.2) -> Tensor:
    """The intent independence loss of the rows of ``w`` (``n_factors × n_relations``), as
    RecBole's ``calculate_cor_loss``, vectorised over the pairs of intents."""
    n = w.shape[0]
    if ind == "mi":
        z = F.normalize(w, dim=1)
        return -torch.log_softmax(z @ z.T / temperature, dim=1).diagonal().sum()
    pairs = torch.triu_indices(n, n, 1, device=w.device)
    if ind == "cosine":
        z = F.normalize(w, dim=1)
        return (z @ z.T)[pairs[0], pairs[1]].pow(2).sum()
    if ind != "distance":
        raise ValueError(f"ind must be one of {IND}, got {ind!r}")
    c = w.shape[1]
    # Per intent: its entries' pairwise distances, double centred (RecBole's
    # DistanceCorrelation, with its 1e-8 guards at the same places).
    x = w.unsqueeze(2)
    a = torch.sqrt((x.pow(2) - 2 * x @ x.transpose(1, 2) + x.pow(2).transpose(1, 2))
                   .clamp(min=0) + 1e-8)
    a = a - a.mean(1, keepdim=True) - a.mean(2, keepdim=True) + a.mean((1, 2), keepdim=True)
    dcov = torch.sqrt((torch.einsum("inm,jnm->ij", a, a) / c**2).clamp(min=0) + 1e-8)
    var = dcov.diagonal()
    dcor = dcov / torch.sqrt(var.unsqueeze(1) * var.unsqueeze(0) + 1e-8)
    return dcor[pairs[0], pairs[1]].sum()


def kgin_propagate(user: Tensor, entity: Tensor, latent: Tensor, relation: Tensor,
                   att: Tensor, kg: tuple[Tensor, Tensor, Tensor], inter: Tensor, hops: int,
                   mess_dropout: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(u*, e*)``: KGIN's ``hops`` layers summed with layer 0 (module docstring).

    ``kg`` = ``(head, tail, rel)`` of the edges to aggregate; ``inter``: the sparse ``users ×
    items`` matrix of the user mean, ``1/deg(u)`` (times any dropout scale) per interaction.
    ``mess_dropout > 0`` drops messages, drawing from ``generator``.
    """
    head, tail, rel = kg
    n_items, n_ent = inter.shape[1], entity.shape[0]
    intents = torch.softmax(att, dim=-1) @ relation  # n_factors × d
    u_out, e_out = user, entity
    for _ in range(hops):
        a = scatter_mean(entity[tail] * relation[rel], head, n_ent)
        beta = torch.softmax(user @ latent.T, dim=1)
        b = csr_spmm(inter, entity[:n_items])
        c = (beta @ intents) * b + b
        if mess_dropout > 0:
            a = a * dropout_mask(tuple(a.shape), mess_dropout, generator, a.device, a.dtype)
            c = c * dropout_mask(tuple(c.shape), mess_dropout, generator, c.device, c.dtype)
        entity, user = F.normalize(a), F.normalize(c)
        e_out, u_out = e_out + entity, u_out + user
    return u_out, e_out


class KGIN(EmbeddingRecommender):
    """KGIN on ``train`` (``n_users × n_items``) and the KG ``kg`` (``(n, 3)`` ``(h, r, t)``,
    relations in ``[0, n_relations)``, items the entities ``0 … n_items-1``).

    Random streams of ``seed``: ``init`` (the tables), ``dropout`` (edge sampling, interaction
    and message dropout; its state is part of ``state_dict``).
    """

    name = "kgin"

    def __init__(self, n_users: int, n_items: int, n_entities: int, n_relations: int,
                 train: sp.spmatrix, kg: np.ndarray, *, embedding_size: int = 64,
                 context_hops: int = 3, n_factors: int = 4, reg_weight: float = 1e-5,
                 sim_regularity: float = 1e-4, ind: str = "cosine", temperature: float = 0.2,
                 node_dropout_rate: float = 0.1, mess_dropout_rate: float = 0.1,
                 kg_reverse_r: bool = False, seed: int = 421, device: str = "cpu") -> None:
        super().__init__()
        self.check_options(locals())
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.context_hops, self.reg_weight = context_hops, reg_weight
        self.sim_regularity, self.ind, self.temperature = sim_regularity, ind, temperature
        self.node_dropout_rate, self.mess_dropout_rate = node_dropout_rate, mess_dropout_rate
        kg = np.asarray(kg, dtype=np.int64).reshape(-1, 3)
        n_rel = n_relations
        if kg_reverse_r:
            inv = kg[:, [2, 1, 0]]
            inv[:, 1] += n_relations
            kg, n_rel = np.concatenate((kg, inv)), 2 * n_relations
        t = torch.from_numpy(kg)
        # Graphs are data rebuilt from the dataset: buffers, but not in the state.
        self.register_buffer("head", t[:, 0].contiguous(), persistent=False)
        self.register_buffer("rel", t[:, 1].contiguous(), persistent=False)
        self.register_buffer("tail", t[:, 2].contiguous(), persistent=False)
        rowptr, col, val = _mean_interactions(train, n_users, n_items)
        self.register_buffer("inter_rowptr", rowptr, persistent=False)
        self.register_buffer("inter_col", col, persistent=False)
        self.register_buffer("inter_val", val, persistent=False)
        d = embedding_size
        self.user = nn.Parameter(torch.empty(n_users, d))
        self.entity = nn.Parameter(torch.empty(n_entities, d))
        self.latent = nn.Parameter(torch.empty(n_factors, d))
        self.relation = nn.Parameter(torch.empty(n_rel, d))
        self.disen_weight_att = nn.Parameter(torch.empty(n_factors, n_rel))
        init = rng_stream(seed, "init")
        with torch.no_grad():
            for p in (self.user, self.entity, self.latent, self.relation,
                      self.disen_weight_att):
                nn.init.xavier_uniform_(p, generator=init)
        self.dropout_generator = rng_stream(seed, "dropout")
        self._inter: tuple[Tensor, Tensor] | None = None  # (values, the CSR built from them)
        self.to(device)

    @classmethod
    def from_dataset(cls, ds: Any, **options: Any) -> KGIN:
        return cls(ds.n_users, ds.n_items, ds.n_entities, ds.n_relations, ds.train, ds.kg,
                   **options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check_options(options, positive=("embedding_size", "n_factors", "temperature"),
                      non_negative=("context_hops", "reg_weight", "sim_regularity", "seed"),
                      unit=("node_dropout_rate", "mess_dropout_rate"), choices={"ind": IND})
        if options.get("mess_dropout_rate", 0.0) == 1.0:
            raise ValueError("mess_dropout_rate must be < 1 (it scales kept values by 1/(1-p))")

    # ------------------------------------------------------------------ propagation
    def _propagate(self, dropout: bool) -> tuple[Tensor, Tensor]:
        kg = (self.head, self.tail, self.rel)
        val = self.inter_val
        g = self.dropout_generator
        if dropout and self.node_dropout_rate > 0:
            kg, val = self._node_dropout(kg, val, g)
        if self._inter is None or self._inter[0] is not val:
            self._inter = (val, _csr(self.inter_rowptr, self.inter_col, val,
                                     (self.n_users, self.n_items)))
        return kgin_propagate(self.user, self.entity, self.latent, self.relation,
                              self.disen_weight_att, kg, self._inter[1], self.context_hops,
                              self.mess_dropout_rate if dropout else 0.0, g)

    def _node_dropout(self, kg: tuple[Tensor, Tensor, Tensor], val: Tensor,
                      g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
        """RecBole's node dropout: keep ``int(n_edges * node_dropout_rate)`` KG edges; drop
        interactions with probability ``mess_dropout_rate`` (module docstring)."""
        n_edges = kg[0].numel()
        keep = torch.randperm(n_edges, generator=g)[: int(n_edges * self.node_dropout_rate)]
        keep = keep.to(kg[0].device)
        kg = tuple(x[keep] for x in kg)
        val = val * dropout_mask(tuple(val.shape), self.mess_dropout_rate, g, val.device,
                                 val.dtype)
        return kg, val

    def _eval_outputs(self) -> tuple[Tensor, Tensor]:
        u, e = self._propagate(dropout=False)
        return u, e[: self.n_items]

    # ------------------------------------------------------------------ training
    def forward(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """BPR + ``reg_weight`` EmbLoss + ``sim_regularity`` independence over one batch: one
        propagation of the whole graph per batch, as RecBole's ``calculate_loss``."""
        u, e = self._propagate(dropout=self.training)
        ub, pb, nb = u[batch.users], e[batch.pos], e[batch.neg]
        bpr = bpr_loss(ub, pb, nb)
        reg = self.reg_weight * emb_norm_reg(ub, pb, nb, span=batch.span, dist=self.dist)
        cor = self.sim_regularity * independence_loss(self.disen_weight_att, self.ind,
                                                      self.temperature)
        return bpr + reg + cor, {"bpr": bpr.detach(), "reg": reg.detach(), "cor": cor.detach()}

    def _apply(self, fn, recurse=True):  # .to(device) moves the buffers: rebuild the matrix
        self._inter = None
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict[str, Any]:
        return {"dropout": self.dropout_generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.dropout_generator.set_state(state["dropout"])


def _csr(rowptr: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": no information
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(rowptr, col, val, size=shape, check_invariants=False)


def _mean_interactions(train: sp.spmatrix, n_users: int,
                       n_items: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(rowptr, col, 1/deg(user))``: the CSR of the binary training matrix with RecBole's
    ``interact_mat`` values, the user rows of ``D^-1 A`` over users + entities
    (``get_norm_inter_matrix(mode="si")``)."""
    if train.shape != (n_users, n_items):
        raise ValueError(f"train matrix has shape {train.shape}, expected ({n_users}, {n_items})")
    m = sp.csr_matrix(train, copy=True)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    deg = np.diff(m.indptr)
    w = 1.0 / np.repeat(deg, deg).astype(np.float64)
    return (torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(w.astype(np.float32)))
