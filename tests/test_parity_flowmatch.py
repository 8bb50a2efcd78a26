"""FlowMatchEulerDiscreteScheduler parity by default: `DiffSamplerScheduler.from_config(its config)` runs the
flow Euler step (ddim's data-form step on alpha = 1 - t, sigma = t) on the class's own grid
(`schedules.flowmatch_sigmas`): shift, use_dynamic_shifting with the pipeline's mu (exponential / linear),
shift_terminal, use_karras / exponential / beta_sigmas, sigmas= and timesteps= lists; equal to diffusers' in
the standard loop on the exact mixture (flow prediction).  What it cannot honour is refused by name."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.schedules import flowmatch_sigmas
from diffusers_loop import run_diffusers

CASES = [
    ({}, dict(nfe=5)),
    ({}, dict(nfe=25)),
    (dict(shift=3.0), dict(nfe=10)),
    (dict(use_dynamic_shifting=True), dict(nfe=5, mu=0.7)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(nfe=10, mu=1.3)),
    (dict(shift_terminal=0.1, shift=2.0), dict(nfe=6)),
    (dict(use_karras_sigmas=True, shift=3.0), dict(nfe=10)),
    (dict(use_exponential_sigmas=True), dict(nfe=5)),
    (dict(use_beta_sigmas=True, shift=2.0), dict(nfe=25)),
    (dict(shift=3.0), dict(nfe=None, sigmas=list(np.linspace(1.0, 1 / 6, 6)))),  # Flux / SD3's sigmas=
    (dict(use_dynamic_shifting=True), dict(nfe=6, sigmas=list(np.linspace(1.0, 1 / 6, 6)), mu=1.1)),
    (dict(shift=3.0), dict(nfe=None, timesteps=[1000.0, 700.0, 300.0, 100.0])),
]


def x_T(n=8, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:`timesteps` were passed")
@pytest.mark.parametrize("kw,run", CASES, ids=[f"{k}-{r}" for k, r in CASES])
def test_flowmatch_euler_parity_by_default(gmm16, kw, run):
    run = dict(run)
    nfe = run.pop("nfe")
    ref_sched = FlowMatchEulerDiscreteScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    assert ours_sched.config.solver == "ddim" and ours_sched.spacing == "flowmatch"
    model = GMMModel(gmm16, ours_sched.schedule, "flow")
    x = x_T()
    ref = run_diffusers(ref_sched, model, nfe, x, **run)
    ours = run_diffusers(ours_sched, model, nfe, x, **run)
    assert ours_sched.timesteps.dtype == ref_sched.timesteps.dtype == torch.float32
    assert torch.equal(ours_sched.timesteps, ref_sched.timesteps)
    assert torch.equal(ours_sched.sigmas, ref_sched.sigmas)
    assert (ours - ref).abs().max().item() <= 1e-4  # float32: diffusers steps in float32, we in float64


def test_flowmatch_sigmas_equal_diffusers_without_a_model():
    for kw, n, mu in [(dict(shift=3.0, shift_terminal=0.05), 9, None), (dict(use_dynamic_shifting=True,
                                                                            use_karras_sigmas=True), 7, 0.5)]:
        ref = FlowMatchEulerDiscreteScheduler(**kw)
        ref.set_timesteps(n, mu=mu)
        s, t = flowmatch_sigmas(dict(ref.config), n, mu=mu)
        assert np.array_equal(s, ref.sigmas[:-1].double().numpy()) and np.array_equal(t, ref.timesteps.double().numpy())


def test_flowmatch_img2img_scale_noise_and_begin_index(gmm16):
    """Flow img2img (SD3Img2Img): set_timesteps, slice timesteps[t_start:], set_begin_index(t_start),
    scale_noise(x0, timesteps[:1], noise) -- then the loop; equal to diffusers'."""
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    x0, noise = gmm16.sample(8, generator=torch.Generator().manual_seed(3)).float(), x_T(seed=4)
    outs = []
    for sched in (FlowMatchEulerDiscreteScheduler.from_config(cfg), DiffSamplerScheduler.from_config(cfg)):
        model = GMMModel(gmm16, DiffSamplerScheduler.from_config(cfg).schedule, "flow")
        sched.set_timesteps(10)
        t_start = 4
        ts = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)
        x = sched.scale_noise(x0, ts[:1].repeat(8), noise)
        outs.append(x)
        for t in ts:
            x = sched.step(model(x, t).sample, t, x).prev_sample
        outs.append(x)
    assert (outs[0] - outs[2]).abs().max().item() <= 1e-6
    assert (outs[1] - outs[3]).abs().max().item() <= 1e-5


def test_flowmatch_dynamic_shifting_needs_mu():
    sched = DiffSamplerScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="mu="):
        sched.set_timesteps(5)


@pytest.mark.parametrize("kw,match", [
    (dict(stochastic_sampling=True), "stochastic_sampling=True cannot be reproduced"),
    (dict(invert_sigmas=True), "invert_sigmas=True cannot be reproduced"),
])
def test_flowmatch_refusals_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        DiffSamplerScheduler.from_config(FlowMatchEulerDiscreteScheduler(**kw).config)


@pytest.mark.parametrize("kw,n", [({}, 5), ({}, 2), (dict(shift=3.0), 10), (dict(num_train_timesteps=500, shift=2.0), 7)])
def test_flowmatch_heun_parity_by_default(gmm16, kw, n):
    """FlowMatchHeunDiscreteScheduler: heun with coordinates='flow' (Heun on dx/dt = (x - D) / t from t = 1, an
    Euler step onto 0) on the class's grid; its keys num_train_timesteps and shift honoured; n grid points,
    2n - 1 calls, order 2, the class's repeated timesteps and sigmas."""
    ref_sched = FlowMatchHeunDiscreteScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    assert ours_sched.config.solver == "heun" and ours_sched.solver.coordinates == "flow"
    model = GMMModel(gmm16, ours_sched.schedule, "flow")
    x = x_T()
    ref = run_diffusers(ref_sched, model, n, x)
    ours = run_diffusers(ours_sched, model, n, x)
    assert torch.equal(ours_sched.timesteps, ref_sched.timesteps) and len(ours_sched.timesteps) == 2 * n - 1
    assert torch.equal(ours_sched.sigmas, ref_sched.sigmas)
    assert ours_sched.order == ref_sched.order == 2 and ours_sched.num_inference_steps == n
    assert (ours - ref).abs().max().item() <= 1e-4  # measured 2.8e-5 at n = 5, 5e-6 at 25


def test_flowmatch_heun_differs_from_the_rho_heun():
    """The flow-coordinate Heun is another method than Karras' Heun in rho (the check above can fail)."""
    from diffsampler.samplers import get

    sch, x = ds.RectifiedFlow(), x_T()
    flow = get("heun", coordinates="flow")
    g = ds.time_grid(sch, 3, "time_uniform")
    plan_f, plan_r = flow.build(g), get("heun").build(g)
    assert plan_f.nfe == plan_r.nfe == 5 and plan_f.steps[0].evals[0].kind == "data"
    den = gmm_denoiser(ds.eval.gmm.GaussianMixture.random(16, 4, seed=1), sch)
    a, b = ds.sample(den, x.clone(), solver=plan_f), ds.sample(den, x.clone(), solver=plan_r)
    assert (a - b).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="coordinates must be one of"):
        get("heun", coordinates="x")
    with pytest.raises(ValueError, match="rectified flow"):
        flow.build(ds.time_grid(ds.DiscreteVP.linear(), 3, "time_uniform"))


def test_flowmatch_heun_refusals():
    sched = DiffSamplerScheduler.from_config(FlowMatchHeunDiscreteScheduler().config)
    with pytest.raises(ValueError, match="num_inference_steps only"):
        sched.set_timesteps(sigmas=[1.0, 0.5])
    sched.set_timesteps(3)
    x = x_T(2)
    with pytest.raises(ValueError, match="s_churn=0.3"):
        sched.step(x, sched.timesteps[0], x, s_churn=0.3)
    sched.step(x, sched.timesteps[0], x, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)  # defaults: no effect
    # a named solver keeps the class's grid (FlowMatchEuler's convention with its shift)
    up = DiffSamplerScheduler.from_config(FlowMatchHeunDiscreteScheduler(shift=3.0).config, solver="dpmpp_2m")
    assert up.spacing == "flowmatch" and up.config.solver == "dpmpp_2m"


def test_invert_sigmas_refused_with_a_named_solver_too():
    with pytest.raises(ValueError, match="invert_sigmas"):
        DiffSamplerScheduler.from_config(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config, solver="dpmpp_2m")


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "euler"])
def test_named_solver_keeps_the_flowmatch_grid(gmm16, name):
    """solver= upgrades the method and keeps the class's grid choices (shift, karras): the grid points are
    the class's for the solver's step count (from t_max = 0.999 where the solver cannot start at t = 1)."""
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True).config
    sched = DiffSamplerScheduler.from_config(cfg, solver=name)
    sched.set_timesteps(8)
    steps = sched.solver.steps_for_nfe(8, final_zero=True)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    assert torch.allclose(sched.plan.grid.t[1:-1].float(), ref.sigmas[1:-1], atol=1e-7)
    assert float(sched.plan.grid.t[0]) == (1.0 if name == "euler" else 0.999)
    x = x_T()
    out = run_diffusers(sched, GMMModel(gmm16, sched.schedule, "flow"), 8, x)
    ref_out = ds.sample(gmm_denoiser(gmm16, sched.schedule, "flow"), x.clone(), solver=sched.plan)
    assert (out - ref_out).abs().max().item() <= 1e-6


@pytest.mark.filterwarnings("ignore:`timesteps` were passed")
@pytest.mark.parametrize("begin", [None, 1])
def test_scale_noise_uses_the_class_sigma_with_explicit_timesteps(begin):
    """With timesteps= the network gets those times while sigmas are shifted: scale_noise takes the sigma
    (at the begin index, else at the timestep's entry) as diffusers does, not timestep / T."""
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    x0, noise = x_T(2, 4, seed=1), x_T(2, 4, seed=2)
    outs = []
    for sched in (FlowMatchEulerDiscreteScheduler.from_config(cfg), DiffSamplerScheduler.from_config(cfg)):
        sched.set_timesteps(timesteps=[1000.0, 700.0, 300.0, 100.0])
        if begin is not None:
            sched.set_begin_index(begin)
        outs.append(sched.scale_noise(x0, sched.timesteps[begin or 0:][:1].repeat(2), noise))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-6
