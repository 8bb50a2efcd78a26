"""Solver-schedule search (S^3; Liu et al. 2024, "A Unified Sampling Framework for Solver Searching of
Diffusion Probabilistic Models", arXiv:2312.07243, and its released evolutionary search).

For a denoiser, an NFE budget and a metric, `search` looks for the `SolverPlan` (samplers/usf.py)
with the lowest metric on a small calibration batch:

1. an initial population: the plan forms of registered solvers on several spacings (so the search
   starts from the best fixed solvers) and random plans;
2. generations: parents from the top 15, crossover (0.5), per-field mutation (0.3), structure
   mutation (0.2: re-draw how the NFE is spent, times interpolated), time jitter (sd 0.03 in the
   normalised coordinate, or 0.01 / 0.003 to refine), order prior {1: .2, 2: .4, 3: .3, 4: .1}, no corrector on the last step
   (the released USF search settings);
3. a light predictor (gradient-boosted trees on a fixed-length plan encoding, refitted every
   generation on all evaluated plans) screens `screen` x more offspring than are evaluated; the
   best-predicted ones (plus a few random ones, to keep exploring) are evaluated for real;
4. the top `n_verify` plans are re-evaluated on a separate verification batch (more calibration
   seeds) and the best there is returned and written as YAML.

Seeds: calibration and verification noise come from seeds in `calibration_seeds` (by default
>= CALIBRATION_SEED_BASE = 1_000_000; evaluation conventionally uses seeds 0, 1, ...); `holdout_seeds`
given to `search` are checked to be disjoint from every seed it uses.  The search is
deterministic, logs every true evaluation to an append-only JSONL file, and re-running it with
the same log replays the log and only evaluates what is missing.

Time-grid optimisation for a fixed solver is the same search with `base=<solver or SolverPlan>`:
only the time points mutate.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..schedules import time_grid
from .loop import initial_noise
from .plan import run_plan
from .usf import ESTIMATOR_TABLE, FINALS, SolverPlan, StepPlan, effective_orders, plan_form

__all__ = ["search", "SearchResult", "calibration_seeds", "CALIBRATION_SEED_BASE", "random_plan", "mutate",
           "crossover", "encode"]

CALIBRATION_SEED_BASE = 1_000_000
ORDER_PRIOR = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
P_CROSSOVER, P_FIELD, P_STRUCTURE, TIME_JITTER = 0.5, 0.3, 0.2, 0.03
JITTERS = (TIME_JITTER, 0.01, 0.003)
N_PARENTS = 15
RELAX_P, RELAX_RANGE, RELAX_JITTER = 0.25, 0.5, 0.1  # linear relaxation c: how often drawn, its range, refinement sd
MIN_GAP = 2e-3  # smallest step in the normalised time coordinate
INIT_SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras")
INIT_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "deis_2", "deis_3", "unipc_2", "unipc_3", "ghvb")
# GHVB: how often a whole trajectory / a single drawn step is GHVB, the momentum range, its nudge sd
P_GHVB_RUN, P_GHVB_STEP, BETA_RANGE, BETA_JITTER = 0.12, 0.02, (0.2, 1.0), 0.1


def calibration_seeds(n: int, offset: int = 0) -> list[int]:
    """Seeds of calibration noise: CALIBRATION_SEED_BASE + offset + k (disjoint from 0..10^6-1)."""
    return list(range(CALIBRATION_SEED_BASE + offset, CALIBRATION_SEED_BASE + offset + n))


# ---------------------------------------------------------------------------------------------
# the search space
# ---------------------------------------------------------------------------------------------

def _order(rng, cap: int = 4) -> int:
    ks = [k for k in ORDER_PRIOR if k <= cap]
    p = np.array([ORDER_PRIOR[k] for k in ks])
    return int(rng.choice(ks, p=p / p.sum()))


def _canonical(steps: list[StepPlan], times: Sequence[float], final: str, coordinate: str) -> SolverPlan | None:
    """Repair a drawn plan into a valid canonical one (or None): fallback steps written with their
    effective order, no corrector where none can run, first order onto sigma = 0."""
    steps = list(steps)
    n = len(steps)
    last = steps[-1]
    if final == "zero" and not last.capabilities.to_zero:
        steps[-1] = StepPlan(last.prediction, 1, "multistep", analytic=last.analytic and n == 1)
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
        return SolverPlan(tuple(steps), tuple(times), final, coordinate)
    except ValueError:
        return None


def _relax(rng, s: StepPlan) -> float:
    """A relaxation coefficient for step `s`: none for steps without a first-derivative term;
    otherwise a fresh draw (0 or uniform in +-RELAX_RANGE) or, for a relaxed step, a nudge."""
    if s.order < 2 or not s.capabilities.relax or s.analytic:
        return 0.0
    if s.relax != 0.0 and rng.random() < 0.6:
        return float(s.relax + rng.normal(0.0, RELAX_JITTER))
    return float(rng.uniform(-RELAX_RANGE, RELAX_RANGE)) if rng.random() < 0.7 else 0.0


def _beta(rng, s: StepPlan | None = None) -> float:
    """Momentum: a fresh draw in BETA_RANGE or, for a step with momentum, a nudge (kept in (0, 1])."""
    if s is not None and s.beta is not None and rng.random() < 0.6:
        return float(np.clip(s.beta + rng.normal(0.0, BETA_JITTER), 0.05, 1.0))
    return float(rng.uniform(*BETA_RANGE))


def _random_step(rng, budget: int, prediction: str) -> StepPlan:
    if rng.random() < P_GHVB_STEP:
        return StepPlan(prediction, _order(rng), "ghvb", beta=_beta(rng))
    if budget >= 2 and rng.random() < 0.15:
        s = StepPlan(prediction, int(rng.integers(2, min(3, budget) + 1)), "singlestep")
    else:
        k = _order(rng)
        r = rng.random()
        if prediction == "noise" and r < 0.25:
            return StepPlan(prediction, k, "multistep_t")
        if prediction == "data" and r < 0.15 and k <= ESTIMATOR_TABLE["multistep_dpm"].max_order:
            s = StepPlan(prediction, k, "multistep_dpm")
        else:
            est = "unipc" if rng.random() < 0.3 else "multistep"
            s = StepPlan(prediction, k, est, corrector=bool(rng.random() < 0.3))
    return replace(s, relax=_relax(rng, s)) if rng.random() < RELAX_P else s


def _structure(rng, nfe: int, prediction_mix: float = 0.3) -> list[StepPlan]:
    """Step decisions spending exactly `nfe` model calls."""
    main = "data" if rng.random() < 0.6 else "noise"
    steps = []
    if rng.random() < 0.2:
        steps.append(StepPlan(main, 1, "multistep", analytic=True))
    budget = nfe
    if rng.random() < P_GHVB_RUN:  # a GHVB trajectory: momentum works over runs of steps
        beta = _beta(rng)
        return steps + [StepPlan(main, _order(rng), "ghvb", beta=beta) for _ in range(budget)]
    while budget > 0:
        pred = main if rng.random() > prediction_mix else ("noise" if main == "data" else "data")
        s = _random_step(rng, budget, pred)
        steps.append(s)
        budget -= s.nfe
    return steps


def _spacing_times(schedule, n_steps: int, spacing: str, final: str, coordinate: str) -> list[float]:
    g = time_grid(schedule, n_steps, spacing, final=final)
    return SolverPlan.times_of(g, coordinate)


def _jitter(rng, times: Sequence[float], sd: float = TIME_JITTER, p: float = 1.0) -> list[float] | None:
    u = np.array(times, dtype=np.float64)
    inner = u[1:-1] + rng.normal(0.0, sd, len(u) - 2) * (rng.random(len(u) - 2) < p)
    u = np.concatenate([[0.0], np.sort(np.clip(inner, MIN_GAP, 1 - MIN_GAP)), [1.0]])
    if np.any(np.diff(u) < MIN_GAP):
        return None
    return [float(v) for v in u]


def _resample_times(times: Sequence[float], n_steps: int) -> list[float]:
    """A parent's time curve u(s), s in [0, 1], read at n_steps + 1 equally spaced s."""
    s_old = np.linspace(0.0, 1.0, len(times))
    return [float(v) for v in np.interp(np.linspace(0.0, 1.0, n_steps + 1), s_old, times)]


def random_plan(rng, nfe: int, schedule, final: str = "zero", coordinate: str = "logsnr",
                base: SolverPlan | None = None) -> SolverPlan:
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


def mutate(rng, sp: SolverPlan, times_only: bool = False, finals: Sequence[str] = ("zero",)) -> SolverPlan | None:
    steps, times = list(sp.steps), list(sp.times)
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
                    s = StepPlan(other, s.order, s.estimator) if keep else _random_step(rng, 1, other)
                elif what == "order" and not est.calls_per_order:
                    k = _order(rng, est.max_order)
                    s = StepPlan(s.prediction, k, s.estimator, s.corrector and est.corrector,
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


def crossover(rng, a: SolverPlan, b: SolverPlan, times_only: bool = False) -> SolverPlan | None:
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


# ---------------------------------------------------------------------------------------------
# the predictor
# ---------------------------------------------------------------------------------------------

_EST = tuple(e.name for e in ESTIMATOR_TABLE.values() if e.searched)


def encode(sp: SolverPlan, slots: int) -> np.ndarray:
    """Fixed-length encoding: per step slot (present, time, step size, prediction, effective order,
    corrector, relaxation, GHVB momentum, estimator one-hot), the number of steps, the final point and
    the last step's start."""
    per = 8 + len(_EST)
    f = np.zeros(slots * per + 3)
    orders = sp.orders
    for i, s in enumerate(sp.steps[:slots]):
        row = [1.0, sp.times[i], sp.times[i + 1] - sp.times[i], float(s.prediction == "data"), orders[i] / 4.0,
               float(s.corrector), s.relax, s.beta or 0.0] + [float(s.estimator == e) for e in _EST]
        f[i * per:(i + 1) * per] = row
        if s.analytic:
            f[i * per + 4] = 0.0
    f[-3] = len(sp.steps) / slots
    f[-2] = float(sp.final == "zero")
    f[-1] = sp.times[-2]  # where the last step starts (the last model call of a final "zero" plan)
    return f


class _Predictor:
    """log(metric) from the plan encoding: gradient-boosted trees (scikit-learn)."""

    def __init__(self, slots: int):
        self.slots, self.model = slots, None

    def fit(self, plans: list[SolverPlan], scores: list[float]) -> None:
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

    def predict(self, plans: list[SolverPlan]) -> np.ndarray:
        if self.model is None:
            return np.zeros(len(plans))
        return self.model.predict(np.stack([encode(p, self.slots) for p in plans]))


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    plan: SolverPlan                 # the best plan (verified)
    calib_score: float
    verify_score: float
    evaluations: int                 # true evaluations of plans on the calibration batch
    model_calls: int                 # batched network calls spent by the search (evaluations + verification)
    sample_evaluations: int          # network calls x batch rows
    reference_seconds: float
    seconds: float
    seeds: list[int]                 # every seed whose noise the search used
    history: list[dict] = field(default_factory=list, repr=False)  # calib evaluations in order
    top: list[tuple[SolverPlan, float, float]] = field(default_factory=list, repr=False)


PHASES = ("calib", "verify")


class _Log:
    """Append-only JSONL: a config line, then one line per true evaluation.  Reading it back skips an
    incomplete last line (a write the interrupted run did not finish; it is cut off, with a warning);
    any other damage is an error naming the file and line."""

    def __init__(self, path, config: dict):
        self.path = Path(path) if path is not None else None
        self.cache: dict[tuple[str, str], float] = {}
        if self.path is None:
            return
        records = _read_log(self.path) if self.path.exists() else []
        if records:
            _check_config(self.path, records[0][1], config)
            for _, rec in records[1:]:
                self.cache[(rec["phase"], rec["key"])] = math.inf if rec["score"] is None else float(rec["score"])
        else:  # a new log (or one whose only line was cut off while being written)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "config", "config": config})

    def _append(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def record(self, phase: str, sp: SolverPlan, score: float, seconds: float) -> None:
        self.cache[(phase, sp.key())] = score
        if self.path is not None:
            self._append({"type": "eval", "phase": phase, "key": sp.key(), "score": score if math.isfinite(score) else None,
                          "seconds": round(seconds, 4), "plan": sp.to_dict()})


def _read_log(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every line of a search log, checked; then the file ends with a newline."""
    text = path.read_text(errors="replace")
    *lines, tail = text.split("\n")  # tail: what follows the last newline ('' for a complete file)
    records = [(i, _parse_line(path, i, line)) for i, line in enumerate(lines, 1) if line.strip()]
    partial = False
    if tail.strip():
        try:
            records.append((len(lines) + 1, _parse_line(path, len(lines) + 1, tail)))
        except ValueError:
            partial = True
    for k, (i, rec) in enumerate(records):
        _check_record(path, i, rec, first=k == 0)
    if partial:
        _cut_partial_line(path, text, tail, len(lines) + 1)
    elif tail.strip():  # a complete last record without its newline: end the line before appending
        with path.open("a") as f:
            f.write("\n")
    return records


def _parse_line(path: Path, i: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg}, column {e.colno}); "
                         "the log is damaged: repair that line or use a new log file") from None


def _cut_partial_line(path: Path, text: str, tail: str, i: int) -> None:
    keep = len(text[: len(text) - len(tail)].encode())
    with path.open("r+b") as f:
        f.truncate(keep)
    warnings.warn(f"{path}, line {i}: incomplete last line (an interrupted write) dropped; "
                  "its evaluation will be redone", stacklevel=4)


def _check_record(path: Path, i: int, rec, first: bool) -> None:
    where = f"{path}, line {i}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    kind = rec.get("type")
    if first:
        if kind != "config" or not isinstance(rec.get("config"), dict):
            raise ValueError(f"{path} is not a search log (line {i} is not a config line)")
        return
    if kind != "eval":
        what = "a second config line" if kind == "config" else f"unknown record type {kind!r}"
        raise ValueError(f"{where}: {what} (allowed after line 1: 'eval')")
    for name in ("phase", "key", "score"):
        if name not in rec:
            raise ValueError(f"{where}: eval record missing {name!r} (has {', '.join(map(repr, rec))})")
    if rec["phase"] not in PHASES:
        raise ValueError(f"{where}: 'phase' must be one of {PHASES}, got {rec['phase']!r}")
    if not isinstance(rec["key"], str):
        raise ValueError(f"{where}: 'key' must be a string, got {rec['key']!r}")
    score = rec["score"]
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError(f"{where}: 'score' must be a number or null, got {score!r}")


def _check_config(path: Path, rec: dict, config: dict) -> None:
    old = rec["config"]
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k) and k != "budget")
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} vs {config.get(k)!r}" for k in diff)
        raise ValueError(f"{path} was written by a different search (line 1, logged vs now: {changes}); "
                         "use a new log file")


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).pow(2).mean().sqrt())


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
    base: str | SolverPlan | None = None,
    final: str | None = None,
    coordinate: str = "logsnr",
    batch: int = 8,
    screen: int = 8,
    log: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> SearchResult:
    """Search a SolverPlan of exactly `nfe` model calls for `denoiser` (see the module docstring).

    shape: one sample's shape (without the batch dimension).
    metric: "rmse" against `reference` (the exact solution: a tensor for the calibration noise or a
        callable x_T -> x_0; default: `reference_solver` at `reference_nfe` model calls), or a
        callable (samples, x_T) -> float, lower is better (e.g. an FID proxy).
    budget: true evaluations on the calibration batch (verification not included).
    n_calib / n_verify_samples: calibration and verification batch sizes (seeds from
        `calibration_seeds`, or `seeds`: the first n_calib for calibration, the next for verification).
    holdout_seeds: evaluation seeds; a ValueError if any seed the search would use is among them.
    base: a solver with a plan form (`samplers.usf.PLAN_FORMS`) or a SolverPlan: time-grid-only search.
    final: "zero" or "last" to fix where plans end; None searches both (the metric's reference is
        at sigma = 0 either way; "last" stops at t_min).
    batch: true evaluations per generation (the predictor is refitted once per generation, as S^3
        retrains it in stages; raise it with the budget); `screen` x batch offspring are screened.
    log: JSONL log; re-running with it resumes.  out: write the best plan there as YAML.
    """
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget (true evaluations) must be a positive integer, got {budget!r}")
    if n_calib < 1:
        raise ValueError(f"n_calib must be >= 1, got {n_calib}")
    n_ver = n_calib if n_verify_samples is None else int(n_verify_samples)
    if seeds is None:
        seeds = calibration_seeds(n_calib + n_ver)
    seeds = [int(s) for s in seeds]
    if len(seeds) < n_calib + n_ver:
        raise ValueError(f"seeds: need {n_calib + n_ver} (calibration {n_calib} + verification {n_ver}), got {len(seeds)}")
    seeds = seeds[:n_calib + n_ver]
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct")
    if holdout_seeds is not None:
        clash = sorted(set(seeds) & {int(s) for s in holdout_seeds})
        if clash:
            raise ValueError(f"calibration/verification seeds overlap the held-out evaluation seeds: {clash[:10]}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if isinstance(metric, str) and metric != "rmse":
        raise ValueError(f"metric must be 'rmse' or a callable (samples, x_T) -> float, got {metric!r}")
    if final not in (None,) + FINALS:
        raise ValueError(f"final must be None (search both) or one of {FINALS}, got {final!r}")
    schedule = denoiser.schedule
    base_plan = None
    if base is not None:
        base_plan = base if isinstance(base, SolverPlan) else plan_form(base, schedule, nfe, "logsnr", final or "zero",
                                                                        coordinate)
        if base_plan.nfe != nfe:
            raise ValueError(f"base plan spends {base_plan.nfe} model calls, nfe={nfe}")
        final, coordinate = base_plan.final, base_plan.coordinate
    t_start = time.perf_counter()
    x_cal = initial_noise((n_calib, *shape), schedule, seeds=seeds[:n_calib]).to(dtype)
    x_ver = initial_noise((n_ver, *shape), schedule, seeds=seeds[n_calib:]).to(dtype)
    ref_seconds = 0.0
    model_calls = 0
    sample_evals = 0
    if metric == "rmse":
        t0 = time.perf_counter()
        if reference is None:
            from .loop import sample

            def reference(x):
                return sample(denoiser, x.clone(), solver=reference_solver, nfe=reference_nfe, spacing="logsnr")
            model_calls += 2 * reference_nfe
            sample_evals += reference_nfe * (n_calib + n_ver)
        if callable(reference):
            ref_cal, ref_ver = reference(x_cal), reference(x_ver)
        else:
            ref_cal, ref_ver = torch.as_tensor(reference), None
            if ref_cal.shape != x_cal.shape:
                raise ValueError(f"reference has shape {tuple(ref_cal.shape)}, the calibration batch {tuple(x_cal.shape)}; "
                                 "give a callable x_T -> reference for verification too")
            n_verify = 0
        ref_seconds = time.perf_counter() - t0

        def score_fn(x, which):
            return _rmse(x, ref_cal if which == "calib" else ref_ver)
    else:
        def score_fn(x, which):
            return float(metric(x, x_cal if which == "calib" else x_ver))

    config = {"nfe": nfe, "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
              "n_calib": n_calib, "n_verify_samples": n_ver, "seed": seed, "seeds": [seeds[0], seeds[-1], len(seeds)],
              "base": base_plan.to_dict()["steps"] if base_plan is not None else None, "final": final,
              "coordinate": coordinate, "batch": batch, "screen": screen}
    book = _Log(log, config)
    counts = {"model_calls": model_calls, "sample_evals": sample_evals}

    def evaluate(sp: SolverPlan, phase: str) -> float:
        key = (phase, sp.key())
        if key in book.cache:
            return book.cache[key]
        x0 = x_cal if phase == "calib" else x_ver
        t0 = time.perf_counter()
        try:
            x = run_plan(sp.compile(schedule), denoiser, x0.clone())
            s = score_fn(x, phase)
        except (ValueError, FloatingPointError):
            s = math.inf
        if not math.isfinite(s):
            s = math.inf
        counts["model_calls"] += sp.nfe
        counts["sample_evals"] += sp.nfe * x0.shape[0]
        book.record(phase, sp, s, time.perf_counter() - t0)
        return s

    times_only = base_plan is not None
    finals = FINALS if final is None else (final,)
    evaluated: dict[str, tuple[SolverPlan, float]] = {}
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget, desc=f"search nfe={nfe}", unit="plan")

    def consider(sp: SolverPlan) -> None:
        k = sp.key()
        if k in evaluated or len(evaluated) >= budget:
            return
        s = evaluate(sp, "calib")
        evaluated[k] = (sp, s)
        history.append({"key": k, "score": s})
        if bar is not None:
            bar.update(1)
            best = min(v[1] for v in evaluated.values())
            bar.set_postfix(best=f"{best:.3e}")

    # initial population: registered solvers' plan forms on several spacings, then random plans
    rng = np.random.default_rng([seed, 0])
    init: list[SolverPlan] = []
    if base_plan is not None:
        init.append(base_plan)
        for sp_name in INIT_SPACINGS:
            t = _spacing_times(schedule, len(base_plan.steps), sp_name, final, coordinate)
            c = _try(base_plan.with_times, t)
            if c is not None:
                init.append(c)
    else:
        for solver in INIT_SOLVERS:
            for sp_name in INIT_SPACINGS:
                for fin in finals:
                    c = _try(plan_form, solver, schedule, nfe, sp_name, fin, coordinate)
                    if c is not None:
                        init.append(c)
    n_init = max(len(init), 48)  # independent of the budget, so a resumed search with a larger budget replays exactly
    while len(init) < n_init:
        init.append(random_plan(rng, nfe, schedule, final, coordinate, base_plan))
    for sp in init:
        consider(sp)

    slots = nfe + 1
    predictor = _Predictor(slots)
    gen = 0
    stall = 0
    while len(evaluated) < budget and stall < 50:
        gen += 1
        rng = np.random.default_rng([seed, gen])
        ranked = sorted(evaluated.values(), key=lambda v: v[1])
        parents = [p for p, s in ranked[:N_PARENTS]]
        predictor.fit([p for p, _ in evaluated.values()], [s for _, s in evaluated.values()])
        pool: dict[str, SolverPlan] = {}
        tries = 0
        while len(pool) < screen * batch and tries < 50 * screen * batch:
            tries += 1
            a = parents[int(rng.integers(len(parents)))]
            child = a
            if rng.random() < P_CROSSOVER and len(parents) > 1:
                b = parents[int(rng.integers(len(parents)))]
                child = crossover(rng, a, b, times_only) or a
            child = mutate(rng, child, times_only, finals)
            if child is not None and child.nfe == nfe and child.key() not in evaluated:
                pool[child.key()] = child
        if not pool:
            stall += 1
            continue
        cands = list(pool.values())
        pred = predictor.predict(cands)
        order = list(np.argsort(pred, kind="stable"))
        n_explore = max(1, batch // 4)
        chosen = order[:batch - n_explore]
        rest = order[batch - n_explore:]
        if rest:
            chosen += list(rng.choice(rest, size=min(n_explore, len(rest)), replace=False))
        before = len(evaluated)
        for j in chosen:
            consider(cands[int(j)])
        stall = stall + 1 if len(evaluated) == before else 0
    if bar is not None:
        bar.close()

    ranked = sorted(evaluated.values(), key=lambda v: v[1])
    top = []
    for sp, s in ranked[:max(1, n_verify)]:
        v = evaluate(sp, "verify") if n_verify > 0 else s
        top.append((sp, s, v))
    best, s_cal, s_ver = min(top, key=lambda r: (r[2], r[1]))
    info = {"search": {"metric": config["metric"], "calib_score": s_cal, "verify_score": s_ver, "budget": budget,
                       "evaluations": len(evaluated), "n_calib": n_calib, "n_verify_samples": n_ver,
                       "seed": seed, "seeds": f"{seeds[0]}..{seeds[-1]}", "base": None if base is None else str(
                           base if isinstance(base, str) else base.name or "plan")}}
    nm = name or f"searched_nfe{nfe}"
    best = SolverPlan(best.steps, best.times, best.final, best.coordinate, name=nm, info=info)
    if out is not None:
        best.save(out)
    return SearchResult(plan=best, calib_score=s_cal, verify_score=s_ver, evaluations=len(evaluated),
                        model_calls=counts["model_calls"], sample_evaluations=counts["sample_evals"],
                        reference_seconds=ref_seconds, seconds=time.perf_counter() - t_start, seeds=seeds,
                        history=history, top=top)
