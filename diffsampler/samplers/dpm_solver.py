"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction exponential integrators.

Notation of the paper: h = lambda_t - lambda_s, phi_1 = e^{-h} - 1, D_i data predictions,
r_i = h_{i} / h the ratio of earlier log-SNR steps to this one.  Coefficients are float64.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedules import TimeGrid
from .plan import Combo, Plan, PlanBuilder
from .registry import MultistepSolver, SinglestepSolver, register

__all__ = ["DPMSolverPP", "DPMSolverPPSDE", "DPMSolverPP2S"]


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
        h = l_t - l_s
        phi1 = math.expm1(-h)
        D = np.eye(k)  # D[j] is the unit vector of D_{i-j}: formulas below act on coefficient vectors
        c = -a_t * phi1 * D[0]
        if k >= 2:
            r0 = (l_s - float(grid.lam[i - 1])) / h
            D1_0 = (D[0] - D[1]) / r0
        if k == 2:
            c = c - 0.5 * a_t * phi1 * D1_0
        elif k == 3:
            r1 = (float(grid.lam[i - 1]) - float(grid.lam[i - 2])) / h
            D1_1 = (D[1] - D[2]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            c = c + a_t * phi2 * D1 - a_t * phi3 * D2
        return s_t / s_s, list(c), 0.0


@register("dpmpp_2m_sde", order=2)
class DPMSolverPPSDE(MultistepSolver):
    """SDE-DPM-Solver++ (1 and 2M, midpoint form; Lu et al. 2022, App. and diffusers' sde-dpmsolver++).

    x_t = (sigma_t/sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) (D_0 + 1/2 D_1) + sigma_t sqrt(1 - e^{-2h}) z.
    """

    name = "dpmpp_sde"
    max_order = 2
    stochastic = True
    kind = "data"

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

    With an odd budget one first-order step is spent first; a step onto sigma = 0 is first order
    (its intermediate point would sit at sigma = 0, the log(0) of diffusers #9007).
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
            h = l_t - l_s
            phi1 = math.expm1(-h)
            if k == 1:
                b.end_step(Combo(s_t / s_s, ((m0, -a_t * phi1),)), order=1)
                continue
            l_1 = l_s + self.r1 * h  # s_1 = t_lambda(lambda_s + r_1 h)
            t_1 = float(sched.t_from_lambda(l_1))
            a_1, s_1 = float(sched.alpha(t_1)), float(sched.sigma(t_1))
            u = Combo(s_1 / s_s, ((m0, -a_1 * math.expm1(-self.r1 * h)),))
            m1 = b.eval(t_1, a_1, s_1, "data", u)
            c1 = -a_t * phi1 / (2.0 * self.r1)  # - 1/(2 r_1) alpha_t phi_1 (D(u, s_1) - D_s)
            b.end_step(Combo(s_t / s_s, ((m0, -a_t * phi1 - c1), (m1, c1))), order=2)
        return b.plan(self.name)
