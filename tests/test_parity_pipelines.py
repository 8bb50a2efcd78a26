"""Parity by default in a real pipeline, end to end: the bundled digits DDPMPipeline run through its own
`__call__` with diffusers' DPMSolverMultistepScheduler (built from the pipeline's scheduler config) and
with `DiffSamplerScheduler.from_config(that config)` -- no solver named -- gives the same images; with an
upgraded solver named, the pipeline's images are `diffsampler.sample`'s on the same plan.

DDPMPipeline has no `callback_on_step_end`, so the callback path is not exercised here."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import diffsampler as ds
from diffsampler.eval.digits import load_digits_pipeline
from diffsampler.pipelines import DiffSamplerScheduler, denoiser_from_pipeline

NFE, BATCH = 5, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.base_config = pipe.scheduler.config  # the tests assign other schedulers to pipe.scheduler
    return pipe


def run(pipe, sched, seed=0):
    pipe.scheduler = sched
    return pipe(batch_size=BATCH, num_inference_steps=NFE, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def dpm_config(pipe):
    """DPMSolverMultistepScheduler from the DDPM pipeline's config, without the two DDPM keys it inherits
    but ignores: variance_type='fixed_small' (acted on only when 'learned*') and clip_sample=True (not
    an argument of DPMSolverMultistepScheduler, kept in its config)."""
    return DPMSolverMultistepScheduler.from_config({**pipe.base_config, "clip_sample": False},
                                                   variance_type=None).config


def test_digits_pipeline_dpmsolver_parity_by_default(digits):
    cfg = dpm_config(digits)
    ref = run(digits, DPMSolverMultistepScheduler.from_config(cfg))
    ours_sched = DiffSamplerScheduler.from_config(cfg)
    assert ours_sched.config.solver == "dpmpp_2m"
    ours = run(digits, ours_sched)
    assert ours.shape == (BATCH, 16, 16, 1)
    assert np.abs(ours - ref).max() <= 1e-4


def test_digits_pipeline_dpmsolver_config_as_is_is_reproduced(digits):
    cfg = DPMSolverMultistepScheduler.from_config(digits.base_config).config
    DiffSamplerScheduler.from_config(cfg)


def test_digits_pipeline_dpmsolver_inherited_clip_sample_is_ignored(digits):
    cfg = DPMSolverMultistepScheduler.from_config(digits.base_config, variance_type=None).config
    ref = run(digits, DPMSolverMultistepScheduler.from_config(cfg))
    assert np.abs(run(digits, DiffSamplerScheduler.from_config(cfg)) - ref).max() <= 1e-4


def test_digits_pipeline_upgraded_solver_equals_sample(digits):
    cfg = dpm_config(digits)
    sched = DiffSamplerScheduler.from_config(cfg, solver="dpmpp_3m")
    assert sched.config.solver == "dpmpp_3m"
    images = run(digits, sched)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert len(sched.timesteps) == NFE
    g = torch.Generator().manual_seed(0)  # DDPMPipeline draws x_T from it
    x_T = torch.randn(BATCH, 1, 16, 16, generator=g)
    den = denoiser_from_pipeline(digits)  # digits.scheduler is ours here
    x = ds.sample(den, x_T, solver=sched.plan, generator=g)
    assert np.abs(images - den.decode(x).permute(0, 2, 3, 1).numpy()).max() <= 1e-5
    # and it is not the parity solver's output
    assert np.abs(images - run(digits, DiffSamplerScheduler.from_config(cfg))).max() > 1e-4


# --------------------------------------------------------------------------------------------------
# tiny real pipelines (tests/tiny_pipelines.py), each run through its own __call__: parity by default (the
# same output as with its own scheduler) and with an upgraded solver (runs, finite, different)
# --------------------------------------------------------------------------------------------------

from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline)

from diffsampler.pipelines.parity import SUPPORTED_CLASSES  # noqa: E402
from tiny_pipelines import ddim_pipeline, sd3_pipeline, sd_pipeline, tiny_unet  # noqa: E402


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    pipe.base_config = pipe.scheduler.config
    return pipe


def check_upgrade(ours, ref):
    assert np.isfinite(np.asarray(ours)).all()
    assert float(np.abs(np.asarray(ours) - np.asarray(ref)).max()) > 1e-3


def test_ddim_pipeline_parity_and_upgrade():
    pipe = quiet(ddim_pipeline())

    def go(sched, eta=0.0):
        pipe.scheduler = sched
        return pipe(batch_size=2, num_inference_steps=5, eta=eta, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    for eta in (0.0, 1.0):  # eta=1: the same generator's noise
        ref = go(DDIMScheduler.from_config(pipe.base_config), eta)
        ours_sched = DiffSamplerScheduler.from_config(pipe.base_config, **({"eta": eta} if eta else {}))
        assert ours_sched.config.solver == "ddim"
        assert np.abs(go(ours_sched, eta) - ref).max() <= 1e-4
    ref = go(DDIMScheduler.from_config(pipe.base_config))
    check_upgrade(go(DiffSamplerScheduler.from_config(pipe.base_config, solver="dpmpp_3m")), ref)


def test_ddpm_pipeline_parity_or_refusal_and_upgrade():
    pipe = quiet(DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()))

    def go(sched):
        pipe.scheduler = sched
        return pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    ref = go(DDPMScheduler.from_config(pipe.base_config))
    if "DDPMScheduler" in SUPPORTED_CLASSES:
        assert np.abs(go(DiffSamplerScheduler.from_config(pipe.base_config)) - ref).max() <= 1e-4
    else:
        with pytest.raises(ValueError, match="DDPMScheduler"):
            DiffSamplerScheduler.from_config(pipe.base_config)
    check_upgrade(go(DiffSamplerScheduler.from_config(pipe.base_config, solver="dpmpp_2m")), ref)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = quiet(sd_pipeline(tmp_path_factory.mktemp("sd")))
    g = torch.Generator().manual_seed(1)
    pipe.test_inputs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
                            negative_prompt_embeds=torch.randn(1, 5, 16, generator=g), guidance_scale=5.0)
    pipe.test_latents = torch.randn(1, 4, 8, 8, generator=g)
    return pipe


def run_sd(pipe, sched, steps=6, **kw):
    """The pipeline's output latents, and what its callback_on_step_end saw after each step: the latents
    and the scheduler's sigma at its step_index (as pipelines that read scheduler.sigmas do)."""
    pipe.scheduler = sched
    seen = []

    def callback(p, i, t, tensors):
        seen.append((tensors["latents"].clone(), float(p.scheduler.sigmas[p.scheduler.step_index])))
        return {}

    out = pipe(**pipe.test_inputs, num_inference_steps=steps, output_type="latent", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents"], generator=torch.Generator().manual_seed(0), **kw).images
    return out, seen


def test_sd_pipeline_cfg_callback_sigmas_parity_by_default(sd):
    """Latent model + classifier-free guidance + callback_on_step_end reading scheduler.sigmas[step_index]:
    each step's latents and sigma equal DPMSolverMultistepScheduler's (the pipeline's own)."""
    ref, ref_seen = run_sd(sd, DPMSolverMultistepScheduler.from_config(sd.base_config), latents=sd.test_latents.clone())
    ours, seen = run_sd(sd, DiffSamplerScheduler.from_config(sd.base_config), latents=sd.test_latents.clone())
    assert len(seen) == len(ref_seen) == 6
    scale = ref.abs().max().item()
    for (x, s), (x_ref, s_ref) in zip(seen, ref_seen):
        assert (x - x_ref).abs().max().item() <= 1e-5 * scale
        assert s == pytest.approx(s_ref, rel=1e-6, abs=1e-7)
    up, _ = run_sd(sd, DiffSamplerScheduler.from_config(sd.base_config, solver="dpmpp_3m"), latents=sd.test_latents.clone())
    check_upgrade(up, ref)


def test_sd_img2img_strength_parity_by_default(sd):
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.test_inputs = sd.test_inputs
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(image=image, strength=0.6, steps=10)
    ref, ref_seen = run_sd(pipe, DPMSolverMultistepScheduler.from_config(sd.base_config), **kw)
    ours, seen = run_sd(pipe, DiffSamplerScheduler.from_config(sd.base_config), **kw)
    assert len(seen) == len(ref_seen) == 6
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    up, _ = run_sd(pipe, DiffSamplerScheduler.from_config(sd.base_config, solver="heun"), **kw)
    check_upgrade(up, ref)


@pytest.fixture(scope="module")
def sd3():
    pipe = quiet(sd3_pipeline(shift=3.0))
    g = torch.Generator().manual_seed(1)
    pipe.test_inputs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
                            pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                            negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                            negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g), guidance_scale=4.0)
    pipe.test_latents = torch.randn(1, 4, 8, 8, generator=g)
    return pipe


def run_sd3(pipe, sched, **kw):
    pipe.scheduler = sched
    return pipe(**pipe.test_inputs, output_type="latent", height=16, width=16,
                generator=torch.Generator().manual_seed(3), **kw).images


@pytest.mark.parametrize("kw", [dict(num_inference_steps=6), dict(sigmas=[1.0, 0.8, 0.5, 0.3, 0.1])],
                         ids=["steps", "sigmas"])
def test_sd3_flow_transformer_parity_by_default(sd3, kw):
    """SD3-style flow transformer (FlowMatchEuler, shift 3) with CFG, and with a pipeline's sigmas= list."""
    lat = dict(latents=sd3.test_latents.clone())
    ref = run_sd3(sd3, FlowMatchEulerDiscreteScheduler.from_config(sd3.base_config), **kw, **lat)
    ours_sched = DiffSamplerScheduler.from_config(sd3.base_config)
    ours = run_sd3(sd3, ours_sched, **kw, **dict(latents=sd3.test_latents.clone()))
    assert ours_sched.spacing == "flowmatch"
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    up = run_sd3(sd3, DiffSamplerScheduler.from_config(sd3.base_config, solver="dpmpp_2m"), **kw,
                 **dict(latents=sd3.test_latents.clone()))
    check_upgrade(up, ref)


def test_sd3_img2img_scale_noise_parity_by_default(sd3):
    """Flow img2img with strength: timesteps[t_start:], set_begin_index, scale_noise of the encoded image."""
    pipe = StableDiffusion3Img2ImgPipeline(**sd3.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.test_inputs = sd3.test_inputs
    kw = dict(image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)), strength=0.6,
              num_inference_steps=10)
    ref = run_sd3(pipe, FlowMatchEulerDiscreteScheduler.from_config(sd3.base_config), **kw)
    ours = run_sd3(pipe, DiffSamplerScheduler.from_config(sd3.base_config), **kw)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    check_upgrade(run_sd3(pipe, DiffSamplerScheduler.from_config(sd3.base_config, solver="dpmpp_2m"), **kw), ref)
