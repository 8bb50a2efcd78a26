"""DiffSamplerScheduler inside real diffusers pipelines (tiny random-weight models saved and loaded with
from_pretrained): every registered solver runs through DDPMPipeline.__call__ with exactly
`num_inference_steps` network calls; from a pipeline's scheduler config it reproduces diffusers' own
DPM-Solver++ / DDIM / DEIS schedulers inside the pipelines; Stable Diffusion text-to-image (CFG) and
image-to-image (`set_begin_index`) paths; half-precision networks through `diffsampler.sample`."""

import functools

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DEISMultistepScheduler,
                       DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline)

import diffsampler as ds
from diffsampler.pipelines import DiffSamplerScheduler, denoiser_from_pipeline
from tiny_pipelines import ddpm_pipeline, sd_pipeline


class CallCounter:
    """Replaces `module.forward` (instance attribute) and counts the calls."""

    def __init__(self, module):
        self.n = 0
        self.timesteps = []
        self._forward = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        self.n += 1
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.timesteps.append(float(torch.as_tensor(t).flatten()[0]))
        return self._forward(*args, **kwargs)


def record_last_sample(sched):
    """Wrap `sched.step` (signature kept, pipelines inspect it) to keep the last prev_sample."""
    step, last = sched.step, {}

    @functools.wraps(step)
    def rec(*args, **kwargs):
        out = step(*args, **kwargs)
        last["x"] = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        return out

    sched.step = rec
    return last


class DEISWithGenerator(DEISMultistepScheduler):
    """DEISMultistepScheduler.step has no `generator`, which DDPMPipeline always passes."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is fastest, and immune to the 10-100x slowdowns of OpenMP
    threads competing with other processes on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm")
    ddpm_pipeline(path)
    return path


@pytest.fixture(scope="module")
def ddpm(ddpm_dir):
    pipe = DDPMPipeline.from_pretrained(ddpm_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.calls = CallCounter(pipe.unet)
    pipe.base_config = pipe.scheduler.config  # the tests assign other schedulers to pipe.scheduler
    return pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = sd_pipeline(tmp_path_factory.mktemp("sd"))
    pipe.set_progress_bar_config(disable=True)
    pipe.calls = CallCounter(pipe.unet)
    pipe.base_config = pipe.scheduler.config
    g = torch.Generator().manual_seed(1)
    pipe.test_inputs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
                            negative_prompt_embeds=torch.randn(1, 5, 16, generator=g), guidance_scale=5.0)
    pipe.test_latents = torch.randn(1, 4, 8, 8, generator=g)
    return pipe


def run_ddpm(pipe, sched, steps, batch=2, seed=0, pipeline=None, **kw):
    """Run `pipeline` (default: the DDPM pipeline) with `sched`; images, final sample, unet calls."""
    runner = pipeline or pipe
    runner.scheduler = sched
    last = record_last_sample(sched)
    pipe.calls.n = 0
    images = runner(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="np", **kw).images
    return images, last["x"], pipe.calls.n


def assert_same(ours, ref, images, images_ref):
    assert np.abs(images - images_ref).max() <= 1e-4
    # the final states are large (random weights: |x| ~ 5e2): compare relative to their scale
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5


# --------------------------------------------------------------------------------------------
# 1. every registered solver through DDPMPipeline.__call__
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in ds.available() if not ds.samplers.info(n)["adaptive"]])  # the adapter refuses adaptive solvers
def test_ddpm_pipeline_every_solver(ddpm, name):
    sched = DiffSamplerScheduler.from_config(ddpm.base_config, solver=name)
    images, x, calls = run_ddpm(ddpm, sched, 6)
    assert images.shape == (2, 8, 8, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert torch.isfinite(x).all()
    # the pipeline's images are diffsampler.sample's samples on the same plan, x_T and noise, decoded
    g = torch.Generator().manual_seed(0)  # DDPMPipeline draws x_T from it, the adapter then its step noise
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    den = denoiser_from_pipeline(ddpm)
    ours = ds.sample(den, x_T, solver=sched.plan, generator=g)
    assert ((x - ours).abs().max() / ours.abs().max()).item() <= 1e-5
    assert np.abs(images - den.decode(ours).permute(0, 2, 3, 1).numpy()).max() <= 1e-5
    assert calls == 6 == len(sched.timesteps)
    if ds.samplers.info(name)["stochastic"]:  # noise from the pipeline's generator: reproducible
        again, _, _ = run_ddpm(ddpm, DiffSamplerScheduler.from_config(ddpm.base_config, solver=name), 6)
        assert np.array_equal(images, again)


# --------------------------------------------------------------------------------------------
# 2. from the pipeline's scheduler config: same images as diffusers' own schedulers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [5, 10])
def test_ddpm_pipeline_dpmpp_2m_matches_diffusers(ddpm, steps):
    cfg = ddpm.base_config  # DDPMScheduler: "leading" spacing
    ref_im, ref, _ = run_ddpm(ddpm, DPMSolverMultistepScheduler.from_config(cfg), steps)
    im, x, calls = run_ddpm(ddpm, DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m", clip_sample=False), steps)
    assert calls == steps
    assert_same(x, ref, im, ref_im)


@pytest.mark.parametrize("steps", [5, 10])
def test_ddim_matches_diffusers_ddim_pipeline(ddpm, steps):
    """DDIMPipeline + DDIMScheduler (trailing, eta=0) vs our "ddim" from that scheduler's config.
    Ours runs in DDPMPipeline (same unet, same initial noise draw): DDIMPipeline itself passes
    eta / use_clipped_model_output to step, which ours does not accept (next test)."""
    ref_sched = DDIMScheduler.from_config(ddpm.base_config, timestep_spacing="trailing", clip_sample=False)
    ddim = DDIMPipeline(unet=ddpm.unet, scheduler=ref_sched)
    ddim.set_progress_bar_config(disable=True)
    ref_im, ref, ref_calls = run_ddpm(ddpm, ref_sched, steps, pipeline=ddim, eta=0.0)
    sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="ddim")
    assert (sched.spacing, sched.final) == ("trailing", "zero")
    im, x, calls = run_ddpm(ddpm, sched, steps)
    assert calls == ref_calls == steps
    assert_same(x, ref, im, ref_im)


def test_ddim_pipeline_call_with_our_scheduler(ddpm):
    cfg = DDIMScheduler.from_config(ddpm.base_config, timestep_spacing="trailing", clip_sample=False).config
    ddim = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(cfg))
    ddim.set_progress_bar_config(disable=True)
    ddim.scheduler = DiffSamplerScheduler.from_config(cfg, solver="ddim")  # __init__ would convert it to DDIM
    im = ddim(batch_size=1, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(0),
              output_type="np").images
    assert np.isfinite(im).all()
    with pytest.raises(ValueError, match="set it on the solver"):
        ddim(batch_size=1, num_inference_steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [5, 10])
def test_ddpm_pipeline_deis_matches_diffusers(ddpm, steps):
    """DEISMultistepScheduler ends at sigma_min (sigma(t=0)), so ours needs final="last" (next test)."""
    ref_sched = DEISWithGenerator.from_config(ddpm.base_config, solver_order=3)
    ref_im, ref, _ = run_ddpm(ddpm, ref_sched, steps)
    sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="deis_logrho_3", final="last",
                                             clip_sample=False)
    im, x, calls = run_ddpm(ddpm, sched, steps)
    assert calls == steps
    assert_same(x, ref, im, ref_im)


def test_deis_config_maps_to_final_last(ddpm):
    cfg = DEISMultistepScheduler.from_config(ddpm.base_config, solver_order=3).config
    assert DiffSamplerScheduler.from_config(cfg, solver="deis_logrho_3").final == "last"


def test_swap_back_to_diffusers_after_one_swap(ddpm):
    """pipe.scheduler = X.from_config(pipe.scheduler.config): ours -> diffusers works after one swap."""
    ours = DiffSamplerScheduler.from_config(ddpm.base_config, solver="ddim")
    back = DPMSolverMultistepScheduler.from_config(ours.config)
    back.set_timesteps(5)
    assert len(back.timesteps) == 5


def test_swap_back_to_diffusers_after_two_swaps(ddpm):
    ours = DiffSamplerScheduler.from_config(ddpm.base_config, solver="ddim")
    ours = DiffSamplerScheduler.from_config(ours.config, solver="heun")
    DPMSolverMultistepScheduler.from_config(ours.config).set_timesteps(5)


# --------------------------------------------------------------------------------------------
# 3. Stable Diffusion text-to-image with classifier-free guidance
# --------------------------------------------------------------------------------------------

def run_sd(pipe, sched, steps, output_type="latent", pipeline=None, **kw):
    runner = pipeline or pipe
    runner.scheduler = sched
    pipe.calls.n = 0
    pipe.calls.timesteps = []
    out = runner(**pipe.test_inputs, num_inference_steps=steps, output_type=output_type,
                 generator=torch.Generator().manual_seed(0), **kw).images
    return out, pipe.calls.n


@pytest.mark.parametrize("steps", [5, 10])
def test_sd_pipeline_dpmpp_2m_matches_diffusers(sd, steps):
    cfg = sd.base_config  # scaled_linear, steps_offset=1, linspace
    ref, _ = run_sd(sd, DPMSolverMultistepScheduler.from_config(cfg), steps, latents=sd.test_latents.clone())
    ours, calls = run_sd(sd, DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m"), steps,
                         latents=sd.test_latents.clone())
    assert calls == steps  # one batched (uncond, cond) unet call per model evaluation
    assert ours.shape == (1, 4, 8, 8)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["dpmpp_3m", "heun", "deis_3", "ddim"])
def test_sd_pipeline_solvers(sd, name):
    images, calls = run_sd(sd, DiffSamplerScheduler.from_config(sd.base_config, solver=name), 6,
                           output_type="np", latents=sd.test_latents.clone())
    assert images.shape == (1, 16, 16, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert calls == 6
    # the pipeline's images are diffsampler.sample's latents on the same plan, decoded
    den = denoiser_from_pipeline(sd, sd.test_inputs["guidance_scale"], prompt_embeds=sd.test_inputs["prompt_embeds"],
                                 negative_prompt_embeds=sd.test_inputs["negative_prompt_embeds"])
    ours = ds.sample(den, sd.test_latents.clone(), solver=sd.scheduler.plan)
    assert np.abs(images - den.decode(ours).permute(0, 2, 3, 1).numpy()).max() <= 1e-4


# --------------------------------------------------------------------------------------------
# 4. image-to-image: a partial schedule through set_begin_index
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def img2img(sd):
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


IMG2IMG_STEPS, STRENGTH = 10, 0.6  # StableDiffusionImg2ImgPipeline: int(10 * 0.6) = 6 denoising calls

def image_input():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m",
                                  "heun", "dpmpp_2s"])
def test_img2img_partial_schedule(sd, img2img, name):
    sched = DiffSamplerScheduler.from_config(sd.base_config, solver=name)
    images, calls = run_sd(sd, sched, IMG2IMG_STEPS, output_type="np", pipeline=img2img, image=image_input(),
                           strength=STRENGTH)
    assert np.isfinite(images).all() and images.shape == (1, 16, 16, 3)
    assert calls == int(IMG2IMG_STEPS * STRENGTH)
    # the unet ran at the plan's model times (re-gridded ones for a start inside a heun/2s step)
    assert sd.calls.timesteps == pytest.approx(sched.timesteps[-calls:].tolist(), abs=1e-3)
    assert sched.timesteps[-calls:].tolist() == pytest.approx(sched._t_model.tolist(), abs=1e-3)


def test_img2img_dpmpp_2m_matches_diffusers(sd, img2img):
    """`order` is 1 (one model call per timestep entry), so the partial schedule equals diffusers':
    the same add_noise time, the same restart of the multistep warm-up."""
    cfg = sd.base_config
    kw = dict(pipeline=img2img, image=image_input(), strength=STRENGTH)
    ref, ref_calls = run_sd(sd, DPMSolverMultistepScheduler.from_config(cfg), IMG2IMG_STEPS, **kw)
    sched = DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m")
    ours, calls = run_sd(sd, sched, IMG2IMG_STEPS, **kw)
    assert calls == ref_calls == int(IMG2IMG_STEPS * STRENGTH)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------
# 5. half-precision networks through diffsampler.sample
# --------------------------------------------------------------------------------------------

def unclipped(pipe):
    """The DDPM config clips x0 to [-1, 1]; a clip boundary turns round-off into O(1) jumps, so the
    precision comparison runs without it."""
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


@pytest.fixture(scope="module")
def reference_samples(ddpm_dir):
    den = denoiser_from_pipeline(unclipped(DDPMPipeline.from_pretrained(ddpm_dir)))
    return den, {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "heun"])
def test_half_precision_unet_sample(ddpm_dir, reference_samples, dtype, solver):
    pipe = DDPMPipeline.from_pretrained(ddpm_dir, dtype=dtype)
    try:
        pipe.unet(torch.zeros(1, 3, 8, 8, dtype=dtype), 10)
    except RuntimeError as e:  # e.g. CPU kernels missing for this dtype
        pytest.skip(f"{dtype} unet forward unsupported on this build: {e}")
    den = denoiser_from_pipeline(unclipped(pipe))
    ref_den, cache = reference_samples
    for nfe in (5, 12, 25, 50):
        x = ds.sample(den, shape=den.sample_shape(2), seeds=[0, 1], solver=solver, nfe=nfe)
        assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8)
        assert torch.isfinite(x).all(), (solver, nfe)
        key = (solver, nfe)
        if key not in cache:
            cache[key] = ds.sample(ref_den, shape=den.sample_shape(2), seeds=[0, 1], solver=solver, nfe=nfe)
        ref = cache[key]
        assert ((x - ref).abs().max() / ref.abs().max()).item() <= 0.02, (solver, nfe)  # measured <= 0.004


class DDIMClippedOutput(DDIMScheduler):
    """DDIM that re-derives eps from the clipped x0 (use_clipped_model_output=True): our DDIM works on
    the (clipped) data prediction alone, like DDPM's posterior and DPM-Solver++ thresholding."""

    def step(self, *args, **kwargs):
        kwargs.pop("generator", None)
        return super().step(*args, use_clipped_model_output=True, **kwargs)


@pytest.mark.parametrize("src,kw", [(DDIMClippedOutput, dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")),
                                    (DPMSolverMultistepScheduler, dict(thresholding=True, sample_max_value=0.8))])
def test_config_clipping_and_thresholding_are_honoured(ddpm, src, kw):
    """clip_sample (DDPM/DDIM configs) and dynamic thresholding read from the config, as diffusers does."""
    ref_sched = src.from_config(ddpm.base_config, **kw)
    ref_im, ref, _ = run_ddpm(ddpm, ref_sched, 5)
    name = "ddim" if src is DDIMClippedOutput else "dpmpp_2m"
    im, x, _ = run_ddpm(ddpm, DiffSamplerScheduler.from_config(ref_sched.config, solver=name), 5)
    assert np.abs(im - ref_im).max() <= 1e-4 and (x - ref).abs().max() <= 1e-4  # clipped states are O(1)
    plain, _, _ = run_ddpm(ddpm, DiffSamplerScheduler.from_config(ref_sched.config, solver=name, clip_sample=False,
                                                                  thresholding=False), 5)
    assert np.abs(plain - im).max() > 1e-3  # the transform did something here
