"""The k-diffusion family (euler_ancestral, dpm2, dpm2_ancestral, lms): equal to k-diffusion's
`sample_*` on the same sigmas and the same noise (float64, 1e-6), and to diffusers' Euler /
EulerAncestral / Heun / LMS / KDPM2 / KDPM2Ancestral schedulers through `from_config` with no solver
named, in the standard loop (1e-4), the stochastic ones with the same generator."""

import sys

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.samplers.plan import Stepper
from diffsampler.schedules import EDM, DiscreteVP, time_grid


def _noise_list(n, shape, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _ours(solver, opts, schedule, den, sigmas, x_T_v, noise):
    """Our plan on the grid at k-diffusion's sigmas (rho = sigma / alpha), run from x_T = alpha_0 v_T
    with the noise list in order; returns v = x / alpha at the end (alpha = 1 at sigma = 0)."""
    rho = sigmas[:-1].double()
    t = schedule.t_from_lambda(-rho.log()).clamp(schedule.t_min, schedule.t_max)
    grid = time_grid(schedule, len(t), t, final="zero")
    plan = ds.samplers.make_plan(solver, schedule, grid=grid, **opts)
    it = iter(noise)
    run = Stepper(plan, den, x_T_v * float(grid.alpha[0]), (lambda x: next(it)) if plan.stochastic else None)
    while not run.done:
        y, t_m, a, s, kind = run.next_input()
        run.feed(den.predict_at(y, t_m, a, s, kind))
    return run.x, plan


def _kdiff(K, fn, gmm, schedule, sigmas, x_T_v, noise, **kw):
    """k-diffusion's sampler on the VE form of `schedule`: model(v, rho) = E[x0 | x = alpha v]."""
    def model(v, rho):
        r = rho.double().flatten()
        a = 1.0 / (1.0 + r * r).sqrt() if isinstance(schedule, DiscreteVP) else torch.ones_like(r)
        return gmm.posterior_mean(v * a[:, None], a, a * r)

    it = iter(noise)
    kw = dict(kw)
    if "noise_sampler" in kw:
        kw["noise_sampler"] = lambda s, t: next(it)
    return fn(model, x_T_v.clone(), sigmas, disable=True, **kw)


CASES = [
    ("euler_ancestral", {}, "sample_euler_ancestral", {"noise_sampler": True}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "sample_euler_ancestral",
     {"eta": 0.5, "s_noise": 0.9, "noise_sampler": True}),
    ("euler_ancestral", {"eta": 0.0}, "sample_euler", {}),
    ("dpm2", {}, "sample_dpm_2", {}),
    ("dpm2_ancestral", {}, "sample_dpm_2_ancestral", {"noise_sampler": True}),
    ("dpm2_ancestral", {"eta": 0.7, "s_noise": 1.1}, "sample_dpm_2_ancestral",
     {"eta": 0.7, "s_noise": 1.1, "noise_sampler": True}),
    ("lms", {}, "sample_lms", {}),
    ("lms", {"order": 2}, "sample_lms", {"order": 2}),
    ("lms", {"order": 3}, "sample_lms", {"order": 3}),
    ("lms", {"order": 1}, "sample_euler", {}),
]


@pytest.mark.parametrize("solver,opts,ref,ref_kw", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
@pytest.mark.parametrize("sched", ["edm", "vp"])
def test_equals_kdiffusion_on_the_same_sigmas_and_noise(K, gmm, solver, opts, ref, ref_kw, sched):
    n = 8
    if sched == "edm":
        schedule = EDM(0.002, 80.0)
        sigmas = K.get_sigmas_karras(n, 0.002, 80.0, device="cpu").double()
    else:
        schedule = DiscreteVP.linear()
        r = schedule.rho(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
        sigmas = K.get_sigmas_exponential(n, float(r[1]), float(r[0]) * (1 - 1e-9), device="cpu").double()
    den = gmm_denoiser(gmm, schedule)
    x_T_v = torch.randn(5, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    noise = _noise_list(n, x_T_v.shape)
    kw = {k: v for k, v in ref_kw.items()}
    want = _kdiff(K, getattr(K, ref), gmm, schedule, sigmas, x_T_v, noise, **kw)
    got, plan = _ours(solver, opts, schedule, den, sigmas, x_T_v, noise)
    n_calls = {"dpm2": 2 * n - 1, "dpm2_ancestral": 2 * n - 1}.get(solver, n)
    assert plan.nfe == n_calls
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err


def test_lms_weights_are_k_diffusions_integrated_lagrange_coefficients(K):
    """lms is rhoAB-DEIS: its weights are k-diffusion's `linear_multistep_coeff` (scaled by alpha_t)."""
    import numpy as np

    sch = EDM(0.002, 80.0)
    sig = np.array([80.0, 30.0, 9.0, 2.5, 0.6, 0.1])
    grid = time_grid(sch, len(sig), torch.tensor(sig), final="zero")
    solver = ds.samplers.get("lms")
    for order, i in [(1, 0), (2, 3), (3, 3), (4, 4), (4, 5)]:
        ref = [K.linear_multistep_coeff(order, np.append(sig, 0.0), i, j) for j in range(order)]
        c_x, got, c_z = solver.coefficients(grid, i, order)
        assert c_x == 1.0 and c_z == 0.0 and np.allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver,opts", [("euler_ancestral", {"eta": -1.0}), ("dpm2_ancestral", {"s_noise": -0.5}),
                                         ("lms", {"order": 5}), ("lms", {"order": 0})])
def test_bad_options_are_refused_by_name(solver, opts):
    key = next(iter(opts))
    with pytest.raises(ValueError, match=key):
        ds.samplers.get(solver, **opts)


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpm2", "dpm2_ancestral", "lms"])
def test_sample_runs_and_per_sample_seeds(gmm, solver):
    schedule = DiscreteVP.linear()
    den = gmm_denoiser(gmm, schedule)
    a = ds.sample(den, shape=(4, gmm.dim), seeds=[0, 1, 2, 3], solver=solver, nfe=9, spacing="karras")
    b = ds.sample(den, shape=(2, gmm.dim), seeds=[2, 3], solver=solver, nfe=9, spacing="karras")
    assert torch.isfinite(a).all()
    assert (a[2:] - b).abs().max() <= 1e-5


def test_hydra_runs_the_solvers_with_options(tmp_path):
    import subprocess

    import pandas as pd

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffsampler", *args, "model=gmm", "num_samples=16",
                               "shard_size=16", "progress=false"], capture_output=True, text=True, timeout=300)

    sweep = tmp_path / "sweep"
    r = cli("-m", "solver=euler_ancestral,dpm2,dpm2_ancestral,lms", "nfe=7", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(sweep / "results.csv")
    assert sorted(df.solver) == ["dpm2", "dpm2_ancestral", "euler_ancestral", "lms"] and (df.nfe_counted == 7).all()
    r = cli("solver=euler_ancestral", "+solver.options.eta=0.5", "+solver.options.s_noise=0.9", "nfe=5",
            f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr  # (an option a solver lacks is refused: test_bad_options_are_refused_by_name)


# -- diffusers' sigma-space classes, reproduced by from_config with no solver named --------------------

import diffusers  # noqa: E402

from diffsampler.eval.gmm import GMMModel  # noqa: E402
from diffsampler.pipelines import DiffSamplerScheduler  # noqa: E402
from diffusers_loop import run_diffusers  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
KARRAS, EXP, BETA = dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)
V, S = dict(prediction_type="v_prediction"), dict(prediction_type="sample")
CONFIGS = {
    "EulerDiscreteScheduler": [{}, KARRAS, EXP, BETA, V, S, SD, dict(timestep_spacing="leading", steps_offset=1),
                               dict(timestep_spacing="trailing", **V), dict(interpolation_type="log_linear"),
                               dict(final_sigmas_type="sigma_min", timestep_spacing="trailing"),
                               dict(final_sigmas_type="sigma_min"), dict(sigma_min=0.05, sigma_max=10.0, **KARRAS, **SD),
                               dict(timestep_type="continuous", **V, **KARRAS)],
    "EulerAncestralDiscreteScheduler": [{}, V, SD, dict(timestep_spacing="trailing"),
                                        dict(timestep_spacing="leading", steps_offset=1)],
    "HeunDiscreteScheduler": [{}, KARRAS, EXP, V, S, dict(clip_sample=True, clip_sample_range=1.5),
                              dict(timestep_spacing="trailing", beta_schedule="linear")],
    "LMSDiscreteScheduler": [{}, KARRAS, BETA, V, S, SD, dict(timestep_spacing="leading", steps_offset=1)],
    "KDPM2DiscreteScheduler": [{}, KARRAS, EXP, V, dict(timestep_spacing="trailing")],
    "KDPM2AncestralDiscreteScheduler": [{}, KARRAS, V, dict(timestep_spacing="leading", steps_offset=1)],
}
K_CASES = [(c, kw) for c, kws in CONFIGS.items() for kw in kws]


def _pair(cls, kw):
    ref = getattr(diffusers, cls)(**kw)
    ours = DiffSamplerScheduler.from_config(ref)
    return ref, ours


@pytest.mark.parametrize("cls,kw", K_CASES, ids=[f"{c}-{kw}" for c, kw in K_CASES])
def test_sigma_space_classes_reproduced_in_the_standard_loop(gmm16, cls, kw):
    """The same samples as diffusers' class (max abs diff <= 1e-4, measured <= 5e-5) at NFE 5 / 10 / 25
    (the class's num_inference_steps), with its timesteps, sigmas and init_noise_sigma; the ancestral
    ones with the same generator."""
    ref, ours = _pair(cls, kw)
    assert ours.config.convention == cls
    model = GMMModel(gmm16, ours.schedule, ref.config.prediction_type)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    stochastic = "Ancestral" in cls
    for n in (5, 10, 25):
        gens = [torch.Generator().manual_seed(7) if stochastic else None for _ in range(2)]
        want = run_diffusers(ref, model, n, x, generator=gens[0])
        got = run_diffusers(ours, model, n, x, generator=gens[1])
        drop = 1 if kw.get("final_sigmas_type") == "sigma_min" and kw.get("timestep_spacing") != "trailing" else 0
        assert len(ours.timesteps) == len(ref.timesteps) - drop and ours.timesteps.dtype == torch.float32
        assert torch.allclose(ours.timesteps.double(), ref.timesteps[:len(ours.timesteps)].double(), atol=1e-3)
        assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        if not drop:
            assert ours.sigmas.shape == ref.sigmas.shape and torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)
        err = float((got - want).abs().max())
        assert err <= 1e-4, (n, err)


@pytest.mark.parametrize("cls", list(CONFIGS))
def test_sigma_space_conventions_add_noise_scale_and_img2img(gmm16, cls):
    """add_noise at the class's sigma of a timestep (before and after set_timesteps, repeated entries as
    diffusers picks them), scale_model_input, order, and an img2img start (set_begin_index(t_start *
    order) on add_noise's sample) give diffusers' numbers."""
    ref, ours = _pair(cls, {})
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 500, 3, 0])
    assert torch.allclose(ours.add_noise(x0, z, t), ref.add_noise(x0, z, t.float()), rtol=1e-6, atol=1e-6)
    n = 6
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert ours.order == ref.order and ours.num_inference_steps == n
    for j in range(len(ref.timesteps)):
        tt = ref.timesteps[j:j + 1].repeat(4)
        assert torch.allclose(ours.add_noise(x0, z, tt), ref.add_noise(x0, z, tt), rtol=1e-6, atol=1e-6), j
    assert torch.allclose(ours.scale_model_input(z, ours.timesteps[0]), ref.scale_model_input(z, ref.timesteps[0]))
    # img2img: start at step t_start with add_noise's sample, as StableDiffusionImg2ImgPipeline does
    # (diffusers' LMS restarted there sums its order-3 coefficients over the one derivative it has;
    # lms warms up again, and says so)
    if cls == "LMSDiscreteScheduler":
        with pytest.warns(UserWarning, match="truncated"):
            ours.set_begin_index(2)
        return
    model = GMMModel(gmm16, ours.schedule)
    outs = []
    for sched in (ref, ours):
        sched.set_timesteps(n)
        begin = 2 * sched.order
        ts = sched.timesteps[begin:]
        sched.set_begin_index(begin)
        x = sched.add_noise(x0, z, ts[:1].repeat(4))
        g = torch.Generator().manual_seed(5)
        for tt in ts:
            kw = {"generator": g} if "Ancestral" in cls else {}
            x = sched.step(model(sched.scale_model_input(x, tt), tt).sample, tt, x, **kw).prev_sample
        outs.append(x)
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-4


def test_sigma_space_class_options_the_mapping_cannot_honour_are_refused():
    ours = DiffSamplerScheduler.from_config(diffusers.EulerDiscreteScheduler())
    ours.set_timesteps(4)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="s_churn=0.5"):
        ours.step(x, ours.timesteps[0], x, s_churn=0.5)
    lms = DiffSamplerScheduler.from_config(diffusers.LMSDiscreteScheduler())
    lms.set_timesteps(4)
    with pytest.raises(TypeError, match="order"):
        lms.step(x, lms.timesteps[0], x, order=2)
    for cls in ("EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        with pytest.raises(ValueError, match="prediction_type='sample'"):
            DiffSamplerScheduler.from_config(getattr(diffusers, cls)(prediction_type="sample"))
    for cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        with pytest.raises(ValueError, match="rescale_betas_zero_snr=True"):
            DiffSamplerScheduler.from_config(getattr(diffusers, cls)(rescale_betas_zero_snr=True))
    # LMS and KDPM2* share their config keys: a config without _class_name is refused naming them
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        DiffSamplerScheduler.from_config(dict(diffusers.LMSDiscreteScheduler().config))
    # the convention's grid is the class's own: a spacing, a key of another class, final='last' elsewhere
    with pytest.raises(ValueError, match="spacing='karras'"):
        DiffSamplerScheduler(solver="heun", convention="HeunDiscreteScheduler", spacing="karras")
    with pytest.raises(ValueError, match="interpolation_type"):
        DiffSamplerScheduler(solver="heun", convention="HeunDiscreteScheduler", interpolation_type="log_linear")
    with pytest.raises(ValueError, match="final='last'"):
        DiffSamplerScheduler(solver="lms", convention="LMSDiscreteScheduler", final="last")
    with pytest.raises(ValueError, match="convention must be"):
        DiffSamplerScheduler(solver="euler", convention="DDIMScheduler")


def test_convention_survives_save_and_load(tmp_path):
    a = DiffSamplerScheduler.from_config(diffusers.EulerDiscreteScheduler(
        use_karras_sigmas=True, sigma_min=0.05, timestep_spacing="leading", steps_offset=1))
    a.save_pretrained(tmp_path)
    b = DiffSamplerScheduler.from_pretrained(tmp_path)
    a.set_timesteps(7)
    b.set_timesteps(7)
    assert b.convention == "EulerDiscreteScheduler" and b.config.solver == "euler"
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert float(a.init_noise_sigma) == float(b.init_noise_sigma)


def test_naming_a_solver_keeps_the_class_grid_only_by_convention(gmm16):
    """from_config(euler_cfg, solver=...) upgrades the solver on diffsampler's own conventions; with
    convention=<class> the named solver runs on that class's grid and conventions."""
    cfg = diffusers.EulerDiscreteScheduler(**KARRAS).config
    up = DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m")
    assert up.convention is None
    k = DiffSamplerScheduler.from_config(cfg, solver="dpm2", convention="EulerDiscreteScheduler")
    k.set_timesteps(5)
    assert len(k.timesteps) == 9 and k.order == 2
    model = GMMModel(gmm16, k.schedule)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    out = run_diffusers(k, model, 5, x)
    assert torch.isfinite(out).all()


def test_custom_sigmas_and_timesteps_follow_the_class(gmm16):
    """set_timesteps(sigmas=...) / (timesteps=...) as diffusers' Euler and Heun take them."""
    for cls, kw in [("EulerDiscreteScheduler", dict(sigmas=[14.0, 5.0, 1.5, 0.3, 0.05, 0.0])),
                    ("EulerDiscreteScheduler", dict(timesteps=[999, 700, 450.5, 200.25, 30])),
                    ("HeunDiscreteScheduler", dict(timesteps=[999, 700, 450.5, 200.25, 30]))]:
        ref, ours = _pair(cls, {})
        model = GMMModel(gmm16, ours.schedule)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        outs = []
        for sched in (ref, ours):
            sched.set_timesteps(**kw)
            y = x * sched.init_noise_sigma
            for t in sched.timesteps:
                y = sched.step(model(sched.scale_model_input(y, t), t).sample, t, y).prev_sample
            outs.append(y)
        assert torch.allclose(ours.timesteps, ref.timesteps, atol=1e-3)
        assert float((outs[0] - outs[1]).abs().max()) <= 1e-4, cls


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from tiny_pipelines import sd_pipeline

    pipe = sd_pipeline(tmp_path_factory.mktemp("sd"))
    pipe.set_progress_bar_config(disable=True)
    pipe.base_config = pipe.scheduler.config  # the tests assign other schedulers to pipe.scheduler
    g = torch.Generator().manual_seed(1)
    pipe.test_inputs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
                            negative_prompt_embeds=torch.randn(1, 5, 16, generator=g), guidance_scale=5.0)
    pipe.test_latents = torch.randn(1, 4, 8, 8, generator=g)
    return pipe


@pytest.mark.parametrize("cls,kw", [("EulerDiscreteScheduler", KARRAS), ("EulerAncestralDiscreteScheduler", {}),
                                    ("HeunDiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", KARRAS),
                                    ("LMSDiscreteScheduler", {})])
def test_stable_diffusion_pipeline_parity_by_default(sd, cls, kw):
    """A (tiny, random-weight) StableDiffusionPipeline with CFG, the same latents and generator: the
    class built from the pipeline's config and `from_config` of it give the same latents; img2img
    (strength 0.6: set_begin_index(t_start * order), add_noise) too for Euler and Heun."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = getattr(diffusers, cls).from_config(sd.base_config, **kw)
    outs = []
    for sched in (ref, DiffSamplerScheduler.from_config(ref)):
        sd.scheduler = sched
        outs.append(sd(**sd.test_inputs, num_inference_steps=5, latents=sd.test_latents.clone(), output_type="latent",
                       generator=torch.Generator().manual_seed(3)).images)
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-4
    if cls not in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        return
    i2i = StableDiffusionImg2ImgPipeline(**sd.components)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    outs = []
    for sched in (getattr(diffusers, cls).from_config(sd.base_config, **kw), DiffSamplerScheduler.from_config(ref)):
        i2i.scheduler = sched
        outs.append(i2i(**sd.test_inputs, image=image, strength=0.6, num_inference_steps=10, output_type="latent",
                        generator=torch.Generator().manual_seed(3)).images)
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-4
