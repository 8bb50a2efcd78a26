"""Parity with diffusers: a plain module or callable as a Denoiser, and `DiffSamplerScheduler.from_config`
with no solver named reproducing the source scheduler (same samples as diffusers' own, to 1e-4)."""

import pytest
import torch
from diffusers import DDPMScheduler

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import denoiser_from_model
from diffsampler.schedules import DiscreteVP


def x_T(n=16, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# -- denoiser_from_model on models without a diffusers config ----------------------------------------

class PlainNet(torch.nn.Module):
    """A module with no diffusers `.config`: forward(x, t) -> the exact epsilon prediction."""

    def __init__(self, gmm, schedule):
        super().__init__()
        self.inner = GMMModel(gmm, schedule)

    def forward(self, x, t):
        return self.inner(x, t).sample.to(x.dtype)


@pytest.mark.parametrize("how", ["module+config", "callable+config", "module+schedule", "callable+schedule"])
def test_plain_module_or_callable_samples_like_the_exact_denoiser(gmm16, how):
    cfg = DDPMScheduler(clip_sample=False).config
    schedule = DiscreteVP.from_diffusers_config(cfg)
    net = PlainNet(gmm16, schedule)
    f = net if how.startswith("module") else (lambda x, t: net(x, t))
    if how.endswith("config"):
        den = denoiser_from_model(f, cfg)
    else:
        den = denoiser_from_model(f, schedule=schedule, prediction_type="epsilon")
    ours = ds.sample(den, x_T(), solver="dpmpp_2m", nfe=8)
    ref = ds.sample(gmm_denoiser(gmm16, schedule), x_T(), solver="dpmpp_2m", nfe=8)
    assert den.nfe == 8 and (ours - ref).abs().max() <= 1e-4


def test_plain_callable_takes_conditioning_keywords(gmm16):
    schedule = DiscreteVP.from_diffusers_config(DDPMScheduler().config)
    net, seen = PlainNet(gmm16, schedule), []

    def f(x, t, scale):
        seen.append(scale)
        return net(x, t)

    den = denoiser_from_model(f, schedule=schedule, prediction_type="epsilon", cond={"scale": 1.0})
    ds.sample(den, x_T(), solver="euler", nfe=3)
    assert seen == [1.0] * 3


def test_plain_module_missing_arguments_are_refused_by_name(gmm16):
    schedule = DiscreteVP.from_diffusers_config(DDPMScheduler().config)
    net = PlainNet(gmm16, schedule)
    with pytest.raises(ValueError, match="scheduler_config, or schedule and prediction_type"):
        denoiser_from_model(net)
    with pytest.raises(ValueError, match="needs prediction_type"):
        denoiser_from_model(net, schedule=schedule)
    with pytest.raises(ValueError, match="not both"):
        denoiser_from_model(net, DDPMScheduler().config, schedule=schedule, prediction_type="epsilon")
    with pytest.raises(TypeError, match="callable"):
        denoiser_from_model(object(), schedule=schedule, prediction_type="epsilon")


def test_plain_module_sample_shape_needs_channels(gmm16):
    schedule = DiscreteVP.from_diffusers_config(DDPMScheduler().config)
    den = denoiser_from_model(PlainNet(gmm16, schedule), schedule=schedule, prediction_type="epsilon")
    with pytest.raises(ValueError, match="channels="):
        den.sample_shape(2, 8, 8)
    den = denoiser_from_model(PlainNet(gmm16, schedule), schedule=schedule, prediction_type="epsilon",
                              channels=4, sample_size=8)
    assert den.sample_shape(2) == (2, 4, 8, 8)


def test_plain_callable_must_return_a_tensor(gmm16):
    schedule = DiscreteVP.from_diffusers_config(DDPMScheduler().config)
    den = denoiser_from_model(lambda x, t: (x,), schedule=schedule, prediction_type="epsilon")
    with pytest.raises(TypeError, match="must return a tensor"):
        ds.sample(den, x_T(), solver="euler", nfe=2)
