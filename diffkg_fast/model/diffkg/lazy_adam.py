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

**Deferred Adam** (:class:`DeferredAdam`) is dense Adam computed lazily. Under dense Adam a row
whose gradient is zero for the ``k`` steps ``t0+1 … t0+k`` after its last update (moments
``m0``, ``v0``) still moves, by the decaying momentum::

    m_τ = β1^s m0,   v_τ = β2^s v0   (s = τ - t0)
    w  -= Σ_s lr · (m_τ / (1 - β1^τ)) / (sqrt(v_τ / (1 - β2^τ)) + ε)
        = lr · A(t0, k) · m0 / (sqrt(v0) + ε'),   A(t0, k) = Σ_{s=1}^{k} r^s h(t0 + s)

with ``r = β1 / sqrt(β2)`` and ``h(τ) = sqrt(1 - β2^τ) / (1 - β1^τ)`` (the bias corrections), and
``ε'`` the term's ``ε · sqrt(1 - β2^τ) / β2^(s/2)``, taken at ``s = 1`` for every term (exact at
``ε = 0``; otherwise each term's relative difference is below ``ε / sqrt(v̂)``). ``A`` is a sum
of scalars per row, cut at ``s = 352`` where ``r^s < 2^-53`` (β = torch's defaults), read from
a table (:class:`_DeferredSums`). So a row
can skip its zero-gradient steps and make them up, in closed form, just before a step reads
it (:meth:`DeferredAdam.catch_up`) or before anything else does (:meth:`DeferredAdam.flush`):
the weights the loss reads and the moments are dense Adam's (up to ``ε'``), at the lazy step's
cost plus one scalar sum per touched row. Why it matters: where a row is touched at a fraction
``p`` of the steps, lazy Adam moves it about ``p`` times as far as dense Adam would over the same
steps (Adam's step is scale-free: a row moves about ``lr`` per update however large its
importance-weighted gradient); the deferred steps restore dense Adam's movement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["DeferredAdam", "LazyAdam", "RowGrad"]

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
        m, v, w = self._rows(p, dim, index)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        w.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** step))
        if index is not None:
            state["exp_avg"].index_copy_(dim, index, m)
            state["exp_avg_sq"].index_copy_(dim, index, v)
            p.index_copy_(dim, index, w)

    def _rows(self, p: Tensor, dim: int, index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The moments and weights this step updates: copies of the rows ``index`` (written
        back after the update), or the whole tensors (``None``)."""
        state = self.state[p]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if index is None:
            return m, v, p
        return m.index_select(dim, index), v.index_select(dim, index), p.index_select(dim, index)


# Terms of A(t0, k) beyond this many deferred steps are below 2^-53 of the first (r^s, r ≈ 0.9).
_DEFERRED_TERMS = 352
# Rows made up at once: a flush's copies of the moments and weights are this many rows, not E.
_CATCH_UP_ROWS = 16384
# Steps whose sums _DeferredSums tabulates at a time (a block × _DEFERRED_TERMS float64, 23 MB).
_TABLE_BLOCK = 8192


class _DeferredSums:
    """``A(t0, k) = Σ_{s=1}^{k} r^s h(t0 + s)`` (module docstring) by table, float64: with
    ``A∞(t) = Σ_{s=1}^{S} r^s h(t + s)`` tabulated (S = _DEFERRED_TERMS),
    ``A(t0, k) = A∞(t0) - r^k A∞(t0 + k)``; the two sums' tails past S, below ``r^S`` of the
    whole, are what this leaves out. Two gathers a row, whatever the gap."""

    def __init__(self, beta1: float, beta2: float, device: torch.device) -> None:
        self.beta1, self.beta2, self.r = beta1, beta2, beta1 / beta2 ** 0.5
        s = torch.arange(1, _DEFERRED_TERMS + 1, dtype=torch.float64, device=device)
        self.r_pow = self.r ** s
        self.table = torch.zeros(0, dtype=torch.float64, device=device)

    def __call__(self, t0: Tensor, k: Tensor) -> Tensor:
        self._extend(int((t0 + k).max()) + 1)
        rk = self.r ** k.to(torch.float64)
        return self.table[t0] - rk * self.table[t0 + k]

    def _extend(self, n: int) -> None:
        while self.table.numel() < n:
            lo = self.table.numel()
            tau = torch.arange(lo + 1, lo + _TABLE_BLOCK + _DEFERRED_TERMS + 1,
                               dtype=torch.float64, device=self.table.device)
            h = (1 - self.beta2 ** tau).sqrt() / (1 - self.beta1 ** tau)  # h(lo+1), h(lo+2) …
            block = h.unfold(0, _DEFERRED_TERMS, 1)[:_TABLE_BLOCK] @ self.r_pow
            self.table = torch.cat([self.table, block])


class DeferredAdam(LazyAdam):
    """Dense Adam whose zero-gradient steps are made up when a row is next read (module
    docstring): :meth:`catch_up` the rows a step will read before its forward, :meth:`step`
    with their row gradients, :meth:`flush` before anything reads every row. ``state_dict``
    flushes first, so the saved state is dense Adam's, in torch Adam's layout.

    A step's rows are gathered once: :meth:`catch_up` keeps the made-up copies of the moments
    (the weights it writes back, for the forward to read) and :meth:`step` updates those copies
    when its rows are the same, instead of gathering them again."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        # Per parameter: (dim, the step count each row is current to); absent: all current.
        self._current: dict[Tensor, tuple[int, Tensor]] = {}
        # Per parameter: (index, m, v, w) made up by catch_up, for the next step's rows.
        self._made_up: dict[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._sums: dict[tuple, _DeferredSums] = {}

    @torch.no_grad()
    def catch_up(self, rows: Mapping[Tensor, tuple[int, Tensor]]) -> None:
        """Apply the deferred steps of the rows ``{param: (dim, index)}`` (unique indices)."""
        for p, (dim, index) in rows.items():
            if p in self._current:
                self._commit(p)
                m, v, w = super()._rows(p, dim, index)
                self._make_up(p, dim, index, (m, v, w), int(self.state[p]["step"]))
                p.index_copy_(dim, index, w)
                self._made_up[p] = (index, m, v, w)

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row current: afterwards the weights and moments are dense Adam's."""
        for p in list(self._current):
            self._flush(p, int(self.state[p]["step"]))

    def _flush(self, p: Tensor, upto: int) -> None:
        """Every row of ``p`` made up to step ``upto``."""
        self._commit(p)
        dim, state = self._current[p][0], self.state[p]
        for lo in range(0, p.shape[dim], _CATCH_UP_ROWS):  # E rows, in blocks
            part = torch.arange(lo, min(lo + _CATCH_UP_ROWS, p.shape[dim]), device=p.device)
            idx = part[self._current[p][1][part] < upto]
            if idx.numel():
                m, v, w = super()._rows(p, dim, idx)
                self._make_up(p, dim, idx, (m, v, w), upto)
                for full, x in ((state["exp_avg"], m), (state["exp_avg_sq"], v), (p, w)):
                    full.index_copy_(dim, idx, x)

    def state_dict(self) -> dict:
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._current.clear()  # a flushed state: every row current
        self._made_up.clear()

    def _rows(self, p: Tensor, dim: int, index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The rows, made up to the step before this one (the step count has moved)."""
        step = int(self.state[p]["step"])
        if index is None:  # a full update: every row made up first, then all current
            if p in self._current:
                self._flush(p, step - 1)
                self._current.pop(p)
            return super()._rows(p, dim, index)
        if p not in self._current:  # until now every row current
            self._current[p] = (dim, torch.full((p.shape[dim],), step - 1, dtype=torch.long,
                                                device=p.device))
        made = self._made_up.pop(p, None)
        if made is not None and torch.equal(made[0], index):
            rows = made[1:]  # catch_up's copies, current at step - 1
        else:
            self._write_moments(p, made)
            rows = super()._rows(p, dim, index)
            self._make_up(p, dim, index, rows, step - 1)
        self._current[p][1][index] = step
        return rows

    def _commit(self, p: Tensor) -> None:
        """Write catch_up's made-up moments of ``p`` back (its weights already are)."""
        self._write_moments(p, self._made_up.pop(p, None))

    def _write_moments(self, p: Tensor, made: tuple[Tensor, ...] | None) -> None:
        if made is not None:
            index, m, v, _ = made
            dim = self._current[p][0]
            self.state[p]["exp_avg"].index_copy_(dim, index, m)
            self.state[p]["exp_avg_sq"].index_copy_(dim, index, v)

    def _make_up(self, p: Tensor, dim: int, index: Tensor,
                 rows: tuple[Tensor, Tensor, Tensor], upto: int) -> None:
        """Rows ``index`` of ``p`` (their copies ``rows`` = m, v, w, changed in place) take
        their deferred steps up to step ``upto``: ``k = 0`` changes nothing (``A = 0``)."""
        current = self._current[p][1]
        t0 = current[index]
        k = upto - t0
        current[index] = upto
        if not bool((k > 0).any()):
            return
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        beta1, beta2 = group["betas"]
        key = (beta1, beta2, p.device)
        if key not in self._sums:
            self._sums[key] = _DeferredSums(beta1, beta2, p.device)
        a = self._sums[key](t0, k)
        eps = group["eps"] * (1 - beta2 ** (t0.to(torch.float64) + 1)).sqrt() / beta2 ** 0.5
        kf = k.to(torch.float64)
        shape = [-1 if i == dim else 1 for i in range(p.dim())]
        a, eps, dm, dv = (x.to(p.dtype).reshape(shape)
                          for x in (a, eps, beta1 ** kf, beta2 ** kf))
        m, v, w = rows
        w.sub_(group["lr"] * a * m / (v.sqrt() + eps))
        m.mul_(dm)
        v.mul_(dv)
