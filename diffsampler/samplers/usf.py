"""Solver plans as data: the unified sampling framework (USF; Liu et al. 2024, "A Unified Sampling
Framework for Solver Searching of Diffusion Probabilistic Models", arXiv:2312.07243).

A `SolverSpec` is a whole trajectory written as per-step decisions (`StepSpec`): the prediction
integrated (data D or noise eps), the Taylor order, how the derivatives are estimated, whether a
UniPC-style corrector runs, and whether the first step is analytic; plus schedule-independent
time points.  `SolverSpec.compile(schedule)` turns it into the engine's `Plan` (samplers/plan.py),
so plans run through the same `run_plan` as every registered solver.

The step from lambda_s to lambda_t (h = lambda_t - lambda_s) is the exponential integrator of the
PF-ODE with the prediction expanded in lambda (Lu et al. 2022, DPM-Solver eq. 3.4 and
DPM-Solver++ eq. 9):

    data:   x_t = (sigma_t / sigma_s) x_s + alpha_t sum_n h^{n+1} phi_{n+1}(-h) D^{(n)}(lambda_s)
    noise:  x_t = (alpha_t / alpha_s) x_s - sigma_t sum_n h^{n+1} phi_{n+1}(h) eps^{(n)}(lambda_s)

with phi_n(z) = sum_k z^k / (n + k)! the exponential-integrator phi functions (phi_1(z) =
(e^z - 1)/z) and n = 0 .. order-1.  The derivatives are those of the Lagrange polynomial through
the chosen points (exact finite differences), so the weight of output M_j is
sum_n n! c_jn h phi_{n+1}(-+h) with c_jn the coefficients of the basis polynomial l_j in
tau = (lambda - lambda_s) / h.

Derivative estimators (`StepSpec.estimator`):

* ``multistep``      history: outputs at the previous `order - 1` grid points (exact Taylor weights).
* ``multistep_dpm``  the coefficients of DPM-Solver++(2M/3M) as published and coded by Lu et al.:
                     at order 2 the first-derivative weight is h phi_1(-h)/2 instead of h phi_2(-h)
                     (Alg. 2 of the paper), at order 3 the second-derivative term has half its
                     Taylor weight (D2 = h^2 f[lambda_i, lambda_{i-1}, lambda_{i-2}] with phi_3).
                     It is what `dpmpp_2m` / `dpmpp_3m` compute.  Data prediction only.
* ``multistep_t``    history with the Lagrange basis in t instead of lambda, integrated in rho
                     (tAB-DEIS, Zhang & Chen 2023, eq. 15): what `deis_k` computes.  Noise only.
* ``unipc``          UniPC-bh2 weights (Zhao et al. 2023, Alg. 1 with B(h) = e^h - 1 in the step's
                     prediction): exact Taylor weights, except that two points (order-2 predictor,
                     first-order step's corrector) use h phi_1/2 as DPM-Solver++(2M) does.  With a
                     corrector on every step but the last it is diffusers' UniPCMultistepScheduler.
                     The registered `unipc` (samplers/unipc.py) takes its bh2 weights from here.
* ``singlestep``     `order - 1` intermediate points inside the step at fractions `r` of h, each
                     reached by the lower-order step through the points before it (DPM-Solver-k
                     style, exact Taylor weights); costs `order` model calls.
* ``fallback``       ``multistep`` at the highest order the history allows (<= `order`): the
                     warm-up rule of the registered multistep solvers, made explicit.
* ``ghvb``           generalized heavy ball (Wizadwongsa et al. 2023, GHVB; `samplers/momentum.py`)
                     with momentum `beta`: over a run of consecutive ghvb steps of one prediction,
                     V_i = (1 - beta) V_{i-1} + beta M_i (V = M at the run's first step), the step's
                     prediction is P_i = (1/beta) sum_j c_j(beta) V_{i-j} (j < order; the GHVB
                     weights, Adams-Bashforth at beta = 1) and P_i is carried by the first-order
                     exponential step.  What the registered `ghvb` computes.

* ``multistep_rho`` / ``multistep_logrho``  DEIS with the Lagrange basis in rho / log rho (`deis_rho_k`,
                     `deis_logrho_k`).  ``plms``  equal-step Adams-Bashforth (`pndm`).  Noise only.
* ``singlestep_dpm`` DPM-Solver++(2S) (`dpmpp_2s`), data, order <= 2, intermediate point at r_1 (default 1/2).
* ``dpm_singlestep`` singlestep DPM-Solver-k (Lu et al. 2022, Alg. 1-2; `dpm_solver`, `dpmpp`, `dpm_fast`),
                     order <= 3, either prediction: the intermediate point s_1 by the first-order step, s_2
                     (order 3) by the phi_2 form through (s, s_1), the end by DPM-Solver-2 (phi_1 / (2 r_1)
                     through (s, s_1)) or DPM-Solver-3 (phi_2 / r_2 through (s, s_2)); points at r = 1/2 or
                     1/3, 2/3 unless given.  ``dpm_singlestep_midpoint`` / ``dpm_singlestep_heun``: the stage
                     rules of diffusers' DPMSolverSinglestepScheduler solver_type "midpoint" / "heun" (with
                     r at its grid points).  Every stage is `dpm_solver.singlestep_weights`.
* ``heun``           Heun's trapezoid in rho (`heun`), noise, order <= 2, second call at the step's end.
* ``dpm2``           k-diffusion's DPM-Solver-2 (`dpm2`), noise, order <= 2: an Euler step in rho to the
                     log-SNR midpoint (rho_mid = sqrt(rho_s rho_t)), then the Euler step in rho from x_s with
                     the midpoint's output only.
* `beta` on ``multistep_dpm``, ``multistep_t``, ``multistep_rho``, ``multistep_logrho`` or ``plms`` adds
  heavy-ball momentum over a run of such steps (`dpmpp_2m_hb`, `pndm_hb`).

What each estimator allows is one row of `ESTIMATOR_TABLE`; its weights come from its solver module.

Relaxation (`relax: c`): the first-derivative estimate of a step of order >= 2 is scaled by
(1 + c h), USF's linear relaxation (D <- D (1 + c h)); c = 0 is the plain estimate.  A
``fallback`` step relaxes only where its history lets it run at order >= 2.

Corrector (`corrector: true` on step i): after x_{i+1} is predicted and the model is evaluated
there for step i+1, x_{i+1} is recomputed with the Lagrange polynomial through that new output
and the step's points (order + 1; UniC of Zhao et al. 2023, UniPC eq. 8, with exact weights);
the new output is reused as is, so the corrector costs no model call.

Analytic first step (`analytic: true` on step 0): at t_max the data prediction is taken as the
data mean, assumed 0 (so eps(x_T, T) = x_T / sigma_T; USF Sec. 4.2): x_1 = (sigma_1/sigma_0) x_T
with no model call.  The zero data prediction can serve as history of later data steps.

Time points live in a normalised coordinate u in [0, 1] (u = 0 at t_max, u = 1 at t_min or, with
final "zero", at sigma = 0): normalised log-SNR (default) or normalised time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from ..schedules import FINALS, LAMBDA_FLOOR, NoiseSchedule, TimeGrid
from .ddim import heun_weights
from .kdiffusion import dpm2_through
from .deis import deis_weights, lagrange_basis, plms_weights
from .dpm_solver import dpm_weights, dpmpp_2s_weights, dpmpp_multistep_weights, phi, singlestep_weights
from .momentum import ghvb_step
from .registry import heavy_ball
from .plan import Combo, Plan, PlanBuilder
from .registry import Solver, register_scheme

__all__ = ["StepSpec", "SolverSpec", "SpecSolver", "PlanFormatError", "PREDICTIONS", "ESTIMATORS", "COORDINATES",
           "spec_of", "spec_solvers", "phi", "load_plan", "ESTIMATOR_TABLE", "Estimator", "available_plans", "plan_dirs", "exp_weights"]

PREDICTIONS = ("data", "noise")
COORDINATES = ("logsnr", "time")
MAX_ORDER = 4
FORMAT = "diffsampler.solver_plan/1"
START_TOL = 1e-9  # a grid starting this close to t_max (normalised) starts at t_max

_ZERO = -1  # the analytic first data prediction D(x_T, T) = 0: a history entry with no engine output


# ---------------------------------------------------------------------------------------------
# the estimators: one table read by validation, the compiler and the search space
# ---------------------------------------------------------------------------------------------

def _taylor(grid: TimeGrid, i: int, pts: list[int], s: "StepSpec", flavour: str = "taylor"):
    lam, alpha, sigma = grid.lam.numpy(), grid.alpha.numpy(), grid.sigma.numpy()
    return exp_weights(s.prediction, [lam[p] for p in pts], float(lam[i]), float(lam[i + 1]), float(alpha[i]),
                       float(sigma[i]), float(alpha[i + 1]), float(sigma[i + 1]), flavour, s.relax)


def _unipc(grid, i, pts, s):
    return _taylor(grid, i, pts, s, "unipc")


def _dpmpp(grid, i, pts, s):
    s_s, a_t, s_t = float(grid.sigma[i]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
    if s_t == 0.0:  # onto sigma = 0: x_0 = D_s
        return 0.0, [a_t]
    return s_t / s_s, dpmpp_multistep_weights([float(grid.lam[p]) for p in pts], float(grid.lam[i + 1]), a_t, s.relax)


def _dpm_noise(grid, i, pts, s):
    """multistep DPM-Solver with noise prediction (`dpm_weights` predict="noise", midpoint)."""
    (a_s, s_s, a_t, s_t) = (float(grid.alpha[i]), float(grid.sigma[i]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1]))
    c_x, w, _ = dpm_weights([float(grid.lam[p]) for p in pts], float(grid.lam[i + 1]), a_s, s_s, a_t, s_t,
                            predict="noise", relax=s.relax)
    return c_x, w


def _deis_t(grid, i, pts, s):
    return deis_weights(grid, i, len(pts), "t")


def _deis_rho(grid, i, pts, s):
    return deis_weights(grid, i, len(pts), "rho")


def _deis_logrho(grid, i, pts, s):
    return deis_weights(grid, i, len(pts), "logrho")


def _plms(grid, i, pts, s):
    return plms_weights(grid, i, len(pts))


def _heun(grid, i, pts, s):
    return heun_weights(grid, i, len(pts))


def _taylor_through(lams, l_s, l_t, a_s, s_s, a_t, s_t, s):
    return exp_weights(s.prediction, lams, l_s, l_t, a_s, s_s, a_t, s_t, relax=s.relax)


def _dpmpp_2s(lams, l_s, l_t, a_s, s_s, a_t, s_t, s):
    return s_t / s_s, dpmpp_2s_weights(l_s, l_t, a_t, (lams[1] - l_s) / (l_t - l_s))


def _dpm_stage(solver_type: str):
    """A stage of a singlestep DPM-Solver step (`singlestep_weights` with diffusers' / the paper's rule)."""
    def stage(lams, l_s, l_t, a_s, s_s, a_t, s_t, s):
        c_x, w, _ = singlestep_weights(lams, l_t, a_s, s_s, a_t, s_t, s.order, predict=s.prediction,
                                       solver_type=solver_type)
        return c_x, w
    return stage


def _dpm_first(grid, i, pts, s):
    """The first-order step of either prediction (`dpm_weights`; onto sigma = 0 its limit)."""
    c_x, w, _ = dpm_weights([float(grid.lam[i])], float(grid.lam[i + 1]), float(grid.alpha[i]), float(grid.sigma[i]),
                            float(grid.alpha[i + 1]), float(grid.sigma[i + 1]), predict=s.prediction)
    return c_x, w


@dataclass(frozen=True)
class Estimator:
    """What a derivative estimator allows and how its weights are computed.  `StepSpec` /
    `SolverSpec` validation, the compiler and the search space (samplers/search.py) read this
    table, so a new estimator is one row (its weights come from its solver module)."""

    name: str
    title: str
    predictions: tuple[str, ...] = PREDICTIONS
    max_order: int = MAX_ORDER
    history: str | None = "outputs"  # order k needs, at the previous k - 1 grid points, "outputs" of the
    #                                  step's prediction, a "run" of steps of this estimator, or nothing
    fallback: bool = False  # a history shortfall lowers the order (instead of being refused)
    calls_per_order: bool = False  # spends `order` model calls (order - 1 intermediate points), else one
    corrector: bool = False
    relax: bool = False
    beta: str | None = None  # momentum beta: "required" (GHVB), "optional" (heavy ball over a run) or None
    r: bool = False  # intermediate points may be given as fractions r of h
    to_zero: bool = False  # order > 1 allowed on the step onto sigma = 0 (finite there)
    searched: bool = True  # in the search space's encoding
    weights: object = None  # one-call steps: (grid, i, grid points, step) -> (c_x, weights over those points)
    through: object = _taylor_through  # calls_per_order: the step through its points' log-SNRs -> (c_x, weights)
    at_end: bool = False  # calls_per_order: the intermediate point is the step's end (Heun's trapezoid)
    inner: object = None  # calls_per_order: an intermediate point's stage, as `through` (None: exact Taylor)


ESTIMATOR_TABLE: dict[str, Estimator] = {e.name: e for e in (
    Estimator("multistep", "exact lambda-Taylor weights", corrector=True, relax=True, weights=_taylor),
    Estimator("multistep_dpm", "DPM-Solver++ 2M/3M", ("data",), 3, relax=True, weights=_dpmpp),
    Estimator("multistep_dpm_noise", "DPM-Solver 2M/3M (noise prediction)", ("noise",), 3, relax=True,
              searched=False, weights=_dpm_noise),
    Estimator("multistep_t", "tAB-DEIS, Lagrange basis in t", ("noise",), to_zero=True, weights=_deis_t),
    Estimator("unipc", "UniPC-bh2", corrector=True, relax=True, weights=_unipc),
    Estimator("singlestep", "DPM-Solver-k style intermediate points", history=None, calls_per_order=True,
              relax=True, r=True, weights=_taylor),
    Estimator("fallback", "multistep at the order the history allows", fallback=True, corrector=True, relax=True,
              searched=False, weights=_taylor),
    Estimator("ghvb", "generalized heavy ball", history="run", beta="required", to_zero=True),
    Estimator("multistep_rho", "rhoAB-DEIS, Lagrange basis in rho", ("noise",), to_zero=True, beta="optional",
              weights=_deis_rho),
    Estimator("multistep_logrho", "DEIS with a Lagrange basis in log rho", ("noise",), beta="optional",
              weights=_deis_logrho),
    Estimator("plms", "PLMS / iPNDM, equal-step Adams-Bashforth", ("noise",), to_zero=True, beta="optional",
              weights=_plms),
    Estimator("singlestep_dpm", "DPM-Solver++(2S)", ("data",), 2, history=None, calls_per_order=True, r=True,
              weights=_dpmpp, through=_dpmpp_2s),
    Estimator("heun", "Heun, trapezoid in rho", ("noise",), 2, history=None, calls_per_order=True, weights=_heun,
              at_end=True),
    Estimator("dpm2", "k-diffusion DPM-2, midpoint in log rho", ("noise",), 2, history=None, calls_per_order=True,
              searched=False, weights=_heun, through=dpm2_through),
    *(Estimator(f"dpm_singlestep{suffix}", title, max_order=3, history=None, calls_per_order=True, r=True,
                searched=False, weights=_dpm_first, through=_dpm_stage(rule), inner=_dpm_stage(rule))
      for suffix, rule, title in (
          ("", "dpm_solver", "singlestep DPM-Solver-k (Lu et al. 2022)"),
          ("_midpoint", "midpoint", "diffusers' singlestep DPM-Solver, solver_type midpoint"),
          ("_heun", "heun", "diffusers' singlestep DPM-Solver, solver_type heun"))),
)}
for _name in ("multistep_dpm", "multistep_t"):  # heavy ball (any multistep solver's `momentum`)
    ESTIMATOR_TABLE[_name] = replace(ESTIMATOR_TABLE[_name], beta="optional")
ESTIMATORS = tuple(ESTIMATOR_TABLE)


def _listed(names) -> str:
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# ---------------------------------------------------------------------------------------------
# field types of plan files
# ---------------------------------------------------------------------------------------------

class PlanFormatError(ValueError):
    """A solver plan (YAML text or mapping) that is not valid YAML or has a field of the wrong type.
    The message names the field (e.g. ``steps[2].order``), the expected type and, when the plan came
    from a file, the file."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _of_type(ok, expected: str):
    """A field check: `ok(value)` or PlanFormatError '<field>: expected <expected>, got <value> (<type>)'."""
    def check(where: str, v) -> None:
        if not ok(v):
            raise PlanFormatError(f"{where}: expected {expected}, got {v!r} ({type(v).__name__})")
    return check


def _is_list(v) -> bool:
    return isinstance(v, (list, tuple))


def _numbers(where: str, v) -> None:
    _of_type(_is_list, "a list of numbers")(where, v)
    for j, x in enumerate(v):
        _NUMBER(f"{where}[{j}]", x)


def _optional(check):
    return lambda where, v: None if v is None else check(where, v)


def _one_of(values) -> str:
    return " or ".join(map(repr, values)) if len(values) == 2 else "one of " + ", ".join(map(repr, values))


_NUMBER = _of_type(lambda v: _is_number(v), "a number")
_INT = _of_type(_is_int, "an integer")
_BOOL = _of_type(lambda v: isinstance(v, bool), "true or false")
_STRING = _of_type(lambda v: isinstance(v, str), "a string")


def _string_of(values):
    return _of_type(lambda v: isinstance(v, str), f"a string ({_one_of(values)})")


def _check_fields(d: dict, fields: dict, what: str, where: str | None) -> None:
    """Refuse unknown keys, then check each present field's type; errors name `where.field`."""
    try:
        _reject_unknown(d, set(fields), what)
    except ValueError as e:
        raise PlanFormatError(f"{where}: {e}" if where else str(e)) from None
    for key, value in d.items():
        fields[key](f"{where}.{key}" if where else str(key), value)


def _prefixed(e: ValueError, prefix: str) -> ValueError:
    """The same kind of error (PlanFormatError or ValueError) with `prefix` in front of its message."""
    return (PlanFormatError if isinstance(e, PlanFormatError) else ValueError)(f"{prefix}{e}")


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """A YAML SafeLoader that refuses a repeated key.  PyYAML's own loaders silently keep the last
    value of a repeated mapping key (the YAML spec requires keys to be unique), so a plan file with
    `nfe:` or `order:` twice would load with one of the two values dropped without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in getattr(node, "value", ()):
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1}; each key may appear "
                    "once in a mapping)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str):
    """The YAML document in `text`; PlanFormatError 'not valid YAML: line L, column C: <problem>'."""
    try:
        return yaml.load(text, Loader=_UniqueKeySafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({e.context})" if e.context else ""
        raise PlanFormatError(f"not valid YAML: {where}{e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise PlanFormatError(f"not valid YAML: {e}") from None


# ---------------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepSpec:
    """The decisions of one step (see the module docstring for the meaning of each field)."""

    prediction: str = "data"
    order: int = 1
    estimator: str = "multistep"
    corrector: bool = False
    analytic: bool = False
    r: tuple[float, ...] | None = None  # singlestep: intermediate points as fractions of h
    relax: float = 0.0  # linear relaxation of the first-derivative estimate: D' <- D' (1 + relax h)
    beta: float | None = None  # ghvb: momentum in (0, 1]

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not isinstance(self.order, (int, np.integer)) or isinstance(self.order, bool) or not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"order must be an integer in 1..{MAX_ORDER}, got {self.order!r}")
        object.__setattr__(self, "order", int(self.order))
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        est = ESTIMATOR_TABLE[self.estimator]
        for name in ("corrector", "analytic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.prediction not in est.predictions or self.order > est.max_order:
            raise ValueError(f"estimator {est.name!r} ({est.title}) integrates the {' or '.join(est.predictions)} "
                             f"prediction with order <= {est.max_order}; got prediction {self.prediction!r}, "
                             f"order {self.order}")
        if (self.beta is not None and est.beta is None) or (self.beta is None and est.beta == "required"):
            with_beta = [e.name for e in ESTIMATOR_TABLE.values() if e.beta]
            raise ValueError(f"beta (momentum) is given with estimator {_listed(with_beta)} and only there; got "
                             f"estimator {self.estimator!r}, beta={self.beta!r}")
        if self.beta is not None:
            if not _is_number(self.beta) or not 0 < self.beta <= 1:
                raise ValueError(f"beta (GHVB momentum) must be in (0, 1], got {self.beta!r}")
            object.__setattr__(self, "beta", float(self.beta))
        if self.corrector and not est.corrector:
            with_corrector = [e.name for e in ESTIMATOR_TABLE.values() if e.corrector]
            raise ValueError(f"a corrector runs on {_listed(with_corrector)} steps, got estimator {self.estimator!r}")
        if self.analytic and (self.order != 1 or est.calls_per_order or self.beta is not None):
            raise ValueError(f"an analytic step is first order with no model call; got order {self.order}, "
                             f"estimator {self.estimator!r}")
        if self.r is not None:
            if not est.r:
                with_r = [e.name for e in ESTIMATOR_TABLE.values() if e.r]
                raise ValueError(f"r (intermediate points) is for estimator {_listed(with_r)}, got {self.estimator!r}")
            _numbers("r", self.r)
            r = tuple(float(v) for v in self.r)
            if len(r) != self.order - 1 or not all(a < b for a, b in zip((0.0,) + r, r + (1.0,))):
                raise ValueError(f"r must be {self.order - 1} increasing fractions in (0, 1) for order {self.order}, got {list(r)}")
            object.__setattr__(self, "r", r)
        if not _is_number(self.relax) or not math.isfinite(self.relax):
            raise ValueError(f"relax must be a finite number, got {self.relax!r}")
        object.__setattr__(self, "relax", float(self.relax))
        if self.relax != 0.0 and (self.order < 2 or not est.relax or self.analytic):
            raise ValueError(f"relax scales the first-derivative estimate of a lambda-Taylor step of order >= 2; "
                             f"got order {self.order}, estimator {self.estimator!r} (relax={self.relax})")

    @property
    def capabilities(self) -> Estimator:
        """The estimator's row of `ESTIMATOR_TABLE`."""
        return ESTIMATOR_TABLE[self.estimator]

    @property
    def nfe(self) -> int:
        """Model calls this step spends."""
        extra = self.order - 1 if self.capabilities.calls_per_order else 0
        return (0 if self.analytic else 1) + extra

    @property
    def fractions(self) -> tuple[float, ...]:
        if self.r is not None:
            return self.r
        return tuple(j / self.order for j in range(1, self.order))

    def to_dict(self) -> dict:
        d = {"prediction": self.prediction, "order": self.order, "estimator": self.estimator}
        if self.corrector:
            d["corrector"] = True
        if self.analytic:
            d["analytic"] = True
        if self.r is not None:
            d["r"] = list(self.r)
        if self.relax != 0.0:
            d["relax"] = self.relax
        if self.beta is not None:
            d["beta"] = self.beta
        return d

    @classmethod
    def from_dict(cls, d, where: str | None = None) -> "StepSpec":
        """A step from its mapping; `where` (e.g. "steps[2]") prefixes every error."""
        _of_type(lambda v: isinstance(v, dict), "a mapping of step fields")(where or "step", d)
        _check_fields(d, _STEP_FIELDS, "step", where)
        try:
            return cls(**d)
        except ValueError as e:
            raise _prefixed(e, f"{where}: " if where else "") from None


_STEP_FIELDS = {
    "prediction": _string_of(PREDICTIONS),
    "order": _INT,
    "estimator": _string_of(ESTIMATORS),
    "corrector": _BOOL,
    "analytic": _BOOL,
    "r": _optional(_numbers),
    "relax": _NUMBER,
    "beta": _optional(_NUMBER),
}


def continues_run(steps: Sequence[StepSpec], i: int, j: int) -> bool:
    """Whether step j (< i) belongs to the run of momentum steps (GHVB) of step i's estimator and prediction."""
    return (steps[j].estimator == steps[i].estimator and steps[j].prediction == steps[i].prediction
            and steps[j].beta is not None)


def effective_orders(steps: Sequence[StepSpec]) -> list[int]:
    """Effective order of each step (not validated): for estimators with a history of "outputs" the
    largest k <= order whose history (outputs of the same prediction at the previous k - 1 points)
    exists; for a history of a "run" (ghvb) the largest k <= order within its run; otherwise the
    declared order."""
    avail: list[str | None] = []  # prediction type of the output at each grid point (none: analytic noise step)
    orders = []
    for i, s in enumerate(steps):
        avail.append(None if (s.analytic and s.prediction == "noise") else s.prediction)
        history = s.capabilities.history
        if history == "run":
            k = 1
            while k < s.order and i - k >= 0 and continues_run(steps, i, i - k):
                k += 1
        elif history == "outputs":
            k = 1
            while k < s.order and i - k >= 0 and avail[i - k] == s.prediction:
                k += 1
        else:
            k = s.order
        orders.append(k)
    return orders


def _reject_unknown(d: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; allowed: {sorted(allowed)}")


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.floating))


@dataclass(frozen=True)
class SolverSpec:
    """A trajectory: `steps[i]` goes from `times[i]` to `times[i + 1]` (normalised coordinate,
    0 = t_max, 1 = t_min or sigma = 0 with final "zero").  Validated on construction.

    times[0] is the start: 0 (t_max) or later, in [0, 1).  A later start takes x_T as the sample at
    that time, as diffusers' "leading" timesteps do (Lin et al. 2024, arXiv:2305.08891, Table 2);
    it needs a prior of unit variance (refused on variance-exploding schedules)."""

    steps: tuple[StepSpec, ...]
    times: tuple[float, ...]
    final: str = "zero"
    coordinate: str = "logsnr"
    name: str = ""
    info: dict = field(default_factory=dict, compare=False)
    #: the Time-Shift sampler's setting the plan runs with ({"window": w, "cutoff": t_c}, see
    #: samplers/time_shift.py), or None (off); part of the plan's decisions, its key and its YAML
    time_shift: dict | None = None

    def __post_init__(self):
        _of_type(_is_list, "a list of steps")("steps", self.steps)
        _numbers("times", self.times)
        object.__setattr__(self, "steps", tuple(s if isinstance(s, StepSpec) else StepSpec.from_dict(s, f"steps[{i}]")
                                                for i, s in enumerate(self.steps)))
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        object.__setattr__(self, "time_shift", _time_shift_setting(self.time_shift))
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the step and the rule it breaks."""
        n = len(self.steps)
        if n < 1:
            raise ValueError("a plan needs at least one step")
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        if self.coordinate not in COORDINATES:
            raise ValueError(f"coordinate must be one of {COORDINATES}, got {self.coordinate!r}")
        t = self.times
        if len(t) != n + 1:
            raise ValueError(f"{n} steps need {n + 1} time points, got {len(t)}")
        if not all(math.isfinite(v) for v in t):
            raise ValueError(f"time points must be finite, got {list(t)}")
        if not 0.0 <= t[0] < 1.0 or t[-1] != 1.0:
            raise ValueError(f"time points run from a start in [0, 1) (0 = t_max) to 1 (the end), got first {t[0]!r}, "
                             f"last {t[-1]!r}")
        for i in range(n):
            if not t[i + 1] > t[i]:
                raise ValueError(f"time points must be strictly increasing (noise -> data): times[{i}]={t[i]!r} "
                                 f"is followed by times[{i + 1}]={t[i + 1]!r}")
        for i, s in enumerate(self.steps):
            where = f"step {i}"
            if s.analytic and i != 0:
                raise ValueError(f"{where}: only the first step can be analytic")
            k = self._orders_unchecked()[i]
            est = s.capabilities
            if est.history == "run" and k < s.order:
                raise ValueError(f"{where}: order {s.order} with estimator 'ghvb' needs velocities at the previous "
                                 f"{s.order - 1} grid points (a run of ghvb steps of prediction {s.prediction}), but the "
                                 f"run is {k} step(s) long here; lower the order")
            if est.history == "outputs" and not est.fallback and k < s.order:
                need = [i - j for j in range(1, s.order)]
                raise ValueError(
                    f"{where}: order {s.order} with estimator {s.estimator!r} needs {s.prediction} outputs at grid "
                    f"points {need}, but only the last {k - 1} exist (history is per prediction type; an analytic "
                    f"first step gives no noise output); lower the order or use estimator 'fallback'")
            last = i == n - 1
            if last and self.final == "zero":
                if est.calls_per_order and s.order > 1:
                    raise ValueError(f"{where}: the step onto sigma = 0 has an infinite log-SNR step; its intermediate "
                                     "points would sit at sigma = 0 (use order 1 or a multistep estimator)")
                if k > 1 and not est.to_zero:
                    raise ValueError(f"{where}: the step onto sigma = 0 has an infinite log-SNR step, where a "
                                     f"lambda-Taylor expansion of order {k} diverges; use order 1 there (or the noise "
                                     "prediction with estimator 'multistep_t', whose basis in t stays finite)")
            if s.corrector:
                if last:
                    raise ValueError(f"{where}: no corrector on the last step (no model call follows it to reuse)")
                nxt = self.steps[i + 1]
                if nxt.prediction != s.prediction:
                    raise ValueError(f"{where}: its corrector reuses the {nxt.prediction} output of step {i + 1}, but "
                                     f"step {i} integrates the {s.prediction} prediction")
        nfe = self.info.get("nfe")
        if nfe is not None and nfe != self.nfe:
            raise ValueError(f"plan declares nfe={nfe} but its steps spend {self.nfe} model calls")

    def _orders_unchecked(self) -> list[int]:
        return effective_orders(self.steps)

    # -- properties ------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        return sum(s.nfe for s in self.steps)

    @property
    def orders(self) -> list[int]:
        return self._orders_unchecked()

    def with_times(self, times: Sequence[float]) -> "SolverSpec":
        return replace(self, times=tuple(times))

    def with_steps(self, steps: Sequence[StepSpec]) -> "SolverSpec":
        return replace(self, steps=tuple(steps))

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT}
        if self.name:
            d["name"] = self.name
        d.update({"coordinate": self.coordinate, "final": self.final, "nfe": self.nfe,
                  "times": [float(t) for t in self.times], "steps": [s.to_dict() for s in self.steps]})
        if self.time_shift is not None:
            d["time_shift"] = dict(self.time_shift)
        info = {k: v for k, v in self.info.items() if k != "nfe"}
        if info:
            d["info"] = info
        return d

    @classmethod
    def from_dict(cls, d) -> "SolverSpec":
        """A plan from its mapping; every field's type is checked (PlanFormatError naming the field)."""
        _of_type(lambda v: isinstance(v, dict), "a mapping of solver-plan fields")("solver plan", d)
        _check_fields(d, _PLAN_FIELDS, "solver-plan", None)
        if d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"unsupported plan format {d.get('format')!r}; this version reads {FORMAT!r}")
        for key in ("times", "steps"):
            if key not in d:
                raise ValueError(f"solver plan has no {key!r}")
        info = dict(d.get("info", {}))
        if "nfe" in info:
            _INT("info.nfe", info["nfe"])
        if "nfe" in d:
            info["nfe"] = d["nfe"]
        return cls(steps=tuple(StepSpec.from_dict(s, f"steps[{i}]") for i, s in enumerate(d["steps"])),
                   times=tuple(d["times"]), final=d.get("final", "zero"), coordinate=d.get("coordinate", "logsnr"),
                   name=d.get("name", ""), info=info, time_shift=d.get("time_shift"))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_yaml(cls, text: str) -> "SolverSpec":
        """A plan from YAML text: refuses invalid YAML and repeated keys (PlanFormatError)."""
        return cls.from_dict(_parse_yaml(text))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path) -> "SolverSpec":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no solver plan file at {str(path)!r}")
        try:
            return cls.from_yaml(path.read_text())
        except ValueError as e:
            raise _prefixed(e, f"{path}: ") from None

    def key(self) -> str:
        """A short hash of the decisions and times (for search logs)."""
        d = self.to_dict()
        key = {"steps": d["steps"], "times": d["times"], "final": d["final"], "coordinate": d["coordinate"]}
        if self.time_shift is not None:  # plans without a time shift keep the keys they had
            key["time_shift"] = d["time_shift"]
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    # -- grid and compilation ---------------------------------------------------------------
    def _coordinate_ends(self, schedule: NoiseSchedule) -> tuple[float, float]:
        if self.coordinate == "logsnr":
            return (float(schedule.lambda_(schedule.t_max).clamp(min=LAMBDA_FLOOR)),
                    float(schedule.lambda_(schedule.t_min)))
        return float(schedule.t_max), float(schedule.t_min)

    def grid(self, schedule: NoiseSchedule) -> TimeGrid:
        """The plan's time points on `schedule`."""
        import torch

        if self.times[0] > 0 and schedule.is_variance_exploding:
            raise ValueError(f"plan {self.name or '(unnamed)'} starts at times[0] = {self.times[0]!r}, after t_max: a later "
                             f"start takes x_T as the sample there, which needs a unit-variance prior, but "
                             f"{type(schedule).__name__} is variance-exploding (x_T has std {schedule.prior_std:g}); "
                             "use times[0] = 0")
        c0, c1 = self._coordinate_ends(schedule)
        u = torch.tensor(self.times, dtype=torch.float64)
        c = c0 + u * (c1 - c0)
        ts = schedule.t_from_lambda(c) if self.coordinate == "logsnr" else c
        if self.times[0] == 0.0:  # the ends exactly
            ts[0] = schedule.t_max
        ts[-1] = schedule.t_min
        ts = ts.clamp(schedule.t_min, schedule.t_max)
        return TimeGrid.from_times(schedule, ts[:-1] if self.final == "zero" else ts, self.final == "zero")

    @staticmethod
    def times_of(grid: TimeGrid, coordinate: str = "logsnr") -> list[float]:
        """Normalised time points of an existing grid (a first point below t_max gives a later start)."""
        sch = grid.schedule
        if grid.final_zero and grid.steps > 1 and float(grid.t[-2]) <= sch.t_min:
            raise ValueError("a solver plan cannot call the model at t_min and then step to sigma = 0 (this grid "
                             "ends its last call at sigma_min, as k-diffusion's karras / exponential grids do): "
                             "use final='last', or explicit times")
        if coordinate == "logsnr":
            c0 = float(sch.lambda_(sch.t_max).clamp(min=LAMBDA_FLOOR))
            c1 = float(sch.lambda_(sch.t_min))
            c = grid.lam.numpy()
        else:
            c0, c1, c = float(sch.t_max), float(sch.t_min), grid.t.numpy()
        u = [(float(v) - c0) / (c1 - c0) for v in c]
        if float(grid.t[0]) >= sch.t_max or u[0] < START_TOL:
            u[0] = 0.0
        u[-1] = 1.0
        return u

    def compile(self, schedule: NoiseSchedule | None = None, grid: TimeGrid | None = None) -> Plan:
        """The engine Plan of this solver plan on `schedule` (at its own time points) or on an
        explicit `grid` (the plan's decisions at the grid's points)."""
        if grid is None:
            if schedule is None:
                raise ValueError("give a schedule (or an explicit grid) to compile a solver plan")
            grid = self.grid(schedule)
        if grid.steps != len(self.steps):
            raise ValueError(f"plan {self.name or '(unnamed)'} has {len(self.steps)} steps, the grid has {grid.steps}")
        if grid.final_zero != (self.final == "zero"):
            raise ValueError(f"plan {self.name or '(unnamed)'} has final={self.final!r}, the grid ends "
                             f"{'at sigma = 0' if grid.final_zero else 'at t_min'}")
        plan = _Compiler(self, grid).run()
        if self.time_shift is not None:  # run_plan / sample() turn it on (samplers/loop.py)
            plan.info["time_shift"] = dict(self.time_shift)
        return plan


def _time_shift_setting(v) -> dict | None:
    """A plan's time_shift: None (off) or {"window": int >= 2, "cutoff": number}, checked by TimeShift."""
    if v is None:
        return None
    from .time_shift import TimeShift

    if not isinstance(v, dict):
        raise PlanFormatError(f"time_shift must be a mapping {{window: ..., cutoff: ...}} or null, got {v!r}")
    if set(v) != {"window", "cutoff"}:
        raise PlanFormatError(f"time_shift needs exactly the keys ['cutoff', 'window'], got {sorted(v)}")
    try:
        ts = TimeShift.from_spec(dict(v))
    except (ValueError, TypeError) as e:
        raise PlanFormatError(f"time_shift: {e}") from None
    cutoff = int(ts.cutoff) if float(ts.cutoff).is_integer() else ts.cutoff
    return {"window": ts.window, "cutoff": cutoff}


_PLAN_FIELDS = {
    "format": _of_type(lambda v: isinstance(v, str), f"a string ({FORMAT!r})"),
    "name": _STRING,
    "coordinate": _string_of(COORDINATES),
    "final": _string_of(FINALS),
    "nfe": _INT,
    "times": _numbers,
    "steps": _of_type(_is_list, "a list of step mappings"),
    "info": _of_type(lambda v: isinstance(v, dict), "a mapping"),
    "time_shift": _optional(_of_type(lambda v: isinstance(v, dict), "a mapping {window, cutoff}")),
}


# ---------------------------------------------------------------------------------------------
# compilation to the engine's Plan
# ---------------------------------------------------------------------------------------------

def exp_weights(kind: str, nodes: Sequence[float], lam_s: float, lam_t: float, a_s: float, s_s: float,
                a_t: float, s_t: float, flavour: str = "taylor", relax: float = 0.0) -> tuple[float, list[float]]:
    """(c_x, [w_j]) with x_t = c_x x_s + sum_j w_j M_j for the exponential-integrator step from
    lambda_s to lambda_t with the prediction interpolated through outputs M_j at log-SNRs `nodes`
    (module docstring).  `flavour="unipc"` gives UniPC-bh2's weights (for two points the first-derivative
    weight h phi_1/2 of DPM-Solver++(2M), exact Taylor weights for more).  `relax` = c applies
    USF's linear relaxation to the first-derivative term, D' <- D' (1 + c h) (USF's derivative-estimation relaxation)."""
    k = len(nodes)
    if s_t == 0.0:  # onto sigma = 0 (h = inf): first order only -> x_0 = D_s
        if k != 1:
            raise ValueError("the step onto sigma = 0 is first order in lambda")
        if kind == "data":
            return 0.0, [a_t]
        return a_t / a_s, [-a_t * s_s / a_s]  # x_0 = alpha_0 (x_s - sigma_s eps_s) / alpha_s
    h = lam_t - lam_s
    tau = (np.asarray(nodes, dtype=np.float64) - lam_s) / h
    if kind == "data":
        cx, scale, z = s_t / s_s, a_t, -h
    else:
        cx, scale, z = a_t / a_s, -s_t, h
    # weight of d^n/dlambda^n p(lambda_s) (times h^n): h phi_{n+1}(z) (times n! for the l_j coefficient)
    kn = [h * phi(n + 1, z) for n in range(k)]
    if flavour == "unipc" and k == 2:
        kn[1] = 0.5 * h * phi(1, z)
    if k >= 2:
        kn[1] *= 1.0 + relax * h
    w = []
    for j in range(k):
        c = lagrange_basis(tau, j) if k > 1 else np.array([1.0])
        w.append(scale * sum(math.factorial(n) * float(c[n]) * kn[n] for n in range(len(c))))
    return cx, w


class _Compiler:
    """Walks the steps keeping (a) the engine output index of each grid point's model call and
    (b) the pending corrector: the true state is the engine's x plus `pending` (a combination of
    outputs), so corrections fold into the next combinations at no cost."""

    def __init__(self, sp: SolverSpec, grid: TimeGrid):
        self.sp, self.grid = sp, grid
        self.b = PlanBuilder(grid)
        self.lam = grid.lam.numpy()
        self.alpha, self.sigma = grid.alpha.numpy(), grid.sigma.numpy()
        self.out: dict[int, int] = {}

    def _lift(self, cx: float, w: dict[int, float], pending: dict[int, float]) -> Combo:
        """c_x x_true + sum w M, with x_true = x_engine + sum pending M, as an engine Combo."""
        terms: dict[int, float] = {}
        for m, c in pending.items():
            terms[m] = terms.get(m, 0.0) + cx * c
        for m, c in w.items():
            if m != _ZERO:
                terms[m] = terms.get(m, 0.0) + c
        return Combo(float(cx), tuple((m, float(c)) for m, c in terms.items()))

    def _point(self, i: int) -> tuple[float, float, float]:
        return float(self.lam[i]), float(self.alpha[i]), float(self.sigma[i])

    def _multistep(self, i: int, s: StepSpec, k: int, with_next: bool = False) -> tuple[float, dict[int, float]]:
        """Weights over grid points (i+1 if with_next,) i, i-1, ..., i-k+1 for step i."""
        pts = ([i + 1] if with_next else []) + [i - j for j in range(k)]
        cx, w = s.capabilities.weights(self.grid, i, pts, s)
        return cx, dict(zip(pts, w))

    def run(self) -> Plan:
        sp, b = self.sp, self.b
        orders = sp.orders
        pending: dict[int, float] = {}
        correction: dict[int, float] | None = None  # over grid points, applied once point i+1 is evaluated
        velocity: list[dict[int, float]] = []  # GHVB: V of the current run of ghvb steps, newest first
        hb_velocity: dict[int, float] | None = None  # heavy ball: V of the current run of steps with beta
        for i, s in enumerate(sp.steps):
            k = orders[i]
            if s.analytic:
                self.out[i] = _ZERO  # D(x_T, T) = 0; as noise it is never read (validated)
            else:
                self.out[i] = b.eval_at(i, s.prediction)  # at the engine's (predicted) x: UniPC reuses it
            if correction is not None:
                pending = {self.out[p]: c for p, c in correction.items() if self.out[p] != _ZERO}
                correction = None
            if s.analytic:  # D(x_T, T) = 0 in either form: x_1 = (sigma_1 / sigma_0) x_T
                cx, w = float(self.sigma[i + 1] / self.sigma[i]), {}
            elif s.capabilities.calls_per_order and k > 1:
                cx, w = self._singlestep(i, s, pending)
            elif s.capabilities.history == "run":
                same_run = i > 0 and continues_run(sp.steps, i, i - 1)
                cx, w, velocity = self._ghvb(i, s, k, velocity if same_run else [])
            else:
                cx, wp = self._multistep(i, s, k)
                w = {self.out[p]: c for p, c in wp.items()}
                if s.beta is not None:  # heavy ball on the step's update direction, g its first-order weight
                    (g,) = self._multistep(i, s, 1)[1].values()
                    same_run = i > 0 and continues_run(sp.steps, i, i - 1)
                    w, hb_velocity = heavy_ball(w, hb_velocity if same_run else None, s.beta, g)
                if s.corrector:
                    _, wc = self._multistep(i, s, k, with_next=True)  # same c_x: the difference is in M only
                    correction = {p: wc[p] - wp.get(p, 0.0) for p in wc}
            b.end_step(self._lift(cx, w, pending), order=k)
            pending = {}
        return b.plan(sp.name or "usf_plan", spacing="plan", solver_plan=sp.name)

    def _ghvb(self, i: int, s: StepSpec, k: int, velocity: list[dict[int, float]]):
        """GHVB step: V_i = (1 - beta) V_{i-1} + beta M_i, P_i = (1/beta) sum_j c_j(beta) V_{i-j},
        x_{i+1} = first-order exponential step carrying P_i.  Returns (c_x, weights, velocities)."""
        p, velocity = ghvb_step(velocity, self.out[i], s.beta, k)
        l_s, a_s, s_s = self._point(i)
        l_t, a_t, s_t = self._point(i + 1)
        cx, (g,) = exp_weights(s.prediction, [l_s], l_s, l_t, a_s, s_s, a_t, s_t)
        return cx, {q: g * c for q, c in p.items()}, velocity

    def _singlestep(self, i: int, s: StepSpec, pending: dict[int, float]) -> tuple[float, dict[int, float]]:
        """Intermediate points at lambda_s + r_j h, each from the lower-order step through the
        points before it (Heun: the end point, from the Euler step); the step itself through all of them."""
        sched = self.grid.schedule
        est = s.capabilities
        l_s, a_s, s_s = self._point(i)
        l_t, a_t, s_t = self._point(i + 1)
        if est.at_end:
            cx, w = est.weights(self.grid, i, [i], s)
            m = self.b.eval_at(i + 1, s.prediction, self._lift(cx, {self.out[i]: w[0]}, pending))
            cx, w = est.weights(self.grid, i, [i, i + 1], s)
            return cx, dict(zip((self.out[i], m), w))
        h = l_t - l_s
        lams, outs = [l_s], [self.out[i]]
        for r in s.fractions:
            l_j = l_s + r * h
            t_j = float(sched.t_from_lambda(l_j))
            a_j, s_j = float(sched.alpha(t_j)), float(sched.sigma(t_j))
            if est.inner is not None:
                cx, w = est.inner(lams, l_s, l_j, a_s, s_s, a_j, s_j, s)
            else:
                cx, w = exp_weights(s.prediction, lams, l_s, l_j, a_s, s_s, a_j, s_j)
            m = self.b.eval(t_j, a_j, s_j, s.prediction, self._lift(cx, dict(zip(outs, w)), pending))
            lams.append(l_j)
            outs.append(m)
        cx, w = est.through(lams, l_s, l_t, a_s, s_s, a_t, s_t, s)
        return cx, dict(zip(outs, w))


# ---------------------------------------------------------------------------------------------
# registered solvers written as plans
# ---------------------------------------------------------------------------------------------

def _estimator_of(solver: Solver) -> tuple[str, str, float | None]:
    """(prediction, estimator, beta) whose steps compute what `solver` computes (ValueError when none)."""
    from .ddim import DDIM, Heun
    from .deis import DEIS, PNDM
    from .dpm_solver import DPMSolverPP, DPMSolverPP2S
    from .momentum import GHVB
    from .plms import PLMS

    if solver.stochastic:
        raise ValueError(f"no solver spec for solver {solver.name!r}: it is stochastic, a plan's steps are deterministic")
    if getattr(solver, "adaptive", False):
        raise ValueError(f"no solver spec for solver {solver.name!r}: it is adaptive (its steps follow its error "
                         "estimate at run time), a plan's steps are fixed")
    beta = getattr(solver, "momentum", None)
    if isinstance(solver, GHVB):
        return solver.kind, "ghvb", solver.beta
    if isinstance(solver, DDIM):
        return "data", "multistep", None
    from .dpm_solver import DPMSolverMultistep

    if isinstance(solver, (DPMSolverPP, DPMSolverMultistep)):
        kind, estimator = ("data", "multistep_dpm") if isinstance(solver, DPMSolverPP) else \
            ("noise", "multistep_dpm_noise")
        if solver.solver_type != "midpoint" or solver.euler_at_final:
            raise ValueError(f"no solver spec for solver {solver.name!r} with solver_type={solver.solver_type!r}, "
                             f"euler_at_final={solver.euler_at_final}: the spec's {estimator} is the midpoint "
                             "form with the registry's order schedule")
        return kind, estimator, beta
    if isinstance(solver, DEIS):
        return "noise", {"t": "multistep_t", "rho": "multistep_rho", "logrho": "multistep_logrho"}[solver.basis], beta
    if isinstance(solver, PNDM):
        return "noise", "plms", beta
    if isinstance(solver, DPMSolverPP2S):
        return "data", "singlestep_dpm", None
    from .dpm_solver import _DPMSinglestep

    if isinstance(solver, _DPMSinglestep):
        return solver.kind, {"dpm_solver": "dpm_singlestep", "midpoint": "dpm_singlestep_midpoint",
                             "heun": "dpm_singlestep_heun"}[solver.solver_type], None
    if isinstance(solver, Heun):
        return "noise", "heun", None
    from .kdiffusion import DPM2

    if isinstance(solver, DPM2):
        return "noise", "dpm2", None
    from .unipc import UniPC

    if isinstance(solver, UniPC):  # the corrector flags: spec_of
        if solver.solver_type != "bh2":
            raise ValueError(f"no solver spec for solver {solver.name!r} with solver_type={solver.solver_type!r}: "
                             "the spec's unipc estimator is bh2 (bh1's UniP-2 / UniC-1 weights differ)")
        return "data", "unipc", None
    if isinstance(solver, PLMS):  # its Heun warm-up step is a "heun" step (spec_of), the rest "plms"
        if solver.prk or solver.diffusers_stride:
            raise ValueError(f"no solver spec for solver {solver.name!r} with prk / diffusers_stride: its Runge-Kutta "
                             "warm-up and diffusers' off-grid step ends are no solver-spec steps")
        return "noise", "plms", None
    raise ValueError(f"no solver spec for solver {solver.name!r} ({type(solver).__name__})")


#: solvers of other libraries written as plans: name -> (prediction, estimator, order)
EXTERNAL_FORMS = {
    "unipc_2": ("data", "unipc", 2),  # diffusers UniPCMultistepScheduler(solver_order=2), bh2, data prediction
    "unipc_3": ("data", "unipc", 3),
}


def spec_of(solver: str, schedule: NoiseSchedule, nfe: int, spacing="time_uniform", final: str = "zero",
              coordinate: str = "logsnr") -> SolverSpec:
    """The SolverSpec that computes what registered `solver` computes at this NFE / spacing
    (its per-step orders, warm-up and cool-down included).  Also "unipc_2" / "unipc_3": diffusers'
    UniPC-bh2 multistep scheduler (orders min(p, i + 1, steps - i), corrector on every step but the
    last; with spacing="linspace" its default grid)."""
    from .loop import make_plan
    from ..schedules import time_grid

    if solver in EXTERNAL_FORMS:
        pred, est, p = EXTERNAL_FORMS[solver]
        grid = time_grid(schedule, nfe, spacing, final=final)
        n = grid.steps
        steps = tuple(StepSpec(pred, min(p, i + 1, n - i), est, corrector=i < n - 1) for i in range(n))
        return SolverSpec(steps, tuple(SolverSpec.times_of(grid, coordinate)), final, coordinate,
                          name=f"{solver}_{spacing if isinstance(spacing, str) else 'explicit'}_nfe{nfe}")
    import torch

    from .registry import get

    s = get(solver)
    pred, est, beta = _estimator_of(s)
    plan = make_plan(s, schedule, nfe, spacing, final)
    r1 = getattr(s, "r1", 0.5)
    grid_points = getattr(s, "intermediate", None) == "grid"  # singlestep calls at the grid's points
    n = len(plan.steps)
    lam = plan.grid.lam.tolist()

    def fractions(i, st, k):
        if grid_points and k > 1:  # the calls' log-SNRs as fractions of the step
            return tuple((float(schedule.lambda_(torch.tensor(ev.t, dtype=torch.float64))) - lam[i]) / (lam[i + 1] - lam[i])
                         for ev in st.evals[1:])
        return (r1,) if k == 2 and r1 != 0.5 else None

    # UniPC: UniC on step i's result unless off / disabled, never on the last step (no call follows)
    corr = [est == "unipc" and s.corrector and i < n - 1 and i not in s.disable_corrector for i in range(n)]
    # a two-call step of a multistep solver is its Heun warm-up (plms)
    steps = tuple(StepSpec(pred, k, "heun" if est == "plms" and len(st.evals) == 2 else est, beta=beta,
                           r=fractions(i, st, k), corrector=c)
                  for i, (k, st, c) in enumerate(zip(plan.orders, plan.steps, corr)))
    return SolverSpec(steps, tuple(SolverSpec.times_of(plan.grid, coordinate)), final, coordinate,
                      name=f"{solver if isinstance(solver, str) else s.name}_{spacing}_nfe{nfe}")


def spec_solvers() -> list[str]:
    """Registered solvers with a solver spec (every deterministic one) and the external forms."""
    from .registry import available, get

    names = []
    for n in available():
        try:
            _estimator_of(get(n))
            names.append(n)
        except ValueError:
            pass
    return names + sorted(EXTERNAL_FORMS)


# ---------------------------------------------------------------------------------------------
# plans as solvers: "plan:<name or path>"
# ---------------------------------------------------------------------------------------------

#: environment variable with extra plan directories (os.pathsep-separated), searched first
PLAN_PATH_ENV = "DIFFSAMPLER_PLAN_PATH"
#: the plans shipped with the package
PACKAGE_PLAN_DIR = Path(__file__).resolve().parent.parent / "plans"


def plan_dirs() -> list[Path]:
    """Directories searched for a plan given by name: $DIFFSAMPLER_PLAN_PATH, then the package's."""
    import os

    extra = [Path(p).expanduser() for p in os.environ.get(PLAN_PATH_ENV, "").split(os.pathsep) if p]
    return extra + [PACKAGE_PLAN_DIR]


def available_plans() -> list[str]:
    """Names of the plans in `plan_dirs()`."""
    names = set()
    for d in plan_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_plan(name_or_path) -> SolverSpec:
    """A SolverSpec from a YAML file path, or by name (file stem) in `plan_dirs()`."""
    if isinstance(name_or_path, SolverSpec):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ValueError(f"a plan is a YAML file path or a plan name, got {name_or_path!r}")
    p = Path(str(name_or_path)).expanduser()
    if p.is_file():
        return SolverSpec.load(p)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        raise ValueError(f"no solver plan file at {str(p)!r}")
    for d in plan_dirs():
        f = d / f"{p.name}.yaml"
        if f.is_file():
            return SolverSpec.load(f)
    raise ValueError(f"unknown plan {str(name_or_path)!r}: not a file, and not a name in {[str(d) for d in plan_dirs()]} "
                     f"(plans there: {available_plans()})")


class SpecSolver(Solver):
    """A SolverSpec behind the Solver interface: `get("plan:<name or path>")`,
    `get("plan", path=...)` or `get("plan", plan=SolverSpec)`.

    The plan fixes its NFE, its time points and its final point: `steps_for_nfe` accepts only
    the plan's NFE, and `build` runs the plan's decisions on the grid it is given (its own grid,
    `own_grid(schedule)`, unless the caller passes explicit times)."""

    stochastic = False

    def __init__(self, path=None, plan: SolverSpec | None = None, **options):
        if options:
            name = f"plan:{path}" if path is not None else "plan"
            raise ValueError(f"solver {name!r} takes no options; got {sorted(options)}: its steps, times and NFE come "
                             "from the plan file (edit the plan, or use a registered solver for these options); "
                             "allowed: none besides path= or plan=")
        if (path is None) == (plan is None):
            raise ValueError("solver 'plan' needs exactly one of path=<plan YAML file or plan name> or plan=<SolverSpec>; "
                             f"plans by name: {available_plans()}")
        self.plan = load_plan(plan if plan is not None else path)
        self.source = str(path) if path is not None else "(in memory)"
        self.name = f"plan:{path}" if path is not None else f"plan:{self.plan.name or '(in memory)'}"
        self.order = max(self.plan.orders)
        self.nfe_per_step = max(s.nfe for s in self.plan.steps)
        self.min_nfe = self.plan.nfe
        kinds = [s.prediction for s in self.plan.steps]
        self.kind = max(set(kinds), key=kinds.count)

    def check_nfe(self, nfe) -> None:
        if nfe != self.plan.nfe:
            raise ValueError(f"{self.name} spends exactly {self.plan.nfe} model calls (its steps fix it), got nfe={nfe!r}")

    def steps_for_nfe(self, nfe: int, final_zero: bool = True) -> int:
        self.check_nfe(nfe)
        if final_zero != (self.plan.final == "zero"):
            raise ValueError(f"{self.name} ends {'at sigma = 0' if self.plan.final == 'zero' else 'at t_min'} "
                             f"(final={self.plan.final!r}); got final={'zero' if final_zero else 'last'!r}")
        return len(self.plan.steps)

    def own_grid(self, schedule: NoiseSchedule) -> TimeGrid:
        return self.plan.grid(schedule)

    def build(self, grid: TimeGrid, nfe: int | None = None) -> Plan:
        if nfe is not None:
            self.check_nfe(nfe)
        plan = self.plan.compile(grid=grid)
        plan.solver = self.name
        return plan

    def __repr__(self) -> str:
        return f"SpecSolver({self.name!r}, nfe={self.plan.nfe}, orders={self.plan.orders})"


register_scheme("plan", SpecSolver, "path")
