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
from .ddim import Heun
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


def _at_rho(sched, rho: float, beyond: str) -> tuple[float, float, float, float]:
    """(t, alpha, sigma, rho) of the time at noise level rho; `beyond` is the error when rho lies above
    a (non variance-exploding) schedule's range."""
    t = float(sched.t_from_lambda(-math.log(rho)))
    if not sched.is_variance_exploding and t > sched.t_max * (1 + 1e-12):
        raise ValueError(beyond)
    return t, float(sched.alpha(t)), float(sched.sigma(t)), rho


def noised_heun_step(b: PlanBuilder, src, hat, dst, k: int, c: float) -> None:
    """One step of Karras et al. 2022, Alg. 2 on points (t, alpha, sigma, rho): from the state x at
    `src`, noise to the level of `hat`, v_hat = v + c z (an in-step draw over (rho_src, rho_hat); no
    draw for c = 0), then Heun's step (Alg. 1, `ddim.euler_weights`) from `hat` to `dst`, or its Euler
    step for k = 1 and onto sigma = 0.  In x: x_hat = (alpha_hat / alpha_src) x + alpha_hat c z."""
    from .ddim import euler_weights

    (_, a_i, _, r_i), (t_h, a_h, s_h, r_h), (t_n, a_n, s_n, r_n) = src, hat, dst
    draws, noise = (((r_i, r_h),), ((0, a_h * c),)) if c else ((), ())
    e0 = b.eval(t_h, a_h, s_h, "noise", Combo(a_h / a_i, (), noise))
    cx, g = euler_weights(a_h, r_h, a_n, r_n)  # Heun's weights are g / 2, g / 2
    carried = tuple((j, cx * e) for j, e in noise)  # the noise x_hat carries
    euler = Combo(cx * a_h / a_i, ((e0, g),), carried)
    if k == 1 or s_n == 0.0:
        b.end_step(euler, order=1, draws=draws)
        return
    e1 = b.eval(t_n, a_n, s_n, "noise", euler)
    b.end_step(Combo(cx * a_h / a_i, ((e0, 0.5 * g), (e1, 0.5 * g)), carried), order=2, draws=draws)


@register("edm_stochastic")
class EDMStochastic(Heun):
    """Karras et al. 2022, Alg. 2 (k-diffusion's sample_heun with s_churn): at each step, where
    s_tmin <= rho_i <= s_tmax, raise the noise level to rho_hat = (1 + gamma) rho_i with
    gamma = min(s_churn / N, sqrt(2) - 1) (N the grid's steps), v_hat = v_i + s_noise sqrt(rho_hat^2 -
    rho_i^2) z (an in-step draw), then a Heun step (Alg. 1) from rho_hat to rho_{i+1}
    (`ddim.euler_weights`): Euler where `SinglestepSolver` spends a first-order step (onto sigma = 0, odd budgets).  With
    s_churn = 0 it is `heun` (its subclass: the same solver spec)."""

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
        b = PlanBuilder(grid)
        sched = grid.schedule
        n = grid.steps
        for i, k in enumerate(self.step_orders(grid, nfe)):
            r_i = _pt(grid, i)[3]
            gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0) if self.s_tmin <= r_i <= self.s_tmax else 0.0
            hat, c = _pt(grid, i), 0.0
            if gamma > 0:
                r_h = r_i * (1.0 + gamma)
                hat = _at_rho(sched, r_h, f"edm_stochastic: churn at step {i} raises the noise level to rho_hat = "
                                          f"{r_h:g}, above the schedule's largest; set s_tmax below rho_{i} = {r_i:g} "
                                          "(or s_churn=0)")
                c = self.s_noise * math.sqrt(r_h * r_h - r_i * r_i)
            noised_heun_step(b, _pt(grid, i), hat, _pt(grid, i + 1), k, c)
        return b.plan(self.name)


def _karras_levels(rho_hi: float, rho_lo: float, n: int, rho: float = 7.0) -> list[float]:
    """n + 1 noise levels from rho_hi down to rho_lo, uniform in rho^(1/7) (Karras et al. 2022, eq. 5)."""
    a, b = rho_hi ** (1 / rho), rho_lo ** (1 / rho)
    return [rho_hi] + [(a + j / n * (b - a)) ** rho for j in range(1, n)] + [rho_lo]


@register("restart")
class Restart(SinglestepSolver):
    """Restart sampling (Xu et al. 2023, Alg. 1): Heun ODE steps (`heun`) on the grid, and on each
    restart interval [t_min, t_max] (noise levels rho = sigma / alpha, EDM's sigma), once the ODE has
    reached t_min: K times, re-noise forward to t_max, v <- v + s_noise sqrt(t_max^2 - t_min^2) z (the
    exact forward process from t_min to t_max), and integrate back to t_min with `steps` Heun steps on
    Karras levels (rho = 7) between them.

    intervals: [(t_min, t_max, K, steps), ...]; t_min is moved to the nearest grid point (as A1111's
    restart sampler does; `plan.info["restart"]` records the levels used).  The `nfe` budget counts
    every call: each restart spends 2 steps calls, the grid's Heun steps get the rest.  K = 0 (or
    intervals=[]) is `heun` on the same grid.  None (the default): A1111's interval [0.1, 2] with
    K = 2 restarts of max(1, nfe // 10) Heun steps each, for budgets nfe >= 8; none below."""

    name = "restart"
    order = 2
    kind = "noise"

    def __init__(self, intervals: list | tuple | None = None, s_noise: float = 1.0):
        _, self.s_noise = _check_eta_noise(0.0, s_noise)
        self.auto = intervals is None
        self.intervals = []
        for item in intervals or ():
            if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 4:
                raise ValueError(f"restart intervals are [t_min, t_max, K, steps] (noise levels, restarts, Heun steps "
                                 f"per restart), got {item!r}")
            lo, hi, k, n = item
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lo, hi)) or not 0 < lo < hi:
                raise ValueError(f"restart interval {list(item)}: need 0 < t_min < t_max (noise levels sigma / alpha)")
            for key, v, least in (("K", k, 0), ("steps", n, 1)):
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
                    raise ValueError(f"restart interval {list(item)}: {key} must be an integer >= {least}, got {v!r}")
            self.intervals.append((float(lo), float(hi), int(k), int(n)))
        self.stochastic = self.s_noise > 0 and (self.auto or any(k > 0 for _, _, k, _ in self.intervals))

    def intervals_for(self, nfe: int) -> list[tuple[float, float, int, int]]:
        """The restart intervals of a run of `nfe` model calls (the default's depend on it)."""
        if not self.auto:
            return self.intervals
        return [(0.1, 2.0, 2, max(1, nfe // 10))] if nfe >= 8 else []

    def _main_nfe(self, nfe: int) -> int:
        spent = sum(2 * k * n for _, _, k, n in self.intervals_for(nfe))
        if nfe - spent < 1:
            raise ValueError(f"restart: nfe={nfe} leaves no model call for the ODE steps after the restarts' "
                             f"{spent} (intervals {self.intervals_for(nfe)}); raise nfe or lower K / steps")
        return nfe - spent

    def steps_for_nfe(self, nfe, final_zero=True):
        self.check_nfe(nfe)
        return len(self._orders(self._main_nfe(nfe), final_zero))

    def build(self, grid, nfe=None):
        if nfe is None:  # an explicit grid: its Heun steps, the restarts on top of them
            main = 2 * grid.steps - (1 if grid.final_zero else 0)
            intervals = self.intervals_for(main)
        else:
            main, intervals = self._main_nfe(nfe), self.intervals_for(nfe)
        orders = self._orders(main, grid.final_zero)
        if len(orders) != grid.steps:
            raise ValueError(f"restart: nfe={nfe} gives {main} calls to {len(orders)} Heun steps, the grid has {grid.steps}")
        sched = grid.schedule
        rho = (grid.sigma / grid.alpha).tolist()
        at: dict[int, tuple] = {}
        for lo, hi, k, n in intervals:
            j = min((j for j in range(1, len(rho)) if rho[j] > 0), key=lambda j: abs(rho[j] - lo), default=None)
            if j is None or j in at:
                raise ValueError(f"restart interval t_min={lo}: no grid point left to restart from (grid levels {rho})")
            if not hi > rho[j]:
                raise ValueError(f"restart interval ({lo}, {hi}): t_min moves to the grid level {rho[j]:g}, not below "
                                 f"t_max={hi}")
            at[j] = (hi, k, n)
        b = PlanBuilder(grid)
        for i, k in enumerate(orders):
            noised_heun_step(b, _pt(grid, i), _pt(grid, i), _pt(grid, i + 1), k, 0.0)
            if i + 1 not in at:
                continue
            hi, times, n = at[i + 1]
            bottom = _pt(grid, i + 1)
            top = _at_rho(sched, hi, f"restart: t_max={hi} is above the schedule's largest noise level")
            levels = [top] + [_at_rho(sched, r, "") for r in _karras_levels(hi, bottom[3], n)[1:-1]] + [bottom]
            c = self.s_noise * math.sqrt(hi * hi - bottom[3] ** 2)
            for _ in range(times):  # forward to t_max (an in-step draw of the first step back), then back
                noised_heun_step(b, bottom, top, levels[1], 2, c)
                for m in range(1, n):
                    noised_heun_step(b, levels[m], levels[m], levels[m + 1], 2, 0.0)
        restarts = [(rho[j], hi, k, n) for j, (hi, k, n) in sorted(at.items())]
        return b.plan(self.name, restart=restarts)
