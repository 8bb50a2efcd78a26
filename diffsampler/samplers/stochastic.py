"""Stochastic samplers that add noise between the evaluations of one step, and their ancestral ones.

Written in the variables of k-diffusion (Karras et al. 2022): v = x / alpha and its noise level
rho = sigma / alpha (EDM's sigma), lambda = -log rho; a step from s to t in those variables is the
step x_t = alpha_t (v_t) of the VP / flow state, with the same standard normal draws.

- `dpmpp_2s_ancestral`: DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, r = 1/2) to the ancestral
  rho_down, then rho_up z (k-diffusion's sample_dpmpp_2s_ancestral).
- `dpmpp_sde`: k-diffusion's DPM-Solver++ SDE (sample_dpmpp_sde): two stochastic exponential-
  integrator stages per step, the intermediate one with its own noise; optional Brownian-tree noise.
- `edm_stochastic`: Karras et al. 2022, Alg. 2 (churn rho_hat = (1 + gamma) rho, then a Heun step).
- `restart`: Xu et al. 2023, Restart sampling (Heun ODE steps; K times re-noise to rho_max and
  integrate back to rho_min on each restart interval).
"""

from __future__ import annotations

import math
import numbers

from ..schedules import TimeGrid
from .dpm_solver import dpmpp_2s_weights, dpmpp_multistep_weights, point_at_lambda
from .kdiffusion import _check_noise as _check_eta_noise
from .kdiffusion import ancestral_step
from .plan import Combo, PlanBuilder
from .registry import SinglestepSolver, register

__all__ = ["DPMSolverPP2SAncestral", "DPMSolverPPSDEStages", "NOISES", "check_noise"]

#: noise sources of the solvers that take `noise=`: independent draws, or a Brownian tree per sample
NOISES = ("gaussian", "brownian")


def check_noise(noise) -> str:
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES} (independent draws, or a Brownian tree per sample), "
                         f"got {noise!r}")
    return noise


def _pt(grid: TimeGrid, i: int) -> tuple[float, float, float, float]:
    """(t, alpha, sigma, rho) of grid point i."""
    a, s = float(grid.alpha[i]), float(grid.sigma[i])
    return float(grid.t[i]), a, s, s / a


@register("dpmpp_2s_ancestral")
class DPMSolverPP2SAncestral(SinglestepSolver):
    """Ancestral DPM-Solver++(2S) (k-diffusion's sample_dpmpp_2s_ancestral): from rho_s, a
    DPM-Solver++(2S) step (Lu et al. 2022, Alg. 1, r_1 = 1/2) to rho_down, then v += s_noise rho_up z,
    with (rho_down, rho_up) = `ancestral_step(rho_s, rho_t, eta)`.  Two model calls per step; a step
    onto sigma = 0 (and, for odd budgets, the first step) is first order: the exponential (= Euler in
    rho) step to rho_down.  Order 2, weak order 2 for any eta (with s_noise = 1): an exact ODE step to
    rho_down followed by N(0, rho_up^2) noise in v gives the exact marginal at rho_t, so only the
    ODE step's error remains (measured on Gaussian data, tests/test_convergence.py)."""

    name = "dpmpp_2s_ancestral"
    order = 2
    kind = "data"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta, self.s_noise = _check_eta_noise(eta, s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def build(self, grid, nfe=None):
        b = PlanBuilder(grid)
        sched = grid.schedule
        for i, k in enumerate(self.step_orders(grid, nfe)):
            _, a_s, s_s, r_s = _pt(grid, i)
            _, a_t, s_t, r_t = _pt(grid, i + 1)
            m0 = b.eval_at(i, "data")
            down, up = ancestral_step(r_s, r_t, self.eta) if s_t > 0 else (0.0, 0.0)
            c_z = a_t * up * self.s_noise
            if down == 0.0:  # a step to rho_down = 0 lands on the data prediction
                b.end_step(Combo(0.0, ((m0, a_t),)), c_z, order=1)
                continue
            l_s, l_d = float(grid.lam[i]), -math.log(down)
            cx = down / r_s * a_t / a_s  # (sigma_down / sigma_s) with sigma_down = alpha_t rho_down
            if k == 1:
                (w0,) = dpmpp_multistep_weights([l_s], l_d, a_t)
                b.end_step(Combo(cx, ((m0, w0),)), c_z, order=1)
                continue
            t_1, a_1, s_1 = point_at_lambda(sched, l_s + 0.5 * (l_d - l_s))
            (u0,) = dpmpp_multistep_weights([l_s], l_s + 0.5 * (l_d - l_s), a_1)
            m1 = b.eval(t_1, a_1, s_1, "data", Combo(s_1 / s_s, ((m0, u0),)))
            w0, w1 = dpmpp_2s_weights(l_s, l_d, a_t, 0.5)
            b.end_step(Combo(cx, ((m0, w0), (m1, w1))), c_z, order=2)
        return b.plan(self.name)


@register("dpmpp_sde")
class DPMSolverPPSDEStages(SinglestepSolver):
    """k-diffusion's DPM-Solver++ SDE (sample_dpmpp_sde, "DPM++ SDE"; diffusers' DPMSolverSDEScheduler):
    per step from rho_s to rho_t, with h = lambda_t - lambda_s and the stage point lambda_u = lambda_s + r h,

        v_u = (rho_d1 / rho_s) v_s + (1 - rho_d1 / rho_s) D_s + s_noise rho_up1 z_1,
        v_t = (rho_d2 / rho_s) v_s + (1 - rho_d2 / rho_s) ((1 - 1/(2r)) D_s + 1/(2r) D(v_u, u)) + s_noise rho_up2 z_2,

    (rho_d1, rho_up1) = ancestral_step(rho_s, rho_u, eta), (rho_d2, rho_up2) = ancestral_step(rho_s, rho_t, eta)
    (DPM-Solver++ first-order stages to the ancestral points, Lu et al. 2022).  z_1 is an in-step draw over
    (s, u), z_2 the end-of-step draw over (s, t); `noise="brownian"` makes them increments of one Brownian
    tree per sample (`samplers/brownian.py`), as k-diffusion does by default; `noise="gaussian"` draws
    them independently.  A step onto sigma = 0 (and, for odd budgets, the first step) is the
    first-order ancestral step.  Weak order 2 with Brownian noise; with independent draws the stage
    noise is not the step noise's part and the weak order drops to ~1 (measured on Gaussian data,
    tests/test_convergence.py)."""

    name = "dpmpp_sde"
    order = 2
    kind = "data"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, noise: str = "brownian"):
        self.eta, self.s_noise = _check_eta_noise(eta, s_noise)
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < 1:
            raise ValueError(f"r (the stage point lambda_s + r h) must be in (0, 1), got {r!r}")
        self.r, self.noise = float(r), check_noise(noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def build(self, grid, nfe=None):
        b = PlanBuilder(grid)
        sched = grid.schedule
        for i, k in enumerate(self.step_orders(grid, nfe)):
            t_s, a_s, s_s, r_s = _pt(grid, i)
            t_t, a_t, s_t, r_t = _pt(grid, i + 1)
            m0 = b.eval_at(i, "data")
            if s_t == 0.0:  # Euler onto sigma = 0: the data prediction
                b.end_step(Combo(0.0, ((m0, a_t),)), order=1)
                continue
            # noise levels as k-diffusion computes them, sigma(lambda(rho)): the Brownian tree is queried there
            l_s, l_t = -math.log(r_s), -math.log(r_t)
            r_s, r_t = math.exp(-l_s), math.exp(-l_t)
            d2, up2 = ancestral_step(r_s, r_t, self.eta)
            c2 = a_t * up2 * self.s_noise
            if k == 1:
                b.end_step(Combo(a_t * d2 / (r_s * a_s), ((m0, a_t * (1.0 - d2 / r_s)),)), c2, order=1, span=(r_s, r_t))
                continue
            l_u = l_s + (l_t - l_s) * self.r
            t_u, a_u, s_u = point_at_lambda(sched, l_u)
            d1, up1 = ancestral_step(r_s, math.exp(-l_u), self.eta)
            c1 = a_u * up1 * self.s_noise
            stage = Combo(a_u * d1 / (r_s * a_s), ((m0, a_u * (1.0 - d1 / r_s)),), ((0, c1),) if c1 else ())
            m1 = b.eval(t_u, a_u, s_u, "data", stage)
            fac = 1.0 / (2.0 * self.r)
            g = a_t * (1.0 - d2 / r_s)
            b.end_step(Combo(a_t * d2 / (r_s * a_s), ((m0, g * (1.0 - fac)), (m1, g * fac))), c2, order=2,
                       draws=((r_s, math.exp(-l_u)),) if c1 else (), span=(r_s, r_t))
        return b.plan(self.name, noise=self.noise)


@register("edm_stochastic")
class EDMStochastic(SinglestepSolver):
    """Karras et al. 2022, Alg. 2 (k-diffusion's sample_heun with s_churn): at each step, where
    s_tmin <= rho_i <= s_tmax, raise the noise level to rho_hat = (1 + gamma) rho_i with
    gamma = min(s_churn / N, sqrt(2) - 1) (N the grid's steps), v_hat = v_i + s_noise sqrt(rho_hat^2 -
    rho_i^2) z (an in-step draw), then a Heun step (Alg. 1) from rho_hat to rho_{i+1}
    (`ddim.euler_weights`): Euler where `SinglestepSolver` spends a first-order step (onto sigma = 0, odd budgets).  With
    s_churn = 0 it is `heun`."""

    name = "edm_stochastic"
    order = 2
    kind = "noise"

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
        for key, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
                raise ValueError(f"{key} must be a number >= 0, got {v!r}")
        if not s_tmin <= s_tmax:
            raise ValueError(f"s_tmin={s_tmin} must not exceed s_tmax={s_tmax}")
        _, self.s_noise = _check_eta_noise(0.0, s_noise)
        self.s_churn, self.s_tmin, self.s_tmax = float(s_churn), float(s_tmin), float(s_tmax)
        self.stochastic = self.s_churn > 0 and self.s_noise > 0

    def build(self, grid, nfe=None):
        from .ddim import euler_weights

        b = PlanBuilder(grid)
        sched = grid.schedule
        n = grid.steps
        for i, k in enumerate(self.step_orders(grid, nfe)):
            t_i, a_i, _, r_i = _pt(grid, i)
            _, a_n, s_n, r_n = _pt(grid, i + 1)
            gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0) if self.s_tmin <= r_i <= self.s_tmax else 0.0
            draws, noise = (), ()
            t_h, a_h, s_h, r_h = t_i, a_i, float(grid.sigma[i]), r_i
            if gamma > 0:
                r_h = r_i * (1.0 + gamma)
                t_h = float(sched.t_from_lambda(-math.log(r_h)))
                if not sched.is_variance_exploding and t_h > sched.t_max * (1 + 1e-12):
                    raise ValueError(f"edm_stochastic: churn at step {i} raises the noise level to rho_hat = {r_h:g}, "
                                     f"above the schedule's largest; set s_tmax below rho_{i} = {r_i:g} "
                                     f"(or s_churn=0)")
                a_h, s_h = float(sched.alpha(t_h)), float(sched.sigma(t_h))
                c = self.s_noise * math.sqrt(r_h * r_h - r_i * r_i)
                draws, noise = ((r_i, r_h),), ((0, a_h * c),)  # x_hat = (a_h / a_i) x_i + a_h c z
            e0 = b.eval(t_h, a_h, s_h, "noise", Combo(a_h / a_i, (), noise))
            cx, g = euler_weights(a_h, r_h, a_n, r_n)  # Heun's weights are g / 2, g / 2
            carried = tuple((j, cx * e) for j, e in noise)  # the churn noise carried by x_hat
            euler = Combo(cx * a_h / a_i, ((e0, g),), carried)
            if k == 1 or s_n == 0.0:
                b.end_step(euler, order=1, draws=draws)
                continue
            e1 = b.eval_at(i + 1, "noise", euler)
            b.end_step(Combo(cx * a_h / a_i, ((e0, 0.5 * g), (e1, 0.5 * g)), carried), order=2, draws=draws)
        return b.plan(self.name)
