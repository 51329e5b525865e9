"""Named hyper-parameter sets for ``diffkg-fast train --preset NAME``: the best known values
for a dataset.

DiffKG's published runs differ from ``Params.py`` by a handful of flags per dataset (the
commands of HKUDS/DiffKG's README). Keeping them here, under a name, lets a run say *which*
published setting it reproduces instead of repeating eight flags that are easy to get subtly
wrong. A preset holds only the keys it changes; a key the chosen model does not take (a DiffKG
option under ``--model lightgcn``) is skipped, and a config file, ``--set`` or a flag still
overrides the rest. A preset holds accuracy, never a time budget: a short demo says its epoch
count on its own command line (``--epoch 6``).

This module imports no torch: the CLI lists the names in ``--help``.
"""

from __future__ import annotations

from typing import Any

from diffkg_fast.data.errors import DataError

__all__ = ["PRESETS", "preset"]

PRESETS: dict[str, dict[str, Any]] = {
    # Params.py as it is: the same as passing no preset.
    "diffkg": {},
    "lastfm": {"reg": 1e-5, "mess_dropout_rate": 0.2, "layer_num_kg": 2, "res_lambda": 0.0,
               "triplet_num": -1, "cl_pattern": 1, "keepRate": 0.1, "e_loss": 0.01},
    "mind": {"e_loss": 0.1, "temp": 1.0, "ssl_reg": 1.0, "mess_dropout_rate": 0.2,
             "res_lambda": 1.0},
    "alibaba": {"reg": 1e-6, "epoch": 50, "ssl_reg": 1.0, "temp": 1.0},
    # The medication cohort: Params.py (25 epochs) with early stopping. On the default synthetic
    # cohort DiffKG's validation Recall@20 peaks at epoch 5 (.8374, seed 421) and falls from epoch
    # 7 on (.8358, .8311, … .7842 at epoch 16: overfitting), so patience 3 keeps the peak and
    # stops ~3 epochs after it (docs/results.md).
    "medication": {"patience": 3},
}


def preset(name: str) -> dict[str, Any]:
    """The config values of preset ``name`` (a copy: callers may change it freely).

    An unknown name is a :class:`DataError` listing the valid ones, so a typo on the command
    line ends as one ``error:`` line instead of silently training with the defaults.
    """
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}",
                        field="--preset")
    return {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[name].items()}
