"""Heavy-ball momentum and GHVB: exact reduction at beta = 1, measured orders, and the paper's point:
bounded samples under strong classifier-free guidance at low NFE where high-order solvers diverge."""

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.samplers.momentum import ghvb_weights
from diffsampler.samplers.loop import make_plan


@pytest.mark.parametrize("base", ["dpmpp_2m", "dpmpp_3m", "pndm", "deis_3", "deis_logrho_3", "dpmpp_2m_sde"])
def test_heavy_ball_with_beta_one_is_the_base_solver(gmm8, base):
    sch = ds.LinearVP()
    hb, plain = make_plan(base, sch, 12, momentum=1.0), make_plan(base, sch, 12)
    den = gmm_denoiser(gmm8, sch)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(ds.sample(den, x.clone(), hb, seeds=range(8)),
                               ds.sample(den, x.clone(), plain, seeds=range(8)), rtol=1e-12, atol=1e-12)


def test_ghvb_integer_order_is_plms(gmm8):
    sch = ds.LinearVP()
    den = gmm_denoiser(gmm8, sch)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (1, 2, 3, 4):
        torch.testing.assert_close(ds.sample(den, x.clone(), "ghvb", nfe=12, order=k),
                                   ds.sample(den, x.clone(), "pndm", nfe=12, order=k), rtol=1e-12, atol=1e-12)
    assert ghvb_weights(4, 1.0) == pytest.approx([55 / 24, -59 / 24, 37 / 24, -9 / 24])


@pytest.mark.parametrize("order,expected", [(1.5, 2), (2.5, 2), (3.8, 2)])
def test_ghvb_fractional_orders_converge_at_about_two(order, expected):
    g = GaussianMixture(torch.tensor([[0.5] * 4], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    sch = ds.LinearVP()
    den = gmm_denoiser(g, sch)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = g.ode_endpoint(x_T, float(sch.alpha(1.0)), float(sch.sigma(1.0)), float(sch.alpha(sch.t_min)),
                         float(sch.sigma(sch.t_min)))
    nfes = [40, 80, 160, 320]
    errs = [float((ds.sample(den, x_T.clone(), "ghvb", nfe=n, spacing="logsnr", final="last", order=order) - ref)
                  .pow(2).mean().sqrt()) for n in nfes]
    assert abs(-np.polyfit(np.log(nfes), np.log(errs), 1)[0] - expected) <= 0.3, errs


def test_bad_momentum_options():
    with pytest.raises(ValueError, match=r"solver 'dpmpp_3m': momentum \(heavy-ball damping beta\) must be in \(0, 1\], got 1.5"):
        ds.samplers.get("dpmpp_3m", momentum=1.5)
    with pytest.raises(ValueError, match=r"solver 'ghvb': GHVB order must be in \(0, 4\]"):
        ds.samplers.get("ghvb", order=5.5)


def _guided_setup():
    """A class-conditional 64-d mixture under CFG in x0 space, D = D_u + w (D_c - D_u)."""
    gm = GaussianMixture.random(64, 8, seed=3, scale=1.0, std=(0.2, 0.4), n_classes=2)
    cond = gm.class_conditional(0)
    sch = ds.DiscreteVP.linear()

    def model(w):
        def f(x, t):
            a, s = sch.alpha(t / sch.time_scale).view(-1, 1), sch.sigma(t / sch.time_scale).view(-1, 1)
            return gm.guided_posterior_mean(x.double(), a.flatten(), s.flatten(), cond, w).to(x.dtype)
        return ds.Denoiser(f, sch, "sample")

    return sch, model


def divergence(name, w, nfe, spacing, **opts):
    sch, model = _guided_setup()
    x_T = torch.randn(256, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ds.sample(model(w), x_T.clone(), "dpmpp_3m", nfe=500, spacing=spacing)
    x = ds.sample(model(w), x_T.clone(), name, nfe=nfe, spacing=spacing, **opts)
    return float(x.norm(dim=1).max() / ref.norm(dim=1).max()), float((x - ref).pow(2).mean().sqrt())


def test_momentum_removes_divergence_under_strong_guidance():
    """CFG scale 15, NFE 8, logSNR grid: 3M and PLMS-4 samples leave the data range (largest norm
    many times the high-NFE reference's), GHVB of order 1.5 stays bounded and is closer to it."""
    base_3m, err_3m = divergence("dpmpp_3m", 15, 8, "logsnr")
    base_plms, err_plms = divergence("pndm", 15, 8, "logsnr")
    ghvb, err_ghvb = divergence("ghvb", 15, 8, "logsnr", order=1.5)
    assert base_3m > 5 and base_plms > 5, (base_3m, base_plms)
    assert ghvb < 1.5, ghvb
    assert err_ghvb < 0.2 * min(err_3m, err_plms)
