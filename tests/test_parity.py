"""Parity with diffusers: a plain module or callable as a Denoiser, and `DiffSamplerScheduler.from_config`
with no solver named reproducing the source scheduler (same samples as diffusers' own, to 1e-4)."""

import pytest
import torch
from diffusers import DDPMScheduler

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import denoiser_from_model
from diffsampler.schedules import DiscreteVP
from diffusers_loop import run_diffusers


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


# -- from_config with no solver: the source scheduler's own method, on its own grid ------------------

import json  # noqa: E402
import warnings  # noqa: E402

from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)

from diffsampler.pipelines import DiffSamplerScheduler  # noqa: E402
from diffsampler.pipelines.parity import parity_arguments, solver_for_config, source_class  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)

#: (class, options, the solver the mapping must pick)
PARITY = [
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing"), "ddim"),
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False), "ddim"),
    (DDIMScheduler, dict(), "ddim"),  # leading, clip_sample=True: more in tests/test_parity_ddpm_era.py
    (DDPMScheduler, dict(clip_sample=False), "ddpm"),  # stochastic: with the generator of run_diffusers' caller
    (PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=False, **SD), "plms"),  # Stable Diffusion's
    (DPMSolverMultistepScheduler, dict(), "dpmpp_2m"),
    (DPMSolverMultistepScheduler, dict(solver_order=1), "ddim"),
    (DPMSolverMultistepScheduler, dict(solver_order=3), "dpmpp_3m"),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min"), "dpmpp_2m"),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", lower_order_final=False), "dpmpp_2m"),
    (DPMSolverMultistepScheduler, dict(solver_order=3, final_sigmas_type="sigma_min", timestep_spacing="trailing"),
     "dpmpp_3m"),
    (DPMSolverMultistepScheduler, dict(timestep_spacing="leading", **SD), "dpmpp_2m"),
    (DPMSolverMultistepScheduler, dict(euler_at_final=True), "dpmpp_2m"),
    (DPMSolverMultistepScheduler, dict(prediction_type="v_prediction"), "dpmpp_2m"),
    (DPMSolverMultistepScheduler, dict(thresholding=True, sample_max_value=1.5), "dpmpp_2m"),
    (DEISMultistepScheduler, dict(), "deis_logrho_2"),
    (DEISMultistepScheduler, dict(solver_order=1), "deis_logrho_1"),
    (DEISMultistepScheduler, dict(solver_order=3), "deis_logrho_3"),
    (DEISMultistepScheduler, dict(timestep_spacing="trailing"), "deis_logrho_2"),
]


def parity_error(gmm, cls, kw, nfe, how="config"):
    ref_sched = cls(**kw)
    src = {"config": ref_sched.config, "instance": ref_sched,
           "json": json.loads(ref_sched.to_json_string())}[how]
    ours_sched = DiffSamplerScheduler.from_config(src)
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T(32)
    if kw.get("thresholding"):
        x = x.reshape(32, 1, 4, 4)
    stochastic = ours_sched.solver.stochastic  # then the same generator on both sides

    def gen():
        return torch.Generator().manual_seed(7) if stochastic else None

    ref = run_diffusers(ref_sched, model, nfe, x, generator=gen())
    ours = run_diffusers(ours_sched, model, nfe, x, generator=gen())
    return ours_sched, (ours - ref).abs().max().item()


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("cls,kw,solver", PARITY, ids=[f"{c[0].__name__}-{c[1]}" for c in PARITY])
def test_from_config_reproduces_diffusers(gmm16, cls, kw, solver, nfe):
    sched, err = parity_error(gmm16, cls, kw, nfe)
    assert sched.config.solver == solver
    assert err <= 1e-4


@pytest.mark.parametrize("how", ["instance", "json"])
def test_source_class_from_instance_or_class_name(gmm16, how):
    sched, err = parity_error(gmm16, DPMSolverMultistepScheduler, dict(solver_order=3), 10, how)
    assert sched.config.solver == "dpmpp_3m" and err <= 1e-4


def test_mapped_solver_survives_save_and_load(tmp_path):
    sched = DiffSamplerScheduler.from_config(DEISMultistepScheduler(solver_order=3).config)
    sched.save_pretrained(tmp_path)
    back = DiffSamplerScheduler.from_pretrained(tmp_path)
    assert (back.config.solver, back.final, back.config.solver_options) == ("deis_logrho_3", "last",
                                                                            {"lower_order_final": True})


def test_naming_a_solver_or_a_spacing_still_wins():
    cfg = DPMSolverMultistepScheduler(solver_order=3).config
    assert DiffSamplerScheduler.from_config(cfg, solver="heun").config.solver == "heun"
    s = DiffSamplerScheduler.from_config(cfg, spacing="logsnr")
    assert (s.config.solver, s.spacing) == ("dpmpp_3m", "logsnr")
    assert DiffSamplerScheduler().config.solver == "dpmpp_2m"


REFUSED = [
    # the use_*_sigmas grids are reproduced (tests/test_parity_grids.py) except with this combination
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"),
     "use_karras_sigmas=True"),
    (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"),
     "use_exponential_sigmas=True"),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True, solver_order=3, final_sigmas_type="sigma_min"),
     "use_lu_lambdas=True"),
    (DPMSolverMultistepScheduler, dict(variance_type="learned_range"), "variance_type='learned_range'"),
    # the other algorithm types, solver_type heun, euler_at_final: tests/test_parity_dpm.py
    (DEISMultistepScheduler, dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
    (DDIMScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    (FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), "stochastic_sampling=True cannot be reproduced"),
    (PNDMScheduler, dict(skip_prk_steps=True, prediction_type="v_prediction"), "prediction_type='v_prediction'"),
    (UniPCMultistepScheduler, dict(solver_p=DDIMScheduler()), "solver_p"),  # the rest: tests/test_parity_unipc.py
    # the sigma-space classes are reproduced (tests/test_parity_kdiffusion.py); diffusers' own raises for these
    (EulerAncestralDiscreteScheduler, dict(prediction_type="sample"), "prediction_type='sample'"),
]


@pytest.mark.parametrize("cls,kw,match", REFUSED, ids=[f"{c[0].__name__}-{c[1]}" for c in REFUSED])
def test_unsupported_configs_are_refused_by_name(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        DiffSamplerScheduler.from_config(cls(**kw).config)
    with pytest.raises(ValueError, match=match):
        DiffSamplerScheduler.from_config(cls(**kw))
    DiffSamplerScheduler.from_config(cls(**kw).config, solver="dpmpp_2m")  # naming a solver replaces it


def test_class_name_inference():
    assert source_class(dict(DEISMultistepScheduler().config)) == "DEISMultistepScheduler"
    assert source_class({"_class_name": "DDIMScheduler"}) == "DDIMScheduler"
    assert set(source_class(dict(LMSDiscreteScheduler().config))) >= {"LMSDiscreteScheduler", "KDPM2DiscreteScheduler"}
    # a partial config with _class_name takes its class's defaults
    assert solver_for_config({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3})["solver"] == "dpmpp_3m"
    with pytest.raises(ValueError, match="_class_name"):
        solver_for_config({"num_train_timesteps": 1000})


def test_unknown_foreign_config_warns_naming_class_name():
    # keys of several classes (more in tests/test_parity_keys.py): refused naming them
    with pytest.raises(ValueError, match="DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler, UniPC.*_class_name"):
        DiffSamplerScheduler.from_config({"num_train_timesteps": 1000, "solver_order": 2})
    # keys of no single class: the default solver, with a warning naming _class_name
    with pytest.warns(UserWarning, match="skip_prk_steps.*_class_name"):
        s = DiffSamplerScheduler.from_config({"num_train_timesteps": 1000, "solver_order": 2, "skip_prk_steps": True})
    assert s.config.solver == "dpmpp_2m"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parity_arguments({"num_train_timesteps": 1000, "beta_schedule": "linear"}) == {}