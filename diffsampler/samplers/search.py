"""The space of solver plans searched by S^3 (Liu et al. 2024, "A Unified Sampling Framework for
Solver Searching of Diffusion Probabilistic Models", arXiv:2312.07243, and its released evolutionary
search); the search driver is `diffsampler.tools.search`.

* `initial_plans`: the solver specs of registered solvers on several spacings (so a search starts
  from the best fixed solvers); `random_plan`: random valid plans;
* `crossover` (0.5) and `mutate`: per-field mutation (0.3), structure mutation (0.2: re-draw how the
  NFE is spent, times interpolated), time jitter (sd 0.03 in the normalised coordinate, or 0.01 /
  0.003 to refine), order prior {1: .2, 2: .4, 3: .3, 4: .1}, no corrector on the last step (the
  released USF search settings);
* `encode` and the predictor: gradient-boosted trees on a fixed-length plan encoding, which screen
  offspring before they are evaluated for real.

* a later start (`late_start`): the first time point moves off t_max (x_T is then taken as the
  sample there, as diffusers' "leading" timesteps do); seeded at START_SOLVERS x INIT_STARTS and
  mutated like a time point.  On a trained digits network at 5 calls this alone takes ipndm's RMSE
  from 0.097 to 0.077 (start at 0.8 T).

Time-grid optimisation for a fixed solver searches with `base=<SolverSpec>`: only the time points
(the start included, where allowed) mutate.

* `PlanCoordinates`: a plan's continuous decisions (time points, start, relaxations, momenta,
  time-shift cutoff) as one vector, for the local refinement that follows the evolution
  (`tools.search.refine`: CMA-ES).  Mutation jitters every time point at once and rarely lands on
  the best grid of a 10-step plan; on the digits model at NFE 10, 300 CMA-ES evaluations take the
  best calibration RMSE from 0.0217 to 0.0182 (held-out RMSE of the shipped plan 0.0269 -> 0.0219).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from ..schedules import time_grid
from .usf import ESTIMATOR_TABLE, FINALS, SolverSpec, StepSpec, effective_orders, spec_of

__all__ = ["initial_plans", "random_plan", "mutate", "crossover", "encode", "PlanPredictor", "has_analytic",
           "random_time_shift", "mutate_time_shift", "with_start", "initial_form", "PlanCoordinates"]

ORDER_PRIOR = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
P_CROSSOVER, P_FIELD, P_STRUCTURE, TIME_JITTER = 0.5, 0.3, 0.2, 0.03
JITTERS = (TIME_JITTER, 0.01, 0.003)
N_PARENTS = 15
RELAX_P, RELAX_RANGE, RELAX_JITTER = 0.25, 0.5, 0.1  # linear relaxation c: how often drawn, its range, refinement sd
MIN_GAP = 2e-3  # smallest step in the normalised time coordinate
INIT_SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras")
INIT_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "deis_2", "deis_3", "unipc_2", "unipc_3", "ghvb", "ipndm")
# A later start: the seeded starts (normalised time of the first point) and solvers (on time_uniform),
# how often a child's start moves, how often a moved start goes back to t_max, its nudge sd and range
INIT_STARTS, START_SOLVERS = (0.1, 0.2), ("unipc_3", "ipndm", "dpmpp_3m")
TIME_SHIFT_SOLVERS = ("unipc_3", "ipndm")  # seeded with the Time-Shift paper's settings (on time_uniform)
P_START, P_START_OFF, START_SD, START_MAX = 0.15, 0.2, 0.04, 0.5
# GHVB: how often a whole trajectory / a single drawn step is GHVB, the momentum range, its nudge sd
P_GHVB_RUN, P_GHVB_STEP, BETA_RANGE, BETA_JITTER = 0.12, 0.02, (0.2, 1.0), 0.1
# Time shift (searched when the search space allows it): how often a child's setting is re-drawn,
# how often a drawn setting is off, the largest window (training steps)
P_SHIFT, P_SHIFT_OFF, WINDOW_MAX = 0.2, 1 / 3, 100


# ---------------------------------------------------------------------------------------------
# the search space
# ---------------------------------------------------------------------------------------------

def _order(rng, cap: int = 4) -> int:
    ks = [k for k in ORDER_PRIOR if k <= cap]
    p = np.array([ORDER_PRIOR[k] for k in ks])
    return int(rng.choice(ks, p=p / p.sum()))


def _canonical(steps: list[StepSpec], times: Sequence[float], final: str, coordinate: str) -> SolverSpec | None:
    """Repair a drawn plan into a valid canonical one (or None): fallback steps written with their
    effective order, no corrector where none can run, first order onto sigma = 0."""
    steps = list(steps)
    n = len(steps)
    last = steps[-1]
    if final == "zero" and not last.capabilities.to_zero:
        steps[-1] = StepSpec(last.prediction, 1, "multistep", analytic=last.analytic and n == 1)
    for i, s in enumerate(steps):
        if s.corrector and (i == n - 1 or steps[i + 1].prediction != s.prediction):
            steps[i] = replace(s, corrector=False)
            s = steps[i]
    # the orders depend only on predictions, estimators and the analytic flag, which the loop keeps
    for i, (s, k) in enumerate(zip(list(steps), effective_orders(steps))):
        history = s.capabilities.history
        if history == "run":
            steps[i] = replace(s, order=k)
        elif history == "outputs":
            est = "multistep" if s.capabilities.fallback else s.estimator
            steps[i] = replace(s, order=k, estimator=est, relax=s.relax if k >= 2 else 0.0)
    try:
        return SolverSpec(tuple(steps), tuple(times), final, coordinate)
    except ValueError:
        return None


def _relax(rng, s: StepSpec) -> float:
    """A relaxation coefficient for step `s`: none for steps without a first-derivative term;
    otherwise a fresh draw (0 or uniform in +-RELAX_RANGE) or, for a relaxed step, a nudge."""
    if s.order < 2 or not s.capabilities.relax or s.analytic:
        return 0.0
    if s.relax != 0.0 and rng.random() < 0.6:
        return float(s.relax + rng.normal(0.0, RELAX_JITTER))
    return float(rng.uniform(-RELAX_RANGE, RELAX_RANGE)) if rng.random() < 0.7 else 0.0


def _beta(rng, s: StepSpec | None = None) -> float:
    """Momentum: a fresh draw in BETA_RANGE or, for a step with momentum, a nudge (kept in (0, 1])."""
    if s is not None and s.beta is not None and rng.random() < 0.6:
        return float(np.clip(s.beta + rng.normal(0.0, BETA_JITTER), 0.05, 1.0))
    return float(rng.uniform(*BETA_RANGE))


def _random_step(rng, budget: int, prediction: str) -> StepSpec:
    if rng.random() < P_GHVB_STEP:
        return StepSpec(prediction, _order(rng), "ghvb", beta=_beta(rng))
    if budget >= 2 and rng.random() < 0.15:
        s = StepSpec(prediction, int(rng.integers(2, min(3, budget) + 1)), "singlestep")
    else:
        k = _order(rng)
        r = rng.random()
        if prediction == "noise" and r < 0.25:
            return StepSpec(prediction, k, "multistep_t")
        if prediction == "data" and r < 0.15 and k <= ESTIMATOR_TABLE["multistep_dpm"].max_order:
            s = StepSpec(prediction, k, "multistep_dpm")
        else:
            est = "unipc" if rng.random() < 0.3 else "multistep"
            s = StepSpec(prediction, k, est, corrector=bool(rng.random() < 0.3))
    return replace(s, relax=_relax(rng, s)) if rng.random() < RELAX_P else s


def _structure(rng, nfe: int, prediction_mix: float = 0.3) -> list[StepSpec]:
    """Step decisions spending exactly `nfe` model calls."""
    main = "data" if rng.random() < 0.6 else "noise"
    steps = []
    if rng.random() < 0.2:
        steps.append(StepSpec(main, 1, "multistep", analytic=True))
    budget = nfe
    if rng.random() < P_GHVB_RUN:  # a GHVB trajectory: momentum works over runs of steps
        beta = _beta(rng)
        return steps + [StepSpec(main, _order(rng), "ghvb", beta=beta) for _ in range(budget)]
    while budget > 0:
        pred = main if rng.random() > prediction_mix else ("noise" if main == "data" else "data")
        s = _random_step(rng, budget, pred)
        steps.append(s)
        budget -= s.nfe
    return steps


def init_spacing(schedule, n_steps: int, spacing: str, final: str):
    """A start spacing as the search lays it: n_steps + 1 points by the spacing from t_max to t_min,
    with final="zero" sigma = 0 in place of the last.  That is `spacing` itself except for "karras",
    whose k-diffusion grid ends its last model call at t_min (a solver plan cannot then step from
    t_min to sigma = 0): its times are given explicitly."""
    if final != "zero" or spacing != "karras":
        return spacing
    return time_grid(schedule, n_steps, spacing, final="last").t[:-1]


def _spacing_times(schedule, n_steps: int, spacing: str, final: str, coordinate: str) -> list[float]:
    g = time_grid(schedule, n_steps, init_spacing(schedule, n_steps, spacing, final), final=final)
    return SolverSpec.times_of(g, coordinate)


def _jitter(rng, times: Sequence[float], sd: float = TIME_JITTER, p: float = 1.0) -> list[float] | None:
    """The inner time points nudged (the start and the end stay)."""
    u = np.array(times, dtype=np.float64)
    inner = u[1:-1] + rng.normal(0.0, sd, len(u) - 2) * (rng.random(len(u) - 2) < p)
    u = np.concatenate([[u[0]], np.sort(np.clip(inner, u[0] + MIN_GAP, 1 - MIN_GAP)), [1.0]])
    if np.any(np.diff(u) < MIN_GAP):
        return None
    return [float(v) for v in u]


def with_start(times: Sequence[float], start: float) -> list[float]:
    """The time points mapped affinely from [times[0], 1] onto [start, 1] (the curve keeps its shape)."""
    u0 = float(times[0])
    return [float(start + (1.0 - start) * (t - u0) / (1.0 - u0)) for t in times[:-1]] + [1.0]


def _moved_start(rng, start: float) -> float:
    """A new start: from t_max a fresh draw in (0, 0.3); else back to t_max (P_START_OFF) or a nudge."""
    if start == 0.0:
        return float(rng.uniform(0.0, 0.3))
    if rng.random() < P_START_OFF:
        return 0.0
    return float(np.clip(start + rng.normal(0.0, START_SD), 0.0, START_MAX))


def _resample_times(times: Sequence[float], n_steps: int) -> list[float]:
    """A parent's time curve u(s), s in [0, 1], read at n_steps + 1 equally spaced s."""
    s_old = np.linspace(0.0, 1.0, len(times))
    return [float(v) for v in np.interp(np.linspace(0.0, 1.0, n_steps + 1), s_old, times)]


def random_plan(rng, nfe: int, schedule, final: str = "zero", coordinate: str = "logsnr",
                base: SolverSpec | None = None) -> SolverSpec:
    """A random valid plan of exactly `nfe` model calls (with `base`: its steps, random times)."""
    finals = FINALS if final is None else (final,)
    for _ in range(1000):
        steps = list(base.steps) if base is not None else _structure(rng, nfe)
        fin = str(rng.choice(finals)) if base is None else base.final
        times = _spacing_times(schedule, len(steps), str(rng.choice(INIT_SPACINGS)), fin, coordinate)
        times = _jitter(rng, times, sd=TIME_JITTER * float(rng.uniform(0.5, 3.0)))
        if times is None:
            continue
        sp = _canonical(steps, times, fin, coordinate) if base is None else _try(base.with_times, times)
        if sp is not None and sp.nfe == nfe:
            return sp
    raise RuntimeError(f"could not draw a valid plan of {nfe} model calls")


def _try(f, *a):
    try:
        return f(*a)
    except ValueError:
        return None


def mutate(rng, sp: SolverSpec, times_only: bool = False, finals: Sequence[str] = ("zero",),
           late_start: bool = False) -> SolverSpec | None:
    """A child of `sp`: per-field / structure mutation (not with times_only), then time jitter; with
    late_start the start may move too."""
    steps, times = list(sp.steps), list(sp.times)
    if late_start and rng.random() < P_START:
        times = with_start(times, _moved_start(rng, times[0]))
    final = sp.final
    if not times_only and len(finals) > 1 and rng.random() < 0.1:
        final = str(rng.choice([f for f in finals if f != final]))
    if not times_only:
        if rng.random() < P_STRUCTURE:  # re-draw how the NFE is spent; keep the time curve
            steps = _structure(rng, sp.nfe)
            times = _resample_times(times, len(steps))
        else:
            for i, s in enumerate(steps):
                if rng.random() >= P_FIELD:
                    continue
                what = rng.choice(["prediction", "order", "corrector", "estimator", "parameter"])
                if s.analytic:
                    continue
                est = s.capabilities
                if what == "prediction":
                    other = "noise" if s.prediction == "data" else "data"
                    keep = est.calls_per_order and other in est.predictions  # intermediate points, other prediction
                    s = StepSpec(other, s.order, s.estimator) if keep else _random_step(rng, 1, other)
                elif what == "order" and not est.calls_per_order:
                    k = _order(rng, est.max_order)
                    s = StepSpec(s.prediction, k, s.estimator, s.corrector and est.corrector,
                                 relax=s.relax if k >= 2 else 0.0, beta=s.beta)
                elif what == "corrector" and est.corrector:
                    s = replace(s, corrector=not s.corrector)
                elif what == "estimator" and not est.calls_per_order:
                    s = _random_step(rng, 1, s.prediction)
                elif what == "parameter":  # the step's continuous parameter: momentum or relaxation
                    s = replace(s, beta=_beta(rng, s)) if s.beta is not None else replace(s, relax=_relax(rng, s))
                steps[i] = s
    # USF's jitter sd is 0.03; smaller ones refine good grids at higher NFE
    times = _jitter(rng, times, sd=float(rng.choice(JITTERS)), p=0.5 if not times_only else 0.7)
    if times is None:
        return None
    if times_only:
        return _try(sp.with_times, times)
    child = _canonical(steps, times, final, sp.coordinate)
    return child if child is not None and child.nfe == sp.nfe else None


def crossover(rng, a: SolverSpec, b: SolverSpec, times_only: bool = False) -> SolverSpec | None:
    """Uniform crossover of step decisions and time points (parents with the same number of steps;
    otherwise the time curve of b read at a's steps)."""
    n = len(a.steps)
    tb = list(b.times) if len(b.steps) == n else _resample_times(b.times, n)
    pick = rng.random(n + 1) < 0.5
    times = sorted(tb[j] if pick[j] else a.times[j] for j in range(n + 1))
    if np.any(np.diff(times) < MIN_GAP):
        return None
    if times_only or len(b.steps) != n:
        return _try(a.with_times, times)
    steps = [b.steps[i] if rng.random() < 0.5 else a.steps[i] for i in range(n)]
    child = _canonical(steps, times, a.final, a.coordinate)
    return child if child is not None and child.nfe == a.nfe else None


def has_analytic(sp: SolverSpec) -> bool:
    """Whether the plan's first step is the analytic one (it assumes a zero data mean)."""
    return bool(sp.steps[0].analytic)


def random_time_shift(rng, training_steps: int = 1000) -> dict | None:
    """A Time-Shift setting drawn for the search: off a third of the time, else a window of 2..100
    training steps (even) and a cutoff in [0, 0.8 N) training steps (samplers/time_shift.py)."""
    if rng.random() < P_SHIFT_OFF:
        return None
    window = int(2 * rng.integers(1, WINDOW_MAX // 2 + 1))
    return {"window": window, "cutoff": int(rng.integers(0, int(0.8 * training_steps)))}


def mutate_time_shift(rng, ts: dict | None, training_steps: int = 1000) -> dict | None:
    """A nudge of a setting (window +-, cutoff +-) or a fresh draw (off included)."""
    if ts is None or rng.random() < 0.4:
        return random_time_shift(rng, training_steps)
    window = int(np.clip(ts["window"] + 2 * rng.integers(-5, 6), 2, WINDOW_MAX))
    cutoff = int(np.clip(ts["cutoff"] + rng.normal(0.0, 0.05 * training_steps), 0, training_steps - 2))
    return {"window": window, "cutoff": cutoff}


# ---------------------------------------------------------------------------------------------
# the continuous decisions, for local refinement
# ---------------------------------------------------------------------------------------------

class PlanCoordinates:
    """The continuous decisions of `plan` as a vector z (its step decisions fixed): the inner time
    points, the start (with late_start), the relaxation of each step that has a first-derivative
    term, each GHVB momentum and the time-shift cutoff (times_only: the time points alone).  Each
    is divided by a scale that makes a unit move in z alike across them (time 1, relaxation and
    momentum 10, cutoff N training steps); `bounds` are those of the search space, `plan(z)` the
    plan (None where z gives no valid plan)."""

    def __init__(self, plan: SolverSpec, late_start: bool = False, training_steps: int = 1000,
                 times_only: bool = False):
        self.base = plan
        self.names: list[str] = []
        x, lo, hi, scale = [], [], [], []

        def add(name, value, low, high, unit):  # bounds widened to hold the plan's own value
            self.names.append(name)
            x.append(value), lo.append(min(low, value)), hi.append(max(high, value)), scale.append(unit)

        if late_start:
            add("start", plan.times[0], 0.0, START_MAX, 1.0)
        for i, u in enumerate(plan.times[1:-1], start=1):
            add(f"times[{i}]", u, MIN_GAP, 1.0 - MIN_GAP, 1.0)
        for i, st in enumerate(() if times_only else plan.steps):
            if st.beta is not None:
                add(f"steps[{i}].beta", st.beta, 0.05, 1.0, 10.0)
            elif st.order >= 2 and st.capabilities.relax and not st.analytic:
                add(f"steps[{i}].relax", st.relax, -2 * RELAX_RANGE, 2 * RELAX_RANGE, 10.0)
        if plan.time_shift is not None and not times_only:
            add("time_shift.cutoff", plan.time_shift["cutoff"], 0.0, training_steps - 2.0, float(training_steps))
        self.scale = np.array(scale, dtype=np.float64)
        self.z0 = np.array(x, dtype=np.float64) / self.scale
        self.bounds = np.stack([np.array(lo) / self.scale, np.array(hi) / self.scale], axis=1)

    @property
    def size(self) -> int:
        return len(self.names)

    def plan(self, z: np.ndarray) -> SolverSpec | None:
        v = dict(zip(self.names, (float(a) for a in np.asarray(z) * self.scale)))
        p = self.base
        start = v.get("start", p.times[0])
        times = [start] + sorted(v[f"times[{i}]"] for i in range(1, len(p.times) - 1)) + [1.0]
        if start < 0.0 or np.any(np.diff(times) < MIN_GAP):
            return None
        steps = [replace(st, beta=v[f"steps[{i}].beta"]) if f"steps[{i}].beta" in v else
                 replace(st, relax=v[f"steps[{i}].relax"]) if f"steps[{i}].relax" in v else st
                 for i, st in enumerate(p.steps)]
        ts = p.time_shift
        if "time_shift.cutoff" in v:
            ts = {**ts, "cutoff": int(round(v["time_shift.cutoff"]))}
        return _try(lambda: SolverSpec(tuple(steps), tuple(times), p.final, p.coordinate, time_shift=ts))


# ---------------------------------------------------------------------------------------------
# the predictor
# ---------------------------------------------------------------------------------------------

_EST = tuple(e.name for e in ESTIMATOR_TABLE.values() if e.searched)


def encode(sp: SolverSpec, slots: int) -> np.ndarray:
    """Fixed-length encoding: per step slot (present, time, step size, prediction, effective order,
    corrector, relaxation, GHVB momentum, estimator one-hot), the number of steps, the final point,
    the last step's start and the time shift (on, window, cutoff)."""
    per = 8 + len(_EST)
    f = np.zeros(slots * per + 6)
    orders = sp.orders
    for i, s in enumerate(sp.steps[:slots]):
        row = [1.0, sp.times[i], sp.times[i + 1] - sp.times[i], float(s.prediction == "data"), orders[i] / 4.0,
               float(s.corrector), s.relax, s.beta or 0.0] + [float(s.estimator == e) for e in _EST]
        f[i * per:(i + 1) * per] = row
        if s.analytic:
            f[i * per + 4] = 0.0
    f[-6] = len(sp.steps) / slots
    f[-5] = float(sp.final == "zero")
    f[-4] = sp.times[-2]  # where the last step starts (the last model call of a final "zero" plan)
    if sp.time_shift is not None:  # the Time-Shift setting: on, window and cutoff (training steps)
        f[-3:] = (1.0, sp.time_shift["window"] / 100.0, sp.time_shift["cutoff"] / 1000.0)
    return f


class PlanPredictor:
    """log(metric) from the plan encoding: gradient-boosted trees (scikit-learn)."""

    def __init__(self, slots: int):
        self.slots, self.model = slots, None

    def fit(self, plans: list[SolverSpec], scores: list[float]) -> None:
        from sklearn.ensemble import GradientBoostingRegressor

        y = np.log(np.array(scores, dtype=np.float64))
        finite = np.isfinite(y)
        if finite.sum() < 8:
            self.model = None
            return
        y = np.where(finite, y, y[finite].max() + 1.0)  # failed plans: worse than any finite score
        X = np.stack([encode(p, self.slots) for p in plans])
        self.model = GradientBoostingRegressor(n_estimators=150, max_depth=3, learning_rate=0.05, subsample=0.8,
                                               random_state=0).fit(X, y)

    def predict(self, plans: list[SolverSpec]) -> np.ndarray:
        if self.model is None:
            return np.zeros(len(plans))
        return self.model.predict(np.stack([encode(p, self.slots) for p in plans]))


# ---------------------------------------------------------------------------------------------
# the initial population
# ---------------------------------------------------------------------------------------------

def initial_plans(schedule, nfe: int, finals: Sequence[str], coordinate: str = "logsnr",
                  base: SolverSpec | None = None, late_start: bool = False) -> list[SolverSpec]:
    """Where a search starts: the solver specs of INIT_SOLVERS on each of INIT_SPACINGS and `finals`;
    with `base`, the base plan and its steps on each spacing.  late_start: also START_SOLVERS (with
    `base`: the base plan) on time_uniform started at each of INIT_STARTS."""
    if base is not None:
        times = [_spacing_times(schedule, len(base.steps), s, base.final, base.coordinate) for s in INIT_SPACINGS]
        if late_start:
            times += [with_start(times[INIT_SPACINGS.index("time_uniform")], u0) for u0 in INIT_STARTS]
        return [base] + [p for p in (_try(base.with_times, t) for t in times) if p is not None]
    forms = [_try(spec_of, solver, schedule, nfe, init_spacing(schedule, nfe, spacing, fin), fin, coordinate)
             for solver in INIT_SOLVERS for spacing in INIT_SPACINGS for fin in finals]
    if late_start:
        starts = (initial_form(solver, schedule, nfe, finals[0], coordinate) for solver in START_SOLVERS)
        forms += [_try(lambda p, u0: p.with_times(with_start(p.times, u0)), p, u0)
                  for p in starts if p is not None for u0 in INIT_STARTS]
    return [p for p in forms if p is not None]


def initial_form(solver: str, schedule, nfe: int, final: str, coordinate: str = "logsnr") -> SolverSpec | None:
    """`solver`'s plan on time_uniform (None where it has none at this NFE)."""
    return _try(spec_of, solver, schedule, nfe, "time_uniform", final, coordinate)
