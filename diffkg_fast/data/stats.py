"""Dataset statistics: the seed paper's Table 1 plus per-split, per-relation and per-type counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffkg_fast.data.dataset import SPLITS, KGDataset
from diffkg_fast.data.errors import cut, excerpt


def dataset_stats(ds: KGDataset) -> dict[str, Any]:
    """Counts as a plain dict (JSON-serialisable)."""
    interactions = int(sum(getattr(ds, s).nnz for s in SPLITS))
    type_counts = np.bincount(ds.entity_type, minlength=len(ds.entity_type_names))
    by_type = {n: int(c) for n, c in zip(ds.entity_type_names, type_counts, strict=True)}
    rel_counts = np.bincount(ds.kg[:, 1], minlength=ds.n_relations) if len(ds.kg) else \
        np.zeros(ds.n_relations, dtype=np.int64)
    out: dict[str, Any] = {
        "name": ds.name,
        "source": ds.meta.get("source", ""),
        "split": ds.split,
        "seed": ds.seed,
        "patients" if ds.visits is not None else "users": ds.n_users,
    }
    if ds.visits is not None:
        out.update(
            diagnoses=by_type.get("diagnosis", 0),
            procedures=by_type.get("procedure", 0),
            medications=ds.n_items,
            visits=ds.visits.n_visits,
        )
    else:
        out["items"] = ds.n_items
    out.update(
        interactions=interactions,
        density=interactions / max(ds.n_users * ds.n_items, 1),
        entities=ds.n_entities,
        relations=ds.n_relations,
        triplets=ds.n_triplets,
        entities_by_type=by_type,
        triplets_by_relation={n: int(c) for n, c in zip(ds.relation_names, rel_counts,
                                                       strict=True)},
    )
    splits = {}
    for s in SPLITS:
        m = getattr(ds, s)
        users = int(np.count_nonzero(np.diff(m.indptr)))
        split_stats = {"interactions": int(m.nnz), "users": users}
        if ds.visits is not None and ds.split == "visit":
            split_stats["visits"] = int(np.count_nonzero(ds.visits.split == SPLITS.index(s)))
        splits[s] = split_stats
    out["splits"] = splits
    validation = describe_validation(ds.meta.get("validation"))
    if validation:
        out["validation"] = validation
    return out


def describe_validation(info: object) -> str | None:
    """Where the validation split came from (``meta['validation']`` of the KG loaders). The
    meta comes from a file's header, which may hold anything: a value that is not what the
    loaders write is shown as ``?`` or as an excerpt, never formatted as what it is not."""
    if not isinstance(info, dict):
        return None

    def num(key: str, spec: str) -> str:
        value = info.get(key, 0)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return format(value, spec) if ok else "?"

    source = info.get("from")
    if source == "train":
        return (f"carved from train: {num('fraction', '.0%')} of each user's training "
                f"interactions (seed {excerpt(info.get('seed'))}), {num('interactions', ',')} "
                f"interactions of {num('users', ',')} users; the source has none")
    if source == "none":
        return "none (the source has none and valid_fraction=0)"
    return f"given by {cut(source, 100)}" if isinstance(source, str) else None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def format_stats(stats: dict[str, Any]) -> str:
    """A two-column text table (nested dicts indented, a third level joined on one line)."""
    lines = []
    for key, value in stats.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                text = (", ".join(f"{a} {_fmt(b)}" for a, b in v.items())
                        if isinstance(v, dict) else _fmt(v))
                lines.append(f"  {k:<22} {text}")
        else:
            lines.append(f"{key:<24} {_fmt(value)}")
    return "\n".join(lines)
