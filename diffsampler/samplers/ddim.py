"""First-order baselines and Karras' Heun.

DDIM (Song et al. 2021, eq. 12), written with the data prediction D and the DDPM posterior noise
sigma_eta = eta sigma_t sqrt(1 - e^{-2h}) (equal to DDIM's eta formula for VP, to k-diffusion's
ancestral sigma_up for VE).  `euler` is Karras et al.'s Euler step on dv/drho = eps in
v = x/alpha, rho = sigma/alpha, which is algebraically DDIM with eta = 0.

Options for diffusers' DDIMScheduler: `diffusers_stride` (each step goes from t_i to
t_i - num_train_timesteps // n, `stride_targets`, which is not always t_{i+1}; below 0 to the final
alpha_bar, 1 or alpha_bar_0 by `set_alpha_to_one`) and `raw_noise` (the direction term uses the
network's own noise prediction while x0 is clipped / thresholded, use_clipped_model_output=False).
"""

from __future__ import annotations

import math

from ..denoisers import DATA_RAW_NOISE
from ..schedules import DiscreteVP
from .plan import Combo
from .plan import PlanBuilder
from .registry import MultistepSolver, SinglestepSolver, register

__all__ = ["DDIM", "DDPM", "Heun", "heun_weights", "flow_heun_weights", "euler_weights", "ddim_coefficients", "stride_targets",
           "DDPM_VARIANCES"]


def ddim_coefficients(a_s: float, s_s: float, l_s: float, a_t: float, s_t: float, l_t: float,
                      eta: float) -> tuple[float, float, float, float]:
    """(c_x, c_D, c_z, c_eps) of DDIM's step from s to t (Song et al. 2021, eq. 12):
    x_t = alpha_t D + c_eps eps + c_z z with c_z = eta sigma_t sqrt(1 - e^{-2h}) and
    c_eps = sqrt(sigma_t^2 - c_z^2); with eps = (x_s - alpha_s D) / sigma_s this is
    x_t = c_x x_s + c_D D, c_x = c_eps / sigma_s, c_D = alpha_t - alpha_s c_x."""
    c_z = 0.0 if s_t == 0.0 else eta * s_t * math.sqrt(-math.expm1(-2.0 * (l_t - l_s)))
    if c_z > s_t:
        raise ValueError(f"eta={eta} gives noise std {c_z:g} above sigma_t={s_t:g}")
    c_e = math.sqrt(max(s_t * s_t - c_z * c_z, 0.0))
    c_x = c_e / s_s
    return c_x, a_t - a_s * c_x, c_z, c_e


def stride_targets(grid, set_alpha_to_one: bool = True) -> list[tuple[float, float, float, float]]:
    """(t, alpha, sigma, lambda) each step of diffusers' DDIM / DDPM lands on: from grid time t_i
    (training timesteps) to t_i - T // n (T = num_train_timesteps, n = grid.steps model calls),
    and where that is below 0 to the final alpha_bar: 1 (set_alpha_to_one) or alpha_bar_0."""
    sch = grid.schedule
    if not isinstance(sch, DiscreteVP):
        raise ValueError(f"diffusers_stride needs a DiscreteVP schedule (training timesteps), got {type(sch).__name__}")
    if not grid.final_zero:
        raise ValueError("diffusers_stride: the grid must end at sigma = 0 (final='zero'); the last step's target "
                         "is set by the option set_alpha_to_one (False: alpha_bar_0, diffusers' final_alpha_cumprod)")
    import torch

    n, stride = grid.steps, sch.num_train_timesteps // grid.steps
    p = grid.t[:-1] - stride
    final = (1.0, 0.0, math.inf) if set_alpha_to_one else None
    on = p.clamp(min=sch.t_min)
    a, s, lam = sch.alpha(on), sch.sigma(on), sch.lambda_(on)
    out = []
    for i in range(n):
        if float(p[i]) >= sch.t_min:
            out.append((float(p[i]), float(a[i]), float(s[i]), float(lam[i])))
        elif final is not None:
            out.append((float(p[i]), *final))
        else:
            t0 = torch.tensor([sch.t_min], dtype=torch.float64)
            out.append((float(p[i]), float(sch.alpha(t0)[0]), float(sch.sigma(t0)[0]), float(sch.lambda_(t0)[0])))
    return out


def euler_weights(a_s: float, rho_s: float, a_t: float, rho_to: float) -> tuple[float, float]:
    """(c_x, c_eps) of Karras et al. 2022's Euler step on dv/drho = eps in v = x / alpha,
    rho = sigma / alpha, from (a_s, rho_s) to noise level rho_to, the result scaled by a_t:
    x' = a_t (v_s + (rho_to - rho_s) eps_s) = (a_t / a_s) x_s + a_t (rho_to - rho_s) eps_s.
    rho_to is the next grid point's rho, or k-diffusion's sigma_down / DPM-2 midpoint."""
    return a_t / a_s, a_t * (rho_to - rho_s)


def heun_weights(grid, i: int, k: int) -> tuple[float, list[float]]:
    """(c_x, weights of eps_s (and eps' at t)) of Karras et al. 2022, Alg. 1 in v = x / alpha,
    rho = sigma / alpha: the Euler step x' = alpha_t (v_s + (rho_t - rho_s) eps_s) for k = 1 (`euler_weights`),
    the trapezoid x_t = alpha_t (v_s + (rho_t - rho_s) (eps_s + eps(x', t)) / 2) for k = 2."""
    c_x, g = euler_weights(float(grid.alpha[i]), float(grid.rho[i]), float(grid.alpha[i + 1]), float(grid.rho[i + 1]))
    return c_x, [g] if k == 1 else [0.5 * g, 0.5 * g]


@register("ddim")
@register("euler")
class DDIM(MultistepSolver):
    name = "ddim"
    max_order = 1
    kind = "data"

    def __init__(self, eta: float = 0.0, diffusers_stride: bool = False, set_alpha_to_one: bool = True,
                 raw_noise: bool = False):
        super().__init__(order=1)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not set_alpha_to_one and not diffusers_stride:
            raise ValueError("set_alpha_to_one=False applies with diffusers_stride=True only; otherwise the grid's "
                             "end decides (final='last' ends at alpha_bar_0)")
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        self.diffusers_stride, self.set_alpha_to_one = bool(diffusers_stride), bool(set_alpha_to_one)
        self.raw_noise = bool(raw_noise)
        self.kind = DATA_RAW_NOISE if self.raw_noise else "data"

    def _targets(self, grid) -> list:
        """(t, alpha, sigma, lambda) of each step's end: the next grid point, or `stride_targets`."""
        if self.diffusers_stride:
            return stride_targets(grid, self.set_alpha_to_one)
        return [(float(grid.t[i + 1]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1]), float(grid.lam[i + 1]))
                for i in range(grid.steps)]

    def _step(self, grid, i: int, target) -> tuple[float, float, float, float]:
        try:
            return ddim_coefficients(float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i]),
                                     *target[1:], self.eta)
        except ValueError as e:
            raise ValueError(f"ddim: {e} at step {i}") from None

    def coefficients(self, grid, i, k):
        target = (self._targets(grid)[i] if self.diffusers_stride else
                  (None, float(grid.alpha[i + 1]), float(grid.sigma[i + 1]), float(grid.lam[i + 1])))
        c_x, c_d, c_z, _ = self._step(grid, i, target)
        return c_x, [c_d], c_z

    def build(self, grid, nfe=None):
        if not (self.diffusers_stride or self.raw_noise):
            return super().build(grid, nfe)
        if nfe is not None and nfe != grid.steps:
            raise ValueError(f"{self.name!r} spends one model call per step: nfe={nfe} needs {nfe} steps, grid has {grid.steps}")
        targets = self._targets(grid)
        b = PlanBuilder(grid)
        for i, target in enumerate(targets):
            m = b.eval_at(i, self.kind)
            c_x, c_d, c_z, c_e = self._step(grid, i, target)
            if self.raw_noise:  # x_t = alpha_t D + c_eps eps_raw + c_z z (D clipped, eps the network's own)
                update = Combo(0.0, ((m, target[1]), (~m, c_e)))
            else:
                update = Combo(c_x, ((m, c_d),))
            b.end_step(update, c_z, 1)
        return b.plan(self.name, targets=[tg[0] for tg in targets])


#: DDPM's reverse-step variances (diffusers' variance_type names): beta~_t (posterior) and beta_t
DDPM_VARIANCES = ("fixed_small", "fixed_large")


@register("ddpm")
class DDPM(MultistepSolver):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on any grid of a VP schedule: from s to t the
    posterior mean mu = sqrt(abar_t) beta / (1 - abar_s) D + sqrt(abar_s / abar_t) (1 - abar_t) / (1 - abar_s) x_s
    (eq. 7, beta = 1 - abar_s / abar_t; with the data prediction D clipped / thresholded by the denoiser,
    as diffusers' DDPMScheduler), which is DDIM's eta = 1 mean (`ddim_coefficients`), plus sigma z with
    sigma^2 = beta~ = (1 - abar_t) / (1 - abar_s) beta ("fixed_small", = DDIM eta = 1) or beta
    ("fixed_large"); no noise on a step from the schedule's first time t_min (Alg. 2: z = 0 at t = 1),
    as diffusers adds none from timestep 0."""

    name = "ddpm"
    max_order = 1
    kind = "data"
    stochastic = True

    def __init__(self, variance: str = "fixed_small"):
        super().__init__(order=1)
        if variance not in DDPM_VARIANCES:
            raise ValueError(f"variance must be one of {DDPM_VARIANCES} (diffusers' variance_type names), got "
                             f"{variance!r}")
        self.variance = variance

    def coefficients(self, grid, i, k):
        a_s, s_s, l_s = float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i])
        a_t, s_t, l_t = float(grid.alpha[i + 1]), float(grid.sigma[i + 1]), float(grid.lam[i + 1])
        c_x, c_d, c_z, _ = ddim_coefficients(a_s, s_s, l_s, a_t, s_t, l_t, 1.0)
        if self.variance == "fixed_large":
            if abs(a_s * a_s + s_s * s_s - 1.0) > 1e-9:
                raise ValueError("ddpm: variance='fixed_large' (beta_t = 1 - abar_s / abar_t) needs a variance-"
                                 f"preserving schedule, got alpha^2 + sigma^2 = {a_s * a_s + s_s * s_s:g}")
            c_z = math.sqrt(-math.expm1(2.0 * (math.log(a_s) - math.log(a_t))))  # sqrt(beta)
        if grid.schedule is not None and float(grid.t[i]) <= grid.schedule.t_min:
            c_z = 0.0
        return c_x, [c_d], c_z


@register("heun")
class Heun(SinglestepSolver):
    """Karras et al. 2022, Alg. 1: Heun's method on dv/drho = eps(x, t) (`heun_weights`); two model
    calls per step, Euler steps where `SinglestepSolver` spends a first-order step."""

    name = "heun"
    order = 2
    kind = "noise"
    #: "rho": Karras' Heun on dv/drho = eps; "flow": Heun on the rectified flow's own ODE (`flow_heun_weights`)
    coordinates = "rho"
    COORDINATES = ("rho", "flow")

    def __init__(self, coordinates: str = "rho"):
        if coordinates not in self.COORDINATES:
            raise ValueError(f"heun: coordinates must be one of {self.COORDINATES}, got {coordinates!r}")
        self.coordinates = coordinates
        if coordinates == "flow":
            self.kind = "data"

    def build(self, grid, nfe=None):
        orders = self.step_orders(grid, nfe)
        if self.coordinates == "flow":
            # Heun on dx/dt = (x - D) / t of a rectified flow (alpha = 1 - t, sigma = t), in x and t themselves
            # (diffusers' FlowMatchHeunDiscreteScheduler); data predictions, so it starts at t = 1 (alpha = 0)
            from ..schedules import RectifiedFlow

            if not isinstance(grid.schedule, RectifiedFlow):
                raise ValueError("heun with coordinates='flow' integrates a rectified flow's ODE; the schedule is "
                                 f"{type(grid.schedule).__name__} (use coordinates='rho')")
            kind, weights = "data", flow_heun_weights
        else:
            kind, weights = "noise", heun_weights
        b = PlanBuilder(grid)
        for i, k in enumerate(orders):
            e0 = b.eval_at(i, kind)
            cx, (g,) = weights(grid, i, 1)
            euler = Combo(cx, ((e0, g),))
            if k == 1:
                b.end_step(euler, order=1)
                continue
            e1 = b.eval_at(i + 1, kind, euler)
            cx, (w0, w1) = weights(grid, i, 2)
            b.end_step(Combo(cx, ((e0, w0), (e1, w1))), order=2)
        return b.plan(self.name)


def flow_heun_weights(grid, i: int, k: int) -> tuple[float, list[float]]:
    """(c_x, weights of D_s (and D' at t)) of Heun's method on a rectified flow's ODE dx/dt = u = (x - D) / t
    (alpha = 1 - t, sigma = t), step h = t' - t: the Euler step x' = x + h (x - D_s) / t for k = 1, the
    trapezoid x_{t'} = x + h/2 ((x - D_s) / t + (x' - D') / t') for k = 2 (Heun 1900; diffusers'
    FlowMatchHeunDiscreteScheduler).  t is the flow time, sigma."""
    t, t1 = float(grid.sigma[i]), float(grid.sigma[i + 1])
    h = t1 - t
    cx1, w = 1.0 + h / t, -h / t  # Euler: x' = cx1 x + w D_s
    if k == 1:
        return cx1, [w]
    q = 0.5 * h / t1  # x_{t'} = x + h/2 (x - D_s)/t + q (x' - D')
    return 1.0 + 0.5 * h / t + q * cx1, [-0.5 * h / t + q * w, -q]
