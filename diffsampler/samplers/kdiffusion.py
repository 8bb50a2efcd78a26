"""The k-diffusion family (Karras et al. 2022; Crowson's k-diffusion): ancestral Euler, DPM-Solver-2
(KDPM2) with and without ancestral noise, and linear multistep (LMS), as plans on the one engine.

They integrate dv/drho = eps in v = x / alpha, rho = sigma / alpha (k-diffusion's x and sigma, EDM's
variance-exploding form); a step from rho_s ends at alpha_t v, so every update is a linear combination
of x_s and noise predictions (`ddim.euler_weights`).  Ancestral steps go down to rho_down and add
noise of std rho_up (k-diffusion's `get_ancestral_step`):

    rho_up = min(rho_t, eta sqrt(rho_t^2 (rho_s^2 - rho_t^2) / rho_s^2)),  rho_down = sqrt(rho_t^2 - rho_up^2),

so x_t = alpha_t (v_s + (rho_down - rho_s) eps_s + s_noise rho_up z).
"""

from __future__ import annotations

import math

from .ddim import euler_weights
from .deis import DEIS
from .plan import Combo, PlanBuilder
from .registry import MultistepSolver, SinglestepSolver, register

__all__ = ["EulerAncestral", "DPM2", "DPM2Ancestral", "LMS", "ancestral_step", "dpm2_through"]


def ancestral_step(rho_s: float, rho_t: float, eta: float) -> tuple[float, float]:
    """(rho_down, rho_up) of an ancestral step from rho_s to rho_t (k-diffusion `get_ancestral_step`):
    the DDPM posterior noise for eta = 1, none for eta = 0."""
    if eta == 0.0 or rho_t == 0.0:
        return rho_t, 0.0
    up = min(rho_t, eta * math.sqrt(rho_t * rho_t * (rho_s * rho_s - rho_t * rho_t) / (rho_s * rho_s)))
    return math.sqrt(max(rho_t * rho_t - up * up, 0.0)), up


def _check_noise(eta, s_noise) -> tuple[float, float]:
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise!r}")
    return float(eta), float(s_noise)


def _point(grid, i: int) -> tuple[float, float]:
    return float(grid.alpha[i]), float(grid.rho[i])


@register("euler_ancestral")
class EulerAncestral(MultistepSolver):
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`; diffusers'
    EulerAncestralDiscreteScheduler is eta = 1): x_t = alpha_t (v_s + (rho_down - rho_s) eps_s +
    s_noise rho_up z).  eta = 0 is the deterministic Euler method."""

    name = "euler_ancestral"
    max_order = 1
    kind = "noise"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        super().__init__(order=1)
        self.eta, self.s_noise = _check_noise(eta, s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def coefficients(self, grid, i, k):
        (a_s, r_s), (a_t, r_t) = _point(grid, i), _point(grid, i + 1)
        r_down, r_up = ancestral_step(r_s, r_t, self.eta)
        c_x, g = euler_weights(a_s, r_s, a_t, r_down)
        return c_x, [g], a_t * self.s_noise * r_up


def dpm2_through(lams, l_s, l_t, a_s, s_s, a_t, s_t, s=None) -> tuple[float, list[float]]:
    """(c_x, [w_s, w_mid]) of DPM-2's second stage, x_t = alpha_t (v_s + (rho_t - rho_s) eps_mid): the
    Euler weight on the midpoint's output only (the USF form's `through`; rho = sigma / alpha)."""
    c_x, g = euler_weights(a_s, s_s / a_s, a_t, s_t / a_t)
    return c_x, [0.0, g]


class _DPM2Base(SinglestepSolver):
    """DPM-Solver-2 in rho (k-diffusion `sample_dpm_2`, Lu et al. 2022's DPM-Solver-2 with the
    midpoint at the geometric mean of the noise levels): an Euler step to rho_mid = sqrt(rho_s rho_down),
    then x_t = alpha_t (v_s + (rho_down - rho_s) eps(x_mid, rho_mid)).  Two model calls per step; a
    step onto sigma = 0 (and a first-order step of `SinglestepSolver`'s budget) is an Euler step."""

    order = 2
    kind = "noise"
    eta = 0.0
    s_noise = 0.0

    def build(self, grid, nfe=None):
        sched = grid.schedule
        b = PlanBuilder(grid)
        for i, k in enumerate(self.step_orders(grid, nfe)):
            (a_s, r_s), (a_t, r_t) = _point(grid, i), _point(grid, i + 1)
            r_down, r_up = ancestral_step(r_s, r_t, self.eta)
            noise = a_t * self.s_noise * r_up
            e0 = b.eval_at(i, "noise")
            if k == 1 or r_down == 0.0:
                c_x, g = euler_weights(a_s, r_s, a_t, r_down)
                b.end_step(Combo(c_x, ((e0, g),)), noise, order=1)
                continue
            r_mid = math.exp(0.5 * (math.log(r_s) + math.log(r_down)))
            t_mid = float(sched.t_from_lambda(-math.log(r_mid)))
            a_mid, s_mid = float(sched.alpha(t_mid)), float(sched.sigma(t_mid))
            c_x, g = euler_weights(a_s, r_s, a_mid, r_mid)
            e1 = b.eval(t_mid, a_mid, s_mid, "noise", Combo(c_x, ((e0, g),)))
            c_x, g = euler_weights(a_s, r_s, a_t, r_down)
            b.end_step(Combo(c_x, ((e1, g),)), noise, order=2)
        return b.plan(self.name)


@register("dpm2")
class DPM2(_DPM2Base):
    """DPM-Solver-2 (k-diffusion `sample_dpm_2`, diffusers' KDPM2DiscreteScheduler)."""

    name = "dpm2"


@register("dpm2_ancestral")
class DPM2Ancestral(_DPM2Base):
    """Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`; diffusers'
    KDPM2AncestralDiscreteScheduler is eta = 1): the DPM-2 step goes down to rho_down (midpoint
    sqrt(rho_s rho_down)), then adds s_noise rho_up z."""

    name = "dpm2_ancestral"
    order = 2  # weak order measured on Gaussian data (tests/test_convergence.py)

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta, self.s_noise = _check_noise(eta, s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0


@register("lms")
class LMS(DEIS):
    """Linear multistep in rho (k-diffusion `sample_lms`, diffusers' LMSDiscreteScheduler), order 1-4:
    x_t = alpha_t (v_s + sum_j w_j eps_{i-j}) with w_j = int_{rho_s}^{rho_t} l_j(rho) drho, l_j the
    Lagrange basis through rho_i, rho_{i-1}, ... -- the integrated Lagrange coefficients of k-diffusion's
    `linear_multistep_coeff`, i.e. rhoAB-DEIS (`deis_weights(..., "rho")`, one copy of the formula).
    Warm-up with the outputs available; like the references it keeps its order on the last steps and
    on the step onto sigma = 0 (`lower_order_final=True` lowers it as diffusers' DPM-Solver does)."""

    name = "lms"

    def __init__(self, order: int = 4, lower_order_final: bool = False, momentum: float | None = None):
        super().__init__(order=order, basis="rho", lower_order_final=lower_order_final, momentum=momentum)
