"""Heavy-ball momentum and Generalized Heavy Ball (GHVB) (Wizadwongsa et al. 2023,
"Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", arXiv:2307.11118).

Both damp the update direction of a multistep solver with a velocity V, which enlarges the
stability region at large guidance scales and low NFE.  In a Plan, V is a linear combination
of earlier model outputs, so the engine runs them unchanged.
"""

from __future__ import annotations

import math

from .plan import Combo, PlanBuilder
from .registry import MultistepSolver, get, heavy_ball, register

__all__ = ["heavy_ball", "GHVB", "ghvb_weights", "ghvb_step", "GHVB_MAX_ORDER"]

GHVB_MAX_ORDER = 4


def ghvb_weights(k: int, beta: float) -> list[float]:
    """c_j(beta) of GHVB of integer part k (paper, Table/eq. for GHVB 1-4), newest first; at
    beta = 1 they are the Adams-Bashforth weights."""
    b = beta
    return {
        1: [b],
        2: [(2 + b) / 2, -(2 - b) / 2],
        3: [(18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12],
        4: [(46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24],
    }[k]


def ghvb_step(velocities: list[dict], m: int, beta: float, k: int) -> tuple[dict, list[dict]]:
    """One GHVB step on coefficient maps {output: coefficient}: V_n = (1 - beta) V_{n-1} + beta M_n
    (V_0 = M_0; the heavy-ball recursion with P = M) and P_n = (1/beta) sum_{j<k} c_j(beta) V_{n-j}.
    `velocities` are V_{n-1}, V_{n-2}, ... (newest first); returns P_n and V_n, V_{n-1}, ..."""
    _, v = heavy_ball({m: 1.0}, velocities[0] if velocities else None, beta, 1.0)
    velocities = [v] + velocities[:GHVB_MAX_ORDER - 1]
    p: dict = {}
    for c, vj in zip(ghvb_weights(k, beta), velocities[:k]):
        for q, cq in vj.items():
            p[q] = p.get(q, 0.0) + c / beta * cq
    return p, velocities


@register("ghvb")
class GHVB(MultistepSolver):
    """GHVB of fractional order o = k - 1 + beta (k = ceil(o); integer o means beta = 1, which is
    PLMS-k).  V_n = (1 - beta) V_{n-1} + beta M_n (V_0 = M_0), P_n = (1/beta) sum_j c_j(beta) V_{n-j},
    and the first-order transfer of `base` (default "pndm": x_{n+1} = alpha_{n+1}(v_n + Delta rho P_n)
    with M = eps; "ddim" uses the data prediction) carries x_n with P_n.  Warm-up uses k_n = min(k, n + 1)."""

    name = "ghvb"
    max_order = GHVB_MAX_ORDER
    first_order_to_zero = False

    def __init__(self, order: float = 2.5, beta: float | None = None, base: str = "pndm",
                 lower_order_final: bool = False):
        if beta is None:
            k = math.ceil(order)
            beta = order - (k - 1) if order != k else 1.0
        else:
            if order != int(order):
                raise ValueError(f"give a fractional order or an integer order with beta, got order={order}, beta={beta}")
            k = int(order)
        if not 1 <= k <= GHVB_MAX_ORDER or not 0 < beta <= 1:
            raise ValueError(f"GHVB order must be in (0, 4] (k = ceil(order) in 1..4, beta in (0, 1]), got order={order}, beta={beta}")
        super().__init__(order=k, lower_order_final=lower_order_final)
        self.beta, self.fractional_order = float(beta), k - 1 + float(beta)
        self.base = get(base)
        if not isinstance(self.base, MultistepSolver):
            raise ValueError(f"GHVB base must be a multistep solver, got {base!r}")
        self.kind = self.base.kind
        self.first_order_to_zero = self.base.first_order_to_zero

    def build(self, grid, nfe=None):
        if nfe is not None and nfe != grid.steps:
            raise ValueError(f"'ghvb' spends one model call per step: nfe={nfe} needs {nfe} steps, grid has {grid.steps}")
        b = PlanBuilder(grid)
        vs: list[dict] = []  # V_n as coefficient maps, newest first
        for i, k in enumerate(self.step_orders(grid)):
            p, vs = ghvb_step(vs, b.eval_at(i, self.kind), self.beta, k)
            cx, (g,), cz = self.base.coefficients(grid, i, 1)
            b.end_step(Combo(cx, tuple((j, g * w) for j, w in p.items())), cz, k)
        return b.plan(self.name, beta=self.beta, fractional_order=self.fractional_order)

