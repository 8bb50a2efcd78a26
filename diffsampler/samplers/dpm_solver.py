"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction exponential integrators.

Notation of the paper: h = lambda_t - lambda_s, D_i data predictions, r_i the ratio of an earlier
log-SNR step to this one; phi_n the exponential-integrator phi functions (`phi`), so that the
first-order step is x_t = (sigma_t / sigma_s) x_s + alpha_t h phi_1(-h) D_s.  Coefficients are float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..schedules import TimeGrid
from .plan import Combo, PlanBuilder
from .registry import MultistepSolver, SinglestepSolver, register

__all__ = ["DPMSolverPP", "DPMSolverPPSDE", "DPMSolverPP2S", "phi", "dpmpp_multistep_weights", "dpmpp_2s_weights",
           "point_at_lambda"]


def phi(n: int, z: float) -> float:
    """phi_n(z) = sum_k z^k / (n + k)!, so phi_0 = e^z, phi_1(z) = (e^z - 1) / z and
    phi_{n+1}(z) = (phi_n(z) - 1/n!) / z (Hochbruck & Ostermann 2010, eq. 2.10).
    The series is used for |z| < 1, where the recursion cancels; the recursion elsewhere."""
    if abs(z) < 1.0:
        term, tot = 1.0 / math.factorial(n), 0.0
        for k in range(40):
            tot += term
            term *= z / (n + k + 1)
        return tot
    f = math.exp(z)
    for m in range(n):
        f = (f - 1.0 / math.factorial(m)) / z
    return f


def dpmpp_multistep_weights(lams: Sequence[float], lam_t: float, alpha_t: float, relax: float = 0.0) -> list[float]:
    """Weights w_j of D_{i-j} in x_t = (sigma_t / sigma_s) x_s + sum_j w_j D_{i-j}, with `lams` the
    log-SNRs lambda_i, lambda_{i-1}, ... of the k = len(lams) <= 3 outputs (newest first):
    DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and 3M (its official code).  `relax` = c scales the
    first-derivative estimate D1 by (1 + c h) (USF's linear relaxation)."""
    k, (l_s, *earlier) = len(lams), lams
    h = lam_t - l_s
    D = np.eye(k)  # D[j] is the unit vector of D_{i-j}: the formulas act on coefficient vectors
    w = alpha_t * h * phi(1, -h) * D[0]
    if k >= 2:
        r0 = (l_s - earlier[0]) / h
        D1_0 = (D[0] - D[1]) / r0
    if k == 2:  # x_t = ... + alpha_t h phi_1(-h) (D_i + D1 / 2), D1 = (D_i - D_{i-1}) / r_0
        w = w + 0.5 * alpha_t * h * phi(1, -h) * (1.0 + relax * h) * D1_0
    elif k == 3:
        r1 = (earlier[0] - earlier[1]) / h
        D1_1 = (D[1] - D[2]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        w = w + alpha_t * h * phi(2, -h) * (1.0 + relax * h) * D1 + alpha_t * h * phi(3, -h) * D2
    return [float(c) for c in w]


def dpmpp_2s_weights(lam_s: float, lam_t: float, alpha_t: float, r1: float) -> list[float]:
    """Weights of D_s and D(u, s_1) in x_t = (sigma_t / sigma_s) x_s + w_0 D_s + w_1 D(u, s_1), with
    lambda_{s_1} = lambda_s + r_1 h and u the first-order step to s_1: DPM-Solver++(2S) (Lu et al.
    2022, Alg. 1), x_t = ... + alpha_t h phi_1(-h) D_s + alpha_t h phi_1(-h) / (2 r_1) (D(u, s_1) - D_s)."""
    h = lam_t - lam_s
    c1 = alpha_t * h * phi(1, -h) / (2.0 * r1)
    return [alpha_t * h * phi(1, -h) - c1, c1]


def point_at_lambda(schedule, lam: float) -> tuple[float, float, float]:
    """(t, alpha_t, sigma_t) of the time with log-SNR `lam` (an intermediate point of a single-step
    solver: s_1 = t_lambda(lambda_s + r_1 h))."""
    t = float(schedule.t_from_lambda(lam))
    return t, float(schedule.alpha(t)), float(schedule.sigma(t))


def _point(grid: TimeGrid, i: int) -> tuple[float, float, float]:
    return float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i])


@register("dpmpp_2m", order=2)
@register("dpmpp_3m", order=3)
class DPMSolverPP(MultistepSolver):
    """Multistep DPM-Solver++ of order 1-3 (Alg. 2 of the paper; 3M as in its official code)."""

    name = "dpmpp_multistep"
    max_order = 3
    kind = "data"

    def coefficients(self, grid, i, k):
        a_s, s_s, l_s = _point(grid, i)
        a_t, s_t, l_t = _point(grid, i + 1)
        if s_t == 0.0:  # step onto sigma = 0: x_0 = D_s (first order; h is infinite)
            return 0.0, [a_t], 0.0
        return s_t / s_s, dpmpp_multistep_weights([float(grid.lam[i - j]) for j in range(k)], l_t, a_t), 0.0


register("dpmpp_2m_hb", DPMSolverPP, order=2, momentum=0.8)


@register("dpmpp_2m_sde", order=2)
class DPMSolverPPSDE(MultistepSolver):
    """SDE-DPM-Solver++ (1 and 2M, midpoint form; Lu et al. 2022, App. and diffusers' sde-dpmsolver++).

    x_t = (sigma_t/sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) (D_0 + 1/2 D_1) + sigma_t sqrt(1 - e^{-2h}) z.
    """

    name = "dpmpp_sde"
    max_order = 2
    stochastic = True
    kind = "data"

    def __init__(self, order: int | None = None, lower_order_final: bool = True, momentum: float | None = None,
                 noise: str = "gaussian"):
        from .stochastic import check_noise

        super().__init__(order, lower_order_final, momentum)
        self.noise = check_noise(noise)  # "brownian": one Brownian tree per sample (samplers/brownian.py)

    def build(self, grid, nfe=None):
        plan = super().build(grid, nfe)
        plan.info["noise"] = self.noise
        return plan

    def coefficients(self, grid, i, k):
        a_s, s_s, l_s = _point(grid, i)
        a_t, s_t, l_t = _point(grid, i + 1)
        if s_t == 0.0:
            return 0.0, [a_t], 0.0
        h = l_t - l_s
        one_m_e2h = -math.expm1(-2.0 * h)
        c = np.array([a_t * one_m_e2h] + [0.0] * (k - 1))
        if k == 2:
            r0 = (l_s - float(grid.lam[i - 1])) / h
            c = c + 0.5 * a_t * one_m_e2h * np.array([1.0, -1.0]) / r0
        return s_t / s_s * math.exp(-h), list(c), s_t * math.sqrt(one_m_e2h)


@register("dpmpp_2s")
class DPMSolverPP2S(SinglestepSolver):
    """Singlestep DPM-Solver++(2S) (Alg. 1 of the paper), r_1 = 1/2, two model calls per step.

    The budget is spent as in `SinglestepSolver`; a step onto sigma = 0 is first order (its
    intermediate point would sit at sigma = 0, where log-SNR is -inf).
    """

    name = "dpmpp_2s"
    order = 2
    kind = "data"

    def __init__(self, r1: float = 0.5):
        if not 0 < r1 < 1:
            raise ValueError(f"r1 must be in (0, 1), got {r1}")
        self.r1 = r1

    def build(self, grid, nfe=None):
        orders = self.step_orders(grid, nfe)
        b = PlanBuilder(grid)
        sched = grid.schedule
        for i, k in enumerate(orders):
            a_s, s_s, l_s = _point(grid, i)
            a_t, s_t, l_t = _point(grid, i + 1)
            m0 = b.eval_at(i, "data")
            if s_t == 0.0:
                b.end_step(Combo(0.0, ((m0, a_t),)), order=1)
                continue
            if k == 1:
                (w0,) = dpmpp_multistep_weights([l_s], l_t, a_t)
                b.end_step(Combo(s_t / s_s, ((m0, w0),)), order=1)
                continue
            l_1 = l_s + self.r1 * (l_t - l_s)  # s_1 = t_lambda(lambda_s + r_1 h)
            t_1, a_1, s_1 = point_at_lambda(sched, l_1)
            (u0,) = dpmpp_multistep_weights([l_s], l_1, a_1)
            m1 = b.eval(t_1, a_1, s_1, "data", Combo(s_1 / s_s, ((m0, u0),)))
            w0, w1 = dpmpp_2s_weights(l_s, l_t, a_t, self.r1)
            b.end_step(Combo(s_t / s_s, ((m0, w0), (m1, w1))), order=2)
        return b.plan(self.name)
