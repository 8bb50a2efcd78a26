"""PNDM as diffusers' PNDMScheduler runs it: PLMS with its warm-up (Liu et al. 2022, Sec. 4.2, Alg. 2).

Every update is PNDM's transfer phi (Liu et al. 2022, eq. 11), the DDIM step with a noise estimate
eps': x_t = (alpha_t / alpha_s) x_s + alpha_t (rho_t - rho_s) eps' (`deis.transfer`).  With n grid
points t_0 > ... > t_{n-1}:

* warm-up `prk=False` (diffusers' skip_prk_steps=True): step 0 is a trapezoid (Heun) step onto t_1, two
  model calls, eps_0 at (x_0, t_0) and eps_0' at (phi(x_0, eps_0), t_1), eps' = (eps_0 + eps_0') / 2;
  steps 1, 2, 3 use Adams-Bashforth 2, 3, 4 over the first calls of the steps so far, later steps
  AB-4 (eps_0' is not in the history); n + 1 model calls (one for n = 1; a budget of two calls is
  spent as Euler then AB-2, no warm-up).
* warm-up `prk=True` (skip_prk_steps=False): steps 0-2 are classical Runge-Kutta-4 steps of phi
  (Alg. 2's pseudo Runge-Kutta: stages at t_i, twice at the midpoint, at t_{i+1}; weights
  1/6, 1/3, 1/3, 1/6), then AB-4 from step 3; n + 9 model calls.

`diffusers_stride=True` reproduces diffusers' times: a PLMS step goes from t_i to t_i - T // n (T
num_train_timesteps; below 0 to the final alpha_bar, `set_alpha_to_one`), the Heun warm-up's Euler
point is at t_0 - T // n and its trapezoid step is phi from t_1 + T // n to t_1 (diffusers' counter-1
branch; both are t_0 on the leading grid), and a PRK step's midpoint stages are at t_i - T // n // 2 (first stage's end) and
t_{i+1} + T // n // 2 (second and third calls), as PNDMScheduler lays them.  Without it every step
ends at t_{i+1} and the midpoint is (t_i + t_{i+1}) / 2.
"""

from __future__ import annotations

import numpy as np
import torch

from .ddim import stride_targets
from .deis import AB_WEIGHTS, transfer
from .plan import Combo, PlanBuilder
from .registry import Solver, register

__all__ = ["PLMS", "PRK_STEPS"]

#: PRK warm-up steps (diffusers' pndm_order - 1) and their model calls
PRK_STEPS, PRK_CALLS = 3, 4


@register("plms")
class PLMS(Solver):
    name = "plms"
    order = 4
    kind = "noise"
    timesteps_int64 = True  # every call is at a grid time or a diffusers half point: integer on its grids

    def __init__(self, prk: bool = False, diffusers_stride: bool = False, set_alpha_to_one: bool = True):
        if not set_alpha_to_one and not diffusers_stride:
            raise ValueError("set_alpha_to_one=False applies with diffusers_stride=True only; otherwise the grid's "
                             "end decides (final='last' ends at alpha_bar_0)")
        self.prk, self.diffusers_stride, self.set_alpha_to_one = bool(prk), bool(diffusers_stride), bool(set_alpha_to_one)
        self.min_nfe = PRK_CALLS * PRK_STEPS + 1 if self.prk else 1

    def _calls(self, steps: int, warm: bool = True) -> int:
        """Model calls on `steps` steps (`warm`: with the Heun warm-up where there are two steps or more)."""
        if self.prk:
            return steps + (PRK_CALLS - 1) * PRK_STEPS
        return steps + 1 if warm and steps > 1 else steps

    def steps_for_nfe(self, nfe: int, final_zero: bool = True) -> int:
        """prk: nfe - 9 steps; else nfe - 1 (the Heun warm-up's extra call), except nfe = 1 (one Euler
        step, diffusers' n = 1) and nfe = 2 (two steps, Euler then AB-2: no call left for the warm-up)."""
        self.check_nfe(nfe)
        if self.prk:
            return nfe - (PRK_CALLS - 1) * PRK_STEPS
        return nfe if nfe <= 2 else nfe - 1

    # -- times ------------------------------------------------------------------------------------
    def _point(self, grid, t: float) -> tuple:
        """(t, alpha, sigma) of schedule time t."""
        tt = torch.tensor([t], dtype=torch.float64)
        sch = grid.schedule
        return t, float(sch.alpha(tt)[0]), float(sch.sigma(tt)[0])

    def _grid_point(self, grid, i: int) -> tuple:
        return float(grid.t[i]), float(grid.alpha[i]), float(grid.sigma[i])

    def _ends(self, grid) -> list[tuple]:
        """(t, alpha, sigma) each step ends at (a PRK step always at t_{i+1})."""
        if self.diffusers_stride:
            ends = [(t, a, s) for t, a, s, _ in stride_targets(grid, self.set_alpha_to_one)]
        else:
            ends = [self._grid_point(grid, i + 1) for i in range(grid.steps)]
        if self.prk:
            ends[:PRK_STEPS] = [self._grid_point(grid, i + 1) for i in range(PRK_STEPS)]
        return ends

    def _half_points(self, grid, i: int) -> tuple[tuple, tuple]:
        """(end of the first stage, time of the second and third calls) of PRK step i."""
        if self.diffusers_stride:
            half = grid.schedule.num_train_timesteps // grid.steps // 2
            return (self._point(grid, float(grid.t[i]) - half), self._point(grid, float(grid.t[i + 1]) + half))
        mid = self._point(grid, 0.5 * float(grid.t[i] + grid.t[i + 1]))
        return mid, mid

    # -- the plan ---------------------------------------------------------------------------------
    def build(self, grid, nfe=None):
        n = grid.steps
        if self.prk and n <= PRK_STEPS:
            raise ValueError(f"plms with prk needs more than {PRK_STEPS} steps (its Runge-Kutta warm-up), got {n}")
        warm = not (nfe == 2 == n and not self.prk)  # two calls on two steps: no Heun warm-up
        if nfe is not None and nfe != self._calls(n, warm):
            raise ValueError(f"{self.name!r}: a grid of {n} steps costs {self._calls(n)} model calls, nfe={nfe}")
        if self.diffusers_stride and grid.schedule is None:
            raise ValueError("diffusers_stride needs the grid's schedule")
        ends = self._ends(grid)
        b = PlanBuilder(grid)
        history: list[int] = []  # first call of each step, newest first (diffusers' ets)
        for i in range(n):
            a_s, r_s = float(grid.alpha[i]), float(grid.rho[i])
            phi = (lambda end: transfer(a_s, r_s, end[1], end[2] / end[1]))
            e0 = b.eval_at(i, "noise")
            history.insert(0, e0)
            if self.prk and i < PRK_STEPS:  # classical RK4 on phi (Alg. 2)
                h_a, h_b = self._half_points(grid, i)
                end = ends[i]
                cx, ce = phi(h_a)
                e1 = b.eval(*h_b, "noise", Combo(cx, ((e0, ce),)))
                cx, ce = phi(h_b)
                e2 = b.eval(*h_b, "noise", Combo(cx, ((e1, ce),)))
                cx, ce = phi(end)
                e3 = b.eval(*end, "noise", Combo(cx, ((e2, ce),)))
                w = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
                b.end_step(Combo(cx, tuple((e, ce * wk) for e, wk in zip((e0, e1, e2, e3), w))), order=4)
                continue
            cx, ce = phi(ends[i])
            if i == 0 and not self.prk and n > 1 and warm:  # Heun warm-up: the second call at t_1 on the Euler point
                e1 = b.eval_at(1, "noise", Combo(cx, ((e0, ce),)))
                end = self._grid_point(grid, 1)
                if self.diffusers_stride:  # diffusers' trapezoid goes from t_1 + T // n (not t_0) to t_1
                    src = self._point(grid, end[0] + grid.schedule.num_train_timesteps // n)
                    cx, ce = transfer(src[1], src[2] / src[1], end[1], end[2] / end[1])
                b.end_step(Combo(cx, ((e0, 0.5 * ce), (e1, 0.5 * ce))), order=2)
                ends[0] = end
                continue
            k = min(len(history), 4)
            b.end_step(Combo(cx, tuple((e, ce * w) for e, w in zip(history[:k], AB_WEIGHTS[k]))), order=k)
            del history[4:]
        return b.plan(self.name, ends=[e[0] for e in ends])
