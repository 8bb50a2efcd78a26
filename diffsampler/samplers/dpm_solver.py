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
from .registry import MultistepSolver, SinglestepSolver, Solver, register

__all__ = ["DPMSolverPP", "DPMSolverPPSDE", "DPMSolverMultistep", "DPMSolverPP2S", "phi", "dpm_weights",
           "dpmpp_multistep_weights", "dpmpp_2s_weights", "point_at_lambda", "SOLVER_TYPES", "DPMSolverSinglestep",
           "DPMSolverPPSinglestep", "singlestep_weights", "singlestep_orders", "diffusers_singlestep_orders",
           "SINGLESTEP_TYPES"]


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


#: how a second-order multistep step uses the first difference D1 (diffusers' `solver_type`)
SOLVER_TYPES = ("midpoint", "heun")
PREDICTIONS = ("data", "noise")


def _differences(lams: Sequence[float], h: float) -> list[np.ndarray]:
    """[D0, D1, D2] (as many as outputs) as coefficient vectors over the outputs M_i, M_{i-1}, ...
    (newest first): D1 = (M_i - M_{i-1}) / r_0 for two, and for three D1 = D1_0 + r_0 / (r_0 + r_1)
    (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r_0 + r_1), r_j the earlier log-SNR steps over h
    (Lu et al. 2022, DPM-Solver++ Alg. 2 and its official 3M code)."""
    k = len(lams)
    E = np.eye(k)
    if k == 1:
        return [E[0]]
    r0 = (lams[0] - lams[1]) / h
    d1_0 = (E[0] - E[1]) / r0
    if k == 2:
        return [E[0], d1_0]
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (E[1] - E[2]) / r1
    return [E[0], d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)]


def dpm_weights(lams: Sequence[float], lam_t: float, a_s: float, s_s: float, a_t: float, s_t: float, *,
                predict: str = "data", solver_type: str = "midpoint", eta: float = 0.0, relax: float = 0.0,
                d2: str = "phi", taylor_d2: bool = False) -> tuple[float, list[float], float]:
    """(c_x, [w_0, ..., w_{k-1}], c_z) of one multistep DPM-Solver step from s to t,
    x_t = c_x x_s + sum_j w_j M_{i-j} + c_z z, with `lams` the log-SNRs lambda_i, lambda_{i-1}, ...
    of the k = len(lams) <= 3 outputs M (newest first) and h = lambda_t - lambda_s.

    predict="data" (DPM-Solver++, Lu et al. 2022, arXiv:2211.01095), with H = (1 + eta) h:
        x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t H [phi_1(-H) D0 + c_1 D1 + phi_3(-H) D2]
              + sigma_t sqrt(1 - e^{-2 eta h}) z,
    eta = 0 the ODE solver, eta = 1 SDE-DPM-Solver++ (diffusers' sde-dpmsolver++), other eta
    k-diffusion's sample_dpmpp_2m_sde / 3m_sde.
    predict="noise" (DPM-Solver, Lu et al. 2022, arXiv:2206.00927; eta in {0, 1}):
        x_t = (alpha_t / alpha_s) x_s - (1 + eta) sigma_t h [phi_1(h) D0 + c_1 D1 + phi_3(h) D2]
              + eta sigma_t sqrt(e^{2h} - 1) z,
    eta = 1 SDE-DPM-Solver (sde-dpmsolver: the ODE's weights doubled).
    c_1 = phi_1 / 2 ("midpoint") or phi_2 ("heun") for two outputs, phi_2 for three (at -H or h);
    D0, D1, D2 are `_differences`.  `relax` = c scales D1 by (1 + c h) (USF's linear relaxation).
    d2="diffusers_sde": diffusers' third-order sde-dpmsolver++ D2 weight alpha_t ((1 - e^{-2h} - 2h) /
    (2h)^2 - 1/2) = -alpha_t (phi_2(-2h) + 1/2), not the derivation's alpha_t 2h phi_3(-2h) =
    -alpha_t (phi_2(-2h) - 1/2) that k-diffusion's sample_dpmpp_3m_sde uses (for parity only).
    `taylor_d2`: D2 is taken as 2 f[lambda_0, lambda_1, lambda_2] h^2 = h^2 p''(lambda_s), so phi_3 carries
    the full Taylor weight (a singlestep third-order step through its intermediate points, diffusers'
    DPMSolverSinglestep solver_type "heun"); without it D2 has half of it (the official multistep 3M).
    A step onto sigma_t = 0 is the first-order limit: x_0 = D_s (data), alpha_t (x_s - (1 + eta)
    sigma_s eps_s + eta sigma_s z) / alpha_s (noise)."""
    if predict not in PREDICTIONS:
        raise ValueError(f"predict must be one of {PREDICTIONS}, got {predict!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    k, l_s = len(lams), lams[0]
    if s_t == 0.0:
        if predict == "data":
            return 0.0, [a_t], 0.0
        return a_t / a_s, [-(1.0 + eta) * a_t * s_s / a_s], eta * a_t * s_s / a_s
    h = lam_t - l_s
    if predict == "data":
        H, z = (1.0 + eta) * h, -(1.0 + eta) * h
        g = a_t * H
        c_x = s_t / s_s * math.exp(-eta * h)
        c_z = s_t * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta else 0.0
    else:
        if eta not in (0.0, 1.0):
            raise ValueError(f"noise-prediction DPM-Solver takes eta 0 (ODE) or 1 (SDE), got {eta!r}")
        z = h
        g = -(1.0 + eta) * s_t * h
        c_x = a_t / a_s
        c_z = s_t * math.sqrt(math.expm1(2.0 * h)) if eta else 0.0
    D = _differences(lams, h)
    if k == 3 and taylor_d2:
        D[2] = 2.0 * D[2]
    w = phi(1, z) * D[0]
    if k == 2:
        w = w + (0.5 * phi(1, z) if solver_type == "midpoint" else phi(2, z)) * (1.0 + relax * h) * D[1]
    elif k == 3:
        w = w + phi(2, z) * (1.0 + relax * h) * D[1]
        if d2 == "diffusers_sde":
            w = w - (phi(2, z) + 0.5) / H * D[2]  # g * this = -alpha_t (phi_2(-2h) + 1/2) D2
        else:
            w = w + phi(3, z) * D[2]
    return c_x, [float(g * c) for c in w], c_z


def dpmpp_multistep_weights(lams: Sequence[float], lam_t: float, alpha_t: float, relax: float = 0.0) -> list[float]:
    """Weights w_j of D_{i-j} in x_t = (sigma_t / sigma_s) x_s + sum_j w_j D_{i-j}: DPM-Solver++(2M)
    (midpoint) and 3M, `dpm_weights` with predict="data", eta = 0 (the sigmas cancel in the weights)."""
    return dpm_weights(lams, lam_t, 1.0, 1.0, alpha_t, 1.0, relax=relax)[1]


def dpmpp_2s_weights(lam_s: float, lam_t: float, alpha_t: float, r1: float) -> list[float]:
    """Weights of D_s and D(u, s_1) in x_t = (sigma_t / sigma_s) x_s + w_0 D_s + w_1 D(u, s_1), with
    lambda_{s_1} = lambda_s + r_1 h and u the first-order step to s_1: DPM-Solver++(2S) (Lu et al.
    2022, Alg. 1), x_t = ... + alpha_t h phi_1(-h) D_s + alpha_t h phi_1(-h) / (2 r_1) (D(u, s_1) - D_s)."""
    # `dpm_weights`' midpoint form through (s, s_1) (the sigmas cancel in the weights)
    return dpm_weights([lam_s, lam_s + r1 * (lam_t - lam_s)], lam_t, 1.0, 1.0, alpha_t, 1.0)[1]


def point_at_lambda(schedule, lam: float) -> tuple[float, float, float]:
    """(t, alpha_t, sigma_t) of the time with log-SNR `lam` (an intermediate point of a single-step
    solver: s_1 = t_lambda(lambda_s + r_1 h))."""
    t = float(schedule.t_from_lambda(lam))
    return t, float(schedule.alpha(t)), float(schedule.sigma(t))


def _point(grid: TimeGrid, i: int) -> tuple[float, float, float]:
    return float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i])


class _DPMMultistep(MultistepSolver):
    """Multistep DPM-Solver of order 1-3 on `dpm_weights` (one copy of the coefficients).

    Options: `solver_type` "midpoint" | "heun" (the second-order steps' use of D1: diffusers'
    solver_type, k-diffusion's 2m_sde solver_type); `euler_at_final` makes the last step first order
    (diffusers' euler_at_final); `lower_order_final`, `momentum` as every multistep solver."""

    max_order = 3
    predict = "data"
    eta = 0.0
    d2 = "phi"

    def __init__(self, order: int | None = None, lower_order_final: bool = True, momentum: float | None = None,
                 solver_type: str = "midpoint", euler_at_final: bool = False):
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
        super().__init__(order=order, lower_order_final=lower_order_final, momentum=momentum)
        self.solver_type, self.euler_at_final = solver_type, bool(euler_at_final)

    def step_orders(self, grid):
        orders = super().step_orders(grid)
        if self.euler_at_final and orders:
            orders[-1] = 1
        return orders

    def coefficients(self, grid, i, k):
        a_s, s_s, _ = _point(grid, i)
        a_t, s_t, l_t = _point(grid, i + 1)
        return dpm_weights([float(grid.lam[i - j]) for j in range(k)], l_t, a_s, s_s, a_t, s_t,
                           predict=self.predict, solver_type=self.solver_type, eta=self.eta, d2=self.d2)


@register("dpmpp_2m", order=2)
@register("dpmpp_3m", order=3)
class DPMSolverPP(_DPMMultistep):
    """Multistep DPM-Solver++ of order 1-3 (Alg. 2 of the paper; 3M as in its official code;
    diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++")."""

    name = "dpmpp_multistep"
    kind = "data"


register("dpmpp_2m_hb", DPMSolverPP, order=2, momentum=0.8)


@register("dpmpp_2m_sde", order=2)
@register("dpmpp_3m_sde", order=3, solver_type="heun")
class DPMSolverPPSDE(_DPMMultistep):
    """SDE-DPM-Solver++ (Lu et al. 2022, Sec. 5 / App.; diffusers' sde-dpmsolver++; k-diffusion's
    sample_dpmpp_2m_sde and sample_dpmpp_3m_sde), order 1-3:

    x_t = (sigma_t/sigma_s) e^{-eta h} x + alpha_t H [phi_1(-H) D_0 + ...] + s_noise sigma_t sqrt(1 - e^{-2 eta h}) z,
    H = (1 + eta) h (`dpm_weights`).  dpmpp_3m_sde's second-order steps are "heun" (k-diffusion's).
    `third_order="diffusers"` takes diffusers' D2 weight of its third-order sde-dpmsolver++ step
    (`dpm_weights` d2="diffusers_sde"; for parity with that class only)."""

    name = "dpmpp_sde"
    stochastic = True
    kind = "data"

    def __init__(self, order: int | None = None, lower_order_final: bool = True, momentum: float | None = None,
                 solver_type: str = "midpoint", euler_at_final: bool = False, eta: float = 1.0,
                 s_noise: float = 1.0, third_order: str = "kdiffusion", noise: str = "gaussian"):
        from .stochastic import check_noise

        super().__init__(order, lower_order_final, momentum, solver_type, euler_at_final)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        if not s_noise >= 0:
            raise ValueError(f"s_noise must be >= 0, got {s_noise!r}")
        if third_order not in ("kdiffusion", "diffusers"):
            raise ValueError(f"third_order must be 'kdiffusion' or 'diffusers', got {third_order!r}")
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.d2 = "diffusers_sde" if third_order == "diffusers" else "phi"
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.noise = check_noise(noise)  # "brownian": one Brownian tree per sample (samplers/brownian.py)

    def build(self, grid, nfe=None):
        plan = super().build(grid, nfe)
        plan.info["noise"] = self.noise
        return plan

    def coefficients(self, grid, i, k):
        c_x, w, c_z = super().coefficients(grid, i, k)
        return c_x, w, self.s_noise * c_z


@register("dpm_solver_2m", order=2)
@register("dpm_solver_3m", order=3)
class DPMSolverMultistep(_DPMMultistep):
    """Multistep DPM-Solver with noise prediction (Lu et al. 2022, arXiv:2206.00927; diffusers'
    algorithm_type "dpmsolver"), order 1-3; `sde=True` is SDE-DPM-Solver ("sde-dpmsolver": the ODE's
    weights doubled, noise sigma_t sqrt(e^{2h} - 1) z).  `dpm_weights` with predict="noise"."""

    name = "dpm_solver_multistep"
    kind = "noise"
    predict = "noise"

    def __init__(self, order: int | None = None, lower_order_final: bool = True, momentum: float | None = None,
                 solver_type: str = "midpoint", euler_at_final: bool = False, sde: bool = False):
        super().__init__(order, lower_order_final, momentum, solver_type, euler_at_final)
        self.sde = bool(sde)
        self.eta = 1.0 if self.sde else 0.0
        self.stochastic = self.sde


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


#: the stage rules of a singlestep order-k step (`singlestep_weights`)
SINGLESTEP_TYPES = ("dpm_solver", "midpoint", "heun")
#: where a singlestep step's intermediate calls sit
INTERMEDIATES = ("inserted", "grid")


def singlestep_weights(lams: Sequence[float], lam_t: float, a_s: float, s_s: float, a_t: float, s_t: float,
                       order: int, *, predict: str = "data", solver_type: str = "dpm_solver", eta: float = 0.0,
                       d2: str = "phi") -> tuple[float, list[float], float]:
    """(c_x, [w over lams], c_z) of one stage of a singlestep order-`order` DPM-Solver step from s:
    the state at lambda_t from x_s and the outputs at `lams` = [lambda_s, lambda_{s_1}, ...] (the step's
    start and the intermediate points reached so far), every stage `dpm_weights` on (some of) them:
      one point:    the first-order step (DPM-Solver-1 / DDIM);
      two points:   the D1 form through (s, s_1): "midpoint" (c_1 = phi_1 / 2, DPM-Solver-2, Lu et al. 2022
                    Alg. 1) for the end of an order-2 step, "heun" (c_1 = phi_2) for the second intermediate
                    point of an order-3 step (Alg. 2's u_2);
      three points: the end of an order-3 step, "heun" through (s, s_2) only (DPM-Solver-3, Alg. 2).
    solver_type "dpm_solver" is that rule (Lu et al. 2022; k-diffusion's DPMSolver); "midpoint" and "heun" are
    diffusers' DPMSolverSinglestepScheduler's: "midpoint" takes the midpoint form for the order-3 step's u_2
    too, "heun" the phi_2 form for the order-2 end and the full Taylor expansion through (s, s_1, s_2) for the
    order-3 end (`dpm_weights` taylor_d2).  predict "data" is DPM-Solver++ (eta > 0 its SDE form, fresh noise
    per stage), "noise" DPM-Solver."""
    n = len(lams)
    kw = dict(predict=predict, eta=eta)
    if n == 1:
        return dpm_weights(lams, lam_t, a_s, s_s, a_t, s_t, **kw)
    if n == 2:
        heun = solver_type == "heun" or (solver_type == "dpm_solver" and order == 3)
        return dpm_weights(lams, lam_t, a_s, s_s, a_t, s_t, solver_type="heun" if heun else "midpoint", **kw)
    if solver_type == "heun":
        return dpm_weights(lams, lam_t, a_s, s_s, a_t, s_t, taylor_d2=True, d2=d2, **kw)
    c_x, (w0, w2), c_z = dpm_weights([lams[0], lams[2]], lam_t, a_s, s_s, a_t, s_t, solver_type="heun", **kw)
    return c_x, [w0, 0.0, w2], c_z


def singlestep_orders(nfe: int, order: int, final_zero: bool) -> list[int]:
    """Step orders spending exactly `nfe` calls (Lu et al. 2022's order list for singlestep DPM-Solver,
    its DPM-Solver-fast for order 3 = k-diffusion's sample_dpm_fast): order-k steps, ending on one
    lower-order step for the remainder (order 3 with nfe % 3 == 0: ..., 3, 2, 1); with `final_zero`
    the step onto sigma = 0 is one more first-order step."""
    n = nfe - 1 if final_zero else nfe
    if n <= 0:
        orders = []
    elif order == 3:
        orders = [3] * (n // 3 - 1) + [2, 1] if n % 3 == 0 else [3] * (n // 3) + [n % 3]
    elif order == 2:
        orders = [2] * (n // 2) + [1] * (n % 2)
    else:
        orders = [1] * n
    return orders + [1] if final_zero else orders


def diffusers_singlestep_orders(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The orders of the steps (blocks of grid intervals) of diffusers' DPMSolverSinglestepScheduler on a grid
    of `steps` intervals, from its `get_order_list`: per call 1, 2, ..., k within a block of order k; with
    lower_order_final (forced there when steps % order != 0 or the grid ends at sigma = 0) the tail is
    lower-order blocks, and the step onto sigma = 0 a first-order block of its own."""
    lower = lower_order_final or steps % order != 0 or final_zero
    if order == 1:
        calls = [1] * steps
    elif not lower:
        calls = list(range(1, order + 1)) * (steps // order)
    elif order == 3:
        calls = ([1, 2, 3] * (steps // 3 - 1) + [1, 2, 1] if steps % 3 == 0 else
                 [1, 2, 3] * (steps // 3) + [1, 2][:steps % 3])
    else:
        calls = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    if final_zero:
        calls[-1] = 1
    blocks: list[int] = []
    for k in calls:
        if k == 1:
            blocks.append(1)
        else:
            blocks[-1] += 1
    return blocks


class _DPMSinglestep(Solver):
    """Singlestep DPM-Solver-k (Lu et al. 2022, arXiv:2206.00927, Alg. 1-2; DPM-Solver++ singlestep,
    arXiv:2211.01095): a step from s to t of order k calls the model at s and at k - 1 intermediate points
    s_1, s_2, each reached from x_s by the lower-order stage through the points before it, and ends
    with the order-k stage (`singlestep_weights`).

    intermediate="inserted" (Lu et al., k-diffusion): the points sit inside the grid interval at
    lambda_{s_j} = lambda_s + r_j h (r = 1/2; 1/3, 2/3); `nfe` is spent over `order`-k steps as
    `singlestep_orders` (orders="fast", DPM-Solver-fast's list) or every step of `order` (orders="fixed":
    nfe a multiple of it, plus 1 with a step onto sigma = 0).
    intermediate="grid" (diffusers' DPMSolverSinglestepScheduler): the caller's grid has one point per
    model call; a step of order k spans k of its intervals, its intermediate calls at the grid points inside,
    the orders of `diffusers_singlestep_orders` (`lower_order_final` as diffusers'); the plan's grid is the
    steps' ends.
    `solver_type`: the stage rule (`singlestep_weights`).  `eta` > 0 (data prediction): SDE-DPM-Solver++,
    each stage with fresh noise sigma sqrt(1 - e^{-2 h}) z (diffusers' sde-dpmsolver++); `third_order=
    "diffusers"` its third-order "heun" D2 weight (`dpm_weights` d2="diffusers_sde", parity only)."""

    predict = "data"

    def __init__(self, order: int = 3, orders: str | None = None, intermediate: str = "inserted",
                 solver_type: str = "dpm_solver", lower_order_final: bool | None = None, eta: float = 0.0,
                 third_order: str = "kdiffusion"):
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 1 <= order <= 3:
            raise ValueError(f"order must be an integer in 1..3, got {order!r}")
        if intermediate not in INTERMEDIATES:
            raise ValueError(f"intermediate must be one of {INTERMEDIATES}, got {intermediate!r}")
        if orders not in (None, "fast", "fixed"):
            raise ValueError(f"orders must be 'fast' or 'fixed', got {orders!r}")
        if intermediate == "grid" and orders is not None:
            raise ValueError(f"orders={orders!r} is the order list of intermediate='inserted'; with intermediate="
                             "'grid' the orders are diffusers' (lower_order_final)")
        if intermediate == "inserted" and lower_order_final is not None:
            raise ValueError(f"lower_order_final={lower_order_final!r} is for intermediate='grid' (diffusers' order "
                             "list); with intermediate='inserted' the orders are orders='fast' | 'fixed'")
        if solver_type not in SINGLESTEP_TYPES:
            raise ValueError(f"solver_type must be one of {SINGLESTEP_TYPES}, got {solver_type!r}")
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        if eta and self.predict != "data":
            raise ValueError(f"eta={eta!r}: the SDE form is DPM-Solver++'s (data prediction, solver 'dpmpp'); "
                             "this solver integrates the noise prediction (eta = 0)")
        if third_order not in ("kdiffusion", "diffusers"):
            raise ValueError(f"third_order must be 'kdiffusion' or 'diffusers', got {third_order!r}")
        if third_order == "diffusers" and not (eta and solver_type == "heun" and order == 3):
            raise ValueError("third_order='diffusers' changes the D2 weight of the SDE form's third-order 'heun' "
                             f"stage only; got order={order}, solver_type={solver_type!r}, eta={eta!r}")
        self.order, self.orders, self.intermediate = int(order), orders or "fast", intermediate
        self.solver_type, self.eta = solver_type, float(eta)
        self.lower_order_final = bool(lower_order_final)
        self.d2 = "diffusers_sde" if third_order == "diffusers" else "phi"
        self.stochastic = self.eta > 0
        self.nfe_per_step = self.order
        # calls sit on the caller's grid points: the model times are the grid's (int64 for a discrete one)
        self.timesteps_int64 = intermediate == "grid"

    def step_list(self, nfe: int, final_zero: bool) -> list[int]:
        self.check_nfe(nfe)
        if self.intermediate == "grid":
            return diffusers_singlestep_orders(nfe, self.order, self.lower_order_final, final_zero)
        if self.orders == "fixed":
            n = nfe - 1 if final_zero else nfe
            if n % self.order or n == 0:
                raise ValueError(f"orders='fixed' with order {self.order} needs nfe = a multiple of {self.order}"
                                 f"{' plus 1 (the step onto sigma = 0)' if final_zero else ''}, got nfe={nfe}")
            return [self.order] * (n // self.order) + ([1] if final_zero else [])
        return singlestep_orders(nfe, self.order, final_zero)

    def steps_for_nfe(self, nfe, final_zero=True):
        """Grid intervals that spend `nfe` calls: one per call with intermediate="grid", else one per step."""
        if self.intermediate == "grid":
            self.check_nfe(nfe)
            return nfe
        return len(self.step_list(nfe, final_zero))

    def _stage(self, lams, l_t, a_s, s_s, a_t, s_t, k):
        return singlestep_weights(lams, l_t, a_s, s_s, a_t, s_t, k, predict=self.predict,
                                  solver_type=self.solver_type, eta=self.eta, d2=self.d2)

    def build(self, grid, nfe=None):
        n = grid.steps
        if self.intermediate == "grid":
            if nfe is not None and nfe != n:
                raise ValueError(f"{self.name!r} with intermediate='grid' calls the model at each grid point: nfe={nfe} "
                                 f"needs {nfe} grid steps, the grid has {n}")
            return self._plan(grid, self.step_list(n, grid.final_zero))
        if nfe is None:
            nfe = self.order * n - ((self.order - 1) if grid.final_zero else 0)
        orders = self.step_list(nfe, grid.final_zero)
        if len(orders) != n:
            raise ValueError(f"{self.name!r}: nfe={nfe} needs {len(orders)} steps, the grid has {n}")
        return self._plan(grid, orders)

    def build_from(self, grid, k: int):
        """The plan from model call k of this solver's plan on `grid` (intermediate="grid"), as diffusers'
        scheduler runs it restarted there (set_begin_index, img2img): the step call k falls in is finished
        as a step of the calls left in it (its earlier outputs do not exist: diffusers lowers the order),
        then the order list goes on."""
        if self.intermediate != "grid":
            raise ValueError(f"{self.name!r}: build_from is for intermediate='grid' (one call per grid point)")
        blocks = self.step_list(grid.steps, grid.final_zero)
        ends = np.cumsum(blocks)
        if not 0 <= k < int(ends[-1]):
            raise ValueError(f"call {k} is outside the plan's {int(ends[-1])} model calls")
        j = int(np.searchsorted(ends, k, side="right"))
        tail = [int(ends[j]) - k] + blocks[j + 1:]
        sub = TimeGrid(t=grid.t[k:], alpha=grid.alpha[k:], sigma=grid.sigma[k:], lam=grid.lam[k:],
                       final_zero=grid.final_zero, schedule=grid.schedule)
        return self._plan(sub, tail)

    def _plan(self, grid, orders: list[int]):
        """The plan of steps of `orders` on `grid` (intermediate="grid": step i spans orders[i] intervals)."""
        n = len(orders)
        ends = np.cumsum([0] + orders) if self.intermediate == "grid" else np.arange(n + 1)
        sched, kind = grid.schedule, self.kind
        sub = TimeGrid(t=grid.t[ends], alpha=grid.alpha[ends], sigma=grid.sigma[ends], lam=grid.lam[ends],
                       final_zero=grid.final_zero, schedule=sched)
        b = PlanBuilder(sub)
        rho = (sub.sigma / sub.alpha).tolist()
        for i, k in enumerate(orders):
            a_s, s_s, l_s = _point(sub, i)
            a_t, s_t, l_t = _point(sub, i + 1)
            if s_t == 0.0:
                k = 1  # onto sigma = 0: first order (the intermediate points would sit at sigma = 0)
            if self.intermediate == "grid":
                pts = [(float(grid.lam[j]), float(grid.t[j]), float(grid.alpha[j]), float(grid.sigma[j]))
                       for j in range(int(ends[i]) + 1, int(ends[i]) + k)]
            else:
                h = l_t - l_s
                rs = (0.5,) if k == 2 else (1.0 / 3.0, 2.0 / 3.0)
                pts = [(l_s + r * h, *point_at_lambda(sched, l_s + r * h)) for r in rs[:k - 1]]
            lams, ms, draws = [l_s], [b.eval_at(i, kind)], []
            for l_j, t_j, a_j, s_j in pts:  # each intermediate point from x_s by the lower-order stage
                c_x, w, c_z = self._stage(lams, l_j, a_s, s_s, a_j, s_j, k)
                noise = ((len(draws), c_z),) if c_z else ()
                if c_z:
                    draws.append((rho[i], s_j / a_j))
                ms.append(b.eval(t_j, a_j, s_j, kind, Combo(c_x, tuple(zip(ms, w)), noise)))
                lams.append(l_j)
            c_x, w, c_z = self._stage(lams, l_t, a_s, s_s, a_t, s_t, k)
            b.end_step(Combo(c_x, tuple((m, c) for m, c in zip(ms, w) if c != 0.0)), c_z, order=k,
                       draws=tuple(draws))
        plan = b.plan(self.name)
        if self.stochastic:
            plan.info["noise"] = "gaussian"
        return plan


@register("dpm_solver")
@register("dpm_fast", order=3, orders="fast")
class DPMSolverSinglestep(_DPMSinglestep):
    """Singlestep DPM-Solver (noise prediction; `dpm_fast` is DPM-Solver-fast, k-diffusion's sample_dpm_fast)."""

    name = "dpm_solver"
    kind = "noise"
    predict = "noise"


@register("dpmpp")
class DPMSolverPPSinglestep(_DPMSinglestep):
    """Singlestep DPM-Solver++ (data prediction), order 1-3; `eta` > 0 its SDE form."""

    name = "dpmpp"
    kind = "data"
    predict = "data"
