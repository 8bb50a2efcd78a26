"""First-order baselines and Karras' Heun.

DDIM (Song et al. 2021, eq. 12), written with the data prediction D and the DDPM posterior noise
sigma_eta = eta sigma_t sqrt(1 - e^{-2h}) (equal to DDIM's eta formula for VP, to k-diffusion's
ancestral sigma_up for VE).  `euler` is Karras et al.'s Euler step on dv/drho = eps in
v = x/alpha, rho = sigma/alpha, which is algebraically DDIM with eta = 0.
"""

from __future__ import annotations

import math

from .plan import Combo
from .plan import PlanBuilder
from .registry import MultistepSolver, SinglestepSolver, register

__all__ = ["DDIM", "Heun", "heun_weights"]


def heun_weights(grid, i: int, k: int) -> tuple[float, list[float]]:
    """(c_x, weights of eps_s (and eps' at t)) of Karras et al. 2022, Alg. 1 in v = x / alpha,
    rho = sigma / alpha: the Euler step x' = alpha_t (v_s + (rho_t - rho_s) eps_s) for k = 1, the
    trapezoid x_t = alpha_t (v_s + (rho_t - rho_s) (eps_s + eps(x', t)) / 2) for k = 2."""
    a_s, a_t = float(grid.alpha[i]), float(grid.alpha[i + 1])
    dr = float(grid.rho[i + 1] - grid.rho[i])
    return a_t / a_s, [a_t * dr] if k == 1 else [0.5 * a_t * dr, 0.5 * a_t * dr]


@register("ddim")
@register("euler")
class DDIM(MultistepSolver):
    name = "ddim"
    max_order = 1
    kind = "data"

    def __init__(self, eta: float = 0.0):
        super().__init__(order=1)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def coefficients(self, grid, i, k):
        a_s, s_s, l_s = float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i])
        a_t, s_t, l_t = float(grid.alpha[i + 1]), float(grid.sigma[i + 1]), float(grid.lam[i + 1])
        c_z = 0.0 if s_t == 0.0 else self.eta * s_t * math.sqrt(-math.expm1(-2.0 * (l_t - l_s)))
        if c_z > s_t:
            raise ValueError(f"ddim: eta={self.eta} gives noise std {c_z:g} above sigma_t={s_t:g} at step {i}")
        c_x = math.sqrt(max(s_t * s_t - c_z * c_z, 0.0)) / s_s  # x_t = alpha_t D + sqrt(sigma_t^2 - c_z^2) eps + c_z z
        return c_x, [a_t - a_s * c_x], c_z


@register("heun")
class Heun(SinglestepSolver):
    """Karras et al. 2022, Alg. 1: Heun's method on dv/drho = eps(x, t) (`heun_weights`); two model
    calls per step, Euler steps where `SinglestepSolver` spends a first-order step."""

    name = "heun"
    order = 2
    kind = "noise"

    def build(self, grid, nfe=None):
        orders = self.step_orders(grid, nfe)
        b = PlanBuilder(grid)
        for i, k in enumerate(orders):
            e0 = b.eval_at(i, "noise")
            cx, (g,) = heun_weights(grid, i, 1)
            euler = Combo(cx, ((e0, g),))
            if k == 1:
                b.end_step(euler, order=1)
                continue
            e1 = b.eval_at(i + 1, "noise", euler)
            cx, (w0, w1) = heun_weights(grid, i, 2)
            b.end_step(Combo(cx, ((e0, w0), (e1, w1))), order=2)
        return b.plan(self.name)
