"""DPM-Solver with adaptive step size (Lu et al. 2022, arXiv:2206.00927, Sec. 3.3 and App. C),
as k-diffusion's `sample_dpm_adaptive` runs it: the embedded pairs DPM-Solver-12 (order 2) and
DPM-Solver-23 (order 3) on the noise prediction, in lambda = log(alpha / sigma), a PID step-size
controller on the scaled difference of the pair.

It is not a fixed plan: the step sizes follow the errors met while sampling.  `DPMAdaptive.plan_for`
returns an `AdaptivePlan`, whose `run` builds each attempted step with this module's coefficients
(`dpm_solver_weights`) as a one-step `Plan` and runs it through the engine's `Stepper`; the lower
member of the pair is the same step's outputs under another `Combo`.  `nfe` is a budget: the run
refuses to start an attempt that would pass it, and reports the calls it spent in `plan.info`.

Notation (noise prediction eps, h = lambda_t - lambda_s, r the fraction of h of an intermediate
point, phi_2(h) = (e^h - 1 - h) / h^2):
  DPM-Solver-1  x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s      (= DDIM, Euler in rho)
  DPM-Solver-2  ... - sigma_t (e^h - 1) / (2 r) (eps_r - eps_s)              (paper's Alg. 1, "phi1")
  DPM-Solver-3  ... - sigma_t h phi_2(h) / r (eps_r - eps_s)                 (paper's Alg. 2, "phi2";
                also its second intermediate point, from s to lambda_s + r_2 h with r = r_1 / r_2)
"""

from __future__ import annotations

import math

import torch

from ..schedules import TimeGrid
from .ddim import euler_weights
from .dpm_solver import dpm_weights
from .kdiffusion import ancestral_step
from .plan import Combo, Plan, PlanBuilder, Stepper, combine
from .registry import Solver, register

__all__ = ["DPMAdaptive", "AdaptivePlan", "PIDController", "dpm_solver_weights"]


def dpm_solver_weights(a_s: float, s_s: float, l_s: float, a_t: float, s_t: float, l_t: float,
                       r: float | None = None, form: str = "phi1") -> tuple[float, list[float]]:
    """(c_x, [w_s] or [w_s, w_r]) of a singlestep DPM-Solver step from s to t on the noise
    prediction, x_t = c_x x_s + w_s eps_s + w_r eps_r (module docstring): first order without r;
    with the output eps_r at lambda_s + r h, the weight c of (eps_r - eps_s) is sigma_t (e^h - 1) / (2 r)
    ("phi1", DPM-Solver-2) or sigma_t h phi_2(h) / r ("phi2", DPM-Solver-3), with a minus sign: the
    noise-prediction `dpm_weights` (one copy of the coefficients), "midpoint" / "heun" through (s, r)."""
    lams = [l_s] if r is None else [l_s, l_s + r * (l_t - l_s)]
    c_x, w, _ = dpm_weights(lams, l_t, a_s, s_s, a_t, s_t, predict="noise",
                            solver_type="midpoint" if form == "phi1" else "heun")
    return c_x, w


class PIDController:
    """PID step-size control (Söderlind 2003; k-diffusion's PIDStepSizeController): with
    e_n = 1 / (error_n + eps), the factor (e_n^b1 e_{n-1}^b2 e_{n-2}^b3) is passed through the
    limiter 1 + atan(f - 1) and multiplies h; the step is accepted when the factor >= accept_safety
    (b1 = (p + i + d) / k, b2 = -(p + 2 d) / k, b3 = d / k, k the order)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2.0 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inv: list[float] = []

    def propose(self, error: float) -> bool:
        e = 1.0 / (error + self.eps)
        if not self.inv:
            self.inv = [e, e, e]
        self.inv[0] = e
        f = self.inv[0] ** self.b[0] * self.inv[1] ** self.b[1] * self.inv[2] ** self.b[2]
        f = 1.0 + math.atan(f - 1.0)
        accept = f >= self.accept_safety
        if accept:
            self.inv[2], self.inv[1] = self.inv[1], self.inv[0]
        self.h *= f
        return accept


def _at(schedule, lam: float) -> tuple[float, float, float, float]:
    """(t, alpha, sigma, lambda) of the schedule at log-SNR lambda."""
    t = schedule.t_from_lambda(torch.tensor(lam, dtype=torch.float64))
    return float(t), float(schedule.alpha(t)), float(schedule.sigma(t)), lam


class AdaptivePlan(Plan):
    """The plan of an adaptive solver: its steps are built while it runs (`run`), so `steps` is
    empty and `nfe` is the budget (None: unbounded).  After a run `info` holds what it spent:
    nfe (model calls), n_accept, n_reject, steps (attempts), lambdas (the accepted points)."""

    adaptive = True

    def __init__(self, solver: "DPMAdaptive", grid: TimeGrid, budget: int | None):
        super().__init__([], grid, solver.name, {"spacing": "adaptive", "budget": budget})
        self.driver, self.budget = solver, budget

    @property
    def nfe(self):
        return self.budget

    @property
    def stochastic(self) -> bool:
        return self.driver.stochastic

    def run(self, denoiser, x: torch.Tensor, callback=None, progress: bool = False, noise_fn=None) -> torch.Tensor:
        return self.driver.run(self, denoiser, x, callback, noise_fn)


@register("dpm_adaptive")
class DPMAdaptive(Solver):
    """DPM-Solver-12 / 23 with error control (k-diffusion's sample_dpm_adaptive), from t_max to t_min,
    then (final="zero") one DPM-Solver-1 step onto sigma = 0.

    Each attempt from lambda_s to lambda_t = min(lambda_end, lambda_s + h) spends `order` calls:
    order 3: x_low = DPM-Solver-2 with r_1 = 1/3, x_high = DPM-Solver-3 (r_1 = 1/3, r_2 = 2/3);
    order 2: x_low = DPM-Solver-1, x_high = DPM-Solver-2 (r_1 = 1/2).  In v = x / alpha (k-diffusion's
    sigma space) the error is ||(v_low - v_high) / delta|| / sqrt(numel), delta = max(atol,
    rtol max(|v_low|, |v_prev|)) with v_prev the last accepted v_low (v_T at first), over the whole
    batch as k-diffusion computes it; the PID controller (`PIDController`, order = `order`) accepts
    or rejects and rescales h.  A rejected attempt is redone from the same point (its first call
    again, as k-diffusion does).

    `eta` > 0 (k-diffusion's eta): each attempt from rho_s towards rho_t solves the ODE pair down to the
    ancestral level lambda' = min(lambda_end, -log rho_down), (rho_down, rho_up) = `kdiffusion.ancestral_step`
    (rho_s, rho_t, eta), and an accepted one adds s_noise sqrt(rho_t^2 - rho'^2) z in v (one draw per accepted
    attempt, none for rejected ones; the controller's order is then 1.5, as k-diffusion's)."""

    name = "dpm_adaptive"
    kind = "noise"
    adaptive = True

    def __init__(self, order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                 eta: float = 0.0, s_noise: float = 1.0):
        if order not in (2, 3) or isinstance(order, bool):
            raise ValueError(f"order must be 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order!r}")
        for key, v in (("rtol", rtol), ("atol", atol)):
            if not v >= 0:
                raise ValueError(f"{key} must be >= 0, got {v!r}")
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol are both 0: the error would be infinite; give one of them > 0")
        if not (h_init > 0 and math.isfinite(h_init)):
            raise ValueError(f"h_init (first log-SNR step) must be > 0, got {h_init!r}")
        if not accept_safety > 0:
            raise ValueError(f"accept_safety must be > 0, got {accept_safety!r}")
        if not pcoeff + icoeff + dcoeff > 0:
            raise ValueError(f"pcoeff + icoeff + dcoeff must be > 0 (the controller's step response), got "
                             f"{pcoeff} + {icoeff} + {dcoeff}")
        for key, v in (("eta", eta), ("s_noise", s_noise)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")
        if eta == 0 and s_noise != 1.0:
            raise ValueError(f"s_noise={s_noise} has no effect with eta=0 (no noise is added); give eta > 0")
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order, self.nfe_per_step, self.min_nfe = int(order), int(order), int(order)
        self.rtol, self.atol, self.h_init = float(rtol), float(atol), float(h_init)
        self.pid = (float(pcoeff), float(icoeff), float(dcoeff), float(accept_safety))

    def build(self, grid, nfe=None):
        raise ValueError(f"solver {self.name!r} chooses its steps while it samples (error control): it has no plan on "
                         "a fixed grid; sample with nfe as a budget and no grid")

    def steps_for_nfe(self, nfe, final_zero=True):
        """None (no fixed number of steps) once `nfe` passes as a budget: at least one attempt
        (`order` calls), plus the final call onto sigma = 0 when final_zero."""
        self.check_nfe(nfe)
        if final_zero and nfe < self.order + 1:
            raise ValueError(f"solver {self.name!r}: nfe={nfe} cannot pay one attempt ({self.order} calls) and "
                             "the final step onto sigma = 0 (1 call)")
        return None

    def plan_for(self, schedule, nfe: int | None, final_zero: bool) -> AdaptivePlan:
        """The adaptive plan from t_max to t_min (and sigma = 0 when final_zero) under a budget of nfe calls."""
        if nfe is not None:
            self.steps_for_nfe(nfe, final_zero)
        lam = schedule.lambda_(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
        if not bool(torch.isfinite(lam).all()):
            raise ValueError(f"solver {self.name!r} needs a finite log-SNR at both ends of the schedule, got "
                             f"{lam.tolist()} (zero terminal SNR)")
        grid = TimeGrid.from_times(schedule, [schedule.t_max, schedule.t_min], final_zero=final_zero)
        return AdaptivePlan(self, grid, None if nfe is None else int(nfe))

    # -- one attempt ---------------------------------------------------------------------------

    def attempt(self, grid: TimeGrid, s: tuple, t: tuple) -> tuple[Plan, Combo]:
        """The one-step Plan of x_high from point s to point t ((t, alpha, sigma, lambda) each) and
        the Combo of x_low over the same outputs."""
        sched = grid.schedule
        b = PlanBuilder(grid)
        _, a_s, s_s, l_s = s
        _, a_t, s_t, l_t = t
        h = l_t - l_s
        e0 = b.eval(*s[:3], "noise")
        if self.order == 2:
            cx, (w,) = dpm_solver_weights(a_s, s_s, l_s, a_t, s_t, l_t)
            low = Combo(cx, ((e0, w),))
            p1 = _at(sched, l_s + 0.5 * h)
            c1, (u,) = dpm_solver_weights(a_s, s_s, l_s, *p1[1:])
            e1 = b.eval(*p1[:3], "noise", Combo(c1, ((e0, u),)))
            cx, (w0, w1) = dpm_solver_weights(a_s, s_s, l_s, a_t, s_t, l_t, 0.5, "phi1")
            b.end_step(Combo(cx, ((e0, w0), (e1, w1))), order=2)
            return b.plan(self.name), low
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        p1, p2 = _at(sched, l_s + r1 * h), _at(sched, l_s + r2 * h)
        c1, (u,) = dpm_solver_weights(a_s, s_s, l_s, *p1[1:])
        e1 = b.eval(*p1[:3], "noise", Combo(c1, ((e0, u),)))
        cx, (w0, w1) = dpm_solver_weights(a_s, s_s, l_s, a_t, s_t, l_t, r1, "phi1")
        low = Combo(cx, ((e0, w0), (e1, w1)))
        c2, (u0, u1) = dpm_solver_weights(a_s, s_s, l_s, *p2[1:], r1 / r2, "phi2")
        e2 = b.eval(*p2[:3], "noise", Combo(c2, ((e0, u0), (e1, u1))))
        cx, (w0, w2) = dpm_solver_weights(a_s, s_s, l_s, a_t, s_t, l_t, r2, "phi2")
        b.end_step(Combo(cx, ((e0, w0), (e2, w2))), order=3)
        return b.plan(self.name), low

    def run(self, plan: AdaptivePlan, denoiser, x: torch.Tensor, callback=None, noise_fn=None) -> torch.Tensor:
        """Sample from x = x_{t_max}: attempts through the Stepper until lambda_end; `plan.info`
        records the spending.  `callback(i, x, M)` after each accepted step (and the final one).
        `noise_fn(x)`: N(0, I) like x, one call per accepted attempt (eta > 0)."""
        if self.stochastic and noise_fn is None:
            raise ValueError(f"solver {self.name!r} with eta={self.eta} is stochastic: pass seeds or a generator")
        grid, sched = plan.grid, plan.grid.schedule
        s = (float(grid.t[0]), float(grid.alpha[0]), float(grid.sigma[0]), float(sched.lambda_(grid.t[0])))
        t_end = float(grid.t[1])
        l_end = float(sched.lambda_(grid.t[1]))
        pid = PIDController(self.h_init, *self.pid[:3], 1.5 if self.eta else self.order, self.pid[3])
        info = {"nfe": 0, "n_accept": 0, "n_reject": 0, "steps": 0, "lambdas": [s[3]]}
        plan.info.update(info)
        reserve = 1 if grid.final_zero else 0
        v_prev = x / s[1]
        while s[3] < l_end - 1e-5:
            if plan.budget is not None and info["nfe"] + self.order + reserve > plan.budget:
                raise RuntimeError(
                    f"solver {self.name!r} spent {info['nfe']} of its nfe={plan.budget} model calls and reached "
                    f"lambda={s[3]:.4g} of {l_end:.4g} ({info['n_accept']} steps accepted, {info['n_reject']} "
                    f"rejected); raise nfe, or rtol / atol")
            l_t = min(l_end, s[3] + pid.h)
            end = (t_end, float(grid.alpha[1]), float(grid.sigma[1]), l_end)
            t = end if l_t == l_end else _at(sched, l_t)
            t_, up = t, 0.0
            if self.eta:  # the pair solves down to the ancestral level rho_down (capped at the end), noise up
                r_s, r_t = math.exp(-s[3]), math.exp(-t[3])
                r_down, _ = ancestral_step(r_s, r_t, self.eta)
                l_ = min(l_end, -math.log(r_down)) if r_down > 0 else l_end
                t_ = end if l_ == l_end else _at(sched, l_)
                up = math.sqrt(max(r_t * r_t - math.exp(-2.0 * l_), 0.0))
            step, low = self.attempt(grid, s, t_)
            pair = {}

            def keep_low(i, x_high, m, step=step, low=low):
                pair["low"], pair["m"] = combine(stepper.x, low, stepper.outs), m

            stepper = Stepper(step, denoiser, x, on_step=keep_low)
            while not stepper.done:
                stepper.feed(denoiser.predict_at(*stepper.next_input()))
            info["nfe"] += self.order
            info["steps"] += 1
            v_low, v_high = pair["low"] / t_[1], stepper.x / t_[1]
            delta = torch.clamp(self.rtol * torch.maximum(v_low.abs(), v_prev.abs()), min=self.atol)
            error = float(torch.linalg.norm((v_low - v_high) / delta)) / v_low.numel() ** 0.5
            if pid.propose(error):
                x, v_prev = stepper.x, v_low
                if self.stochastic:  # v_t = v_high + s_noise rho_up z, at the attempt's target t
                    x = (v_high + (self.s_noise * up) * noise_fn(x)) * t[1]
                s = t
                info["n_accept"] += 1
                info["lambdas"].append(t[3])
                if callback is not None:
                    callback(info["n_accept"] - 1, x, pair["m"])
            else:
                info["n_reject"] += 1
            plan.info.update(info)
        if grid.final_zero:  # DPM-Solver-1 onto sigma = 0: x_0 = (x - sigma_s eps_s) / alpha_s
            b = PlanBuilder(grid)
            e0 = b.eval(*s[:3], "noise")
            cx, w = euler_weights(s[1], s[2] / s[1], 1.0, 0.0)
            b.end_step(Combo(cx, ((e0, w),)))
            stepper = Stepper(b.plan(self.name), denoiser, x, on_step=callback and (
                lambda i, y, m: callback(info["n_accept"], y, m)))
            while not stepper.done:
                stepper.feed(denoiser.predict_at(*stepper.next_input()))
            x = stepper.x
            info["nfe"] += 1
            plan.info.update(info)
        return x
