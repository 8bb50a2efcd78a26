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

__all__ = ["DDIM", "Heun"]


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
    """Karras et al. 2022, Alg. 1: Heun's method on dv/drho = eps(x, t); two model calls per step,
    an Euler step onto sigma = 0 (and one Euler step first when the budget is even)."""

    name = "heun"
    order = 2
    kind = "noise"

    def build(self, grid, nfe=None):
        orders = self.step_orders(grid, nfe)
        b = PlanBuilder(grid)
        rho = grid.rho
        for i, k in enumerate(orders):
            a_s, a_t = float(grid.alpha[i]), float(grid.alpha[i + 1])
            dr = float(rho[i + 1] - rho[i])
            e0 = b.eval_at(i, "noise")
            euler = Combo(a_t / a_s, ((e0, a_t * dr),))  # x' = alpha_t (v_s + (rho_t - rho_s) eps_s)
            if k == 1:
                b.end_step(euler, order=1)
                continue
            e1 = b.eval_at(i + 1, "noise", euler)
            b.end_step(Combo(a_t / a_s, ((e0, 0.5 * a_t * dr), (e1, 0.5 * a_t * dr))), order=2)
        return b.plan(self.name)
