"""RecBole 1.2.1 on a dataset exported by ``diffkg-fast data export --format recbole``: the
reference side of the parity runs in ``docs/parity.md``.

Runs in a separate, throwaway virtual environment, never in the project's: RecBole pins an old
stack (numpy < 2, scipy < 1.12, pandas < 2.3, setuptools < 70), its KGIN imports
torch_scatter and its KGAT DGL, neither of which has a build for current torch (small stand-ins
for the calls RecBole makes are written on first use, below). RecBole never becomes a
dependency of the project::

    python3 -m venv /tmp/recbole && /tmp/recbole/bin/pip install torch==2.13.0
    /tmp/recbole/bin/pip install recbole==1.2.1 "numpy<2" "scipy<1.12" "pandas<2.3" "setuptools<70"
    diffkg-fast data build --source synthetic --out default.npz
    diffkg-fast data export default.npz --format recbole --out data/synthetic
    /tmp/recbole/bin/python bench/recbole_parity.py --data data --model MultiVAE --seed 421 \\
        --out parity.json [--set key=value ...]

The protocol is the project's: the exported train / valid / test splits as they are
(``benchmark_filename``), full ranking over all items with training items masked (and
validation items when testing), Recall and NDCG at 10 / 20 / 40, selection on validation
NDCG@20, early stopping after ``stopping_step`` validations without improvement, the test split
ranked once with the selected state. Appends one JSON record per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# KGIN's Aggregator imports torch_scatter.scatter_mean; this is all of it that RecBole calls.
_TORCH_SCATTER = '''
import torch


def scatter_mean(src, index, dim=0, dim_size=None):
    size = list(src.shape)
    size[dim] = int(index.max()) + 1 if dim_size is None else dim_size
    out = torch.zeros(size, dtype=src.dtype, device=src.device).index_add_(dim, index, src)
    count = torch.zeros(size[dim], dtype=src.dtype, device=src.device).index_add_(
        0, index, torch.ones_like(index, dtype=src.dtype))
    shape = [1] * src.dim()
    shape[dim] = -1
    return out / count.clamp(min=1).view(shape)


def scatter_sum(src, index, dim=0, dim_size=None):
    size = list(src.shape)
    size[dim] = int(index.max()) + 1 if dim_size is None else dim_size
    return torch.zeros(size, dtype=src.dtype, device=src.device).index_add_(dim, index, src)
'''


# KGAT builds its collaborative KG with dgl.graph((src, dst)), sets edata["relation_id"], and
# per relation takes filter_edges(...) -> edge_subgraph(..., preserve_nodes=True) ->
# adjacency_matrix(transpose=False, scipy_fmt="coo"): rows the sources, columns the
# destinations, one entry per edge (DGL's documented layout), N = the graph's node count.
_DGL = '''
import numpy as np
import scipy.sparse as sp
import torch


class _Edges:
    def __init__(self, data):
        self.data = data


class _Graph:
    def __init__(self, src, dst, n):
        self.src, self.dst, self.n = torch.as_tensor(src), torch.as_tensor(dst), n
        self.edata = {}

    def filter_edges(self, predicate):
        return torch.nonzero(predicate(_Edges(self.edata)), as_tuple=False).flatten()

    def adjacency_matrix(self, transpose=False, scipy_fmt="coo"):
        rows, cols = (self.dst, self.src) if transpose else (self.src, self.dst)
        m = sp.coo_matrix((np.ones(len(rows)), (rows.numpy(), cols.numpy())),
                          shape=(self.n, self.n))
        return m.asformat(scipy_fmt)


def graph(edges, num_nodes=None):
    src, dst = (torch.as_tensor(e) for e in edges)
    n = int(max(src.max(), dst.max())) + 1 if num_nodes is None else num_nodes
    return _Graph(src, dst, n)


def edge_subgraph(g, edges, preserve_nodes=True):
    assert preserve_nodes, "the stand-in keeps every node, as RecBole's KGAT asks"
    edges = torch.as_tensor(edges)
    sub = _Graph(g.src[edges], g.dst[edges], g.n)
    sub.edata = {k: v[edges] for k, v in g.edata.items()}
    return sub
'''


def _stand_ins() -> None:
    """Make ``import torch_scatter`` and ``import dgl`` find the stand-ins above (a temporary
    module path), each only where the real package is missing."""
    folder = Path(tempfile.mkdtemp(prefix="recbole_stand_ins_"))
    for name, text in (("torch_scatter", _TORCH_SCATTER), ("dgl", _DGL)):
        try:
            __import__(name)
        except ImportError:
            (folder / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder))


def _kgin_whole_kg_at_evaluation() -> None:
    """A diagnostic variant (``--kgin-eval-whole-kg``): RecBole 1.2.1's KGIN samples its KG
    edges (``GraphConv.edge_sampling``, keeping ``node_dropout_rate`` of them) in every forward,
    evaluation included, where the authors' ``generate()`` and the native model score with the
    whole KG. Patched here so that evaluation uses every edge, as theirs does; training is
    RecBole's unchanged."""
    from recbole.model.knowledge_aware_recommender import kgin

    sample = kgin.GraphConv.edge_sampling

    def edge_sampling(self, edge_index, edge_type, rate=0.5):
        if not self.training:
            return edge_index, edge_type
        return sample(self, edge_index, edge_type, rate)

    kgin.GraphConv.edge_sampling = edge_sampling


def _kgin_fresh_test_scores() -> None:
    """A diagnostic variant (``--kgin-fresh-test-scores``): RecBole 1.2.1's KGIN caches its
    propagated embeddings for scoring (``restore_user_e``, ``restore_entity_e``) but, unlike its
    KGAT, does not list them in ``other_parameter_name``; so when the trainer loads the best
    checkpoint for the test, the cache still holds the LAST validated epoch's embeddings, and the
    test ranks with that model, not the selected one. Patched here: loading a state clears the
    cache, as KGAT's checkpoint does."""
    from recbole.model.knowledge_aware_recommender import kgin

    load = kgin.KGIN.load_state_dict

    def load_state_dict(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        self.restore_user_e, self.restore_entity_e = None, None
        return out

    kgin.KGIN.load_state_dict = load_state_dict


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder holding DATASET/DATASET.*.inter")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--model", required=True)
    ap.add_argument("--seed", type=int, default=421)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a RecBole config value (JSON or a string)")
    ap.add_argument("--kgin-fresh-test-scores", action="store_true",
                    help="KGIN: clear the cached embeddings when the best state is loaded for "
                         "the test; recorded as model 'KGIN (fresh test scores)'")
    ap.add_argument("--kgin-eval-whole-kg", action="store_true",
                    help="KGIN: evaluate with every KG edge (RecBole samples them at evaluation "
                         "too); recorded as model 'KGIN (whole KG at evaluation)'")
    args = ap.parse_args()
    _stand_ins()
    from recbole.quick_start import run_recbole

    if args.kgin_eval_whole_kg:
        _kgin_whole_kg_at_evaluation()
    if args.kgin_fresh_test_scores:
        _kgin_fresh_test_scores()

    config = {
        "data_path": args.data, "benchmark_filename": ["train", "valid", "test"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "load_col": {"inter": ["user_id", "item_id"],
                     "kg": ["head_id", "relation_id", "tail_id"],
                     "link": ["item_id", "entity_id"]},
        "eval_args": {"mode": "full", "group_by": "user", "order": "RO"},
        "metrics": ["Recall", "NDCG"], "topk": [10, 20, 40], "valid_metric": "NDCG@20",
        "metric_decimal_place": 6,
        "seed": args.seed, "reproducibility": True, "show_progress": False,
        "checkpoint_dir": tempfile.mkdtemp(prefix="recbole_ckpt_"),
        "log_wandb": False, "device": "cpu", "gpu_id": "",
    }
    for pair in args.set:
        key, _, value = pair.partition("=")
        config[key] = _value(value)
    t0 = time.perf_counter()
    res = run_recbole(model=args.model, dataset=args.dataset, config_dict=config)
    variants = [v for v, on in (("whole KG at evaluation", args.kgin_eval_whole_kg),
                                ("fresh test scores", args.kgin_fresh_test_scores)) if on]
    name = args.model + (f" ({', '.join(variants)})" if variants else "")
    record = {"model": name, "seed": args.seed, "seconds": time.perf_counter() - t0,
              "sets": args.set, "valid": dict(res["best_valid_result"]),
              "test": dict(res["test_result"])}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # RecBole 1.2.1 reloads the best checkpoint of this very run with torch.load's old default;
    # torch >= 2.6 defaults to weights_only=True, which RecBole's file does not satisfy.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    main()
