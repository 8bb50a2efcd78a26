"""Classifier-free guidance in a limited interval of noise levels (Kynkaanniemi et al. 2024) on the
class-conditional mixture, where both branches have closed forms: inside sigma_lo < sigma_t / alpha_t
<= sigma_hi the prediction is D_u + w (D_c - D_u), outside it D_c, from one network pass of the batch
(no unconditional rows)."""

from __future__ import annotations

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.denoisers import Denoiser
from diffsampler.eval.gmm import ConditionalGMMModel, GaussianMixture
from diffsampler.guidance import ClassifierFreeGuidance
from diffsampler.guidance.cfg import CFGModel
from diffsampler.pipelines.loaders import denoiser_from_model
from diffsampler.schedules import DiscreteVP, LinearVP, time_grid

TARGET, W = 1, 3.0
COND, UNCOND = {"class_labels": torch.tensor([TARGET])}, {"class_labels": torch.tensor([-1])}


@pytest.fixture(scope="module")
def labelled():
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)) * 1.5
    return GaussianMixture(means, [0.4] * 6, None, component_labels=[0, 0, 1, 1, 2, 2])


class Recording(ConditionalGMMModel):
    """The conditional mixture network, recording the batch size of every pass."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.batches: list[int] = []

    def __call__(self, sample, timestep, **cond):
        self.batches.append(sample.shape[0])
        return super().__call__(sample, timestep, **cond)


def _den(gmm, schedule, interval, scale=W):
    net = Recording(gmm, schedule, "epsilon")
    den = Denoiser(net, schedule, "epsilon", cond=COND)
    return ClassifierFreeGuidance(scale, uncond=UNCOND, interval=interval).wrap(den), net


def _level(schedule, t) -> float:
    return float(schedule.rho(torch.tensor(t, dtype=torch.float64)))


def test_inside_guided_outside_conditional_and_one_pass(labelled):
    schedule = LinearVP()
    lo, hi = _level(schedule, 0.3), _level(schedule, 0.7)  # guidance for 0.3 < t <= 0.7
    den, net = _den(labelled, schedule, (lo, hi))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.9, 0.7, 0.5, 0.3, 0.1):
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = schedule.alpha(tt), schedule.sigma(tt)
        inside = 0.3 < t <= 0.7 and t != 0.3  # the interval is open at sigma_lo
        want = labelled.guided_posterior_mean(x, a, s, TARGET, W if inside else 1.0)
        torch.testing.assert_close(den.data_pred(x, t), want, rtol=1e-5, atol=1e-6)  # float32 network times
    # a pass of 2B rows inside (cond + uncond), of B rows outside; one counted call each
    assert net.batches == [16, 32, 32, 16, 16] and den.nfe == 5


def test_sampling_equals_the_closed_form_interval_field(labelled):
    """The trajectory equals that of the closed-form field that is guided exactly on (sigma_lo,
    sigma_hi] (float64, same solver); the interval is between the grid's levels so that round-off
    cannot move a point across a bound."""
    schedule = DiscreteVP.linear()
    grid = time_grid(schedule, 12, "logsnr")
    lv = (grid.sigma / grid.alpha)[:-1]
    lo, hi = math.sqrt(float(lv[8] * lv[9])), math.sqrt(float(lv[2] * lv[3]))  # steps 3..8 guided

    def exact(x, t_model):
        t = t_model.double() / schedule.time_scale
        a, s = schedule.alpha(t), schedule.sigma(t)
        lvl = float(s[0] / a[0])
        w = W if lo < lvl <= hi else 1.0
        return labelled.guided_posterior_mean(x.double(), a.view(-1, 1), s.view(-1, 1), TARGET, w)

    den, net = _den(labelled, schedule, (lo, hi))
    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ds.sample(den, x_T.clone(), solver="dpmpp_2m", grid=grid)
    want = ds.sample(Denoiser(exact, schedule, "sample"), x_T.clone(), solver="dpmpp_2m", grid=grid)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # both read float32 network times
    assert net.batches == [64] * 3 + [128] * 6 + [64] * 3  # the 6 calls outside save the unconditional rows
    # and it differs from guidance everywhere and from no guidance
    full = ds.sample(_den(labelled, schedule, None)[0], x_T.clone(), solver="dpmpp_2m", grid=grid)
    plain = ds.sample(_den(labelled, schedule, None, scale=1.0)[0], x_T.clone(), solver="dpmpp_2m", grid=grid)
    assert (got - full).abs().max() > 1e-2 and (got - plain).abs().max() > 1e-2


def test_per_sample_levels_mix_in_one_pass(labelled):
    schedule = LinearVP()
    den, net = _den(labelled, schedule, (_level(schedule, 0.3), _level(schedule, 0.7)))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2, 0.6], dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    got = den.predict(x, t, "data", alpha=a, sigma=s)
    w = torch.tensor([1.0, W, 1.0, W], dtype=torch.float64)
    want = torch.stack([labelled.guided_posterior_mean(x[i:i + 1], a[i], s[i], TARGET, float(w[i]))[0]
                        for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 network times
    assert net.batches == [8]


def test_pipeline_path_equals_the_guidance_object(labelled):
    """denoiser_from_model(..., guidance_interval=...) (what Hydra's guidance.interval uses): the
    same samples as ClassifierFreeGuidance(interval=...)."""
    schedule = DiscreteVP.linear()
    grid = time_grid(schedule, 10, "time_uniform")
    lv = (grid.sigma / grid.alpha)[:-1]
    interval = (math.sqrt(float(lv[7] * lv[8])), math.sqrt(float(lv[1] * lv[2])))
    net = Recording(labelled, schedule, "epsilon")
    piped = denoiser_from_model(lambda x, t, **c: net(x, t, **c).sample, schedule=schedule, prediction_type="epsilon",
                                guidance_scale=W, guidance_interval=interval, cond=COND, uncond=UNCOND)
    x_T = torch.randn(32, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = ds.sample(piped, x_T.clone(), solver="dpmpp_2m", grid=grid)
    assert net.batches == [32] * 2 + [64] * 6 + [32] * 2
    want = ds.sample(_den(labelled, schedule, interval)[0], x_T.clone(), solver="dpmpp_2m", grid=grid)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the network sees float32 times on this path


@pytest.mark.parametrize("interval, match", [
    ((5.0, 1.0), r"0 <= sigma_lo < sigma_hi"), ((-1.0, 2.0), r"0 <= sigma_lo"), ((1.0,), r"\(sigma_lo, sigma_hi\)"),
    ("0.3,2", r"got '0.3,2'"), ((0.3, float("nan")), r"sigma_hi"), ((True, 2.0), r"got \(True"),
])
def test_bad_intervals_are_refused(interval, match):
    with pytest.raises(ValueError, match=match):
        ClassifierFreeGuidance(W, uncond=UNCOND, interval=interval)


def test_interval_without_guidance_is_refused(labelled):
    with pytest.raises(ValueError, match=r"no effect at guidance scale 1"):
        ClassifierFreeGuidance(1.0, uncond=UNCOND, interval=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"no effect at guidance scale 1"):
        CFGModel(lambda x, t, **c: x, COND, UNCOND, 1.0, interval=(0.5, 2.0), schedule=LinearVP())
    with pytest.raises(ValueError, match=r"needs the noise schedule"):
        CFGModel(lambda x, t, **c: x, COND, UNCOND, 2.0, interval=(0.5, 2.0))
    ClassifierFreeGuidance(W, uncond=UNCOND, interval=(0.0, float("inf")))  # everywhere, spelled out


def _spec(*overrides):
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.run_spec import resolve

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return resolve(compose("config", overrides=["model=diffusers", "model.path=some/pipeline", "guidance=cfg",
                                                    *overrides]))


def test_hydra_guidance_interval():
    from diffsampler.tools.run_checks import ConfigError, _check_guidance

    spec = _spec("guidance.interval=[0.28,5.42]")
    assert spec.guidance.interval == (0.28, 5.42)
    _check_guidance(spec)
    assert _spec().guidance.interval is None  # the default: guidance at every noise level
    with pytest.raises(ConfigError, match=r"guidance.interval: .*0 <= sigma_lo < sigma_hi.*got \[5.42, 0.28\]"):
        _check_guidance(_spec("guidance.interval=[5.42,0.28]"))
    with pytest.raises(ConfigError, match=r"guidance.interval: .*no effect at guidance scale 1"):
        _check_guidance(_spec("guidance.interval=[0.28,5.42]", "guidance.scale=1"))
    with pytest.raises(ConfigError, match=r"guidance.interval.*a list of numbers"):
        _spec("guidance.interval=high")


def test_runner_passes_the_interval(monkeypatch):
    from diffsampler.tools import runner

    seen = {}

    def fake(pipe, scale, rescale, **kw):
        seen.update(kw, scale=scale)
        return "den"

    import diffsampler.eval.digits as digits
    import diffsampler.pipelines as pipelines

    monkeypatch.setattr(pipelines, "denoiser_from_pipeline", fake)
    monkeypatch.setattr(digits, "load_digits_pipeline", lambda path: _Pipe())
    spec = _spec("guidance.interval=[0.28,5.42]", "guidance.scale=4", "model.prompt=a cat")
    m = spec.model.__class__(**{**spec.model.__dict__, "name": "digits"})
    assert runner._pipeline_denoiser(m, spec.guidance, "cpu") == "den"
    assert seen["guidance_interval"] == (0.28, 5.42) and seen["scale"] == 4


class _Pipe:
    def to(self, device):
        return self
