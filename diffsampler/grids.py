"""Time grids users pick by name: k-diffusion's `karras` / `exponential` / `polyexponential`,
diffusers' `beta`, ComfyUI's `simple` / `normal` / `sgm_uniform` / `ddim_uniform` schedulers and the
published Align Your Steps schedules (`ays_sd15`, `ays_sdxl`, `ays_svd`).

Each is what its reference builds: a list of n decreasing noise levels, to which the reference
appends sigma = 0.  Noise levels are k-diffusion's sigma, i.e. sigma_t / alpha_t of the schedule
(`NoiseSchedule.rho`); the `simple` / `normal` / `sgm_uniform` / `ddim_uniform` schedulers pick
model times t instead.  `time_grid(schedule, steps, name, final=...)` (schedules.py) lays them as:
final="zero": the reference's list for `steps` points, then sigma = 0 (exactly what k-diffusion,
ComfyUI and diffusers sample on); final="last": the reference's list for steps + 1 points, ending
at its last point.  Everything here is float64.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NAMED_SPACINGS", "SIGMA_SPACINGS", "TABLE_SPACINGS", "AYS_SPACINGS", "AYS_PUBLISHED", "karras_sigmas",
           "exponential_sigmas", "polyexponential_sigmas", "beta_sigmas", "kl_optimal_sigmas",
           "linear_quadratic_levels", "ZERO_ENDED_SPACINGS", "SPACING_REFUSED", "ays_sigmas", "loglinear_interp",
           "simple_times", "comfy_beta_times", "ddim_uniform_times", "normal_times", "spacing_options", "SPACING_ALIASES",
           "canonical_spacing"]

#: grids built from the schedule's end noise levels sigma_max, sigma_min
SIGMA_SPACINGS = ("karras", "exponential", "polyexponential", "beta", "kl_optimal")
#: ComfyUI's linear_quadratic (Mochi's schedule): levels sigma_max (1 - s_i), ending at sigma = 0 by construction
ZERO_ENDED_SPACINGS = ("linear_quadratic",)
#: ComfyUI's schedulers: model times of a discrete schedule's table (simple, ddim_uniform) or
#: uniform in time between its ends (normal, sgm_uniform)
TABLE_SPACINGS = ("simple", "ddim_uniform", "normal", "sgm_uniform", "comfy_beta")
#: Align Your Steps (Sabour et al. 2024), the published 10-step schedules
AYS_SPACINGS = ("ays_sd15", "ays_sdxl", "ays_svd")
NAMED_SPACINGS = SIGMA_SPACINGS + TABLE_SPACINGS + AYS_SPACINGS + ZERO_ENDED_SPACINGS
#: AUTOMATIC1111's schedule-type labels for these grids (modules/sd_schedulers.py): its "Uniform"
#: is k-diffusion's DiscreteSchedule.get_sigmas (uniform in t, the last call at t = 0: "normal"),
#: its "DDIM" ComfyUI's ddim_uniform, its "Beta" (sigma_min + Beta(0.6, 0.6) quantiles of 1 - i/(n-1)
#: times (sigma_max - sigma_min), then 0) diffusers' use_beta_sigmas, i.e. `beta`, its "KL Optimal"
#: (n + 1 points ending at sigma_min, no 0: final="last") `kl_optimal`.
SPACING_ALIASES = {"Uniform": "normal", "Karras": "karras", "Exponential": "exponential",
                   "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "SGMUniform": "sgm_uniform",
                   "Simple": "simple", "Normal": "normal", "DDIM": "ddim_uniform", "Beta": "beta",
                   "KL Optimal": "kl_optimal"}
#: schedule names of A1111 / ComfyUI that are not grids here, and why (refused naming them).  ComfyUI's
#: `beta` scheduler (Beta quantiles of the timestep table) is `comfy_beta` here: the name `beta` is
#: diffusers' / A1111's grid (Beta quantiles in sigma).
SPACING_REFUSED = {
    "Align Your Steps": "A1111's Align Your Steps lays the published list resampled to n points ending at sigma_min "
                        "and then 0 (n + 1 levels for n steps), for SD 1.5 or SDXL by the loaded model; the ays_sd15 "
                        "/ ays_sdxl / ays_svd grids here are the authors' steps + 1 points with the last replaced "
                        "by 0 (ComfyUI's AlignYourStepsScheduler)",
    "Automatic": "A1111's Automatic is the sampler's own default schedule: name it (karras, exponential, ...)",
}

#: The published 10-step AYS noise levels as diffusers ships them (`AysSchedules`, which ends them
#: with 0.0), followed by the schedule's sigma_min that the authors' lists end at before that 0
#: (0.029 for SD 1.5 / SDXL, 0.002 for SVD; research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto).
AYS_PUBLISHED = {
    "ays_sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "ays_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "ays_svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

#: options each named grid takes (beyond steps / final), with their defaults
_OPTIONS = {
    "karras": {"rho": 7.0, "t_start": None, "t_end": None},
    "exponential": {"t_start": None, "t_end": None},
    "polyexponential": {"rho": 1.0, "t_start": None, "t_end": None},
    "beta": {"alpha": 0.6, "beta": 0.6, "t_start": None, "t_end": None},
    "kl_optimal": {"t_start": None, "t_end": None},
    "linear_quadratic": {"threshold_noise": 0.025, "linear_steps": None},
    "normal": {"t_start": None, "t_end": None},
    "sgm_uniform": {"t_start": None, "t_end": None},
    "simple": {},
    "comfy_beta": {"alpha": 0.6, "beta": 0.6},
    "ddim_uniform": {},
    **{name: {} for name in AYS_SPACINGS},
}


def canonical_spacing(spacing):
    """The grid name an A1111 schedule-type label stands for (other values as they are); a schedule
    name of A1111 / ComfyUI that is not a grid here is refused, naming it and why."""
    if isinstance(spacing, str) and spacing in SPACING_REFUSED:
        raise ValueError(f"spacing {spacing!r} is not a grid here: {SPACING_REFUSED[spacing]}")
    return SPACING_ALIASES.get(spacing, spacing) if isinstance(spacing, str) else spacing


def spacing_options(name: str, given: dict) -> dict:
    """The options of named grid `name`: its defaults updated by `given` (None values are left at
    the default); an option the grid does not take is refused, naming it and the allowed ones."""
    allowed = _OPTIONS[name]
    extra = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if extra:
        raise ValueError(f"spacing {name!r} takes no option(s) {extra}; it takes {sorted(allowed) or 'none'}")
    out = dict(allowed)
    out.update({k: v for k, v in given.items() if v is not None})
    for key in ("rho", "alpha", "beta"):
        if key in out and not (isinstance(out[key], (int, float)) and not isinstance(out[key], bool) and out[key] > 0
                               and math.isfinite(out[key])):
            raise ValueError(f"spacing {name!r}: {key} must be a positive number, got {out[key]!r}")
    return out


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n < 1:
        raise ValueError(f"a grid needs at least 1 point, got {n}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    (Karras et al. 2022, eq. 5; k-diffusion get_sigmas_karras without its trailing 0)."""
    _check(n, sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log sigma from sigma_max to sigma_min (k-diffusion get_sigmas_exponential)."""
    _check(n, sigma_min, sigma_max)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """log sigma_i = log sigma_min + (1 - i/(n-1))^rho (log sigma_max - log sigma_min)
    (k-diffusion get_sigmas_polyexponential; rho = 1 is `exponential`)."""
    _check(n, sigma_min, sigma_max)
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def beta_sigmas(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """sigma_i = sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min), F the Beta(alpha, beta) CDF
    ("Beta sampling is all you need", Lee et al. 2024; diffusers' use_beta_sigmas, alpha = beta = 0.6)."""
    import scipy.stats

    _check(n, sigma_min, sigma_max)
    ppf = scipy.stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """sigma_i = tan((1 - i/(n-1)) arctan(sigma_max) + i/(n-1) arctan(sigma_min)), the schedule minimising
    the KL bound of Sabour et al. 2024 ("Align Your Steps", sec. 3; ComfyUI's kl_optimal_scheduler without its
    trailing 0, A1111's kl_optimal over n points)."""
    _check(n, sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    return np.tan((1.0 - ramp) * math.atan(sigma_max) + ramp * math.atan(sigma_min))


def linear_quadratic_levels(n: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> np.ndarray:
    """The n leading fractions of ComfyUI's linear_quadratic_schedule (from Mochi's sampler): 1 - s_i with s_i
    linear from 0 to threshold_noise over the first L = linear_steps (n // 2) points, then the quadratic
    q i^2 + l i + c through (L, threshold_noise) with slope-continuity that reaches 1 at i = n; the schedule is
    sigma_max times these, then 0.  n = 1: [1]."""
    if n < 1:
        raise ValueError(f"a grid needs at least 1 point, got {n}")
    if n == 1:
        return np.ones(1)
    L = n // 2 if linear_steps is None else linear_steps
    if not (isinstance(L, (int, np.integer)) and not isinstance(L, bool) and 1 <= L < n):
        raise ValueError(f"spacing 'linear_quadratic': linear_steps must be an integer in [1, {n - 1}] for {n} "
                         f"points, got {linear_steps!r}")
    if not 0.0 < threshold_noise < 1.0:
        raise ValueError(f"spacing 'linear_quadratic': threshold_noise must lie in (0, 1), got {threshold_noise!r}")
    Q = n - L
    gap = L - threshold_noise * n
    quad = gap / (L * Q * Q)
    lin = threshold_noise / L - 2.0 * gap / (Q * Q)
    const = quad * L * L
    i = np.arange(n, dtype=np.float64)
    s = np.where(i < L, i * threshold_noise / L, quad * i * i + lin * i + const)
    return 1.0 - s


def loglinear_interp(levels, n: int) -> np.ndarray:
    """A decreasing list of noise levels resampled to n points, linearly in log level over equally
    spaced positions (the AYS authors' rule for other step counts)."""
    levels = np.asarray(levels, dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(levels))
    return np.exp(np.interp(np.linspace(0.0, 1.0, n), pos, np.log(levels[::-1])))[::-1].copy()


def ays_sigmas(name: str, n: int) -> np.ndarray:
    """n points of the published AYS schedule `name` (its 11 points ending at sigma_min; resampled
    by `loglinear_interp` when n != 11).  n = steps + 1: final="zero" replaces the last by 0."""
    levels = np.asarray(AYS_PUBLISHED[name], dtype=np.float64)
    return levels.copy() if n == len(levels) else loglinear_interp(levels, n)


def simple_times(num_train: int, n: int) -> np.ndarray:
    """ComfyUI's `simple`: table times T-1 - floor(i T/n), i = 0..n-1 (the float arithmetic as there)."""
    ss = num_train / n
    return np.array([num_train - 1 - int(i * ss) for i in range(n)], dtype=np.float64)


def comfy_beta_times(num_train: int, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """ComfyUI's `beta` scheduler (Lee et al. 2024, "Beta sampling is all you need"): table times
    rint(F^-1(1 - i/n) (T - 1)), i = 0..n-1, F the Beta(alpha, beta) CDF.  ComfyUI drops repeated times
    (fewer steps than asked); here a count that repeats one is refused by the grid builder."""
    import scipy.stats

    return np.rint(scipy.stats.beta.ppf(1.0 - np.arange(n) / n, alpha, beta) * (num_train - 1))


def ddim_uniform_times(num_train: int, n: int) -> np.ndarray:
    """ComfyUI's `ddim_uniform`: table times 1, 1 + c, 1 + 2c, ... < T with c = T // n, decreasing.
    That is n times only for some (T, n): other n are refused, naming the count it gives."""
    c = max(num_train // n, 1)
    ts = np.arange(1, num_train, c, dtype=np.float64)[::-1].copy()
    if len(ts) != n:
        near = sorted({m for m in range(max(1, n - 3), n + 4) if len(np.arange(1, num_train, max(num_train // m, 1))) == m})
        raise ValueError(f"spacing 'ddim_uniform' lays {len(ts)} points, not {n}, on a {num_train}-step schedule "
                         f"(ComfyUI's rule: times 1, 1 + {c}, ... below {num_train}); point counts it can lay "
                         f"near {n}: {near}")
    return ts


def normal_times(t_max: float, t_min: float, n: int, sgm: bool = False) -> np.ndarray:
    """ComfyUI's `normal` (n times uniform in t from t_max to t_min) and `sgm_uniform` (n + 1 such
    times without the last)."""
    return np.linspace(t_max, t_min, n + 1)[:-1] if sgm else np.linspace(t_max, t_min, n)
