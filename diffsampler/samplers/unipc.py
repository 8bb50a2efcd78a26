"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the unified predictor UniP and corrector UniC, data
prediction, B(h) = h ("bh1") or e^h - 1 ("bh2"); diffusers' UniPCMultistepScheduler with predict_x0=True.

Notation of the paper (Alg. 1-3, data prediction, hh = -h with h = lambda_t - lambda_s): r_k =
(lambda_{s-k} - lambda_s) / h, D1_k = (M_{s-k} - M_s) / r_k, phi_n the exponential-integrator phi
functions (dpm_solver.phi) and b_n = n! hh phi_{n+1}(hh) / B(h).  A step of order p from s to t is

    UniP-p:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) M_s - alpha_t B(h) sum_{k<p} a_k D1_k,
    UniC-p:  x_t^c = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) M_s
                     - alpha_t B(h) [sum_{k<p} c_k D1_k + c_p (M_t - M_s)],

with a = 1/2 at p = 2 and the solution of sum_k a_k r_k^{n-1} = b_n (n < p) at p = 3; c = 1/2 at p = 1
and the solution of sum_k c_k r_k^{n-1} = b_n (n <= p, r_p = 1) otherwise (diffusers' simplified
low orders).  Where the system is solved B(h) cancels (b ~ 1 / B(h)): bh1 and bh2 differ only by the
fixed 1/2 of UniP-2 and UniC-1.  M_t is the model output at the predicted x_t, so the corrector costs no call: on the
engine the state x_i is the predicted point the model sees, and the corrected x_i^c = x_i + Delta_i
(Delta_i = UniC - UniP, a combination of outputs only: both start from the same x_s with the same
factor) enters the next step's update, x_{i+1} = (sigma_{i+1} / sigma_i) (x_i + Delta_i) + UniP terms.
The last step has no corrector after it (no model call follows).

`samplers/usf.py`'s ``unipc`` estimator is UniPC-bh2 (exact Taylor weights, which solve bh2's system):
bh2's weights are computed there, bh1's by the system here (`unipc_weights`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .dpm_solver import phi
from .plan import Combo, PlanBuilder
from .registry import MultistepSolver, register

__all__ = ["UniPC", "unipc_weights", "bh_system_weights", "VARIANTS"]

#: diffusers' solver_type: B(h) = hh ("bh1") or e^hh - 1 ("bh2")
VARIANTS = ("bh1", "bh2")


def _bh(h: float, variant: str, n: int, kind: str = "data") -> tuple[float, float, list[float]]:
    """(e^hh - 1, B(h), [b_1 .. b_n]) with hh = -h (data prediction; hh = h for noise prediction),
    b_k = k! hh phi_{k+1}(hh) / B(h)."""
    hh = -h if kind == "data" else h
    B = hh if variant == "bh1" else math.expm1(hh)
    return math.expm1(hh), B, [math.factorial(k) * hh * phi(k + 1, hh) / B for k in range(1, n + 1)]


def unipc_weights(lams: Sequence[float], lam_t: float, alpha_t: float, variant: str = "bh2",
                  corrector: bool = False, kind: str = "data") -> list[float]:
    """Weights of the model outputs in one UniPC step from s (log-SNR lams[0]) to t, besides
    (sigma_t / sigma_s) x_s: UniP over [M_s, M_{s-1}, ...] (len(lams) = p outputs, newest first), or,
    with `corrector`, UniC-p over [M_t, M_s, M_{s-1}, ...] (see the module docstring).

    bh2's system has the exact lambda-Taylor weights as its solution (with h phi_1 / 2 at two points),
    which is USF's ``unipc`` estimator: bh2 is computed there (`usf.exp_weights`, one copy; the system
    gives the same weights, tests/test_parity_unipc.py), bh1 by the system (`bh_system_weights`).

    kind="noise" (UniPC with noise prediction, diffusers' predict_x0=False): the same step with the roles of
    alpha and sigma exchanged and hh = h: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) M_s - sigma_t B(h)
    sum a_k D1_k (M the noise prediction); pass sigma_t as `alpha_t`.  Its weights come from the system."""
    if variant not in VARIANTS:
        raise ValueError(f"solver_type must be one of {VARIANTS}, got {variant!r}")
    if kind == "noise":
        return bh_system_weights(lams, lam_t, alpha_t, variant, corrector, kind)
    if variant == "bh2":
        from .usf import exp_weights

        nodes = [lam_t, *lams] if corrector else list(lams)
        return [float(w) for w in exp_weights("data", nodes, lams[0], lam_t, 1.0, 1.0, alpha_t, 1.0, "unipc")[1]]
    return bh_system_weights(lams, lam_t, alpha_t, variant, corrector)


def bh_system_weights(lams: Sequence[float], lam_t: float, alpha_t: float, variant: str,
                      corrector: bool = False, kind: str = "data") -> list[float]:
    """`unipc_weights` from the B(h) linear system of Zhao et al. 2023 (Alg. 1-3; diffusers'
    multistep_uni_p_bh_update / multistep_uni_c_bh_update), for either variant and prediction kind
    (`alpha_t` is sigma_t for kind="noise")."""
    p = len(lams)
    h = lam_t - lams[0]
    e1, B, b = _bh(h, variant, p, kind)
    r = [(lams[k] - lams[0]) / h for k in range(1, p)]
    if corrector:
        if p == 1:
            c = np.array([0.5])
        else:
            R = np.array([[rk ** n for rk in (*r, 1.0)] for n in range(p)])
            c = np.linalg.solve(R, np.array(b))
        a, c_t = c[:-1], float(c[-1])
    else:
        c_t = None
        if p == 1:
            a = np.zeros(0)
        elif p == 2:
            a = np.array([0.5])
        else:
            R = np.array([[rk ** n for rk in r] for n in range(p - 1)])
            a = np.linalg.solve(R, np.array(b[:-1]))
    w = np.zeros(p)
    w[0] = -alpha_t * e1
    for k in range(1, p):  # - alpha_t B a_k (M_{s-k} - M_s) / r_k
        g = alpha_t * B * a[k - 1] / r[k - 1]
        w[k] -= g
        w[0] += g
    if c_t is None:
        return [float(v) for v in w]
    w[0] += alpha_t * B * c_t  # - alpha_t B c_p (M_t - M_s)
    return [float(-alpha_t * B * c_t), *(float(v) for v in w)]


@register("unipc")
class UniPC(MultistepSolver):
    """Multistep UniPC (Zhao et al. 2023), data prediction: UniP-p predictor (p = `order`, 1-3) and
    the UniC corrector of the same order on every step's result but the last (diffusers'
    UniPCMultistepScheduler, predict_x0=True).

    Options: `solver_type` "bh1" | "bh2" (B(h)); `corrector` False runs UniP only;
    `disable_corrector` step indices whose result is not corrected (diffusers' disable_corrector:
    index k skips the corrector applied when the model is called after step k); `lower_order_final`
    as diffusers' UniPC: the order of step i is at most steps - i on runs of any length.  A step onto
    sigma = 0 is first order (diffusers' higher-order step there divides by r_k = 0).  `prediction`
    "data" (UniPC's default) | "noise": the noise-prediction form (diffusers' predict_x0=False), whose
    first-order step onto sigma = 0 is its limit x_0 = (alpha_0 / alpha_s) (x_s - sigma_s M_s)."""

    name = "unipc"
    max_order = 3

    def __init__(self, order: int = 2, solver_type: str = "bh2", corrector: bool = True,
                 disable_corrector: Sequence[int] | None = None, lower_order_final: bool = True,
                 prediction: str = "data"):
        if solver_type not in VARIANTS:
            raise ValueError(f"solver_type must be one of {VARIANTS}, got {solver_type!r}")
        if prediction not in ("data", "noise"):
            raise ValueError(f"prediction must be 'data' or 'noise', got {prediction!r}")
        self.kind = prediction
        super().__init__(order=order, lower_order_final=lower_order_final)
        dis = () if disable_corrector is None else disable_corrector
        if isinstance(dis, (str, bytes)) or not hasattr(dis, "__iter__"):
            raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
        dis = list(dis)
        if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0 for k in dis):
            raise ValueError(f"disable_corrector must be a list of step indices >= 0, got {disable_corrector!r}")
        self.solver_type, self.corrector = solver_type, bool(corrector)
        self.disable_corrector = frozenset(int(k) for k in dis)

    def step_orders(self, grid):
        n = grid.steps
        orders = []
        for i in range(n):
            k = min(self.order, i + 1)
            if self.lower_order_final:  # diffusers' UniPC lowers at any run length (unlike DPM-Solver)
                k = min(k, n - i)
            if i == n - 1 and grid.final_zero:
                k = 1
            orders.append(k)
        return orders

    def build(self, grid, nfe=None):
        if nfe is not None and nfe != grid.steps:
            raise ValueError(f"{self.name!r} spends one model call per step: nfe={nfe} needs {nfe} steps, "
                             f"grid has {grid.steps}")
        lam, alpha, sigma = (grid.lam.tolist(), grid.alpha.tolist(), grid.sigma.tolist())
        kind = self.kind
        # data: x_t = (sigma_t / sigma_s) x_s - alpha_t (...); noise: alpha and sigma exchanged
        keep, coef = (sigma, alpha) if kind == "data" else (alpha, sigma)
        orders = self.step_orders(grid)
        b = PlanBuilder(grid)
        hist: list[int] = []  # output indices, newest first
        for i, p in enumerate(orders):
            hist.insert(0, b.eval_at(i, kind))
            terms: dict[int, float] = {}
            c_x = keep[i + 1] / keep[i]
            q = orders[i - 1] if i else 0
            if q and self.corrector and (i - 1) not in self.disable_corrector and c_x != 0.0:
                # x_i^c - x_i = UniC - UniP of step i - 1 (order q), over M_i, M_{i-1}, ..., M_{i-q}
                lams = [lam[i - 1 - k] for k in range(q)]
                wc = unipc_weights(lams, lam[i], coef[i], self.solver_type, corrector=True, kind=kind)
                wp = [0.0, *unipc_weights(lams, lam[i], coef[i], self.solver_type, kind=kind)]
                for m, u, v in zip(hist, wc, wp):
                    terms[m] = terms.get(m, 0.0) + c_x * (u - v)
            if sigma[i + 1] == 0.0 and kind == "data":  # onto sigma = 0: x_0 = alpha_t M_i
                c_x, w = 0.0, [alpha[i + 1]]
            elif sigma[i + 1] == 0.0:  # the noise form's limit: x_0 = (alpha_t / alpha_s) (x_s - sigma_s M_s)
                w = [-alpha[i + 1] * sigma[i] / alpha[i]]
            else:
                w = unipc_weights([lam[i - k] for k in range(p)], lam[i + 1], coef[i + 1], self.solver_type, kind=kind)
            for m, v in zip(hist, w):
                terms[m] = terms.get(m, 0.0) + v
            b.end_step(Combo(c_x, tuple(terms.items())), 0.0, p)
            del hist[self.order + 1:]
        return b.plan(self.name)
