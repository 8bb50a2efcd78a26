"""The S^3 search driver (Liu et al. 2024, arXiv:2312.07243): the plan space lives in
`diffsampler.samplers.search`; this module spends a budget of true evaluations in it.

Three pieces, each usable on its own:

* the objective: a plan's score on a batch (x_T from calibration seeds, sampled with the plan, scored
  against a reference or by a metric), cached and logged (`Objective`, `evaluate`);
* the evolution loop: an initial population (registered solvers' solver specs on several spacings,
  then random plans), then generations of offspring screened by a light predictor (`evolve`);
* refinement (optional, `refine` evaluations): CMA-ES on the continuous decisions of the best plan
  (time points, start, relaxations, momenta, time-shift cutoff), its steps fixed (`refine`);
* verification: the top-k plans re-scored on a second batch, the best there wins (`verify`).

`search` ties them together with the settings of one `S3Settings`.  Calibration and verification
noise come from seeds >= CALIBRATION_SEED_BASE (evaluation conventionally uses seeds 0, 1, ...);
`holdout_seeds` are checked to be disjoint from every seed the search uses.  The search is
deterministic and logs every true evaluation to an append-only JSONL file (`diffsampler.tools.
search_log`); re-running it with the same log replays the log and only evaluates what is missing.
Time-grid optimisation for a fixed solver is the same search with `base=<solver or SolverSpec>`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..samplers.loop import initial_noise, sample
from ..samplers.plan import run_plan
from ..samplers.search import (N_PARENTS, P_CROSSOVER, P_SHIFT, TIME_SHIFT_SOLVERS, PlanCoordinates, PlanPredictor,
                               crossover, has_analytic, initial_form, initial_plans, mutate, mutate_time_shift,
                               random_plan, random_time_shift)
from ..samplers.usf import FINALS, SolverSpec, spec_of
from .search_log import SearchLog

__all__ = ["search", "SearchResult", "S3Settings", "calibration_seeds", "CALIBRATION_SEED_BASE", "Batch",
           "Objective", "evaluate", "evolve", "refine", "verify", "best_verified", "PlanSpace",
           "Population", "run_search"]

CALIBRATION_SEED_BASE = 1_000_000
MIN_POPULATION = 48  # initial population, independent of the budget: a resumed search replays exactly
MAX_STALL = 50       # generations in a row without a new plan end the loop
REFINE_SIGMA = 0.01  # CMA-ES initial step size (normalised time; the other coordinates scaled alike)
REFINE_PENALTY = 1e30  # what CMA-ES is told for a point with no valid plan or a failed one (it only ranks)


def calibration_seeds(n: int, offset: int = 0) -> list[int]:
    """Seeds of calibration noise: CALIBRATION_SEED_BASE + offset + k (disjoint from 0..10^6-1)."""
    return list(range(CALIBRATION_SEED_BASE + offset, CALIBRATION_SEED_BASE + offset + n))


@dataclass(frozen=True)
class S3Settings:
    """How the search spends its budget.

    budget: true evaluations on the calibration batch (verification not included).
    refine: further evaluations spent by CMA-ES on the continuous decisions of the best plan (0: none).
    n_calib / n_verify_samples: calibration and verification batch sizes (None: as many as n_calib).
    top_k: plans re-scored on the verification batch.
    seeds: the noise seeds (first n_calib for calibration, the next for verification); None:
        `calibration_seeds`.  holdout_seeds: evaluation seeds the search must not touch.
    batch: true evaluations per generation; `screen` x batch offspring are screened by the predictor.
    final: "zero" or "last" to fix where plans end; None searches both.
    """

    budget: int = 200
    n_calib: int = 128
    n_verify_samples: int | None = None
    top_k: int = 5
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    holdout_seeds: tuple[int, ...] | None = None
    batch: int = 8
    screen: int = 8
    final: str | None = None
    coordinate: str = "logsnr"
    analytic: bool = True      # plans may start with the analytic first step (assumes a zero data mean)
    time_shift: bool = False   # the Time-Shift setting is searched too (off included)
    late_start: bool = False   # plans may start after t_max (x_T taken as the sample there; unit-variance priors)
    refine: int = 0            # CMA-ES evaluations on the best plan's continuous decisions after the budget

    @property
    def n_verify_batch(self) -> int:
        return self.n_calib if self.n_verify_samples is None else int(self.n_verify_samples)

    def check(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget (true evaluations) must be a positive integer, got {self.budget!r}")
        if not isinstance(self.refine, int) or isinstance(self.refine, bool) or self.refine < 0:
            raise ValueError(f"refine (CMA-ES evaluations after the budget) must be an integer >= 0, "
                             f"got {self.refine!r}")
        if self.n_calib < 1:
            raise ValueError(f"n_calib must be >= 1, got {self.n_calib}")
        self.noise_seeds()
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    def noise_seeds(self) -> list[int]:
        """The calibration then verification seeds, checked: enough, distinct, none held out."""
        n = self.n_calib + self.n_verify_batch
        seeds = [int(s) for s in (calibration_seeds(n) if self.seeds is None else self.seeds)]
        if len(seeds) < n:
            raise ValueError(f"seeds: need {n} (calibration {self.n_calib} + verification {self.n_verify_batch}), "
                             f"got {len(seeds)}")
        seeds = seeds[:n]
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        clash = sorted(set(seeds) & {int(s) for s in self.holdout_seeds or ()})
        if clash:
            raise ValueError(f"calibration/verification seeds overlap the held-out evaluation seeds: {clash[:10]}")
        return seeds


@dataclass
class SearchResult:
    plan: SolverSpec                 # the best plan (verified)
    calib_score: float
    verify_score: float
    evaluations: int                 # true evaluations of plans on the calibration batch
    model_calls: int                 # batched network calls spent by the search (evaluations + verification)
    sample_evaluations: int          # network calls x batch rows
    reference_seconds: float
    seconds: float
    seeds: list[int]                 # every seed whose noise the search used
    history: list[dict] = field(default_factory=list, repr=False)  # calib evaluations in order
    top: list[tuple[SolverSpec, float, float]] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """A batch to score plans on: its initial noise and a score of the samples (lower is better)."""

    x_T: torch.Tensor
    score: Callable[[torch.Tensor], float]
    chunk: int | None = None  # rows per model call (None: the whole batch); per-sample plans: the same samples


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).pow(2).mean().sqrt())


def evaluate(plan: SolverSpec, denoiser, batch: Batch) -> float:
    """The plan's score on the batch; inf for a plan that fails or gives a non-finite score."""
    try:
        compiled = plan.compile(denoiser.schedule)
        n = batch.x_T.shape[0]
        step = batch.chunk or n
        with torch.no_grad():
            x = torch.cat([run_plan(compiled, denoiser, batch.x_T[i:i + step].clone()) for i in range(0, n, step)])
        s = batch.score(x)
    except (ValueError, FloatingPointError):
        s = math.inf
    return s if math.isfinite(s) else math.inf


class Objective:
    """`evaluate` on the batch of a phase ("calib", "verify"), answered from the log when the plan was
    evaluated before; counts the model calls it spends.  `many` evaluates a list of plans; under
    torch.distributed (torchrun) plan j of the plans not in the log runs on rank j % world, the
    scores are gathered, and every rank holds them all (rank 0 alone writes the log)."""

    def __init__(self, denoiser, batches: dict[str, Batch], log: SearchLog | None = None,
                 rank: int = 0, world: int = 1):
        self.denoiser, self.batches, self.log = denoiser, batches, log or SearchLog(None, {})
        self.rank, self.world = rank, world
        self.model_calls = 0
        self.sample_evaluations = 0

    def _evaluate(self, plan: SolverSpec, phase: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        s = evaluate(plan, self.denoiser, self.batches[phase])
        return s, time.perf_counter() - t0

    def _count(self, plan: SolverSpec, phase: str) -> None:
        self.model_calls += plan.nfe
        self.sample_evaluations += plan.nfe * self.batches[phase].x_T.shape[0]

    def __call__(self, plan: SolverSpec, phase: str = "calib") -> float:
        return self.many([plan], phase)[0]

    def many(self, plans: list[SolverSpec], phase: str = "calib") -> list[float]:
        todo: dict[str, SolverSpec] = {}
        for p in plans:
            if (phase, p.key()) not in self.log.cache:
                todo.setdefault(p.key(), p)
        todo_list = list(todo.values())
        if self.world > 1 and todo_list:
            import torch.distributed as dist

            mine = {p.key(): self._evaluate(p, phase) for j, p in enumerate(todo_list) if j % self.world == self.rank}
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, mine)
            done = {k: v for d in gathered for k, v in d.items()}
        else:
            done = {p.key(): self._evaluate(p, phase) for p in todo_list}
        for p in todo_list:  # in the plans' order: the log is that of one process
            s, seconds = done[p.key()]
            self._count(p, phase)
            self.log.record(phase, p, s, seconds)
        return [self.log.cache[(phase, p.key())] for p in plans]


@dataclass
class Calibration:
    """The batches of a search and what their reference cost."""

    batches: dict[str, Batch]
    seconds: float = 0.0
    model_calls: int = 0
    sample_evaluations: int = 0


def calibration(denoiser, shape, seeds: list[int], n_calib: int, metric, reference, dtype,
                reference_solver: str = "dpmpp_3m", reference_nfe: int = 200) -> Calibration:
    """Calibration and verification batches from `seeds`; scored by RMSE against `reference` (a
    tensor for the calibration batch alone, or a callable x_T -> x_0; None: `reference_solver` at
    `reference_nfe` model calls) when metric is "rmse", else by metric(samples, x_T).  A tensor
    reference gives no verification batch."""
    schedule = denoiser.schedule
    x_cal = initial_noise((n_calib, *shape), schedule, seeds=seeds[:n_calib]).to(dtype)
    x_ver = initial_noise((len(seeds) - n_calib, *shape), schedule, seeds=seeds[n_calib:]).to(dtype)
    if metric != "rmse":
        return Calibration({"calib": _metric_batch(x_cal, metric), "verify": _metric_batch(x_ver, metric)})
    t0 = time.perf_counter()
    cost = Calibration({})
    if reference is None:
        def reference(x):
            return sample(denoiser, x.clone(), solver=reference_solver, nfe=reference_nfe, spacing="logsnr")
        cost.model_calls, cost.sample_evaluations = 2 * reference_nfe, reference_nfe * len(seeds)
    if callable(reference):
        cost.batches = {"calib": _rmse_batch(x_cal, reference(x_cal)), "verify": _rmse_batch(x_ver, reference(x_ver))}
    else:
        ref = torch.as_tensor(reference)
        if ref.shape != x_cal.shape:
            raise ValueError(f"reference has shape {tuple(ref.shape)}, the calibration batch {tuple(x_cal.shape)}; "
                             "give a callable x_T -> reference for verification too")
        cost.batches = {"calib": _rmse_batch(x_cal, ref)}
    cost.seconds = time.perf_counter() - t0
    return cost


def _rmse_batch(x_T, ref) -> Batch:
    return Batch(x_T, lambda x: rmse(x, ref))


def _metric_batch(x_T, metric) -> Batch:
    return Batch(x_T, lambda x: float(metric(x, x_T)))


# ---------------------------------------------------------------------------------------------
# the evolution loop
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanSpace:
    """The plans searched: `nfe` model calls on `schedule`, ending at one of `finals`; with `base`
    only the time points change.  analytic: whether plans may start with the analytic first step
    (it assumes a zero data mean; keep it out for data with another mean).  time_shift: whether
    the Time-Shift setting is searched too (off is one of its values); `training_steps` is the
    schedule's N (samplers/time_shift.py)."""

    schedule: object
    nfe: int
    finals: tuple[str, ...]
    coordinate: str = "logsnr"
    base: SolverSpec | None = None
    analytic: bool = True
    time_shift: bool = False
    training_steps: int = 1000
    late_start: bool = False

    def allows(self, plan: SolverSpec | None) -> bool:
        return plan is not None and (self.analytic or not has_analytic(plan)) and (
            self.time_shift or plan.time_shift is None) and (self.late_start or plan.times[0] == 0.0)

    def seed_plans(self) -> list[SolverSpec]:
        """Registered solvers' solver specs on several spacings (with `base`: its steps on them);
        with time_shift, some of them also with the Time-Shift paper's settings."""
        plans = [p for p in initial_plans(self.schedule, self.nfe, self.finals, self.coordinate, self.base,
                                          self.late_start) if self.allows(p)]
        if self.time_shift:
            n = self.training_steps
            settings = [{"window": w, "cutoff": int(c * n)} for w in (10, 40) for c in (0.2, 0.4)]
            plans += [replace(p, time_shift=ts) for p in self._time_shift_seeds(plans) for ts in settings]
        return plans

    def _time_shift_seeds(self, plans: list[SolverSpec]) -> list[SolverSpec]:
        """The plans the Time-Shift settings are seeded on: TIME_SHIFT_SOLVERS on time_uniform (with
        `base`: the base plan)."""
        if self.base is not None:
            return plans[:1]
        forms = (initial_form(s, self.schedule, self.nfe, self.finals[0], self.coordinate) for s in TIME_SHIFT_SOLVERS)
        return [p for p in forms if self.allows(p)]

    def random(self, rng) -> SolverSpec:
        final = None if self.base is None and len(self.finals) > 1 else self.finals[0]
        for _ in range(1000):
            plan = random_plan(rng, self.nfe, self.schedule, final, self.coordinate, self.base)
            if self.time_shift:
                plan = replace(plan, time_shift=random_time_shift(rng, self.training_steps))
            if self.allows(plan):
                return plan
        raise ValueError("no plan of this search space is allowed (an analytic base plan with analytic=False?)")

    def child(self, rng, parents: list[SolverSpec]) -> SolverSpec | None:
        """An offspring: crossover of two parents (sometimes), then mutation; with time_shift the
        setting comes from a parent or is re-drawn."""
        times_only = self.base is not None
        a = parents[int(rng.integers(len(parents)))]
        child, ts = a, a.time_shift
        if rng.random() < P_CROSSOVER and len(parents) > 1:
            b = parents[int(rng.integers(len(parents)))]
            child = crossover(rng, a, b, times_only) or a
            if self.time_shift and rng.random() < 0.5:
                ts = b.time_shift
        child = mutate(rng, child, times_only, self.finals, self.late_start)
        if child is not None and self.time_shift:
            if rng.random() < P_SHIFT:
                ts = mutate_time_shift(rng, ts, self.training_steps)
            child = replace(child, time_shift=ts)
        return child if self.allows(child) else None


class Population:
    """The plans evaluated on the calibration batch, in order, up to `budget`.  `consider_many`
    hands a whole generation to the objective at once (`objective.many` when it has one: the
    distributed objective spreads it over ranks); the order of the scores, and so the search, is
    that of one process evaluating them one by one."""

    def __init__(self, objective: Callable[[SolverSpec], float], budget: int, on_new: Callable | None = None):
        self.objective, self.budget, self.on_new = objective, budget, on_new
        self.scored: dict[str, tuple[SolverSpec, float]] = {}
        self.history: list[dict] = []
        self.generation = 0

    def full(self) -> bool:
        return len(self.scored) >= self.budget

    def consider(self, plan: SolverSpec) -> None:
        self.consider_many([plan])

    def consider_many(self, plans: list[SolverSpec]) -> None:
        new: dict[str, SolverSpec] = {}
        for plan in plans:
            k = plan.key()
            if k not in self.scored and k not in new and len(self.scored) + len(new) < self.budget:
                new[k] = plan
        if not new:
            return
        many = getattr(self.objective, "many", None)
        scores = many(list(new.values())) if many is not None else [self.objective(p) for p in new.values()]
        for (k, plan), s in zip(new.items(), scores):
            self.scored[k] = (plan, s)
            self.history.append({"key": k, "score": s, "generation": self.generation})
            if self.on_new is not None:
                self.on_new(min(v[1] for v in self.scored.values()))

    def ranked(self) -> list[tuple[SolverSpec, float]]:
        return sorted(self.scored.values(), key=lambda v: v[1])


def evolve(space: PlanSpace, population: Population, seed: int, batch: int, screen: int) -> Population:
    """Fill `population` up to its budget: the initial population (evaluated `batch` at a time),
    then generations of `batch` evaluations chosen among `screen` x batch offspring by the predictor."""
    rng = np.random.default_rng([seed, 0])
    init = space.seed_plans()
    n_init = max(len(init), MIN_POPULATION)
    while len(init) < n_init:
        init.append(space.random(rng))
    for j in range(0, len(init), batch):
        population.consider_many(init[j:j + batch])
    predictor = PlanPredictor(space.nfe + 1)
    gen = stall = 0
    while not population.full() and stall < MAX_STALL:
        gen += 1
        population.generation = gen
        before = len(population.scored)
        generation(space, population, predictor, np.random.default_rng([seed, gen]), batch, screen)
        stall = stall + 1 if len(population.scored) == before else 0
    return population


def generation(space: PlanSpace, population: Population, predictor, rng, batch: int, screen: int) -> None:
    """One generation: refit the predictor, draw offspring of the best, evaluate the screened ones."""
    scored = list(population.scored.values())
    predictor.fit([p for p, _ in scored], [s for _, s in scored])
    parents = [p for p, _ in population.ranked()[:N_PARENTS]]
    candidates = offspring(space, parents, population.scored, rng, screen * batch)
    population.consider_many(screened(candidates, predictor, rng, batch))


def offspring(space: PlanSpace, parents, seen, rng, n: int) -> list[SolverSpec]:
    """Up to `n` distinct new children of `parents` (none of `seen`), in the order drawn."""
    pool: dict[str, SolverSpec] = {}
    tries = 0
    while len(pool) < n and tries < 50 * n:
        tries += 1
        child = space.child(rng, parents)
        if child is not None and child.nfe == space.nfe and child.key() not in seen:
            pool[child.key()] = child
    return list(pool.values())


def screened(candidates: list[SolverSpec], predictor, rng, batch: int) -> list[SolverSpec]:
    """The best-predicted candidates, plus a few random others (a quarter of the batch) to explore."""
    if not candidates:
        return []
    order = list(np.argsort(predictor.predict(candidates), kind="stable"))
    n_explore = max(1, batch // 4)
    chosen, rest = order[:batch - n_explore], order[batch - n_explore:]
    if rest:
        chosen += list(rng.choice(rest, size=min(n_explore, len(rest)), replace=False))
    return [candidates[int(j)] for j in chosen]


def refine(space: PlanSpace, population: Population, evaluations: int, seed: int,
           sigma: float = REFINE_SIGMA) -> Population:
    """Spend `evaluations` more true evaluations on the best plan's continuous decisions with CMA-ES
    (Hansen 2016, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772; the `cmaes` package):
    each CMA-ES generation is evaluated at once like an evolution generation (spread over ranks,
    logged, replayed on resume).  Points that give no valid plan of the space cost no evaluation."""
    from cmaes import CMA

    ranked = population.ranked()
    if evaluations <= 0 or not ranked:
        return population
    coords = PlanCoordinates(ranked[0][0], space.late_start, space.training_steps, times_only=space.base is not None)
    population.budget = len(population.scored) + evaluations
    if coords.size == 0:
        return population
    opt = CMA(mean=coords.z0, sigma=sigma, bounds=coords.bounds, seed=seed)
    gen, stall = population.generation, 0
    while not population.full() and stall < MAX_STALL and not opt.should_stop():
        gen += 1
        population.generation = gen
        zs = [opt.ask() for _ in range(opt.population_size)]
        plans = [coords.plan(z) for z in zs]
        plans = [p if space.allows(p) else None for p in plans]
        before = len(population.scored)
        population.consider_many([p for p in plans if p is not None])
        stall = stall + 1 if len(population.scored) == before else 0
        values = [population.scored[p.key()][1] if p is not None and p.key() in population.scored else math.inf
                  for p in plans]
        opt.tell([(z, v if math.isfinite(v) else REFINE_PENALTY) for z, v in zip(zs, values)])
    return population


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------

def verify(ranked: list[tuple[SolverSpec, float]], objective: Callable[[SolverSpec], float] | None,
           top_k: int) -> list[tuple[SolverSpec, float, float]]:
    """(plan, calibration score, verification score) of the top_k plans of `ranked`, in its order;
    without an objective (or top_k 0) the best calibration plan alone, its calibration score
    standing in for the verification score."""
    if objective is None or top_k <= 0:
        return [(p, s, s) for p, s in ranked[:1]]
    return [(p, s, objective(p)) for p, s in ranked[:top_k]]


def best_verified(top: list[tuple[SolverSpec, float, float]]) -> tuple[SolverSpec, float, float]:
    """The verified winner: lowest verification score, ties broken by the calibration score."""
    return min(top, key=lambda r: (r[2], r[1]))


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------

def search(
    denoiser,
    nfe: int,
    *,
    shape: Sequence[int],
    metric: str | Callable[[torch.Tensor, torch.Tensor], float] = "rmse",
    reference: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference_solver: str = "dpmpp_3m",
    reference_nfe: int = 200,
    budget: int = 200,
    n_calib: int = 128,
    n_verify_samples: int | None = None,
    n_verify: int = 5,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    holdout_seeds: Sequence[int] | None = None,
    base: str | SolverSpec | None = None,
    final: str | None = None,
    coordinate: str = "logsnr",
    batch: int = 8,
    screen: int = 8,
    log: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    analytic: bool = True,
    time_shift: bool = False,
    late_start: bool = False,
    refine: int = 0,
) -> SearchResult:
    """Search a SolverSpec of exactly `nfe` model calls for `denoiser` (see the module docstring).

    shape: one sample's shape (without the batch dimension).
    metric: "rmse" against `reference` (the exact solution: a tensor for the calibration noise or a
        callable x_T -> x_0; default: `reference_solver` at `reference_nfe` model calls), or a
        callable (samples, x_T) -> float, lower is better (e.g. an FID proxy).
    n_verify: the top-k plans re-scored on the verification batch; the other settings are those of
        `S3Settings`.  base: a solver with a solver spec (`samplers.usf.spec_solvers()`: every
        deterministic registered solver) or a SolverSpec: time-grid-only search.  log: JSONL log; re-running with it resumes.  out: write the best
        plan there as YAML.  analytic: whether plans may start with the analytic first step (it
        assumes a zero data mean).  time_shift: search the Time-Shift setting too (off included).
        late_start: plans may start after t_max, taking x_T as the sample there (refused on
        variance-exploding schedules).  refine: evaluations spent after the budget by CMA-ES on the
        best plan's continuous decisions (`refine`); 0: none.
    """
    settings = S3Settings(budget, n_calib, n_verify_samples, n_verify, seed,
                          None if seeds is None else tuple(seeds),
                          None if holdout_seeds is None else tuple(holdout_seeds), batch, screen, final, coordinate,
                          analytic, time_shift, late_start, refine)
    return run_search(denoiser, nfe, shape, settings, metric=metric, reference=reference,
                      reference_solver=reference_solver, reference_nfe=reference_nfe, base=base, log=log, out=out,
                      name=name, dtype=dtype, progress=progress)


def run_search(denoiser, nfe: int, shape: Sequence[int], settings: S3Settings, *, metric="rmse", reference=None,
               reference_solver: str = "dpmpp_3m", reference_nfe: int = 200, base=None, log=None, out=None,
               name: str | None = None, dtype: torch.dtype = torch.float32, progress: bool = True,
               batches: Calibration | None = None, metric_name: str | None = None,
               provenance: dict | None = None, log_extra: dict | None = None) -> SearchResult:
    """`search` with its settings in one S3Settings.  batches: the calibration (and verification)
    batches made by the caller (e.g. against cached reference endpoints), else made here from
    `metric` / `reference`.  Under torchrun every rank runs this; each generation's plans are spread
    over the ranks (`Objective.many`) and the result is that of one process.  log_extra: more
    values the log's config line records (a log written under others is refused), e.g. the model."""
    from ..eval.generate import barrier, dist_env

    _check(nfe, settings, metric)
    seeds = settings.noise_seeds()
    space = _space(denoiser.schedule, nfe, settings, base)
    rank, world = dist_env()
    t_start = time.perf_counter()
    cal = batches if batches is not None else calibration(denoiser, shape, seeds, settings.n_calib, metric, reference,
                                                           dtype, reference_solver, reference_nfe)
    config = {**_log_config(nfe, settings, metric_name or metric, seeds, space), **(log_extra or {})}
    if rank == 0:
        search_log = SearchLog(log, config)
    barrier()  # rank 0 has created (or repaired) the log; the others replay it
    if rank != 0:
        search_log = SearchLog(log, config, readonly=True)
    objective = Objective(denoiser, cal.batches, search_log, rank, world)
    bar = _progress_bar(settings.budget + settings.refine, nfe) if progress and rank == 0 else None
    population = Population(objective, settings.budget, _bar_update(bar, lambda: population.generation)
                            if bar is not None else None)
    evolve(space, population, settings.seed, settings.batch, settings.screen)
    refine(space, population, settings.refine, settings.seed)
    if bar is not None:
        bar.close()
    verifier = None
    if "verify" in cal.batches:
        objective.many([p for p, _ in population.ranked()[:settings.top_k]], "verify")  # spread over ranks
        verifier = (lambda p: objective(p, "verify"))
    top = verify(population.ranked(), verifier, settings.top_k)
    best, s_cal, s_ver = best_verified(top)
    best = _named(best, name or f"searched_nfe{nfe}", config["metric"], s_cal, s_ver, settings, len(population.scored),
                  seeds, base, provenance)
    if out is not None and rank == 0:
        best.save(out)
    return SearchResult(plan=best, calib_score=s_cal, verify_score=s_ver, evaluations=len(population.scored),
                        model_calls=cal.model_calls + objective.model_calls,
                        sample_evaluations=cal.sample_evaluations + objective.sample_evaluations,
                        reference_seconds=cal.seconds, seconds=time.perf_counter() - t_start, seeds=seeds,
                        history=population.history, top=top)


def _check(nfe, settings: S3Settings, metric) -> None:
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    settings.check()
    if isinstance(metric, str) and metric != "rmse":
        raise ValueError(f"metric must be 'rmse' or a callable (samples, x_T) -> float, got {metric!r}")
    if settings.final not in (None,) + FINALS:
        raise ValueError(f"final must be None (search both) or one of {FINALS}, got {settings.final!r}")


def _space(schedule, nfe: int, settings: S3Settings, base) -> PlanSpace:
    from ..samplers.time_shift import training_steps

    final, coordinate = settings.final, settings.coordinate
    if settings.late_start and schedule.is_variance_exploding:
        raise ValueError(f"late_start=True needs a unit-variance prior (x_T is taken as the sample at the later start), "
                         f"but {type(schedule).__name__} is variance-exploding; use late_start=False")
    flags = dict(analytic=settings.analytic, time_shift=settings.time_shift, training_steps=training_steps(schedule),
                 late_start=settings.late_start)
    if base is None:
        return PlanSpace(schedule, nfe, FINALS if final is None else (final,), coordinate, **flags)
    plan = base if isinstance(base, SolverSpec) else spec_of(base, schedule, nfe, "logsnr", final or "zero",
                                                                coordinate)
    if plan.nfe != nfe:
        raise ValueError(f"base plan spends {plan.nfe} model calls, nfe={nfe}")
    return PlanSpace(schedule, nfe, (plan.final,), plan.coordinate, plan, **flags)


def _log_config(nfe: int, settings: S3Settings, metric, seeds: list[int], space: PlanSpace) -> dict:
    """What a log's first line records: a log written under other values is refused."""
    return {"nfe": nfe, "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
            "n_calib": settings.n_calib, "n_verify_samples": settings.n_verify_batch, "seed": settings.seed,
            "seeds": [seeds[0], seeds[-1], len(seeds)],
            "base": space.base.to_dict()["steps"] if space.base is not None else None,
            "final": settings.final if space.base is None else space.base.final,
            "coordinate": space.coordinate, "batch": settings.batch, "screen": settings.screen,
            # recorded only away from their defaults, so logs written before these existed still resume
            **({"analytic": False} if not settings.analytic else {}),
            **({"time_shift": True} if settings.time_shift else {}),
            **({"late_start": True} if settings.late_start else {})}


def _named(plan: SolverSpec, name: str, metric: str, s_cal: float, s_ver: float, settings: S3Settings,
           evaluations: int, seeds: list[int], base, provenance: dict | None = None) -> SolverSpec:
    info = {"search": {**(provenance or {}), "metric": metric, "calib_score": s_cal, "verify_score": s_ver, "budget": settings.budget,
                       "refine": settings.refine,
                       "evaluations": evaluations, "n_calib": settings.n_calib,
                       "n_verify_samples": settings.n_verify_batch, "seed": settings.seed,
                       "seeds": f"{seeds[0]}..{seeds[-1]}",
                       "base": None if base is None else str(base if isinstance(base, str) else base.name or "plan")}}
    info["search"]["time_shift_searched"] = settings.time_shift
    info["search"]["late_start_searched"] = settings.late_start
    info["search"].setdefault("analytic_first_step", "searched" if settings.analytic else "excluded")
    return SolverSpec(plan.steps, plan.times, plan.final, plan.coordinate, name=name, info=info,
                      time_shift=plan.time_shift)


def _progress_bar(budget: int, nfe: int):
    from tqdm.auto import tqdm

    return tqdm(total=budget, desc=f"search nfe={nfe}", unit="plan")


def _bar_update(bar, generation=lambda: 0):
    def update(best: float) -> None:
        bar.update(1)
        bar.set_postfix(generation=generation(), best=f"{best:.3e}")
    return update
