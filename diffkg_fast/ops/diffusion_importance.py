"""DiffRec's importance sampling of the diffusion step ``t`` (the one piece of DiffRec's
training that DiffKG's diffusion has no counterpart for).

Wang et al., "Diffusion Recommender Models" (SIGIR 2023), section 3.3 ("importance
sampling"); YiyanXu/DiffRec ``gaussian_diffusion.py`` (``sample_timesteps``, ``Lt_history``,
``Lt_count``) and RecBole 1.2.1's ``diffrec.py`` (the same code)::

    L_t^(1..H)  the last H = history_num_per_term weighted losses w_t mse_b of the rows drawn at t
    until every step has H of them:   t ~ U{0 … T-1},                       pt = 1
    then:   p(t) = (1-u) sqrt(mean_h L_t²) / Σ_s sqrt(mean_h L_s²) + u/T,  u = 1e-3
            t ~ p,                                                          pt = T p(t)
    loss    = mean_b(w_t mse_b / pt_b)                                      (unbiased)

``u`` is ``uniform_prob=0.001``, the default of DiffRec's ``sample_timesteps`` (neither DiffRec
nor RecBole passes another). The history records each row in batch order, exactly as DiffRec's
per-row loop (a step's row shifts the oldest out once it holds H), vectorised per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffkg_fast.ops.diffusion import _gen_device, draw_timesteps_noise

__all__ = ["ImportanceSampler"]


class ImportanceSampler:
    """The loss history of ``steps`` steps (``per_step`` losses each) and the draws it drives.

    The history lives on the CPU in float64 (DiffRec's ``Lt_history`` dtype), whatever device
    the model is on; it is model state (:meth:`state_dict`), so a resumed run draws the same
    steps.
    """

    def __init__(self, steps: int, per_step: int = 10, uniform_prob: float = 1e-3) -> None:
        if steps < 1 or per_step < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"need steps >= 1, per_step >= 1, uniform_prob in [0, 1]; got "
                             f"{steps}, {per_step}, {uniform_prob}")
        self.steps, self.per_step, self.uniform_prob = steps, per_step, uniform_prob
        self.history = torch.zeros(steps, per_step, dtype=torch.float64)
        self.count = torch.zeros(steps, dtype=torch.int64)

    @property
    def ready(self) -> bool:
        """Whether every step holds ``per_step`` losses (importance sampling is on)."""
        return bool((self.count == self.per_step).all())

    def probs(self) -> Tensor:
        """``p(t)`` (steps,) float64 from the full history (module docstring)."""
        lt = self.history.pow(2).mean(-1).sqrt()
        total = lt.sum()
        if not total > 0:  # every recorded loss 0: nothing to prefer (DiffRec would divide by 0)
            return torch.full((self.steps,), 1.0 / self.steps, dtype=torch.float64)
        return lt / total * (1.0 - self.uniform_prob) + self.uniform_prob / self.steps

    def draw(self, x0: Tensor, generator: torch.Generator | None = None,
             ) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, pt, noise)`` for the rows ``x0`` (B, I): ``t`` (B,) int64, ``pt`` (B,) float64,
        ``noise`` like ``x0``; ``t`` first, then the noise, from ``generator`` (DiffRec's order).
        Uniform: :func:`~diffkg_fast.ops.diffusion.draw_timesteps_noise`, DiffKG's own draw."""
        if not self.ready:
            t, noise = draw_timesteps_noise(x0, self.steps, generator)
            return t, torch.ones(t.shape, dtype=torch.float64, device=x0.device), noise
        dev = _gen_device(generator, x0.device)
        p = self.probs().to(dev)
        t = torch.multinomial(p, x0.shape[0], replacement=True, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        pt = p[t] * self.steps
        return t.to(x0.device), pt.to(x0.device), noise.to(x0.device)

    def record(self, t: Tensor, losses: Tensor) -> None:
        """Append each row's weighted loss ``losses[b]`` (B,) to step ``t[b]``'s history, in
        batch order, keeping the last ``per_step`` of each step."""
        t = t.detach().cpu()
        losses = losses.detach().to("cpu", torch.float64)
        for s in torch.unique(t).tolist():  # a loop over steps (5 by default), not rows
            k = int(self.count[s])
            last = torch.cat([self.history[s, :k], losses[t == s]])[-self.per_step:]
            self.history[s, :last.numel()] = last
            self.count[s] = last.numel()

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        history, count = state["history"], state["count"]
        if tuple(history.shape) != (self.steps, self.per_step) or tuple(count.shape) != (
                self.steps,):
            raise ValueError(f"loss history of shape {tuple(history.shape)}, expected "
                             f"{(self.steps, self.per_step)}")
        self.history = history.to("cpu", torch.float64).clone()
        self.count = count.to("cpu", torch.int64).clone()
