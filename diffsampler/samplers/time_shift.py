"""Time-Shift sampler (Li et al. 2024, "Alleviating Exposure Bias in Diffusion Models through
Sampling with Shifted Time Steps", arXiv:2305.15583).

A trained network sees, at planned time t_i, samples whose noise level differs from t_i (exposure
bias).  Before each model call (zero extra NFE) the per-sample variance statistic s^2 = Var(x) picks
the time in a window around t_i whose noise level matches best,

    t_s = argmin_{tau in [t_i - w/2, t_i + w/2]} | s^2 - sigma_tau^2 / (alpha_tau^2 + sigma_tau^2) |,

while t_i is above the cutoff t_c.  The network is then evaluated at t_s, and its output is read
(converted to data / noise prediction) at t_s's alpha and sigma; the solver's step coefficients stay
those of the planned grid.  This is the form the paper uses for DEIS and, through the converted
prediction, the shifted start of DDIM / PNDM / DPM-Solver steps; it composes with every solver.
"""

from __future__ import annotations

import torch

from ..schedules import DiscreteVP, NoiseSchedule

__all__ = ["TimeShift"]


class TimeShift:
    """window: candidates t_i + j * unit for |j| <= window // 2, where unit is one training
    timestep for DiscreteVP and (t_max - t_min) / 1000 otherwise; cutoff: shift only while the
    planned time is above it (schedule time units, e.g. 300 for a 1000-step DiscreteVP)."""

    def __init__(self, window: int = 8, cutoff: float = 300.0):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"time_shift window must be an integer >= 1, got {window!r}")
        self.window, self.cutoff = window, float(cutoff)

    @classmethod
    def from_spec(cls, spec) -> "TimeShift | None":
        if spec is None or isinstance(spec, TimeShift):
            return spec
        if isinstance(spec, dict) or hasattr(spec, "items"):
            unknown = set(spec) - {"window", "cutoff"}
            if unknown:
                raise ValueError(f"time_shift got unknown keys {sorted(unknown)}; allowed: ['cutoff', 'window']")
            return cls(**dict(spec))
        raise ValueError(f"time_shift must be a dict(window=..., cutoff=...) or TimeShift, got {spec!r}")

    def tables(self, plan, schedule: NoiseSchedule, device) -> dict[int, tuple]:
        """Candidate times and their (noise level, model time, alpha, sigma) for every step whose
        first model call is shifted (steps 1.., planned time above the cutoff)."""
        unit = 1.0 if isinstance(schedule, DiscreteVP) else (schedule.t_max - schedule.t_min) / 1000.0
        offsets = torch.arange(-(self.window // 2), self.window // 2 + 1, dtype=torch.float64) * unit
        out = {}
        for i, step in enumerate(plan.steps):
            if i == 0 or not step.evals or step.evals[0].t <= self.cutoff:
                continue
            cand = (step.evals[0].t + offsets).clamp(schedule.t_min, schedule.t_max).unique()
            a, s = schedule.alpha(cand), schedule.sigma(cand)
            level = s**2 / (a**2 + s**2)
            out[i] = tuple(v.to(device) for v in (level, schedule.model_time(cand).float(), a, s))
        return out

    @staticmethod
    def shift(x: torch.Tensor, table: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (model time, alpha, sigma) of the best-matching candidate; no host sync."""
        level, t_model, a, s = table
        s2 = x.flatten(1).double().var(dim=1)
        j = (s2[:, None] - level[None, :]).abs().argmin(dim=1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return t_model[j], a[j].view(shape), s[j].view(shape)
