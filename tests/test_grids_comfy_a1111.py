"""The schedule names of ComfyUI (comfy/samplers.py SCHEDULER_NAMES) and AUTOMATIC1111
(modules/sd_schedulers.py) as spacings: each is a grid equal to its source's formula (transcribed below from
the source, in float64), or refused naming it and why.  kl_optimal and linear_quadratic are grids.py's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDPMScheduler

import diffsampler as ds
from diffsampler import grids
from diffsampler.schedules import SPACINGS, DiscreteVP, RectifiedFlow, time_grid

SD = DiscreteVP.from_diffusers_config(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                    beta_end=0.012).config)
#: comfy/samplers.py SCHEDULER_NAMES
COMFY_SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                         "linear_quadratic", "kl_optimal"]
#: A1111 modules/sd_schedulers.py `schedulers` labels (and the alias "SGMUniform")
A1111_SCHEDULE_LABELS = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                         "SGMUniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


def _levels(grid):
    return (grid.sigma / grid.alpha).numpy()


def _ends(schedule):
    return float(schedule.rho(schedule.t_min)), float(schedule.rho(schedule.t_max))


#: the spacing each ComfyUI scheduler name is here (the same name, but for the `beta` collision)
COMFY_AS = {"beta": "comfy_beta"}


@pytest.mark.parametrize("name", COMFY_SCHEDULER_NAMES + A1111_SCHEDULE_LABELS)
def test_every_schedule_name_is_a_grid_or_refused_by_name(name):
    if name in grids.SPACING_REFUSED:
        with pytest.raises(ValueError, match=f"spacing '{name}' is not a grid here: "):
            time_grid(SD, 10, name)
        return
    name = COMFY_AS.get(name, name) if name in COMFY_SCHEDULER_NAMES else name
    assert name in SPACINGS
    g = time_grid(SD, 10, name)
    assert g.steps == 10 and float(g.sigma[-1]) == 0.0


# --- kl_optimal: ComfyUI's kl_optimal_scheduler(n, sigma_min, sigma_max); A1111's kl_optimal -----------------

def _comfy_kl_optimal(n, sigma_min, sigma_max):
    """ComfyUI: adj = arange(n) / (n - 1); sigmas[:-1] = tan(adj atan(sigma_min) + (1 - adj) atan(sigma_max)); 0 last."""
    adj = np.arange(n, dtype=np.float64) / (n - 1)
    return np.append(np.tan(adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)), 0.0)


def _a1111_kl_optimal(n, sigma_min, sigma_max):
    """A1111: step_indices = arange(n + 1); tan(i / n atan(sigma_min) + (1 - i / n) atan(sigma_max)) (no 0)."""
    i = np.arange(n + 1, dtype=np.float64)
    return np.tan(i / n * math.atan(sigma_min) + (1.0 - i / n) * math.atan(sigma_max))


@pytest.mark.parametrize("steps", [2, 7, 10, 30])
def test_kl_optimal_is_comfyui_and_a1111(steps):
    lo, hi = _ends(SD)
    np.testing.assert_allclose(_levels(time_grid(SD, steps, "kl_optimal")), _comfy_kl_optimal(steps, lo, hi),
                               rtol=1e-9, atol=0)
    # A1111's list ends at sigma_min with no 0 appended: final="last"
    np.testing.assert_allclose(_levels(time_grid(SD, steps, "KL Optimal", final="last")),
                               _a1111_kl_optimal(steps, lo, hi), rtol=1e-9, atol=0)


# --- linear_quadratic: ComfyUI's linear_quadratic_schedule(model_sampling, steps, threshold_noise, linear_steps) --

def _comfy_linear_quadratic(steps, sigma_max, threshold_noise=0.025, linear_steps=None):
    """ComfyUI (from Mochi's sampler), as lists: the linear part i tn / L, i < L; the quadratic part
    q i^2 + l i + c for L <= i < steps, q = (L - tn steps) / (L Q^2), l = tn / L - 2 (L - tn steps) / Q^2,
    c = q L^2, Q = steps - L; then 1; all as 1 - s, times sigma_max."""
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        L = steps // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / L for i in range(L)]
        diff = L - threshold_noise * steps
        Q = steps - L
        q = diff / (L * Q ** 2)
        lc = threshold_noise / L - 2 * diff / (Q ** 2)
        c = q * (L ** 2)
        quad = [q * (i ** 2) + lc * i + c for i in range(L, steps)]
        sched = [1.0 - s for s in lin + quad + [1.0]]
    return np.asarray(sched) * sigma_max


@pytest.mark.parametrize("steps, tn, L", [(1, 0.025, None), (2, 0.025, None), (10, 0.025, None), (25, 0.025, None),
                                          (10, 0.1, 3)])
def test_linear_quadratic_is_comfyui(steps, tn, L):
    lo, hi = _ends(SD)
    got = _levels(time_grid(SD, steps, "linear_quadratic", threshold_noise=tn, linear_steps=L))
    np.testing.assert_allclose(got, _comfy_linear_quadratic(steps, hi, tn, L), rtol=1e-9, atol=0)
    # on a flow schedule ComfyUI's sigma is the flow's sigma_t = t (its CONST model sampling), sigma_max = t_max
    flow = RectifiedFlow(t_max=1.0)
    g = time_grid(flow, steps, "linear_quadratic", threshold_noise=tn, linear_steps=L)
    np.testing.assert_allclose(g.sigma.numpy(), _comfy_linear_quadratic(steps, 1.0, tn, L), rtol=1e-12, atol=0)


def test_linear_quadratic_refusals():
    with pytest.raises(ValueError, match="ends at sigma = 0 by construction.*final='zero'"):
        time_grid(SD, 10, "linear_quadratic", final="last")
    with pytest.raises(ValueError, match=r"linear_steps must be an integer in \[1, 9\]"):
        time_grid(SD, 10, "linear_quadratic", linear_steps=10)
    with pytest.raises(ValueError, match=r"threshold_noise must lie in \(0, 1\)"):
        time_grid(SD, 10, "linear_quadratic", threshold_noise=1.5)
    with pytest.raises(ValueError, match=r"spacing 'linear_quadratic' takes no option\(s\) \['rho'\]"):
        time_grid(SD, 10, "linear_quadratic", rho=7.0)


# --- A1111's Beta: sigma_min + Beta(0.6, 0.6) quantiles of 1 - linspace(0, 1, n) times the range, then 0 ---------

def test_a1111_beta_is_beta():
    lo, hi = _ends(SD)
    for n in (5, 10, 20):
        ppf = [scipy.stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        want = np.append([lo + x * (hi - lo) for x in ppf], 0.0)
        np.testing.assert_allclose(_levels(time_grid(SD, n, "Beta")), want, rtol=1e-9, atol=0)


def test_new_grids_sample_through_every_entry_point():
    from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
    from diffsampler.pipelines import DiffSamplerScheduler

    gmm = GaussianMixture.random(4, 3, seed=0)
    den = gmm_denoiser(gmm, SD, "epsilon")
    x = ds.samplers.initial_noise((4, 4), SD, seeds=range(4), dtype=torch.float64)
    for spacing in ("kl_optimal", "linear_quadratic", "KL Optimal"):
        got = ds.sample(den, x.clone(), solver="dpmpp_2m", nfe=10, spacing=spacing)
        want = ds.sample(den, x.clone(), solver="dpmpp_2m", grid=time_grid(SD, 10, spacing))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    sched = DiffSamplerScheduler.from_config(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012).config, spacing="kl_optimal")
    sched.set_timesteps(6)
    lo, hi = _ends(SD)
    np.testing.assert_allclose(sched.sigmas.double().numpy(), _comfy_kl_optimal(6, lo, hi), rtol=1e-6)
    with pytest.raises(ValueError, match="spacing 'Align Your Steps' is not a grid here"):
        ds.sample(den, x.clone(), solver="dpmpp_2m", nfe=10, spacing="Align Your Steps")


def test_hydra_takes_the_new_grids_and_refuses_the_rest_with_why():
    from test_aliases import _composed

    from diffsampler.tools.run_checks import ConfigError, validate

    assert validate(_composed("solver=dpmpp_2m", "spacing=KL Optimal", "nfe=6")).sampling.spacing == "KL Optimal"
    assert validate(_composed("solver=dpmpp_2m", "spacing=linear_quadratic", "nfe=6")).sampling.spacing == \
        "linear_quadratic"
    with pytest.raises(ConfigError, match="spacing 'Align Your Steps' is not a grid here: A1111's Align Your Steps"):
        validate(_composed("solver=dpmpp_2m", "spacing=Align Your Steps", "nfe=6"))


# --- ComfyUI's beta scheduler: `comfy_beta` (the name `beta` is diffusers' / A1111's grid) ----------------------

def _comfy_beta(acp, steps, a=0.6, b=0.6):
    """ComfyUI's beta_scheduler over its ModelSamplingDiscrete table sigma_t = sqrt((1 - acp_t) / acp_t):
    ts = rint(Beta(a, b).ppf(1 - linspace(0, 1, steps, endpoint=False)) * (T - 1)), repeats dropped, then 0."""
    table = np.sqrt((1 - acp) / acp)
    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), a, b) * (len(table) - 1))
    out, last = [], -1
    for t in ts:
        if t != last:
            out.append(table[int(t)])
        last = t
    return np.append(out, 0.0)


@pytest.mark.parametrize("steps, a, b", [(5, 0.6, 0.6), (10, 0.6, 0.6), (30, 0.6, 0.6), (10, 0.5, 0.7)])
def test_comfy_beta_is_comfyui_beta_scheduler(steps, a, b):
    acp = SD.alphas_cumprod.double().numpy()
    got = _levels(time_grid(SD, steps, "comfy_beta", alpha=a, beta=b))
    np.testing.assert_allclose(got, _comfy_beta(acp, steps, a, b), rtol=1e-9, atol=0)
    # not the grid named `beta` (diffusers' / A1111's Beta quantiles in sigma): the documented collision
    assert not np.allclose(got, _levels(time_grid(SD, steps, "beta", alpha=a, beta=b)))


def test_comfy_beta_refusals():
    with pytest.raises(ValueError, match="200 steps with spacing 'comfy_beta' repeat timesteps"):
        time_grid(SD, 200, "comfy_beta")
    with pytest.raises(ValueError, match="spacing 'comfy_beta' picks times of a discrete schedule's table"):
        time_grid(RectifiedFlow(), 10, "comfy_beta")
