"""The one solver engine: a compiled plan of linear combinations, run by one stepper.

Every solver in this package (DDIM, Euler, Heun, PLMS, DEIS, DPM-Solver++ single/multistep/SDE)
is, once the time grid is fixed, a list of steps of the form

    for each evaluation k of step i:   y_k = a_k x_i + sum_m b_km M_m + sum_j e_kj z_j,   M_k = model(y_k, t_k)
    x_{i+1} = a x_i + sum_m b_m M_m + sum_j e_j z_j + c z,       z_j, z ~ N(0, I)

where M_m are earlier model outputs (data or noise predictions, this step's or from history), z
the noise drawn at the end of the step and z_j the step's in-step draws (noise added between the
evaluations of one step, as DPM-Solver++ SDE, EDM's churn and Restart do; zero terms for most solvers).
A call of kind "data|raw_noise" (`denoisers.DATA_RAW_NOISE`) gives two outputs: M_n, the data
prediction after the denoiser's transforms (clipping, thresholding), and M_{~n} (index -n-1), the
noise prediction of the network's own output (diffusers' DDIM / DDPM direction term).
Solvers differ only in the float64 coefficients, which they compute once per grid in `build`.
`Stepper` executes any such plan, one model call at a time, with a few fused tensor ops per step
and no host sync; `run_plan` is its loop, the diffusers adapter feeds it one call per `step`, and
sampling strategies (Time-Shift, SVDD) are its hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable

import torch

from ..denoisers import DATA_RAW_NOISE
from ..schedules import TimeGrid

__all__ = ["Combo", "Eval", "Step", "Plan", "PlanBuilder", "Stepper", "run_plan", "combine", "frees_per_step"]


@dataclass(frozen=True)
class Combo:
    """cx * x_i + sum(c * M[m] for m, c in terms) + sum(e * z[j] for j, e in noise), z[j] the
    step's in-step draws (`Step.draws`)."""

    cx: float = 1.0
    terms: tuple[tuple[int, float], ...] = ()
    noise: tuple[tuple[int, float], ...] = ()
    is_identity: bool = field(init=False, repr=False, compare=False)  # x_i itself

    def __post_init__(self):
        object.__setattr__(self, "is_identity", self.cx == 1.0 and not self.terms and not self.noise)


@dataclass(frozen=True)
class Eval:
    """One model call: prediction `kind` at time t (alpha, sigma precomputed) on input `x`."""

    t: float
    alpha: float
    sigma: float
    kind: str  # "data" | "noise" | "data|raw_noise" (two outputs: M_n and M_{~n})
    x: Combo = Combo()


@dataclass(frozen=True)
class Step:
    """One step: its model calls, x_{i+1} = update + noise * z, and its noise draws.

    `draws`: the step's in-step draws z_0, z_1, ... (referred to by the `noise` terms of its evals'
    inputs and its update), each given as the span (rho_from, rho_to) of noise levels rho = sigma /
    alpha it stands for, so that a Brownian source can make it (W(rho_to) - W(rho_from)) /
    sqrt|rho_to - rho_from|; they are drawn, in order, before the step's first model call.  The
    end-of-step draw z (scaled by `noise`) comes after them; `span` is its (rho_from, rho_to), None
    for the step's grid interval."""

    evals: tuple[Eval, ...]
    update: Combo
    noise: float = 0.0
    order: int = 1  # order of this step's update, for inspection and tests
    draws: tuple[tuple[float, float], ...] = ()
    span: tuple[float, float] | None = None

    @property
    def n_draws(self) -> int:
        """Standard normal tensors this step draws: its in-step draws, then the end-of-step one."""
        return len(self.draws) + (self.noise != 0.0)


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
        return any(s.n_draws for s in self.steps)

    @property
    def n_draws(self) -> int:
        """Standard normal tensors one run draws (`Step.n_draws` summed)."""
        return sum(s.n_draws for s in self.steps)


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

    def end_step(self, update: Combo, noise: float = 0.0, order: int = 1,
                 draws: tuple[tuple[float, float], ...] = (), span: tuple[float, float] | None = None) -> None:
        """Close the step: x_{i+1} = update + noise * z.  `draws`: the spans of the in-step draws its
        combos' noise terms refer to (see `Step`); `span`: that of the end-of-step draw, if not the
        step's grid interval."""
        evals = tuple(self._evals)
        used = {j for c in (update, *(ev.x for ev in evals)) for j, _ in c.noise}
        if used - set(range(len(draws))):
            raise ValueError(f"step {len(self.steps)} refers to in-step draws {sorted(used)} but declares "
                             f"{len(draws)} (pass their spans as draws=)")
        self.steps.append(Step(evals, update, noise, order, tuple(draws), span))
        self._evals = []

    def plan(self, solver: str, **info) -> Plan:
        if self._evals:
            raise RuntimeError("unfinished step in plan builder")
        return Plan(self.steps, self.grid, solver, info)


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------

def combine(x: torch.Tensor, c: Combo, outs: dict[int, torch.Tensor],
            z: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Apply a Combo: cx * x + sum(c * outs[m]) + sum(e * z[j]) (the one linear-combination kernel
    of the engine; `z` the step's in-step draws)."""
    y = x * c.cx
    for m, b in c.terms:
        y.add_(outs[m], alpha=b)
    for j, e in c.noise:
        y.add_(z[j], alpha=e)
    return y


def frees_per_step(plan: Plan) -> list[list[int]]:
    """For each step, the model outputs no longer needed after it (so memory is freed)."""
    last: dict[int, int] = {}
    n = 0
    for i, s in enumerate(plan.steps):
        for ev in s.evals:
            last[n] = i
            if ev.kind == DATA_RAW_NOISE:
                last[~n] = i
            for m, _ in ev.x.terms:
                last[m] = i
            n += 1
        for m, _ in s.update.terms:
            last[m] = i
    frees: list[list[int]] = [[] for _ in plan.steps]
    for m, i in last.items():
        frees[i].append(m)
    return frees


class Stepper:
    """The engine: one run of a Plan from x = x_{t_0}, one model call at a time.

        stepper = Stepper(plan, denoiser, x_T, noise_fn)
        while not stepper.done:
            stepper.feed(denoiser.predict_at(*stepper.next_input()))
        x_0 = stepper.x

    `next_input()` is call k of step i: (y_k, t_model, alpha, sigma, kind) with
    y_k = a_k x_i + sum_m b_km M_m.  `feed(M_k)` takes that call's prediction; when it is the step's
    last, the stepper applies x_{i+1} = a x_i + sum_m b_m M_m + c z and returns x_{i+1} (else None).
    It owns the run's state: x_i, the outputs M still needed (each freed after its last use), the
    noise (each draw is one call noise_fn(x_i): a step's in-step draws z_j before its first model
    call, then its end-of-step z), and the denoiser's deferred finite check at the end of the run.

    Hooks, for sampling strategies (the loop itself has no special cases):
      at(i, k, y) -> (t_model, alpha, sigma) or None: evaluate call k of step i elsewhere than at
          its planned time, per sample (Time-Shift, `TimeShift.hook`);
      transition(i, mean, c) -> (x_{i+1}, M or None): replaces x_{i+1} = mean + c z of stochastic
          step i (SVDD); a returned M is the next step's first model output, which is then not asked for;
      on_step(i, x_{i+1}, M): after each step, with its last model output (None if it has none).
    """

    def __init__(self, plan: Plan, denoiser, x: torch.Tensor,
                 noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 at: Callable | None = None, transition: Callable | None = None, on_step: Callable | None = None):
        if plan.stochastic and noise_fn is None:
            raise ValueError(f"solver {plan.solver!r} is stochastic: pass a generator or seeds for its noise")
        self.plan, self.denoiser, self.x, self.noise_fn = plan, denoiser, x, noise_fn
        self.at, self.transition, self.on_step = at, transition, on_step
        start = getattr(denoiser, "start_run", None)
        if start is not None:  # deferred finite checks report this run's model calls only
            start()
        self._evals = [ev for s in plan.steps for ev in s.evals]  # call n of the run
        self._ends = list(accumulate(len(s.evals) for s in plan.steps))  # the call after step i
        # model time inputs are built once, in one call, not per step
        times = sorted({ev.t for ev in self._evals})
        model_t = denoiser.schedule.model_time(torch.tensor(times, dtype=torch.float64)).to(x.device, torch.float32)
        self._t_in = {t: model_t[j].expand(x.shape[0]) for j, t in enumerate(times)}
        self._frees = frees_per_step(plan)
        self.outs: dict[int, torch.Tensor] = {}
        self._z: tuple[int, list[torch.Tensor]] = (-1, [])  # step i's in-step draws
        self.i = self.n = 0  # step i and the run's call n (the index of M_n in outs)
        self.done = not plan.steps
        while not self.done and self.n == self._ends[self.i]:  # steps without model calls
            self._end_step()

    @property
    def k(self) -> int:
        """The next model call's index within step i."""
        return self.n - self._ends[self.i] + len(self.plan.steps[self.i].evals)

    @property
    def eval(self) -> Eval:
        """The plan's entry for the next model call."""
        return self._evals[self.n]

    def next_input(self) -> tuple:
        """(y, t_model, alpha, sigma, kind) of the next model call."""
        ev = self._evals[self.n]
        y = self.x if ev.x.is_identity else combine(self.x, ev.x, self.outs, self._draws())
        if self.at is not None:
            where = self.at(self.i, self.k, y)
            if where is not None:
                return (y, *where, ev.kind)
        return y, self._t_in[ev.t], ev.alpha, ev.sigma, ev.kind

    def feed(self, output) -> torch.Tensor | None:
        """Take the prediction of the call `next_input` gave (the pair (M_n, M_{~n}) for kind
        "data|raw_noise"); x_{i+1} if it ends step i, else None."""
        if isinstance(output, tuple):
            self.outs[self.n], self.outs[~self.n] = output
        else:
            self.outs[self.n] = output
        self.n += 1
        x = None
        while not self.done and self.n == self._ends[self.i]:  # the next step may need no call: its
            x = self._end_step()                                 # output was handed over, or it has none
        return x

    def _draws(self) -> list[torch.Tensor] | None:
        """Step i's in-step draws, drawn (once, in order) when the step first needs its state."""
        s = self.plan.steps[self.i]
        if not s.draws:
            return None
        if self._z[0] != self.i:
            self._z = (self.i, [self.noise_fn(self.x) for _ in s.draws])
        return self._z[1]

    def _end_step(self) -> torch.Tensor:
        """x_{i+1} = a x_i + sum_m b_m M_m + c z; free the outputs step i used last."""
        i, s, outs = self.i, self.plan.steps[self.i], self.outs
        x = combine(self.x, s.update, outs, self._draws())
        handed = None
        if s.noise != 0.0 and self.transition is not None:
            x, handed = self.transition(i, x, s.noise)
        elif s.noise != 0.0:
            x.add_(self.noise_fn(self.x), alpha=s.noise)
        if self.on_step is not None:
            self.on_step(i, x, outs[self.n - 1] if s.evals else None)
        for m in self._frees[i]:
            del outs[m]
        self._z = (-1, [])
        self.x, self.i = x, i + 1
        self.done = self.i == len(self.plan.steps)
        if self.done:
            self.denoiser.raise_if_nonfinite()
        elif handed is not None and self.n < self._ends[self.i]:  # the next call's output, from the hook
            outs[self.n] = handed
            self.n += 1
        return x


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
    """Run `plan` from x = x_{t_0} and return the final state: the `Stepper` loop.
    `callback(i, x_{i+1}, M)` runs after each step; `time_shift` (a samplers.time_shift.TimeShift)
    and `transition` (SVDD) are the stepper's `at` and `transition` hooks."""
    if time_shift is None and plan.info.get("time_shift") is not None:  # a solver plan's own setting
        from .time_shift import TimeShift

        time_shift = TimeShift.from_spec(dict(plan.info["time_shift"]))
    if getattr(plan, "adaptive", False):  # steps built while sampling (dpm_adaptive), each through a Stepper
        if time_shift is not None or transition is not None:
            raise ValueError(f"solver {plan.solver!r} chooses its steps while it samples: "
                             f"{'time_shift' if time_shift is not None else 'a sampling strategy (transition)'} "
                             "cannot apply to it")
        return plan.run(denoiser, x, callback=callback, progress=progress, noise_fn=noise_fn)
    at = time_shift.hook(plan, denoiser.schedule, x.device) if time_shift is not None else None
    stepper = Stepper(plan, denoiser, x, noise_fn, at=at, transition=transition, on_step=callback)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.steps), desc=plan.solver or "sampling", unit="step")
    predict, feed, next_input = denoiser.predict_at, stepper.feed, stepper.next_input
    while not stepper.done:
        feed(predict(*next_input()))
        if bar is not None:
            bar.update(stepper.i - bar.n)
    if bar is not None:
        bar.close()
    return stepper.x
