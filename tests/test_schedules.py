"""Noise schedules and time grids."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import diffsampler as ds
from diffsampler.denoisers import Denoiser
from diffsampler.schedules import CosineVP, DiscreteVP, EDM, LinearVP, RectifiedFlow, time_grid

SCHEDULES = [DiscreteVP.linear(), LinearVP(), CosineVP(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: type(s).__name__)
def test_lambda_inverse_and_definitions(sch):
    t = torch.linspace(sch.t_min, sch.t_max, 101, dtype=torch.float64)
    lam = sch.lambda_(t)
    assert bool((lam[1:] < lam[:-1]).all()), "lambda must decrease from data to noise"
    torch.testing.assert_close(sch.t_from_lambda(lam), t, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(lam, torch.log(sch.alpha(t) / sch.sigma(t)), rtol=1e-12, atol=1e-12)
    if not sch.is_variance_exploding and not isinstance(sch, RectifiedFlow):
        torch.testing.assert_close(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_vp_from_diffusers_config(beta_schedule):
    ref = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    sch = DiscreteVP.from_diffusers_config(ref.config)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sch.alpha(t) ** 2, ref.alphas_cumprod.double(), rtol=1e-6, atol=1e-12)


def test_zero_terminal_snr_is_floored_not_nan():
    ref = DDIMScheduler(rescale_betas_zero_snr=True)
    sch = DiscreteVP.from_diffusers_config(ref.config)
    a2 = float(sch.alpha(999.0)) ** 2
    assert math.isfinite(float(sch.lambda_(999.0))) and 0 < a2 <= 2.0**-24 and a2 < float(ref.alphas_cumprod[998])


def test_continuous_interpolation_between_knots():
    """lambda is linear in t between integer timesteps (DPM-Solver's discrete-time wrapper)."""
    sch = DiscreteVP.linear()
    l0, l1 = float(sch.lambda_(300.0)), float(sch.lambda_(301.0))
    assert float(sch.lambda_(300.25)) == pytest.approx(0.75 * l0 + 0.25 * l1, rel=1e-12)


@pytest.mark.parametrize("final", ["zero", "last"])
def test_logsnr_grid_is_uniform_in_lambda(final):
    sch = LinearVP()
    g = time_grid(sch, 8, "logsnr", final=final)
    lam = g.lam[:-1] if final == "zero" else g.lam
    d = torch.diff(lam)
    torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-9, atol=1e-9)
    assert g.steps == 8 and (g.sigma[-1] == 0) == (final == "zero")


def test_karras_grid_formula():
    sch = EDM(0.002, 80.0)
    g = time_grid(sch, 10, "karras", final="last", rho=7.0)
    i = np.arange(11) / 10
    want = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(g.sigma.numpy(), want, rtol=1e-10)


def test_time_uniform_and_quadratic():
    sch = LinearVP()
    g = time_grid(sch, 4, "time_uniform", final="last")
    np.testing.assert_allclose(g.t.numpy(), np.linspace(1.0, 1e-3, 5))
    g = time_grid(sch, 4, "time_quadratic", final="last")
    np.testing.assert_allclose(np.sqrt(g.t.numpy()), np.linspace(1.0, math.sqrt(1e-3), 5), rtol=1e-12)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_diffusers_spacings_reproduce_dpmsolver_timesteps(spacing, steps):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(steps)
    sch = DiscreteVP.from_diffusers_config(ref.config)
    g = time_grid(sch, steps, spacing, final="zero", steps_offset=ref.config.steps_offset)
    np.testing.assert_array_equal(g.t[:-1].numpy(), ref.timesteps.numpy().astype(np.float64))
    np.testing.assert_allclose((g.sigma / g.alpha).numpy(), ref.sigmas.numpy(), rtol=2e-6, atol=0)


def test_prediction_type_conversions_agree():
    """One network, four parametrisations: all give the same D and eps."""
    sch = LinearVP()
    x = torch.randn(4, 5, dtype=torch.float64)
    x0, eps = torch.randn(4, 5, dtype=torch.float64), None
    t = 0.4
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    eps = (x - a * x0) / s
    outs = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
    for pred, out in outs.items():
        den = Denoiser(lambda xx, tt, out=out: out, sch, pred)
        torch.testing.assert_close(den.data_pred(x, t), x0)
        torch.testing.assert_close(den.noise_pred(x, t), eps)
    fl = RectifiedFlow()
    a, s = float(fl.alpha(t)), float(fl.sigma(t))
    eps = (x - a * x0) / s
    den = Denoiser(lambda xx, tt: eps - x0, fl, "flow")
    torch.testing.assert_close(den.data_pred(x, t), x0)
    torch.testing.assert_close(den.noise_pred(x, t), eps)
