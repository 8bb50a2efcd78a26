"""DEIS exponential integrators (Zhang & Chen 2023, arXiv:2204.13902) and PLMS / iPNDM.

All integrate the PF-ODE in v = x / alpha, rho = sigma / alpha, where it reads dv/drho = eps:

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + sum_j C_ij eps_{i-j},
    C_ij = alpha_{i+1} * int_{rho_i}^{rho_{i+1}} l_j(u(rho)) d rho,

with l_j the Lagrange basis through the last r + 1 points in a variable u:
  * u = t       tAB-DEIS (the paper's eq. 15: Psi = sqrt(abar_{i+1}/abar_i), same C_ij after the
                change of variable d rho = -(1/2) dlog abar / sqrt(1 - abar) / alpha dt);
  * u = rho     rhoAB-DEIS (closed form: polynomial integrals);
  * u = log rho the variant of diffusers' DEISMultistepScheduler (closed form: int p(u) e^u du).
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from .registry import MultistepSolver, register

__all__ = ["DEIS", "PNDM", "lagrange_basis", "deis_weights", "plms_weights", "transfer", "AB_WEIGHTS", "BASES"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(48)


BASES = ("t", "rho", "logrho")


def lagrange_basis(nodes: np.ndarray, j: int) -> np.ndarray:
    """Coefficients (low to high) of the Lagrange basis polynomial l_j through `nodes`
    (l_j(nodes[m]) = [j == m])."""
    others = np.delete(nodes, j)
    return P.polyfromroots(others) / np.prod(nodes[j] - others)


def _int_poly_exp(p: np.ndarray, u0: float, u1: float) -> float:
    """int_{u0}^{u1} p(u) e^u du  via the antiderivative e^u sum_k (-1)^k p^(k)(u); u0 may be -inf."""

    def F(u):
        if u == -np.inf:
            return 0.0
        tot, d, sign = 0.0, p, 1.0
        for _ in range(len(p)):  # p has degree len(p) - 1: that many derivatives are nonzero
            tot += sign * P.polyval(u, d)
            d, sign = P.polyder(d), -sign
        return np.exp(u) * tot

    return F(u1) - F(u0)


def _basis_integrals(grid, i: int, k: int, basis: str) -> np.ndarray:
    """int_{rho_i}^{rho_{i+1}} l_j(u(rho)) d rho for j = 0..k-1 (nodes at grid points i, i-1, ...)."""
    rho = grid.rho.numpy()
    r0, r1 = float(rho[i]), float(rho[i + 1])
    idx = [i - j for j in range(k)]
    if basis == "rho":
        nodes = rho[idx]
        return np.array([np.diff(P.polyval([r0, r1], P.polyint(lagrange_basis(nodes, j))))[0] for j in range(k)])
    if basis == "logrho":
        nodes = np.log(rho[idx])
        u1 = -np.inf if r1 == 0.0 else np.log(r1)
        return np.array([_int_poly_exp(lagrange_basis(nodes, j), np.log(r0), u1) for j in range(k)])
    # basis in t: Gauss-Legendre in rho (the integrand l_j(t(rho)) is smooth)
    nodes = grid.t.numpy()[idx]
    mid, half = 0.5 * (r0 + r1), 0.5 * (r1 - r0)
    rq = mid + half * _GL_NODES
    tq = grid.schedule.t_from_lambda(-np.log(rq)).numpy()
    return np.array([half * np.dot(_GL_WEIGHTS, P.polyval(tq, lagrange_basis(nodes, j))) for j in range(k)])


def deis_weights(grid, i: int, k: int, basis: str = "t") -> tuple[float, list[float]]:
    """(c_x, [C_i0, ..., C_i,k-1]) with x_{i+1} = c_x x_i + sum_j C_ij eps_{i-j}: DEIS with a Lagrange
    basis in t, rho or log rho through grid points i, i-1, ... (Zhang & Chen 2023, eq. 15; module docstring)."""
    a_s, a_t = float(grid.alpha[i]), float(grid.alpha[i + 1])
    return a_t / a_s, [a_t * float(c) for c in _basis_integrals(grid, i, k, basis)]


class DEIS(MultistepSolver):
    """Multistep DEIS with a Lagrange basis in `basis` ("t" = tAB, "rho" = rhoAB, "logrho")."""

    name = "deis"
    max_order = 4
    first_order_to_zero = False  # rho stays finite at sigma = 0 (set per basis below)
    kind = "noise"

    def __init__(self, order: int = 3, basis: str = "t", lower_order_final: bool = True,
                 momentum: float | None = None):
        if basis not in BASES:
            raise ValueError(f"basis must be 't', 'rho' or 'logrho', got {basis!r}")
        self.basis = basis
        self.first_order_to_zero = basis == "logrho"  # log(rho) -> -inf: diffusers never goes there
        super().__init__(order=order, lower_order_final=lower_order_final, momentum=momentum)

    def coefficients(self, grid, i, k):
        return (*deis_weights(grid, i, k, self.basis), 0.0)


for _k in (1, 2, 3):
    register(f"deis_{_k}", DEIS, order=_k, basis="t")
    register(f"deis_rho_{_k}", DEIS, order=_k, basis="rho")
    register(f"deis_logrho_{_k}", DEIS, order=_k, basis="logrho")

#: Adams-Bashforth weights for equal steps, newest first (iPNDM warm-up: Zhang & Chen 2023, App. B)
AB_WEIGHTS = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def transfer(a_s: float, r_s: float, a_t: float, r_t: float) -> tuple[float, float]:
    """(c_x, c_eps) of PNDM's transfer phi (Liu et al. 2022, eq. 11), the DDIM step with a noise
    estimate: x_t = alpha_t (v_s + (rho_t - rho_s) eps) = (alpha_t / alpha_s) x_s + alpha_t (rho_t - rho_s) eps.
    From alpha_s = 0 (pure noise, x_s = sigma_s eps) the step's x0 estimate (x_s - sigma_s eps) / alpha_s is 0 / 0;
    it is taken as 0, x_t = sigma_t eps (diffusers' IPNDMScheduler: (x - sigma eps) / max(alpha, 1e-8) = 0 there)."""
    if a_s == 0.0:
        return 0.0, a_t * r_t
    return a_t / a_s, a_t * (r_t - r_s)


def plms_weights(grid, i: int, k: int) -> tuple[float, list[float]]:
    """(c_x, [c_0, ..., c_{k-1}]) with x_{i+1} = c_x x_i + sum_j c_j eps_{i-j}: PLMS (Liu et al. 2022,
    Sec. 4.2), x_{i+1} = alpha_{i+1} (v_i + (rho_{i+1} - rho_i) sum_j w_j eps_{i-j}), w = AB_WEIGHTS[k]."""
    c_x, c_e = transfer(float(grid.alpha[i]), float(grid.rho[i]), float(grid.alpha[i + 1]), float(grid.rho[i + 1]))
    return c_x, [c_e * w for w in AB_WEIGHTS[k]]


@register("pndm")
class PNDM(MultistepSolver):
    """Pseudo linear multistep (PLMS, Liu et al. 2022) with lower-order Adams-Bashforth warm-up
    (iPNDM): eps' = sum_j w_j eps_{i-j}, then the DDIM transfer x_{i+1} = alpha_{i+1}(v_i + (rho_{i+1} - rho_i) eps').
    The weights assume equal steps, so on a non-uniform rho grid the method is second order at
    best (the variable-step error of AB-k is O(h^2 (h_i/h_{i-1} - 1)) per step).

    `first_order_to_zero`: the step onto sigma = 0 is an Euler step (x_0 = D, the "denoising step"
    of the iPNDM of Zhou et al.'s diff-solvers as ComfyUI's `sample_ipndm` runs it: registered
    `ipndm`); False keeps the AB-k weights on it (diffusers' IPNDMScheduler / PNDM's PLMS: `pndm`)."""

    name = "pndm"
    max_order = 4
    first_order_to_zero = False
    kind = "noise"

    def __init__(self, order: int = 4, lower_order_final: bool = False, momentum: float | None = None,
                 first_order_to_zero: bool = False):
        super().__init__(order=order, lower_order_final=lower_order_final, momentum=momentum)
        self.first_order_to_zero = bool(first_order_to_zero)

    def coefficients(self, grid, i, k):
        return (*plms_weights(grid, i, k), 0.0)


register("pndm_hb", PNDM, momentum=0.8)
#: iPNDM (Zhang & Chen 2023, App. B; Zhou et al. diff-solvers, ComfyUI's `sample_ipndm`): AB-4 in rho with
#: the lower-order warm-up and an Euler (x_0 = D) step onto sigma = 0.  `max_order` is `order`.
register("ipndm", PNDM, first_order_to_zero=True)
