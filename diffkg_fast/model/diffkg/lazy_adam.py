"""Lazy Adam: Adam whose step moves only the rows a step's gradient touched.

Dense Adam (Kingma and Ba, ICLR 2015; ``torch.optim.Adam``) updates every weight at every step,
a zero gradient included: the moments decay and the weight keeps moving along its first
moment. For DiffKG's denoiser in the sampled mode a step reads the weights of the K entities it
touches (its rows' edges, the sampled columns, the CKGC's items) out of E; updating all 2·E·H
entity weights and their moments costs O(E·H) per step, O(E²·H / B) per epoch, where the loss
itself is O(K·H).

The lazy step (TensorFlow Addons' ``LazyAdam``, torch's ``SparseAdam``) applies Adam's update to
the touched rows only, with the parameter's global step count in the bias corrections::

    m[K] = β1 m[K] + (1 - β1) g[K],   v[K] = β2 v[K] + (1 - β2) g[K]²,   s = steps so far
    w[K] -= lr · (m[K] / (1 - β1^s)) / (sqrt(v[K] / (1 - β2^s)) + ε)

An untouched row keeps its weights and moments until a step touches it: not dense Adam (whose
untouched rows drift by their momentum and whose moments decay every step), the same where
every row is touched at every step (tested against ``torch.optim.Adam``). The arithmetic is
torch's single-tensor Adam's, op for op. The state (``step``, ``exp_avg``, ``exp_avg_sq`` per
parameter) has torch Adam's layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["LazyAdam", "RowGrad"]

# A parameter's gradient at some of its rows: (dim, index (unique), gradient at those rows).
RowGrad = tuple[int, Tensor, Tensor]


class LazyAdam(torch.optim.Optimizer):
    """Adam over ``params``; :meth:`step` takes row gradients (module docstring) and moves
    those rows only; a parameter not in them moves by its ``.grad`` (all rows), or not at all
    without one."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, rows: Mapping[Tensor, RowGrad] | None = None) -> None:  # type: ignore[override]
        rows = rows or {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in rows:
                    self._update(p, group, *rows[p])
                elif p.grad is not None:
                    self._update(p, group, 0, None, p.grad)

    def _update(self, p: Tensor, group: dict, dim: int, index: Tensor | None,
                grad: Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        m, v, w = state["exp_avg"], state["exp_avg_sq"], p
        if index is not None:
            m, v, w = (x.index_select(dim, index) for x in (m, v, w))
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        w.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** step))
        if index is not None:
            state["exp_avg"].index_copy_(dim, index, m)
            state["exp_avg_sq"].index_copy_(dim, index, v)
            p.index_copy_(dim, index, w)
