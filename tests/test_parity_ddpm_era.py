"""Parity by default for diffusers' DDPM-era schedulers: `DiffSamplerScheduler.from_config(cfg)` with no
solver named equals DDIMScheduler / DDPMScheduler / PNDMScheduler in the standard loop (same model,
same x_T, the same generator for stochastic steps), to 1e-4 max abs (float32) on the exact mixture,
at NFE 5, 10 and 25, for every timestep_spacing and the options that change the samples."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from diffsampler.eval.gmm import GMMModel
from diffsampler.pipelines import DiffSamplerScheduler
from diffusers_loop import run_diffusers

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NFES = [5, 10, 25]


def x_T(n=32, seed=0):
    """(n, 1, 4, 4) samples: diffusers' thresholding needs >= 3-d samples."""
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def both(gmm, ref_sched, nfe, seed=None, ours_kw=None, step_kw=None, x=None):
    """(ours, diffusers'): the standard loop with from_config(ref_sched.config, **ours_kw) and with
    ref_sched; stochastic runs use a generator seeded `seed` on each side."""
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config, **(ours_kw or {}))
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T() if x is None else x

    def run(sched):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        return run_loop(sched, model, nfe, x, g, step_kw or {})

    return ours_sched, run(ours_sched), run(ref_sched)


def run_loop(sched, model, nfe, x, generator, step_kw):
    """tests/diffusers_loop.run_diffusers, with keywords for step() (DDIMPipeline passes eta)."""
    if not step_kw:
        return run_diffusers(sched, model, nfe, x, generator=generator)
    sched.set_timesteps(nfe)
    for t in sched.timesteps:
        kw = dict(step_kw) if generator is None else {**step_kw, "generator": generator}
        x = sched.step(model(x, t).sample, t, x, **kw).prev_sample
    return x


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# -- DDIM -------------------------------------------------------------------------------------------

DDIM_CONFIGS = [
    dict(),  # diffusers' defaults: leading, clip_sample=True, set_alpha_to_one=True
    dict(timestep_spacing="linspace"),
    dict(timestep_spacing="trailing", clip_sample=False),
    dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, **SD),  # Stable Diffusion's DDIM
    dict(timestep_spacing="linspace", set_alpha_to_one=False, clip_sample_range=0.8),
    dict(timestep_spacing="leading", steps_offset=1, clip_sample_range=0.7),
    dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9, clip_sample=False),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample_range=0.8),
    dict(prediction_type="sample", set_alpha_to_one=False),
]


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("kw", DDIM_CONFIGS, ids=str)
def test_ddim_by_default(gmm16, kw, nfe):
    ref_sched = DDIMScheduler(**kw)
    ours_sched, ours, ref = both(gmm16, ref_sched, nfe)
    assert ours_sched.config.solver == "ddim"
    assert ours_sched.timesteps.tolist() == ref_sched.timesteps.tolist()
    assert max_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("nfe", [7, 13])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_ddim_timesteps_and_stride(gmm16, spacing, nfe):
    """n not dividing 1000: diffusers' step from t goes to t - 1000 // n, which is the next timestep
    for leading only; reproduced (timesteps equal too), where stepping to the next timestep differs."""
    ref_sched = DDIMScheduler(timestep_spacing=spacing, clip_sample=False)
    ours_sched, ours, ref = both(gmm16, ref_sched, nfe)
    assert ours_sched.timesteps.tolist() == ref_sched.timesteps.tolist()
    assert ours_sched.timesteps.dtype == torch.int64
    assert max_diff(ours, ref) <= 1e-4
    _, next_point, _ = both(gmm16, ref_sched, nfe, ours_kw=dict(solver="ddim", spacing=ours_sched.spacing))
    assert max_diff(next_point, ref) > 1e-3 if spacing != "leading" else max_diff(next_point, ref) <= 1e-4


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("eta,kw", [(1.0, dict()), (0.5, dict(timestep_spacing="trailing", clip_sample=False)),
                                    (0.3, dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, **SD))],
                         ids=["eta1-clip", "eta0.5-trailing", "eta0.3-sd"])
def test_ddim_eta_same_generator(gmm16, eta, kw, nfe):
    """eta > 0 (passed to step, as DDIMPipeline does; set on our solver at from_config): the same
    generator gives diffusers' noise draws."""
    ours_sched, ours, ref = both(gmm16, DDIMScheduler(**kw), nfe, seed=3, ours_kw=dict(eta=eta),
                                 step_kw=dict(eta=eta))
    assert ours_sched.solver.eta == eta and ours_sched.solver.diffusers_stride
    assert max_diff(ours, ref) <= 1e-4
    other = both(gmm16, DDIMScheduler(**kw), nfe, seed=4, ours_kw=dict(eta=eta), step_kw=dict(eta=eta))[1]
    assert max_diff(other, ours) > 1e-2  # the noise matters


def test_ddim_variance_noise(gmm16):
    ref_sched = DDIMScheduler()
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config, eta=1.0)
    model = GMMModel(gmm16, ours_sched.schedule)
    outs = []
    for sched in (ours_sched, ref_sched):
        x = x_T()
        sched.set_timesteps(10)
        for k, t in enumerate(sched.timesteps):
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + k))
            x = sched.step(model(x, t).sample, t, x, eta=1.0, variance_noise=z).prev_sample
        outs.append(x)
    assert max_diff(*outs) <= 1e-4


def test_ddim_clipped_model_output(gmm16):
    """clip_sample keeps the network's epsilon in the direction term (use_clipped_model_output=False,
    the pipelines' default); use_clipped_model_output=True is refused by name, or reproduced with
    solver_options raw_noise=False."""
    kw = dict(clip_sample_range=0.7)
    ours_sched = DiffSamplerScheduler.from_config(DDIMScheduler(**kw).config)
    assert ours_sched.solver.raw_noise
    ours_sched.set_timesteps(5)
    x = x_T()
    with pytest.raises(ValueError, match="use_clipped_model_output=True.*raw_noise"):
        ours_sched.step(torch.zeros_like(x), ours_sched.timesteps[0], x, use_clipped_model_output=True)
    ours_sched.set_timesteps(5)
    ours_sched.step(torch.zeros_like(x), ours_sched.timesteps[0], x, use_clipped_model_output=False)

    step_kw = dict(use_clipped_model_output=True)
    _, ours, ref = both(gmm16, DDIMScheduler(**kw), 10, ours_kw=dict(solver_options={"raw_noise": False}),
                        step_kw=step_kw)
    assert max_diff(ours, ref) <= 1e-4
    _, raw, _ = both(gmm16, DDIMScheduler(**kw), 10)
    assert max_diff(raw, ref) > 1e-3  # the two directions differ here


def test_ddim_zero_snr_refused_by_name():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True.*9e-4"):
        DiffSamplerScheduler.from_config(DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction").config)


def test_ddim_diffusers_options_through_sample_and_hydra(gmm16, tmp_path):
    """The options the mapping uses work in sample() (same result as the adapter) and as Hydra overrides."""
    import diffsampler as ds
    from diffsampler.eval.gmm import gmm_denoiser

    ref_sched = DDIMScheduler(timestep_spacing="linspace", clip_sample_range=0.8)
    ours_sched, adapter, ref = both(gmm16, ref_sched, 7)
    den = ds.Thresholded(gmm_denoiser(gmm16, ours_sched.schedule), max_value=0.8, dynamic=False)
    x = ds.sample(den, x_T().reshape(32, 16), solver="ddim", nfe=7, spacing="ddim_linspace",
                  diffusers_stride=True, raw_noise=True)
    assert max_diff(x.reshape(adapter.shape), adapter) <= 1e-5
    with pytest.raises(ValueError, match="set_alpha_to_one=False applies with diffusers_stride=True"):
        ds.sample(den, x_T().reshape(32, 16), solver="ddim", nfe=7, set_alpha_to_one=False)
    with pytest.raises(ValueError, match="final='zero'"):
        ds.sample(den, x_T().reshape(32, 16), solver="ddim", nfe=7, final="last", diffusers_stride=True)
    spec = hydra_spec("solver=ddim", "spacing=ddim_linspace", "nfe=7", "+solver.options.diffusers_stride=true",
                      "+solver.options.raw_noise=true", "+solver.options.set_alpha_to_one=false")
    assert spec.sampling.spacing == "ddim_linspace"
    assert spec.solver.options == {"diffusers_stride": True, "raw_noise": True, "set_alpha_to_one": False}


def hydra_spec(*overrides):
    """The validated run spec of a Hydra command line (what `diffsampler ...` runs)."""
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.run_checks import validate

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return validate(compose("config", overrides=list(overrides)))


# -- DDPM -------------------------------------------------------------------------------------------

DDPM_CONFIGS = [
    dict(),  # diffusers' defaults: leading, fixed_small, clip_sample=True
    dict(variance_type="fixed_large"),
    dict(variance_type="fixed_small_log", timestep_spacing="trailing"),
    dict(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False),  # noise on the last step
    dict(timestep_spacing="linspace", prediction_type="v_prediction", clip_sample_range=0.8),
    dict(steps_offset=1, prediction_type="sample", clip_sample=False, **SD),
    dict(thresholding=True, sample_max_value=1.5, clip_sample=False),
]


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("kw", DDPM_CONFIGS, ids=str)
def test_ddpm_by_default(gmm16, kw, nfe):
    ref_sched = DDPMScheduler(**kw)
    ours_sched, ours, ref = both(gmm16, ref_sched, nfe, seed=3)
    assert ours_sched.config.solver == "ddpm"
    assert ours_sched.timesteps.tolist() == ref_sched.timesteps.tolist()
    assert max_diff(ours, ref) <= 1e-4


def test_ddpm_noise_and_variance_matter(gmm16):
    _, ours, _ = both(gmm16, DDPMScheduler(), 10, seed=3)
    assert max_diff(both(gmm16, DDPMScheduler(), 10, seed=4)[1], ours) > 1e-2
    assert max_diff(both(gmm16, DDPMScheduler(variance_type="fixed_large"), 10, seed=3)[1], ours) > 1e-2
    # DDPM's fixed_small is DDIM's eta = 1 (same mean, same variance), as a diffsampler run shows
    _, ddim, _ = both(gmm16, DDPMScheduler(clip_sample=False), 10, seed=3,
                      ours_kw=dict(solver="ddim", spacing="ddim_leading", eta=1.0))
    _, ddpm, _ = both(gmm16, DDPMScheduler(clip_sample=False), 10, seed=3)
    assert max_diff(ddim, ddpm) <= 1e-5


@pytest.mark.parametrize("variance", ["learned", "learned_range", "fixed_large_log"])
def test_ddpm_variances_refused_by_name(variance):
    with pytest.raises(ValueError, match=f"variance_type='{variance}'"):
        DiffSamplerScheduler.from_config(DDPMScheduler(variance_type=variance).config)
    with pytest.raises(ValueError, match="variance must be one of"):
        DiffSamplerScheduler(solver="ddpm", solver_options={"variance": variance})


def test_ddpm_through_sample_and_hydra(gmm16):
    import diffsampler as ds
    from diffsampler.eval.gmm import gmm_denoiser

    ref_sched = DDPMScheduler(variance_type="fixed_large", clip_sample=False, timestep_spacing="trailing")
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    model = GMMModel(gmm16, ours_sched.schedule)
    # one generator per sample row: the adapter and sample(seeds=...) draw the same noise
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    x = torch.stack([torch.randn(1, 4, 4, generator=g) for g in gens])
    adapter = run_diffusers(ours_sched, model, 10, x, generator=gens)
    den = gmm_denoiser(gmm16, ours_sched.schedule)
    ours = ds.sample(den, shape=(4, 16), seeds=range(4), solver="ddpm", variance="fixed_large", nfe=10,
                     spacing="trailing")
    assert max_diff(ours, adapter.reshape(4, 16)) <= 1e-5
    alone = ds.sample(den, shape=(1, 16), seeds=[2], solver="ddpm", variance="fixed_large", nfe=10, spacing="trailing")
    assert max_diff(alone[0], ours[2]) == 0.0  # sample k depends only on seed k
    with pytest.raises(ValueError, match="variance-preserving"):
        ds.sample(gmm_denoiser(gmm16, ds.EDM()), shape=(1, 16), seeds=[0], solver="ddpm", variance="fixed_large", nfe=4)
    spec = hydra_spec("solver=ddpm", "spacing=ddim_leading", "nfe=10", "+solver.options.variance=fixed_large")
    assert spec.solver.options == {"variance": "fixed_large"} and spec.sampling.spacing == "ddim_leading"


# -- PNDM -------------------------------------------------------------------------------------------

PNDM_CONFIGS = [
    dict(),  # diffusers' defaults: leading, skip_prk_steps=False (three Runge-Kutta warm-up steps)
    dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD),  # Stable Diffusion's PNDM
    dict(skip_prk_steps=True, timestep_spacing="linspace"),
    dict(skip_prk_steps=True, timestep_spacing="trailing", set_alpha_to_one=False),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace", set_alpha_to_one=False),
]


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("kw", PNDM_CONFIGS, ids=str)
def test_pndm_by_default(gmm16, kw, nfe):
    """set_timesteps(n) as diffusers counts it: n timesteps, n + 1 model calls (n + 9 with PRK)."""
    ref_sched = PNDMScheduler(**kw)
    ours_sched, ours, ref = both(gmm16, ref_sched, nfe)
    assert ours_sched.config.solver == "plms" and ours_sched.config.budget == "steps"
    assert ours_sched.solver.prk == (not ref_sched.config.skip_prk_steps)
    assert ours_sched.timesteps.tolist() == ref_sched.timesteps.tolist()
    assert ours_sched.timesteps.dtype == torch.int64 and ours_sched.num_inference_steps == nfe
    assert len(ours_sched.timesteps) == nfe + (9 if ours_sched.solver.prk else 1)
    assert max_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("nfe", [7, 13])
def test_pndm_stride_matters(gmm16, nfe):
    """Off the leading grid diffusers' PLMS steps to t - T // n and its warm-up trapezoid starts from
    t_1 + T // n: both reproduced; stepping along the grid instead differs."""
    ref_sched = PNDMScheduler(skip_prk_steps=True, timestep_spacing="trailing")
    ours_sched, ours, ref = both(gmm16, ref_sched, nfe)
    assert max_diff(ours, ref) <= 1e-4
    on_grid = dict(solver="plms", spacing="trailing", budget="steps")
    assert max_diff(both(gmm16, ref_sched, nfe, ours_kw=on_grid)[1], ref) > 1e-3


def test_pndm_refusals_and_plms_counts():
    import diffsampler as ds
    from diffsampler.samplers import make_plan

    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*4.7"):
        DiffSamplerScheduler.from_config(PNDMScheduler(prediction_type="v_prediction").config)
    sch = ds.DiscreteVP.linear()
    assert [make_plan("plms", sch, n, "ddim_leading").nfe for n in (1, 2, 3, 10)] == [1, 2, 3, 10]
    assert make_plan("plms", sch, 2, "ddim_leading").orders == [1, 2]  # no call left for the warm-up
    assert make_plan("plms", sch, 3, "ddim_leading").orders == [2, 2]  # trapezoid warm-up, then AB-2
    assert make_plan("plms", sch, 13, "ddim_leading", prk=True).nfe == 13
    with pytest.raises(ValueError, match="plms. spends 5 model calls on this grid .4 steps."):
        make_plan("plms", sch, 4, grid=ds.time_grid(sch, 4, "ddim_leading"))
    with pytest.raises(ValueError, match="needs an integer nfe >= 13"):
        make_plan("plms", sch, 12, "ddim_leading", prk=True)
    with pytest.raises(ValueError, match="budget must be one of"):
        DiffSamplerScheduler(budget="calls")


def test_plms_through_sample_adapter_and_hydra(gmm16):
    """plms (and its prk warm-up) in sample() equals the adapter on the same grid; Hydra takes its options."""
    import diffsampler as ds
    from diffsampler.eval.gmm import gmm_denoiser

    for prk, nfe in ((False, 8), (True, 14)):
        sched = DiffSamplerScheduler(solver="plms", spacing="time_uniform", solver_options={"prk": prk})
        model = GMMModel(gmm16, sched.schedule)
        x = x_T(8)
        adapter = run_diffusers(sched, model, nfe, x)
        assert len(sched.timesteps) == nfe and sched.num_inference_steps == nfe
        ours = ds.sample(gmm_denoiser(gmm16, sched.schedule), x.reshape(8, 16), solver="plms", prk=prk, nfe=nfe,
                         spacing="time_uniform")
        assert max_diff(ours, adapter.reshape(8, 16)) <= 1e-5
    spec = hydra_spec("solver=plms", "nfe=14", "+solver.options.prk=true", "+solver.options.diffusers_stride=true",
                      "spacing=ddim_leading")
    assert spec.solver.options == {"prk": True, "diffusers_stride": True}


@pytest.mark.parametrize("nfe", [5, 10])
def test_pndm_from_a_ddpm_config_ignores_its_clip_sample(gmm16, nfe):
    """PNDMScheduler.from_config(a DDPM config) keeps clip_sample=True in its config but never clips
    (PNDM takes no such argument): parity by default must not clip either (the digits pipeline's case;
    its images moved by 0.07 when the inherited key was applied)."""
    ref_sched = PNDMScheduler.from_config(DDPMScheduler(clip_sample=True, clip_sample_range=0.5).config)
    assert ref_sched.config.clip_sample is True  # inherited, unused by PNDM
    ours_sched = DiffSamplerScheduler.from_config(ref_sched)  # the instance names its class
    assert ours_sched.config.solver == "plms" and not ours_sched.config.clip_sample
    model = GMMModel(gmm16, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T()
    ours, ref = (run_loop(s, model, nfe, x, None, {}) for s in (ours_sched, ref_sched))
    assert max_diff(ours, ref) <= 1e-4
