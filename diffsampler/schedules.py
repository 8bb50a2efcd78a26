"""Noise schedules x_t = alpha_t x_0 + sigma_t eps, and the time grids solvers step along.

Every schedule exposes alpha(t), sigma(t), lambda(t) = log(alpha_t / sigma_t) and the inverse
t(lambda) (Lu et al. 2022, DPM-Solver, Sec. 3.1).  All schedule arithmetic is float64; only the
network ever sees low precision.  Time runs from noise (t_max) to data (t_min).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import grids
from .grids import AYS_SPACINGS, NAMED_SPACINGS

__all__ = [
    "NoiseSchedule",
    "schedule_differences",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "TrigVP",
    "EDMPrecond",
    "edm_sigmas",
    "ipndm_times",
    "EDM",
    "RectifiedFlow",
    "TimeGrid",
    "time_grid",
    "SPACINGS",
    "DIFFUSERS_SIGMA_SPACINGS",
    "DIFFUSERS_TIMESTEP_SPACINGS",
    "diffusers_sigmas",
    "diffusers_sigma_to_t",
    "diffusers_k_grid",
    "K_CLASSES",
]

# lambda below this is treated as "pure noise" (alpha ~ 1e-13); keeps h finite for alpha = 0 schedules.
LAMBDA_FLOOR = -30.0


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule(ABC):
    """A forward process x_t = alpha_t x0 + sigma_t eps on t in [t_min, t_max]."""

    t_min: float
    t_max: float
    #: multiplies t to give the network's time input (e.g. 1000 for flow transformers)
    time_scale: float = 1.0

    @abstractmethod
    def log_alpha(self, t) -> torch.Tensor: ...

    @abstractmethod
    def log_sigma(self, t) -> torch.Tensor: ...

    @abstractmethod
    def t_from_lambda(self, lam) -> torch.Tensor:
        """Inverse of lambda(t)."""

    def alpha(self, t) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t) -> torch.Tensor:
        return self.log_sigma(t).exp()

    def lambda_(self, t) -> torch.Tensor:
        return self.log_alpha(t) - self.log_sigma(t)

    def rho(self, t) -> torch.Tensor:
        """rho = sigma / alpha = exp(-lambda): the noise level of v = x / alpha (EDM's sigma)."""
        return (-self.lambda_(t)).exp()

    def model_time(self, t) -> torch.Tensor:
        """What the network is given as its time input."""
        return _f64(t) * self.time_scale

    #: VE schedules start from N(0, sigma_max^2); the others from N(0, 1)
    is_variance_exploding: bool = False

    @property
    def prior_std(self) -> float:
        """Std of the initial noise x_T."""
        return float(self.sigma(self.t_max)) if self.is_variance_exploding else 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


class _VP(NoiseSchedule):
    """Variance preserving: alpha^2 + sigma^2 = 1, so everything follows from log alpha."""

    def log_sigma(self, t) -> torch.Tensor:
        la = self.log_alpha(t)
        return 0.5 * torch.log(-torch.expm1(2.0 * la))

    @staticmethod
    def _log_alpha_from_lambda(lam: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -1/2 log(1 + e^{-2 lambda})
        return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class DiscreteVP(_VP):
    """The discrete-time VP schedule of a diffusers model, made continuous (DPM-Solver, App. D).

    t is measured in training timesteps, t in [0, N-1], exactly the `timestep` a diffusers UNet
    takes.  lambda is interpolated linearly in t between the N knots, so t(lambda) is the exact
    inverse.  A zero-terminal-SNR schedule (alpha_bar_N = 0) has its last value floored at
    alpha_bar = 2^-24 as in diffusers' DPMSolverMultistep / UniPC / Euler (at half the value before it where
    that one is below 2^-24, so the table stays decreasing), so the first step starts from (almost) pure noise.
    """

    def __init__(self, alphas_cumprod):
        acp = _f64(np.array(alphas_cumprod, dtype=np.float64))
        if acp.ndim != 1 or len(acp) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D sequence of >= 2 values, got shape {tuple(acp.shape)}")
        if not bool((acp[1:] < acp[:-1]).all()) or not bool((acp <= 1).all()) or not bool((acp[:-1] > 0).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing, <= 1, and > 0 except possibly the last")
        if acp[-1] <= 0:  # zero terminal SNR: lambda = -inf; floor as diffusers' DPM-Solver, UniPC, Euler do (2^-24)
            acp[-1] = 2.0**-24 if float(acp[-2]) > 2.0**-24 else 0.5 * float(acp[-2])  # (kept decreasing)
        self.alphas_cumprod = acp
        self._lam = 0.5 * (acp.log() - torch.log1p(-acp))
        self._knots = torch.arange(len(acp), dtype=torch.float64)
        self.t_min, self.t_max = 0.0, float(len(acp) - 1)

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        return cls(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))

    @classmethod
    def from_diffusers_config(cls, config) -> "DiscreteVP":
        """Build from any diffusers scheduler config (linear, scaled_linear, squaredcos_cap_v2,
        trained_betas, rescale_betas_zero_snr) using diffusers' own beta code."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
        try:
            ref = DDPMScheduler(**kwargs)
        except NotImplementedError as e:
            raise ValueError(f"scheduler config maps to no noise schedule: {e}; beta_schedule must be one of "
                             "'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas") from None
        return cls(ref.alphas_cumprod.double().numpy())

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVP":
        return cls.from_betas(np.linspace(beta_start, beta_end, n, dtype=np.float64))

    def lambda_(self, t) -> torch.Tensor:
        t = _f64(t)
        return _interp(t, self._knots, self._lam)

    def log_alpha(self, t) -> torch.Tensor:
        return self._log_alpha_from_lambda(self.lambda_(t))

    def log_sigma(self, t) -> torch.Tensor:
        return self._log_alpha_from_lambda(-self.lambda_(t))

    def t_from_lambda(self, lam) -> torch.Tensor:
        lam = _f64(lam)
        return _interp(-lam, -self._lam, self._knots)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with linear extrapolation (xp increasing)."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


class LinearVP(_VP):
    """Continuous VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0) (Song et al. 2021)."""

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_0, self.beta_1, self.t_min, self.t_max = beta_0, beta_1, t_min, t_max

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_from_lambda(self, lam) -> torch.Tensor:
        # solve 1/4 (b1-b0) t^2 + 1/2 b0 t = -log alpha(lambda)  (DPM-Solver, App. A)
        lam = _f64(lam)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / ((self.beta_0**2 + tmp).sqrt() + self.beta_0) / (self.beta_1 - self.beta_0)


class CosineVP(_VP):
    """Cosine schedule alpha_bar(t) = cos^2(pi/2 (t+s)/(1+s)) / cos^2(pi/2 s/(1+s)) (Nichol & Dhariwal 2021)."""

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._log_alpha_0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        return torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha_0

    def t_from_lambda(self, lam) -> torch.Tensor:
        la = self._log_alpha_from_lambda(_f64(lam))
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(la + self._log_alpha_0)) - self.s


class TrigVP(_VP):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2) on t in (0, 1], the network given t itself: diffusers'
    IPNDMScheduler's schedule (its timesteps atan2(sigma, alpha) 2 / pi; Liu et al. 2022's PNDM code).
    It reaches pure noise: alpha = 0 exactly at t = 1 (lambda = -inf there, t(lambda = -inf) = 1)."""

    def __init__(self, t_min: float = 1e-7, t_max: float = 1.0):
        if not 0 < t_min < t_max <= 1:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = t_min, t_max

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        la = torch.log(torch.cos(t * (math.pi / 2.0)).clamp(min=0.0))
        return torch.where(t >= 1.0, torch.full_like(t, -math.inf), la)  # cos(pi / 2) is 6e-17 in float64

    def t_from_lambda(self, lam) -> torch.Tensor:
        return torch.atan(torch.exp(-_f64(lam))) * (2.0 / math.pi)


def ipndm_times(n: int) -> np.ndarray:
    """The n model times of diffusers' IPNDMScheduler.set_timesteps(n), computed as it does in float32:
    s = linspace(1, 0, n + 1)[:-1], sigma = sin^2(pi s / 2), alpha = sqrt(1 - sigma^2), t = atan2(sigma, alpha) 2 / pi
    (`TrigVP` times; the first is 1, alpha = 0)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    s = torch.linspace(1, 0, n + 1)[:-1]
    sig = torch.sin(s * math.pi / 2) ** 2
    alp = (1.0 - sig**2) ** 0.5
    return (torch.atan2(sig, alp) / math.pi * 2).double().numpy()


class EDMPrecond(_VP):
    """EDM's preconditioned network (Karras et al. 2022, Table 1) as a VP schedule in the VE noise level t = sigma:
    the network sees c_in x = x / sqrt(sigma^2 + sigma_data^2) = alpha (x0 / sigma_data) + sigma_vp eps with
    alpha = sigma_data / sqrt(sigma^2 + sigma_data^2), sigma_vp = sigma / sqrt(sigma^2 + sigma_data^2), and the
    time c_noise = log(sigma) / 4; EDM's D = c_skip x + c_out F is then sigma_data times the v-prediction
    x0 / sigma_data = alpha x_in - sigma_vp v with v = F for c_out = -sigma sigma_data / sqrt(...) (diffusers'
    prediction_type "v_prediction"), v = -F for c_out = +... ("epsilon").  rho = sigma / sigma_data."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max or not sigma_data > 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and sigma_data > 0, got {sigma_min}, {sigma_max}, "
                             f"{sigma_data}")
        self.sigma_data = float(sigma_data)
        # float32 round-off of the ends (diffusers' grids are float32) stays inside the range
        self.t_min, self.t_max = float(sigma_min) * (1 - 1e-6), float(sigma_max) * (1 + 1e-6)

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        return math.log(self.sigma_data) - 0.5 * torch.log(t * t + self.sigma_data**2)

    def t_from_lambda(self, lam) -> torch.Tensor:
        return self.sigma_data * torch.exp(-_f64(lam))

    def model_time(self, t) -> torch.Tensor:
        return 0.25 * torch.log(_f64(t))


def edm_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, schedule: str = "karras",
               ramp_dtype=torch.float64) -> np.ndarray:
    """diffusers' EDMEulerScheduler.set_timesteps(n) noise levels, as it computes them: karras
    (sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho on ramp = linspace(0, 1, n) in float64
    (EDMDPMSolverMultistepScheduler: `ramp_dtype` float32), or exponential exp(linspace(log sigma_min, log sigma_max,
    n)) flipped (float32), then float32."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    if schedule == "karras":
        ramp = torch.linspace(0, 1, n, dtype=ramp_dtype)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
    elif schedule == "exponential":
        s = torch.linspace(math.log(sigma_min), math.log(sigma_max), n).exp().flip(0)
    else:
        raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {schedule!r}")
    return s.to(torch.float32).double().numpy()


class EDM(NoiseSchedule):
    """Variance exploding / EDM: alpha = 1, sigma = t (Karras et al. 2022)."""

    is_variance_exploding = True

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = sigma_min, sigma_max

    def log_alpha(self, t) -> torch.Tensor:
        return torch.zeros_like(_f64(t))

    def log_sigma(self, t) -> torch.Tensor:
        return _f64(t).log()

    def t_from_lambda(self, lam) -> torch.Tensor:
        return torch.exp(-_f64(lam))


class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t, lambda = log((1-t)/t) (Liu et al. 2023).

    `time_scale=1000` gives diffusers flow transformers their `timestep = sigma * 1000`.
    t_max defaults to 0.999 (as diffusers' flow sigmas for DPM-Solver): at t = 1, alpha = 0 and
    v = x / alpha, which the eps-form solvers (Heun, PNDM, DEIS) integrate, is undefined; the
    data-form solvers (DDIM, DPM-Solver++) accept t_max = 1.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999, time_scale: float = 1.0):
        if not 0 < t_min < t_max <= 1:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max, self.time_scale = t_min, t_max, time_scale

    def log_alpha(self, t) -> torch.Tensor:
        return torch.log1p(-_f64(t))

    def log_sigma(self, t) -> torch.Tensor:
        return _f64(t).log()

    def t_from_lambda(self, lam) -> torch.Tensor:
        return torch.sigmoid(-_f64(lam))


def _same_value(u, v) -> bool:
    if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
        return (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and u.shape == v.shape
                and bool(torch.equal(u.to(v.dtype), v)))
    if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
        return bool(np.array_equal(u, v))
    try:
        return bool(u == v)
    except Exception:  # an uncomparable value: not provably the same
        return False


def schedule_differences(a: NoiseSchedule, b: NoiseSchedule) -> list[str]:
    """What makes two schedules different processes ([] when they are the same one, e.g. built twice
    from the same config).  `time_scale` is left out: it maps t to the network's input only, and
    samplers take that from the denoiser's own schedule."""
    if a is b:
        return []
    if type(a) is not type(b):
        return [f"type: {type(a).__name__} vs {type(b).__name__}"]
    va = {k: v for k, v in vars(a).items() if k != "time_scale"}
    vb = {k: v for k, v in vars(b).items() if k != "time_scale"}
    keys = [k for k in sorted(set(va) | set(vb)) if not _same_value(va.get(k), vb.get(k))]
    public = [k for k in keys if not k.startswith("_")] or keys
    return [f"{k}: {va[k]:g} vs {vb[k]:g}" if _is_number(va.get(k)) and _is_number(vb.get(k)) else f"{k} differs"
            for k in public]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------------

#: the named grids (k-diffusion, diffusers, ComfyUI, Align Your Steps) are in grids.py
SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "linspace", "leading", "trailing",
            "diffusers_karras", "diffusers_exponential", "diffusers_lu", "diffusers_beta",
            "ddim_linspace", "ddim_leading") + NAMED_SPACINGS + tuple(grids.SPACING_ALIASES)
#: the integer-timestep grids of diffusers' discrete schedulers: DPMSolver-style (linspace / leading /
#: trailing) and DDIM / DDPM / PNDM-style (ddim_linspace / ddim_leading; their trailing is "trailing")
DIFFUSERS_TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "ddim_linspace", "ddim_leading")
#: the grids of diffusers' `use_karras_sigmas`, `use_exponential_sigmas`, `use_lu_lambdas`, `use_beta_sigmas`
DIFFUSERS_SIGMA_SPACINGS = ("diffusers_karras", "diffusers_exponential", "diffusers_lu", "diffusers_beta")
FINALS = ("zero", "last")


@dataclass(frozen=True)
class TimeGrid:
    """Grid points t_0 > t_1 > ... > t_N with alpha, sigma, lambda precomputed in float64.

    If `final_zero`, the last point is sigma = 0 (alpha = 1 for VP and VE, lambda = +inf): the
    network is never evaluated there.
    """

    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor
    final_zero: bool
    schedule: NoiseSchedule = field(repr=False, compare=False, default=None)

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    @classmethod
    def from_times(cls, schedule: NoiseSchedule, ts, final_zero: bool = False) -> "TimeGrid":
        """Grid through explicit times (decreasing); with final_zero a sigma = 0 point is appended."""
        t = _f64(ts).flatten()
        if t.numel() < (1 if final_zero else 2):
            raise ValueError(f"a time grid needs at least {1 if final_zero else 2} points, got {t.numel()}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"time grid contains non-finite values: {t.tolist()}")
        if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
            bad = int(torch.nonzero(t[1:] >= t[:-1])[0]) + 1
            raise ValueError(
                f"time grid must be strictly decreasing (noise -> data); t[{bad - 1}]={t[bad - 1].item():g} "
                f"is followed by t[{bad}]={t[bad].item():g}")
        lo, hi = schedule.t_min, schedule.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        if float(t.max()) > hi + tol or float(t.min()) < lo - tol:
            raise ValueError(f"time grid {t.tolist()} leaves the schedule's range [{lo:g}, {hi:g}]")
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        lam = schedule.lambda_(t).clamp(min=LAMBDA_FLOOR)
        if final_zero:
            t = torch.cat([t, t.new_tensor([schedule.t_min])])
            alpha = torch.cat([alpha, alpha.new_ones(1)])
            sigma = torch.cat([sigma, sigma.new_zeros(1)])
            lam = torch.cat([lam, lam.new_tensor([math.inf])])
        return cls(t=t, alpha=alpha, sigma=sigma, lam=lam, final_zero=final_zero, schedule=schedule)

    @property
    def rho(self) -> torch.Tensor:
        return self.sigma / self.alpha


def time_grid(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str | Sequence[float] | torch.Tensor = "time_uniform",
    final: str = "zero",
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float | None = None,
    steps_offset: int = 0,
    last_timestep: int | None = None,
    **options,
) -> TimeGrid:
    """Grid of `steps` solver steps (steps + 1 points).

    spacing: "logsnr" (uniform lambda; DPM-Solver), "time_uniform", "time_quadratic" (DEIS,
    kappa = 2), the named grids of grids.py ("karras" (`rho`, default 7), "exponential",
    "polyexponential" (`rho`, default 1), "beta" (`alpha`, `beta`, default 0.6), ComfyUI's "simple",
    "normal", "sgm_uniform", "ddim_uniform", Align Your Steps' "ays_sd15" / "ays_sdxl" /
    "ays_svd"; final="zero" gives exactly the reference's sigmas for `steps` points, then 0),
    diffusers' "linspace" / "leading" / "trailing" (integer timesteps of a DiscreteVP, Lin et al. 2024,
    Table 2), diffusers' sigma-space grids "diffusers_karras" / "diffusers_exponential" /
    "diffusers_lu" / "diffusers_beta" (the sigmas of `use_karras_sigmas` etc. of a DiscreteVP, see
    `diffusers_sigmas`; the grid points sit at those float32 sigmas), the timesteps of diffusers'
    DDIM / DDPM / PNDM schedulers "ddim_linspace" / "ddim_leading" (their "trailing" is "trailing";
    `steps` timesteps, the last one 0 for ddim_linspace), or an explicit decreasing sequence of
    model times.  `last_timestep` (linspace / leading / trailing only): the training range diffusers'
    DPMSolverMultistep lays them on under `lambda_min_clipped` (`diffusers_last_timestep`).

    final: "zero" ends at sigma = 0 (the last step jumps to the data prediction), "last" ends at the
    last grid time.  Both lay steps + 1 points on [t_end, t_start] by the spacing; "zero" replaces
    the last one (t_end) by sigma = 0, as diffusers' linspace grids do, so no model call is spent
    at t_end just before the jump.  The named grids follow their references instead: "zero" is the
    reference's `steps` points then sigma = 0 (k-diffusion's karras: the last call at sigma_min).  For diffusers spacings it reproduces `final_sigmas_type`.
    """
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}, got {final!r}")
    final_zero = final == "zero"
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(spacing, str):
        ts = _f64(spacing)
        if ts.ndim == 2:  # one grid per sample: all solvers here share one grid per batch
            if not bool((ts == ts[:1]).all()):
                raise ValueError("per-sample time grids differ between rows; the solvers share one grid per "
                                 "batch (multistep history needs it): sample each distinct grid as its own batch")
            ts = ts[0]
        ts = ts.flatten()
        want = steps if final_zero else steps + 1
        if ts.numel() != want:
            raise ValueError(f"explicit grid has {ts.numel()} times; {steps} steps with final={final!r} need {want}")
        return TimeGrid.from_times(schedule, ts, final_zero)
    spacing = grids.canonical_spacing(spacing)  # A1111's labels ("Karras", "SGM Uniform", ...)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS} or pass explicit times")
    if spacing in NAMED_SPACINGS:
        return _named_grid(schedule, steps, spacing, final_zero,
                           dict(t_start=t_start, t_end=t_end, rho=rho, **options))
    if rho is not None or options:
        bad = sorted(options) + (["rho"] if rho is not None else [])
        raise ValueError(f"spacing {spacing!r} takes no option(s) {bad}; rho is an option of 'karras' and "
                         "'polyexponential', alpha / beta of 'beta'")

    if (t_start is not None or t_end is not None) and spacing in DIFFUSERS_SIGMA_SPACINGS + ("linspace", "leading",
                                                                                           "trailing"):
        raise ValueError(f"spacing {spacing!r} takes no t_start / t_end: its times are diffusers' own")
    if spacing in DIFFUSERS_SIGMA_SPACINGS:
        # "zero": the `steps` sigmas of diffusers' list, then sigma = 0; "last": its steps + 1 sigmas,
        # the last at the schedule's sigma_min (t = 0)
        sig, _ = diffusers_sigmas(schedule, steps if final_zero else steps + 1, spacing)
        s32 = torch.as_tensor(sig.astype(np.float32).astype(np.float64))
        ts = schedule.t_from_lambda(-s32.log()).clamp(schedule.t_min, schedule.t_max)
        if not final_zero:
            ts[-1] = schedule.t_min
        return TimeGrid.from_times(schedule, ts, final_zero)

    if last_timestep is not None and spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"last_timestep applies to the spacings 'linspace', 'leading', 'trailing', not {spacing!r}")
    if spacing in DIFFUSERS_TIMESTEP_SPACINGS:
        ts = _diffusers_timesteps(schedule, steps, spacing, steps_offset, last_timestep)
        if not final_zero:  # diffusers' final_sigmas_type="sigma_min": end at t = 0
            if ts[-1] <= schedule.t_min:
                raise ValueError(f"spacing {spacing!r} with {steps} steps puts its last model call at t = "
                                 f"{ts[-1]:g}, the schedule's t_min: final='last' cannot end there; use final='zero'")
            ts = np.append(ts, schedule.t_min)
        return TimeGrid.from_times(schedule, ts, final_zero)

    t0 = schedule.t_max if t_start is None else float(t_start)
    t1 = schedule.t_min if t_end is None else float(t_end)
    n = steps + 1
    if spacing == "time_uniform":
        ts = torch.linspace(t0, t1, n, dtype=torch.float64)
    elif spacing == "time_quadratic":
        ts = torch.linspace(math.sqrt(t0), math.sqrt(t1), n, dtype=torch.float64) ** 2
    else:  # logsnr
        l0, l1 = schedule.lambda_(t0).clamp(min=LAMBDA_FLOOR), schedule.lambda_(t1)
        ts = schedule.t_from_lambda(torch.linspace(float(l0), float(l1), n, dtype=torch.float64))
    ts[0], ts[-1] = t0, t1  # pin the ends exactly (no float drift through the inverse)
    if final_zero:  # the last point becomes sigma = 0: no model call is spent at t_end itself
        ts = ts[:-1]
    return TimeGrid.from_times(schedule, ts, final_zero)


def _named_grid(schedule: NoiseSchedule, steps: int, spacing: str, final_zero: bool, given: dict) -> TimeGrid:
    """A grid of grids.py: final="zero" the reference's points for `steps` points, then sigma = 0;
    final="last" its points for steps + 1 (AYS: its steps + 1 points, ending at sigma_min)."""
    opts = grids.spacing_options(spacing, given)
    n = steps if final_zero else steps + 1
    if spacing in AYS_SPACINGS:
        return _ays_grid(schedule, steps, spacing, final_zero)
    if spacing == "linear_quadratic":
        if not final_zero:
            raise ValueError("spacing 'linear_quadratic' ends at sigma = 0 by construction (ComfyUI's list): "
                             "use final='zero'")
        # ComfyUI's sigma: k-diffusion's rho = sigma_t / alpha_t, but a flow model's own sigma_t (its CONST
        # model sampling) for a RectifiedFlow schedule, where sigma_t = t
        flow = isinstance(schedule, RectifiedFlow)
        level = schedule.sigma if flow else schedule.rho
        top = float(level(schedule.t_max).clamp(max=math.exp(-LAMBDA_FLOOR)))
        bottom = float(level(schedule.t_min))
        sig = top * grids.linear_quadratic_levels(steps, float(opts["threshold_noise"]), opts["linear_steps"])
        if sig.min() < bottom:
            raise ValueError(f"spacing 'linear_quadratic' with {steps} steps lays the noise level {sig.min():.6g} "
                             f"below this schedule's lowest, {bottom:.6g}")
        ts = _f64(sig).clone() if flow else schedule.t_from_lambda(-torch.as_tensor(sig).log())
        ts[0] = schedule.t_max
        return TimeGrid.from_times(schedule, ts, final_zero)
    if spacing in ("simple", "ddim_uniform", "comfy_beta"):
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"spacing {spacing!r} picks times of a discrete schedule's table; it needs a DiscreteVP "
                             f"schedule, got {type(schedule).__name__} (use 'normal' or 'sgm_uniform')")
        T = schedule.num_train_timesteps
        if spacing == "comfy_beta":
            ts = grids.comfy_beta_times(T, n, float(opts["alpha"]), float(opts["beta"]))
        else:
            ts = grids.simple_times(T, n) if spacing == "simple" else grids.ddim_uniform_times(T, n)
        if len(np.unique(ts)) != len(ts):
            raise ValueError(f"{steps} steps with spacing {spacing!r} repeat timesteps of the {T}-step schedule")
        return TimeGrid.from_times(schedule, ts, final_zero)
    t0 = schedule.t_max if opts["t_start"] is None else float(opts["t_start"])
    t1 = schedule.t_min if opts["t_end"] is None else float(opts["t_end"])
    if not schedule.t_min <= t1 < t0 <= schedule.t_max:
        raise ValueError(f"spacing {spacing!r} needs t_min <= t_end < t_start <= t_max = "
                         f"[{schedule.t_min:g}, {schedule.t_max:g}], got t_start={t0:g}, t_end={t1:g}")
    if spacing in ("normal", "sgm_uniform"):
        ts = torch.as_tensor(grids.normal_times(t0, t1, n, sgm=spacing == "sgm_uniform"))
    else:  # a sigma grid between rho(t_start) and rho(t_end) (k-diffusion's sigma_max, sigma_min)
        s_max = float(schedule.rho(t0).clamp(max=math.exp(-LAMBDA_FLOOR)))
        s_min = float(schedule.rho(t1))
        extra = {k: opts[k] for k in ("rho", "alpha", "beta") if k in opts}
        sig = {"karras": grids.karras_sigmas, "exponential": grids.exponential_sigmas,
               "polyexponential": grids.polyexponential_sigmas, "beta": grids.beta_sigmas,
               "kl_optimal": grids.kl_optimal_sigmas}[spacing](
            n, s_min, s_max, **extra)
        ts = schedule.t_from_lambda(-torch.as_tensor(sig).log())
        ts[-1] = t1 if n > 1 else ts[-1]  # every sigma list ends at sigma_min: pin it (no float drift)
    ts[0] = t0
    return TimeGrid.from_times(schedule, ts, final_zero)


def _ays_grid(schedule: NoiseSchedule, steps: int, spacing: str, final_zero: bool) -> TimeGrid:
    """The published AYS noise levels, log-linearly resampled to steps + 1 points (grids.ays_sigmas);
    the schedule must be the one they were published for (its sigma_max within rounding)."""
    sig = grids.ays_sigmas(spacing, steps + 1)
    top, bottom = float(schedule.rho(schedule.t_max)), float(schedule.rho(schedule.t_min))
    pub_max, pub_min = grids.AYS_PUBLISHED[spacing][0], grids.AYS_PUBLISHED[spacing][-1]
    if abs(sig[0] - top) > 1e-3 * top or abs(sig[-1] - bottom) > 1e-2 * bottom:
        raise ValueError(f"spacing {spacing!r} is published for noise levels sigma = {pub_max:g} .. {pub_min:g} "
                         f"(sigma / alpha); this {type(schedule).__name__} schedule spans {top:.6g} .. {bottom:.6g}, "
                         "so its first step would not start from the prior: use it with the model family it was "
                         "published for")
    ts = schedule.t_from_lambda(-torch.as_tensor(sig).log())
    ts[0], ts[-1] = schedule.t_max, schedule.t_min  # the published ends are the schedule's, rounded
    return TimeGrid.from_times(schedule, ts[:-1] if final_zero else ts, final_zero)


def _diffusers_timesteps(schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int,
                         last_timestep: int | None = None) -> np.ndarray:
    """Integer timesteps exactly as diffusers' DPMSolverMultistepScheduler.set_timesteps makes them, or
    (ddim_*) as DDIMScheduler / DDPMScheduler / PNDMScheduler make them (`steps` points, leading with
    step ratio T // steps).  `last_timestep`: DPMSolverMultistep's range under lambda_min_clipped (linspace
    and leading are laid on [0, last_timestep), trailing counts down from it with the step T / steps)."""
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"spacing {spacing!r} needs a DiscreteVP schedule, got {type(schedule).__name__}")
    T = schedule.num_train_timesteps
    if last_timestep is not None:
        last = int(last_timestep)
        if not 0 < last <= T:
            raise ValueError(f"last_timestep must be in [1, {T}], got {last_timestep!r}")
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + steps_offset
        else:
            ts = np.arange(last, 0, -T / steps).round() - 1
            if len(ts) != steps:
                raise ValueError(f"trailing spacing from last_timestep {last} gives {len(ts)} timesteps for {steps} "
                                 "steps (diffusers' DPMSolverMultistep with lambda_min_clipped then makes fewer calls)")
        ts = ts.astype(np.float64)
        if len(np.unique(ts)) != len(ts) or ts.min() < 0:
            raise ValueError(f"{steps} steps with {spacing!r} spacing below timestep {last} give duplicate or negative "
                             "timesteps")
        return ts
    if spacing == "ddim_linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    elif spacing == "ddim_leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = T // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    else:
        ts = np.arange(T, 0, -T / steps).round() - 1
    ts = ts.astype(np.float64)
    if len(np.unique(ts)) != len(ts):
        raise ValueError(f"{steps} steps with {spacing!r} spacing give duplicate timesteps on a {T}-step schedule")
    return ts


def diffusers_sigmas(schedule: NoiseSchedule, n: int, spacing: str) -> tuple[np.ndarray, np.ndarray]:
    """The `n` sigmas (sigma / alpha, float64, decreasing) and fractional timesteps of diffusers'
    DPMSolverMultistepScheduler.set_timesteps with `use_karras_sigmas` ("diffusers_karras", rho = 7),
    `use_exponential_sigmas` ("diffusers_exponential"), `use_lu_lambdas` ("diffusers_lu", uniform
    log-SNR) or `use_beta_sigmas` ("diffusers_beta", Beta(0.6, 0.6) quantiles), computed as diffusers
    does: from the float32 sigma table sqrt((1 - alpha_bar) / alpha_bar) of a DiscreteVP, its
    sigma_max / sigma_min, and the timesteps by interpolating log sigma between the table's entries.
    diffusers gives the network these timesteps rounded (karras, lu; not for squaredcos_cap_v2) or
    truncated (the int64 cast)."""
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"spacing {spacing!r} needs a DiscreteVP schedule, got {type(schedule).__name__}")
    if spacing not in DIFFUSERS_SIGMA_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {DIFFUSERS_SIGMA_SPACINGS}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    acp = schedule.alphas_cumprod.to(torch.float32)
    table = np.array(((1 - acp) / acp) ** 0.5)  # float32, as diffusers' DPMSolverMultistepScheduler
    log_table = np.log(table)
    s_min, s_max = table[0].item(), table[-1].item()
    ramp = np.linspace(0, 1, n)
    if spacing == "diffusers_karras":
        lo, hi = s_min ** (1 / 7.0), s_max ** (1 / 7.0)
        sig = (hi + ramp * (lo - hi)) ** 7.0
    elif spacing == "diffusers_exponential":
        sig = np.exp(np.linspace(math.log(s_max), math.log(s_min), n))
    elif spacing == "diffusers_lu":
        lam = np.flip(log_table.copy())
        l_min, l_max = lam[-1].item(), lam[0].item()
        sig = np.exp(l_max + ramp * (l_min - l_max))
    else:
        import scipy.stats

        sig = np.array([s_min + ppf * (s_max - s_min)
                        for ppf in [scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)]])
    t = diffusers_sigma_to_t(sig, log_table)
    return np.asarray(sig, dtype=np.float64), t.astype(np.float64)


def diffusers_last_timestep(schedule: NoiseSchedule, lambda_min_clipped: float) -> int:
    """DPMSolverMultistepScheduler's `last_timestep` under `lambda_min_clipped`: the number of training timesteps
    whose float32 log-SNR lambda_t = log alpha_t - log sigma_t is at least the clip (the timesteps past it are not
    used by its linspace / leading / trailing grids; DPM-Solver, Lu et al. 2022, clips lambda for the cosine
    schedule's numerical stability)."""
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"lambda_min_clipped needs a DiscreteVP schedule, got {type(schedule).__name__}")
    acp = schedule.alphas_cumprod.to(torch.float32)
    lam = torch.log(acp**0.5) - torch.log((1 - acp) ** 0.5)
    clipped = int(torch.searchsorted(torch.flip(lam, [0]), torch.tensor(float(lambda_min_clipped))))
    return schedule.num_train_timesteps - clipped


def diffusers_sigma_to_t(sigma, log_table: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the fractional timestep of each noise level `sigma` (sigma / alpha),
    interpolating log sigma linearly between the entries of `log_table` (log of the float32 table
    sqrt((1 - alpha_bar) / alpha_bar), index = timestep), clipped to the table's range."""
    log_sig = np.log(np.maximum(np.asarray(sigma), 1e-10))
    dists = log_sig - log_table[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    w = np.clip((log_table[low] - log_sig) / (log_table[low] - log_table[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).astype(np.float64)


#: diffusers' sigma-space (k-diffusion style) scheduler classes whose grids `diffusers_k_grid` builds
K_CLASSES = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
             "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
             "DPMSolverSDEScheduler")


def diffusers_k_grid(schedule: NoiseSchedule, steps: int, class_name: str = "EulerDiscreteScheduler", *,
                     timestep_spacing: str = "linspace", steps_offset: int = 0, interpolation_type: str = "linear",
                     sigmas: str | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                     final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray, float]:
    """The noise levels and model timesteps of `set_timesteps(steps)` of diffusers' sigma-space
    scheduler `class_name` (one of K_CLASSES) on a DiscreteVP, computed as diffusers does:

    timesteps by `timestep_spacing` (linspace: fractional, np.linspace(0, T - 1, steps); leading:
    (arange(steps) * (T // steps)) + steps_offset; trailing: round(arange(T, 0, -T / steps)) - 1),
    sigma = sqrt((1 - alpha_bar) / alpha_bar) of the float32 table interpolated linearly in t
    (`interpolation_type` "linear"; "log_linear": steps + 1 levels uniform in log sigma over the whole
    table, EulerDiscrete only), or `sigmas` = "karras" / "exponential" / "beta" (use_*_sigmas: the
    grids.py lists between the levels' ends, or `sigma_min` / `sigma_max` where given, EulerDiscrete
    only) with timesteps from `diffusers_sigma_to_t` (rounded by the KDPM2 classes for karras).

    Returns (sigmas, timesteps, end): the float32 noise levels of the model calls at grid points
    (as float64), their model timesteps (float64), and the end level (0, or the table's sigma_min for
    final_sigmas_type="sigma_min", or log_linear's last level)."""
    from . import grids as _grids

    if class_name not in K_CLASSES:
        raise ValueError(f"unknown class {class_name!r}; diffusers_k_grid builds the grids of {K_CLASSES}")
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"{class_name}'s grid needs a DiscreteVP schedule, got {type(schedule).__name__}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    T = schedule.num_train_timesteps
    acp = schedule.alphas_cumprod.to(torch.float32)
    table = np.array(((1 - acp) / acp) ** 0.5)  # float32, as the classes' __init__
    log_table = np.log(table)
    if timestep_spacing == "linspace":  # DPMSolverSDE lays them in float64, the others in float32
        ts = np.linspace(0, T - 1, steps, dtype=np.float64 if class_name == "DPMSolverSDEScheduler"
                         else np.float32)[::-1].copy()
    elif timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.float32) + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.arange(T, 0, -T / steps).round().copy().astype(np.float32) - 1
    else:
        raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}")
    if interpolation_type == "linear":
        sig = np.interp(ts, np.arange(0, len(table)), table)
    elif interpolation_type == "log_linear":
        sig = torch.linspace(np.log(table[-1]), np.log(table[0]), steps + 1).exp().numpy()
    else:
        raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation_type!r}")
    ts = ts.astype(np.float64)
    if sigmas is not None:
        lo = float(sig[-1]) if sigma_min is None else float(sigma_min)
        hi = float(sig[0]) if sigma_max is None else float(sigma_max)
        make = {"karras": _grids.karras_sigmas, "exponential": _grids.exponential_sigmas,
                "beta": _grids.beta_sigmas}.get(sigmas)
        if make is None:
            raise ValueError(f"sigmas must be None, 'karras', 'exponential' or 'beta', got {sigmas!r}")
        sig = make(steps, lo, hi)
        ts = diffusers_sigma_to_t(sig, log_table)
        if sigmas == "karras" and class_name.startswith("KDPM2"):
            ts = np.round(ts)
    if final_sigmas_type == "zero":
        end = 0.0
    elif final_sigmas_type == "sigma_min":
        end = float(((1 - acp[0]) / acp[0]) ** 0.5)
    else:
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    sig = np.concatenate([sig, [end]]).astype(np.float32).astype(np.float64)
    if len(sig) > steps + 1:  # log_linear: steps + 1 levels before the end; the run stops at the last
        sig = sig[:steps + 1]
    return sig[:steps], ts[:steps], float(sig[steps])


#: the FlowMatchEulerDiscreteScheduler config keys `flowmatch_sigmas` reads, with diffusers' defaults
FLOWMATCH_KEYS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential",
                  "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                  "use_beta_sigmas": False}


def flowmatch_sigmas(config: dict, n: int | None = None, sigmas=None, timesteps=None,
                     mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The flow times (diffusers' `sigmas`, without the trailing 0) and model timesteps of diffusers'
    FlowMatchEulerDiscreteScheduler.set_timesteps(n, sigmas=, timesteps=, mu=) for `config`, computed as
    diffusers does, in float32:

    sigma_max / sigma_min of the training table s(k / T), k = T..1, s the shift (t -> s t / (1 + (s - 1) t)
    with `shift`; none with `use_dynamic_shifting`); the default timesteps linspace(sigma_max T,
    sigma_min T, n) and sigmas = timesteps / T, or the given `sigmas`, or `timesteps` / T; then the shift
    again (`use_dynamic_shifting`: Flux / SD3's t -> e^mu / (e^mu + (1/t - 1)) or, time_shift_type
    'linear', mu / (mu + (1/t - 1))); `shift_terminal` stretches 1 - t so the last time is that value
    (LTX-Video); `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` then re-lay n points
    between the first and last (grids.karras_sigmas rho = 7, exponential_sigmas, beta_sigmas 0.6 / 0.6).
    Model timesteps are sigmas * T, or the given `timesteps` as they are."""
    c = {**FLOWMATCH_KEYS, **{k: v for k, v in config.items() if k in FLOWMATCH_KEYS and v is not None}}
    if config.get("shift_terminal") is None:
        c["shift_terminal"] = None
    T = int(c["num_train_timesteps"])
    shift = float(c["shift"])
    dynamic = bool(c["use_dynamic_shifting"])
    if dynamic and mu is None:
        raise ValueError("use_dynamic_shifting=True needs set_timesteps(..., mu=...) (the pipeline's resolution "
                         "shift), as FlowMatchEulerDiscreteScheduler")
    if c["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {c['time_shift_type']!r}")
    which = [k for k in ("karras", "exponential", "beta") if c[f"use_{k}_sigmas"]]
    if len(which) > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be True")

    def static(s):
        return shift * s / (1 + (shift - 1) * s)

    table = np.linspace(1, T, T, dtype=np.float32)[::-1].copy()
    table = torch.from_numpy(table) / T
    if not dynamic:
        table = static(table)
    s_max, s_min = table[0].item(), table[-1].item()
    given_t = None
    if sigmas is not None:
        s = np.array(sigmas).astype(np.float32)
    else:
        if timesteps is not None:
            given_t = np.array(timesteps).astype(np.float32)
            tt = given_t
        else:
            if n is None or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
            tt = np.linspace(s_max * T, s_min * T, n)
        s = tt / T
    if dynamic:
        with np.errstate(divide="ignore", invalid="ignore"):  # (1/t - 1)^1 at t = 1 is 0, as diffusers
            if c["time_shift_type"] == "exponential":
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
            else:
                s = mu / (mu + (1 / s - 1) ** 1.0)
    else:
        s = static(s)
    if c["shift_terminal"]:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
    if which:
        lo, hi = float(s[-1]), float(s[0])
        m = len(s)
        s = {"karras": grids.karras_sigmas, "exponential": grids.exponential_sigmas,
             "beta": grids.beta_sigmas}[which[0]](m, lo, hi)
    s = torch.from_numpy(np.asarray(s)).to(torch.float32)
    t_model = torch.from_numpy(given_t) if given_t is not None else s * T
    return s.numpy().astype(np.float64), t_model.numpy().astype(np.float64)
