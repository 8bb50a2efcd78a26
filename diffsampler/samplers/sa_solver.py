"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models", NeurIPS): stochastic Adams predictor and corrector on the SDE family with noise scale tau(t);
diffusers' SASolverScheduler.

Notation of the paper (VP, lambda = log(alpha / sigma), h = lambda_t - lambda_s, tau constant on a
step, taken at its start t_s).  Data prediction (x_theta = D):

    x_t = e^{-tau^2 h} (sigma_t / sigma_s) x_s + sigma_t (1 + tau^2) e^{-tau^2 lambda_t} sum_j b_j D_j
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi,      b_j = int_{lambda_s}^{lambda_t} e^{(1 + tau^2) lambda} l_j(lambda) dlambda,

noise prediction (eps_theta):

    x_t = (alpha_t / alpha_s) x_s - (1 + tau^2) alpha_t sum_j int_{lambda_s}^{lambda_t} e^{-lambda} l_j(lambda) dlambda eps_j
          + tau sigma_t sqrt(e^{2h} - 1) xi,

l_j the Lagrange basis in lambda through the step's nodes.  The SA-Predictor of order p takes the nodes
lambda_s, lambda_{s-1}, ..., (p outputs of the history); the SA-Corrector of order c re-does the same
step from the same x_s with the same xi and the nodes lambda_t, lambda_s, ... (c outputs, the first the
model output at the predicted x_t), so it costs no model call.  In the variable H = (1 + tau^2) h the
data-prediction weights are the plain (tau = 0) exponential-integrator weights of the Lagrange
polynomial on nodes stretched by 1 + tau^2, and the noise-prediction weights are the tau = 0 weights
times 1 + tau^2: both come from `usf.exp_weights` (one copy of the Lagrange-phi integrals).  At order
2 with data prediction, SA-Solver's code (diffusers) weights the first difference by H / 2 instead of
its exact H phi_2(-H) (UniPC-bh1's fixed 1/2, an O(h^3) change; `second_order="unipc"`, the default).

On the engine, as UniPC's UniC (samplers/unipc.py): the state x_i is the predicted point the model sees;
the corrected x_i^c = x_i + Delta_i, Delta_i = (corrector - predictor weights) . outputs (the x_s, noise
and factor terms are the same in both and cancel), enters step i's update.  tau(t) is `tau` on the steps
whose start noise level rho = sigma / alpha lies in `tau_interval` (everywhere when None) and 0 elsewhere;
diffusers' default tau_func (1 on training timesteps 200..800) is such an interval (pipelines/parity.py).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from ..schedules import TimeGrid
from .dpm_solver import phi
from .plan import Combo, PlanBuilder
from .registry import Solver, register

__all__ = ["SASolver", "sa_weights", "PREDICTIONS", "SECOND_ORDER"]

#: diffusers' algorithm_type data_prediction / noise_prediction
PREDICTIONS = ("data", "noise")
#: the order-2 data-prediction first-difference weight: SA-Solver's code (H / 2) or the exact Lagrange one
SECOND_ORDER = ("unipc", "exact")
MAX_ORDER = 4


def sa_weights(prediction: str, nodes: Sequence[float], lam_s: float, lam_t: float, a_s: float, s_s: float,
               a_t: float, s_t: float, tau: float, second_order: str = "unipc") -> tuple[float, list[float], float]:
    """(c_x, [w_j], c_z) of one SA-Solver step from s to t, x_t = c_x x_s + sum_j w_j M_j + c_z xi, with the
    outputs M_j at log-SNRs `nodes` (the predictor's lambda_s, lambda_{s-1}, ... or the corrector's
    lambda_t, lambda_s, ...); Xue et al. 2023 (module docstring).  A step onto sigma_t = 0 is first order:
    its limit x_0 = D_s (data), (alpha_t / alpha_s) (x_s - (1 + tau^2) sigma_s eps_s + tau sigma_s xi) (noise)."""
    from .usf import exp_weights

    t2 = tau * tau
    if s_t == 0.0:
        if len(nodes) != 1:
            raise ValueError("the step onto sigma = 0 is first order")
        if prediction == "data":
            return 0.0, [a_t], 0.0
        g = a_t * s_s / a_s
        return a_t / a_s, [-(1.0 + t2) * g], tau * g
    h = lam_t - lam_s
    if prediction == "noise":
        _, w = exp_weights("noise", nodes, lam_s, lam_t, a_s, s_s, a_t, s_t)
        c_z = tau * s_t * math.sqrt(math.expm1(2.0 * h)) if tau else 0.0
        return a_t / a_s, [(1.0 + t2) * v for v in w], c_z
    H = (1.0 + t2) * h
    stretched = [lam_s + (1.0 + t2) * (lam - lam_s) for lam in nodes]
    _, w = exp_weights("data", stretched, lam_s, lam_s + H, 1.0, 1.0, a_t, 1.0)
    if second_order == "unipc" and len(nodes) == 2:  # first difference (M_0 - M_1) / r weighted a_t H / 2
        r = (nodes[0] - nodes[1]) / h
        adj = a_t * H * (0.5 - phi(2, -H)) / r
        w = [w[0] + adj, w[1] - adj]
    c_z = s_t * math.sqrt(-math.expm1(-2.0 * t2 * h)) if tau else 0.0
    return math.exp(-t2 * h) * s_t / s_s, list(w), c_z


def _order(key: str, v, least: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) or not least <= v <= MAX_ORDER:
        raise ValueError(f"{key} must be an integer in {least}..{MAX_ORDER}, got {v!r}")
    return int(v)


@register("sa_solver")
class SASolver(Solver):
    """SA-Solver (Xue et al. 2023; diffusers' SASolverScheduler): SA-Predictor of order `predictor_order`
    (1-4) and SA-Corrector of order `corrector_order` (1-4; 0 runs the predictor alone) on every step's
    result but the last, one model call per step.

    Options: `prediction` "data" | "noise" (diffusers' algorithm_type data_prediction / noise_prediction);
    `tau` >= 0 the noise scale (0: the deterministic Adams method on the probability-flow ODE; 1: the
    reverse SDE), applied on the steps whose start noise level rho = sigma / alpha is in `tau_interval`
    = [rho_lo, rho_hi] (None: on every step; 0 outside); `lower_order_final` as diffusers' SA-Solver
    (step i's predictor order <= steps - i, its corrector's <= steps - i + 1, on runs of any length);
    `second_order` "unipc" (SA-Solver's code, the default) or "exact" for the order-2 data-prediction
    weights (module docstring); `final_corrector` spends one more model call at the last grid point
    (final="last" grids) to correct the result there (diffusers' zero-length last step on its
    use_*_sigmas grids).  When any step adds noise every step draws one standard normal (diffusers'
    one draw per step), weighted 0 where tau = 0.  A step onto sigma = 0 is first order."""

    name = "sa_solver"
    kind = "data"
    timesteps_int64 = True  # one model call per step (the final corrector's too): the adapter's int64 timesteps

    def __init__(self, predictor_order: int = 2, corrector_order: int = 2, prediction: str = "data",
                 tau: float = 1.0, tau_interval: Sequence[float] | None = None, lower_order_final: bool = True,
                 second_order: str | None = None, final_corrector: bool = False):
        self.predictor_order = _order("predictor_order", predictor_order, 1)
        self.corrector_order = _order("corrector_order", corrector_order, 0)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (diffusers' algorithm_type data_prediction / "
                             f"noise_prediction), got {prediction!r}")
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau < 0:
            raise ValueError(f"tau (the noise scale) must be a finite number >= 0, got {tau!r}")
        if tau_interval is not None:
            ok = (not isinstance(tau_interval, (str, bytes)) and hasattr(tau_interval, "__len__")
                  and len(tau_interval) == 2
                  and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in tau_interval))
            if not ok or not 0 <= tau_interval[0] <= tau_interval[1]:
                raise ValueError(f"tau_interval must be [rho_lo, rho_hi] with 0 <= rho_lo <= rho_hi (noise levels "
                                 f"sigma / alpha), or None (every step), got {tau_interval!r}")
            tau_interval = (float(tau_interval[0]), float(tau_interval[1]))
        if second_order is None:
            second_order = "unipc" if prediction == "data" else "exact"
        if second_order not in SECOND_ORDER:
            raise ValueError(f"second_order must be one of {SECOND_ORDER}, got {second_order!r}")
        if second_order == "unipc" and prediction == "noise":
            raise ValueError("second_order='unipc' is the data-prediction form's order-2 weight; with "
                             "prediction='noise' the weights are exact (second_order='exact' or None)")
        self.prediction, self.kind = prediction, prediction
        self.tau, self.tau_interval = float(tau), tau_interval
        self.lower_order_final, self.second_order = bool(lower_order_final), second_order
        self.final_corrector = bool(final_corrector)
        if self.final_corrector and self.corrector_order == 0:
            raise ValueError("final_corrector=True needs a corrector (corrector_order >= 1)")
        self.order = max(self.predictor_order, self.corrector_order)
        self.stochastic = self.tau > 0
        self.min_nfe = 2 if self.final_corrector else 1

    # ------------------------------------------------------------------------------------------
    def steps_for_nfe(self, nfe, final_zero=True):
        self.check_nfe(nfe)
        return nfe - 1 if self.final_corrector else nfe  # build refuses final_corrector on a grid ending at sigma = 0

    def _check_final(self, final_zero: bool) -> None:
        if final_zero:
            raise ValueError("final_corrector=True calls the model at the grid's last point: it needs a grid "
                             "ending above sigma = 0 (final='last')")

    def step_orders(self, grid: TimeGrid) -> tuple[list[int], list[int]]:
        """(predictor order of step i, order of the corrector of its result x_{i+1}) as diffusers'
        SASolverScheduler: warm-up min(p, i + 1) / min(c, i + 2) and, with lower_order_final, at most
        N - i / N - i + 1 (N the run's model calls); first order onto sigma = 0."""
        n = grid.steps
        big_n = n + (1 if self.final_corrector else 0)
        p, c = self.predictor_order, self.corrector_order
        preds, corrs = [], []
        for i in range(n):
            k = min(p, i + 1, big_n - i) if self.lower_order_final else min(p, i + 1)
            if i == n - 1 and grid.final_zero:
                k = 1
            preds.append(k)
            corrs.append(min(c, i + 2, big_n - i + 1) if self.lower_order_final else min(c, i + 2))
        return preds, corrs

    def taus(self, grid: TimeGrid) -> list[float]:
        """tau of each step: `tau` where the step's start rho = sigma / alpha is in `tau_interval`, else 0."""
        rho = (grid.sigma / grid.alpha).tolist()
        lo, hi = self.tau_interval if self.tau_interval is not None else (0.0, math.inf)
        return [self.tau if lo <= rho[i] <= hi else 0.0 for i in range(grid.steps)]

    def build(self, grid, nfe=None):
        if self.final_corrector:
            self._check_final(grid.final_zero)
        calls = grid.steps + (1 if self.final_corrector else 0)
        if nfe is not None and nfe != calls:
            raise ValueError(f"{self.name!r} spends {calls} model calls on a grid of {grid.steps} steps"
                             f"{' (final_corrector: one more at its last point)' if self.final_corrector else ''}; "
                             f"nfe={nfe} does not fit")
        lam, alpha, sigma = grid.lam.tolist(), grid.alpha.tolist(), grid.sigma.tolist()
        preds, corrs = self.step_orders(grid)
        taus = self.taus(grid)

        def weights(i: int, nodes: list[int]) -> tuple[float, list[float], float]:
            return sa_weights(self.prediction, [lam[j] for j in nodes], lam[i], lam[i + 1], alpha[i], sigma[i],
                              alpha[i + 1], sigma[i + 1], taus[i], self.second_order)

        # noise: diffusers draws one xi per step; a plan that adds none draws none
        noisy = any(weights(i, [i])[2] != 0.0 for i in range(grid.steps))
        b = PlanBuilder(grid)
        out: list[int] = []  # the output of the model call at grid point j
        delta: dict[int, float] = {}  # x_i^c - x_i over outputs

        def correction(i: int) -> dict[int, float]:
            """Delta_{i+1}: SA-Corrector minus SA-Predictor of step i, over outputs (x_{i+1} evaluated)."""
            q = corrs[i]
            if not self.corrector_order or sigma[i + 1] == 0.0:
                return {}
            _, wc, _ = weights(i, [i + 1 - j for j in range(q)])
            _, wp, _ = weights(i, [i - j for j in range(preds[i])])
            d: dict[int, float] = {}
            for j, v in zip(range(q), wc):
                d[out[i + 1 - j]] = d.get(out[i + 1 - j], 0.0) + v
            for j, v in zip(range(preds[i]), wp):
                d[out[i - j]] = d.get(out[i - j], 0.0) - v
            return d

        for i, p in enumerate(preds):
            out.append(b.eval_at(i, self.kind))
            if i > 0:
                delta = correction(i - 1)
            cx, w, cz = weights(i, [i - j for j in range(p)])
            terms = {m: cx * v for m, v in delta.items()}
            for j, v in enumerate(w):
                terms[out[i - j]] = terms.get(out[i - j], 0.0) + v
            terms = {m: v for m, v in terms.items() if v != 0.0 or m == out[i]}
            span = (sigma[i] / alpha[i], sigma[i + 1] / alpha[i + 1])
            if noisy and cz == 0.0:  # diffusers' draw of this step, weighted 0
                b.end_step(Combo(cx, tuple(terms.items()), ((0, 0.0),)), 0.0, p, draws=(span,))
            else:
                b.end_step(Combo(cx, tuple(terms.items())), cz, p)
        if self.final_corrector:  # the call at the last point corrects the result there
            out.append(b.eval_at(grid.steps, self.kind))
            delta = correction(grid.steps - 1)
            b.end_step(Combo(1.0, tuple(delta.items())), 0.0, corrs[-1])
        return b.plan(self.name, taus=taus)
