"""The one solver engine: a compiled plan of linear combinations, run by a small state machine.

Every solver in this package (DDIM, Euler, Heun, PLMS, DEIS, DPM-Solver++ single/multistep/SDE)
is, once the time grid is fixed, a list of steps of the form

    for each evaluation k of step i:   y_k = a_k x_i + sum_m b_km M_m ,   M_k = model(y_k, t_k)
    x_{i+1} = a x_i + sum_m b_m M_m + c z,       z ~ N(0, I)

where M_m are earlier model outputs (data or noise predictions, this step's or from history).
Solvers differ only in the float64 coefficients, which they compute once per grid in `build`.
The engine below executes any such plan with a few fused tensor ops per step and no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..schedules import TimeGrid

__all__ = ["Combo", "Eval", "Step", "Plan", "PlanBuilder", "run_plan", "combine", "frees_per_step"]


@dataclass(frozen=True)
class Combo:
    """cx * x_i + sum(c * M[m] for m, c in terms)."""

    cx: float = 1.0
    terms: tuple[tuple[int, float], ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.cx == 1.0 and not self.terms


@dataclass(frozen=True)
class Eval:
    """One model call: prediction `kind` at time t (alpha, sigma precomputed) on input `x`."""

    t: float
    alpha: float
    sigma: float
    kind: str  # "data" | "noise"
    x: Combo = Combo()


@dataclass(frozen=True)
class Step:
    evals: tuple[Eval, ...]
    update: Combo
    noise: float = 0.0
    order: int = 1  # order of this step's update, for inspection and tests


@dataclass
class Plan:
    """A whole trajectory: steps over a grid.  `nfe` is the exact number of model calls."""

    steps: list[Step]
    grid: TimeGrid
    solver: str = ""
    info: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return sum(len(s.evals) for s in self.steps)

    @property
    def orders(self) -> list[int]:
        return [s.order for s in self.steps]

    @property
    def stochastic(self) -> bool:
        return any(s.noise != 0.0 for s in self.steps)


class PlanBuilder:
    """Helps solvers write plans: `ev = b.eval(...)` returns the output's index for later terms."""

    def __init__(self, grid: TimeGrid):
        self.grid = grid
        self.steps: list[Step] = []
        self._evals: list[Eval] = []
        self._n = 0

    def eval_at(self, i: int, kind: str, x: Combo = Combo()) -> int:
        """Evaluate at grid point i."""
        g = self.grid
        return self.eval(float(g.t[i]), float(g.alpha[i]), float(g.sigma[i]), kind, x)

    def eval(self, t: float, alpha: float, sigma: float, kind: str, x: Combo = Combo()) -> int:
        if sigma <= 0:
            raise ValueError(f"plan evaluates the model at sigma = {sigma} (t = {t}); the network is never called at sigma = 0")
        self._evals.append(Eval(t, alpha, sigma, kind, x))
        self._n += 1
        return self._n - 1

    def end_step(self, update: Combo, noise: float = 0.0, order: int = 1) -> None:
        self.steps.append(Step(tuple(self._evals), update, noise, order))
        self._evals = []

    def plan(self, solver: str, **info) -> Plan:
        if self._evals:
            raise RuntimeError("unfinished step in plan builder")
        return Plan(self.steps, self.grid, solver, info)


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------

def combine(x: torch.Tensor, c: Combo, outs: dict[int, torch.Tensor]) -> torch.Tensor:
    """Apply a Combo: cx * x + sum(c * outs[m]) (the one linear-combination kernel of the engine)."""
    y = x * c.cx
    for m, b in c.terms:
        y.add_(outs[m], alpha=b)
    return y


def frees_per_step(plan: Plan) -> list[list[int]]:
    """For each step, the model outputs no longer needed after it (so memory is freed)."""
    last: dict[int, int] = {}
    n = 0
    for i, s in enumerate(plan.steps):
        for ev in s.evals:
            last[n] = i
            for m, _ in ev.x.terms:
                last[m] = i
            n += 1
        for m, _ in s.update.terms:
            last[m] = i
    frees: list[list[int]] = [[] for _ in plan.steps]
    for m, i in last.items():
        frees[i].append(m)
    return frees


def run_plan(
    plan: Plan,
    denoiser,
    x: torch.Tensor,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    time_shift=None,
    transition: Callable[[int, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """Run `plan` from x = x_{t_0}.  State (x, model outputs) lives only in this call.
    `time_shift` (a samplers.time_shift.TimeShift) shifts each step's first model call per sample.
    `transition(i, mean, c)` replaces the noise of stochastic step i (x_{i+1} = mean + c z): it returns
    x_{i+1} and, optionally, the model output the next step's first call would compute at x_{i+1}
    (reused instead of calling the model again).  Sampling strategies such as SVDD use it."""
    if plan.stochastic and noise_fn is None:
        raise ValueError(f"solver {plan.solver!r} is stochastic: pass a generator or seeds for its noise")
    start = getattr(denoiser, "start_run", None)
    if start is not None:  # deferred finite checks report this run's model calls only
        start()
    batch = x.shape[0]
    # model time inputs are built once, in one call, not per step
    times = sorted({ev.t for s in plan.steps for ev in s.evals})
    model_t = denoiser.schedule.model_time(torch.tensor(times, dtype=torch.float64)).to(x.device, torch.float32)
    t_in = {t: model_t[j].expand(batch) for j, t in enumerate(times)}
    frees = frees_per_step(plan)
    shifts = time_shift.tables(plan, denoiser.schedule, x.device) if time_shift is not None else {}
    outs: dict[int, torch.Tensor] = {}
    carried = None  # a model output handed over by `transition` for the next step's first call
    n = 0
    it = range(len(plan.steps))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=plan.solver or "sampling", unit="step")
    for i in it:
        s = plan.steps[i]
        for k, ev in enumerate(s.evals):
            if k == 0 and carried is not None:
                outs[n], carried = carried, None
            else:
                y = x if ev.x.is_identity else combine(x, ev.x, outs)
                if k == 0 and i in shifts:
                    outs[n] = denoiser._predict(y, *time_shift.shift(y, shifts[i]), ev.kind)
                else:
                    outs[n] = denoiser._predict(y, t_in[ev.t], ev.alpha, ev.sigma, ev.kind)
            n += 1
        x_next = combine(x, s.update, outs)
        if s.noise != 0.0:
            if transition is not None:
                x_next, carried = transition(i, x_next, s.noise)
            else:
                x_next.add_(noise_fn(x), alpha=s.noise)
        if callback is not None:
            callback(i, x_next, outs[n - 1] if s.evals else None)
        x = x_next
        for m in frees[i]:
            del outs[m]
    denoiser.raise_if_nonfinite()
    return x

