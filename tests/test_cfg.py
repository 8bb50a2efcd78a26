"""Classifier-free guidance on a class-conditional Gaussian mixture, where the guided denoiser has a
closed form: D_w = D_u + w (D_c - D_u) of the exact conditional and unconditional posterior means."""

import pytest
import torch

import diffsampler as ds
from diffsampler.denoisers import Denoiser
from diffsampler.eval.gmm import ConditionalGMMModel, GaussianMixture
from diffsampler.guidance import ClassifierFreeGuidance
from diffsampler.schedules import LinearVP

TARGET = 1


@pytest.fixture(scope="module")
def labelled():
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)) * 1.5
    return GaussianMixture(means, [0.4] * 6, None, component_labels=[0, 0, 1, 1, 2, 2])


def guided_denoiser(gmm, scale, pred="epsilon"):
    schedule = LinearVP()
    den = Denoiser(ConditionalGMMModel(gmm, schedule, pred), schedule, pred,
                   cond={"class_labels": torch.tensor([TARGET])})
    return ClassifierFreeGuidance(scale, uncond={"class_labels": torch.tensor([-1])}).wrap(den), schedule


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 7.5])
def test_cfg_denoiser_is_the_closed_form(labelled, pred, scale):
    """One batched forward pass (both branches) per call; the data prediction equals the closed form
    in every parametrisation (combining raw outputs == combining data predictions)."""
    den, schedule = guided_denoiser(labelled, scale, pred)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.9, 0.5, 0.1):
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = schedule.alpha(tt), schedule.sigma(tt)
        want = labelled.guided_posterior_mean(x, a, s, TARGET, scale)
        assert torch.allclose(den.data_pred(x, t), want, atol=1e-9)
    assert den.nfe == 3


def class_posterior(gmm, x):
    """p(class = TARGET | x0) under the clean mixture."""
    logp = gmm.component_log_prob(x.double()) + gmm._log_w
    on = gmm.component_labels == TARGET
    return torch.exp(torch.logsumexp(logp[:, on], 1) - torch.logsumexp(logp, 1))


def exact_guided(gmm, schedule, w):
    """The closed-form guided field as a data-prediction network."""
    def net(x, t_model):
        t = t_model.double() / schedule.time_scale
        return gmm.guided_posterior_mean(x.double(), schedule.alpha(t), schedule.sigma(t), TARGET, w).to(x.dtype)
    return Denoiser(net, schedule, "sample")


def test_cfg_moves_samples_toward_the_class(labelled):
    """Sampling with the guided network: the class posterior of the samples rises with the scale
    (w = 0: the unconditional rate, 1/3; w = 1: the conditional model, ~1); the trajectories equal
    those of the closed-form guided field (same solver) to float precision, and converge to its exact
    ODE solution (150-step DPM-Solver++(3M) in float64) at second order."""
    n = 512
    x_T = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    rates = []
    for w in (0.0, 0.5, 1.0, 3.0):
        den, schedule = guided_denoiser(labelled, w)
        x = ds.sample(den, x_T.clone(), solver="dpmpp_2m", nfe=40)
        rates.append(class_posterior(labelled, x).mean().item())
        same = ds.sample(exact_guided(labelled, schedule, w), x_T.clone(), solver="dpmpp_2m", nfe=40)
        assert (x - same).abs().max() < 1e-4, w
        if w == 3.0:
            ref = ds.sample(exact_guided(labelled, schedule, w), x_T.clone().double(), solver="dpmpp_3m", nfe=150)
            x20 = ds.sample(den, x_T.clone(), solver="dpmpp_2m", nfe=20)
            e20, e40 = ((y.double() - ref).pow(2).mean().sqrt().item() for y in (x20, x))
            assert e40 < 0.02 and e20 / e40 > 3.0, (e20, e40)
    assert abs(rates[0] - 1 / 3) < 0.08
    assert rates[2] > 0.97
    assert rates[0] < rates[1] < rates[2] <= rates[3] + 1e-6, rates


@pytest.mark.parametrize("name", [n for n in ds.available() if not ds.samplers.info(n)["adaptive"]])  # fixed plans (dpm_adaptive: tests/test_dpm_adaptive.py)
def test_cfg_composes_with_every_solver(labelled, name):
    den, schedule = guided_denoiser(labelled, 2.0)
    nfe = max(8, ds.samplers.info(name)["min_nfe"])
    x = ds.sample(den, shape=(16, 8), seeds=range(16), solver=name, nfe=nfe)
    assert torch.isfinite(x).all() and den.nfe == nfe  # one (batched) forward pass per model call
    assert class_posterior(labelled, x).mean() > 0.8


def test_cfg_errors(labelled):
    with pytest.raises(ValueError, match="scale"):
        guided_denoiser(labelled, -1.0)
    schedule = LinearVP()
    model = ConditionalGMMModel(labelled, schedule)
    den = Denoiser(model, schedule, cond={"class_labels": torch.tensor([7])})
    with pytest.raises(ValueError, match="class label 7"):
        den.data_pred(torch.zeros(2, 8), 0.5)
