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

Units.  w and t_c count training steps on every schedule: the schedule's time range
[t_min, t_max] is read as the steps 0 .. N-1 of an N-step training schedule,

    k(t) = (N - 1) (t - t_min) / (t_max - t_min),

with N = num_train_timesteps on a DiscreteVP (k is then exactly its diffusers timestep, the unit of
the paper's settings) and N = 1000 on continuous schedules.  On LinearVP this is t = (k + 1) / 1000,
DPM-Solver's map between a 1000-step discrete VP model and its continuous limit, so the paper's
settings (e.g. w = 80, t_c = 300) mean the same on DiscreteVP.linear() and LinearVP().
"""

from __future__ import annotations

import math

import torch

from ..schedules import DiscreteVP, NoiseSchedule

__all__ = ["TimeShift", "training_steps"]

#: steps that a continuous schedule's time range is read as
CONTINUOUS_STEPS = 1000


def training_steps(schedule: NoiseSchedule) -> int:
    """N: the number of training steps that [t_min, t_max] spans (steps 0 .. N-1)."""
    return schedule.num_train_timesteps if isinstance(schedule, DiscreteVP) else CONTINUOUS_STEPS


def _step_size(schedule: NoiseSchedule) -> float:
    """Schedule time per training step: (t_max - t_min) / (N - 1); exactly 1.0 on a DiscreteVP."""
    return (schedule.t_max - schedule.t_min) / (training_steps(schedule) - 1)


def _steps_of(schedule: NoiseSchedule, t: float) -> float:
    """k(t) = (t - t_min) / step size: schedule time in training steps."""
    return (t - schedule.t_min) / _step_size(schedule)


def _range_text(schedule: NoiseSchedule) -> str:
    n = training_steps(schedule)
    return (f"the schedule spans training steps 0..{n - 1}, i.e. t in [{schedule.t_min:g}, {schedule.t_max:g}] "
            f"on {schedule!r}")


class TimeShift:
    """window w: candidates t_i + j for |j| <= w // 2 training steps (an integer >= 2: w = 1 holds
    only the planned time); cutoff t_c: shift only steps whose planned time is above t_c training
    steps.  Training steps are the schedule's own timesteps on a DiscreteVP (the paper's unit:
    w = 80, t_c = 300 for a 1000-step model) and 1/999 of [t_min, t_max] on continuous schedules
    (see the module docstring), so one setting means the same on every schedule.

    `hook(plan, schedule, device)` is the engine's `at` hook (samplers.plan.Stepper) that moves
    each shifted step's first model call.  `check(plan, schedule)` refuses a setting that would
    shift nothing on that plan (cutoff outside the schedule's range, or at or above every step the
    shift could act on); `tables`, and so `hook`, run it before any model call."""

    def __init__(self, window: int = 8, cutoff: float = 300.0):
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise ValueError(f"time_shift window must be an integer >= 2 (training steps; candidates t_i + j for "
                             f"|j| <= window // 2, so window 1 holds only the planned time), got {window!r}")
        if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool) or not math.isfinite(cutoff):
            raise ValueError(f"time_shift cutoff must be a finite number of training steps (e.g. 300), got {cutoff!r}")
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

    def __repr__(self) -> str:
        return f"TimeShift(window={self.window}, cutoff={self.cutoff:g})"

    @staticmethod
    def _shiftable(plan) -> list[int]:
        """Steps whose first model call the shift may move: every step after the first that calls the model."""
        return [i for i, step in enumerate(plan.steps) if i > 0 and step.evals]

    def check(self, plan, schedule: NoiseSchedule) -> None:
        """Refuse, naming the key, its value and the schedule's range, a setting that shifts nothing."""
        last = training_steps(schedule) - 1
        if not 0 <= self.cutoff < last:
            raise ValueError(f"time_shift cutoff={self.cutoff:g} is outside the steps it can act on "
                             f"({_range_text(schedule)}); allowed: 0 <= cutoff < {last}")
        starts = [_steps_of(schedule, plan.steps[i].evals[0].t) for i in self._shiftable(plan)]
        if not starts:
            raise ValueError(f"time_shift has nothing to shift: the plan of {plan.solver or 'this solver'} has no model "
                             "call after its first step (the first is never shifted); drop time_shift")
        if max(starts) <= self.cutoff:
            raise ValueError(f"time_shift cutoff={self.cutoff:g} is at or above every step it could shift: steps "
                             f"1..{len(plan.steps) - 1} of this {len(plan.steps)}-step plan start at training steps "
                             f"{min(starts):g}..{max(starts):g}, so nothing would be shifted; allowed: cutoff < "
                             f"{max(starts):g} on this plan ({_range_text(schedule)})")

    def tables(self, plan, schedule: NoiseSchedule, device) -> dict[int, tuple]:
        """Candidate times and their (noise level, model time, alpha, sigma) for every step whose
        first model call is shifted (steps 1.., planned time above the cutoff).  Checks first."""
        self.check(plan, schedule)
        unit = _step_size(schedule)
        offsets = torch.arange(-(self.window // 2), self.window // 2 + 1, dtype=torch.float64) * unit
        out = {}
        for i in self._shiftable(plan):
            t_i = plan.steps[i].evals[0].t
            if _steps_of(schedule, t_i) <= self.cutoff:
                continue
            cand = (t_i + offsets).clamp(schedule.t_min, schedule.t_max).unique()
            a, s = schedule.alpha(cand), schedule.sigma(cand)
            level = s**2 / (a**2 + s**2)
            out[i] = tuple(v.to(device) for v in (level, schedule.model_time(cand).float(), a, s))
        return out

    def hook(self, plan, schedule: NoiseSchedule, device):
        """The stepper's `at(i, k, y)` hook: per-sample (model time, alpha, sigma) for the first
        model call of each shifted step, None (the planned time) for every other call."""
        tables = self.tables(plan, schedule, device)

        def at(i: int, k: int, y: torch.Tensor):
            return self.shift(y, tables[i]) if k == 0 and i in tables else None

        return at

    @staticmethod
    def shift(x: torch.Tensor, table: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (model time, alpha, sigma) of the best-matching candidate; no host sync."""
        level, t_model, a, s = table
        s2 = x.flatten(1).double().var(dim=1)
        j = (s2[:, None] - level[None, :]).abs().argmin(dim=1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return t_model[j], a[j].view(shape), s[j].view(shape)
