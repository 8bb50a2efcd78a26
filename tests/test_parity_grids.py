"""diffusers' sigma-space grids (use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas,
use_beta_sigmas): `DiffSamplerScheduler.from_config` with no solver named reproduces
DPMSolverMultistepScheduler on them (same samples to 1e-4), and the grids are diffusers' own."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffsampler.eval.gmm import GMMModel
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.pipelines.parity import solver_for_config
from diffsampler.schedules import DIFFUSERS_SIGMA_SPACINGS, DiscreteVP, diffusers_sigmas, time_grid
from diffusers_loop import run_diffusers

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
KEYS = {"use_karras_sigmas": "diffusers_karras", "use_lu_lambdas": "diffusers_lu",
        "use_exponential_sigmas": "diffusers_exponential", "use_beta_sigmas": "diffusers_beta"}


def x_T(n=32, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))




def parity(gmm, kw, nfe):
    ref = DPMSolverMultistepScheduler(**kw)
    ours = DiffSamplerScheduler.from_config(ref.config)
    model = GMMModel(gmm, ours.schedule)
    a, b = run_diffusers(ref, model, nfe, x_T()), run_diffusers(ours, model, nfe, x_T())
    assert torch.isfinite(a).all()
    return ref, ours, (a - b).abs().max().item()


CASES = [(key, order, final) for key in KEYS for order in (1, 2, 3) for final in ("zero", "sigma_min")
         if not (order == 3 and final == "sigma_min")]


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("key,order,final", CASES)
def test_sigma_grids_reproduce_diffusers(gmm16, key, order, final, nfe):
    kw = dict(solver_order=order, final_sigmas_type=final, **{key: True})
    ref, ours, err = parity(gmm16, kw, nfe)
    assert ours.config.spacing == KEYS[key]
    assert err <= 1e-4, f"max abs diff {err:.3g}"
    # the network sees diffusers' timesteps (the zero-length last call of "sigma_min" is not made)
    n = len(ours.timesteps)
    assert n == (nfe if final == "zero" else nfe - 1)
    assert ours.timesteps.dtype == torch.int64 and torch.equal(ours.timesteps, ref.timesteps[:n])
    assert torch.allclose(ours.sigmas[:n], ref.sigmas[:n], rtol=1e-6, atol=0)


@pytest.mark.parametrize("key", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_sigma_grids_other_beta_schedules(gmm16, key):
    for extra in (SD, dict(SD, steps_offset=1, timestep_spacing="trailing")):  # the spacing keys are unused
        for order in (2, 3):
            _, _, err = parity(gmm16, dict(solver_order=order, **{key: True}, **extra), 10)
            assert err <= 1e-4, (extra, order, err)


def test_sigma_min_third_order_is_refused_by_name():
    with pytest.raises(ValueError, match="solver_order=3 with use_karras_sigmas=True"):
        solver_for_config(DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min",
                                                      use_karras_sigmas=True).config)


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("key", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_euler_discrete_sigmas_are_the_same_grid(key, nfe):
    for extra in ({}, SD):
        ref = EulerDiscreteScheduler(**{key: True}, **extra)
        ref.set_timesteps(nfe)
        schedule = DiscreteVP.from_diffusers_config(ref.config)
        sig, _ = diffusers_sigmas(schedule, nfe, KEYS[key])
        np.testing.assert_array_equal(np.append(sig, 0.0).astype(np.float32), ref.sigmas.numpy())


@pytest.mark.parametrize("spacing", DIFFUSERS_SIGMA_SPACINGS)
def test_time_grid_sits_at_the_float32_sigmas(spacing):
    schedule = DiscreteVP.from_diffusers_config(DPMSolverMultistepScheduler().config)
    sig, _ = diffusers_sigmas(schedule, 8, spacing)
    g = time_grid(schedule, 8, spacing, final="zero")
    assert g.steps == 8 and g.final_zero
    np.testing.assert_allclose((g.sigma / g.alpha)[:-1].numpy(), sig.astype(np.float32), rtol=1e-6)
    g = time_grid(schedule, 7, spacing, final="last")
    assert g.steps == 7 and float(g.t[-1]) == schedule.t_min and abs(float(g.t[0]) - schedule.t_max) < 1e-3


def test_existing_spacings_unchanged():
    # "karras" keeps its meaning (rho-interpolation between the schedule's own end points)
    schedule = DiscreteVP.linear()
    g = time_grid(schedule, 5, "karras", final="last")
    assert float(g.t[0]) == schedule.t_max and float(g.t[-1]) == schedule.t_min
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert solver_for_config(DPMSolverMultistepScheduler().config)["spacing"] == "linspace"
