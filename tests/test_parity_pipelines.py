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
