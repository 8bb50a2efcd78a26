"""The stochastic samplers users know from k-diffusion equal its `sample_*` functions on the same
noise levels and the same noise (float64, exact mixture, 1e-6), and keep per-sample seeds."""

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.samplers import make_plan, per_sample_generators, run_plan
from diffsampler.samplers.brownian import tree_seeds

from kdiffusion_ref import recording_noise, replay, replay_randn_like, run, sampling

SCHEDULES = {"edm": ds.EDM, "linear_vp": ds.LinearVP}
#: (spacing, final, nfe): k-diffusion's two calls on every step but a final one onto sigma = 0
GRIDS = [("karras", "zero", 9), ("logsnr", "last", 8)]


def _x_T(sched, n=6, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sched.prior_std


def _ours_and_ref(gmm, sched_name, solver, ref_name, spacing, final, nfe, ref_kw=None, **opts):
    sched = SCHEDULES[sched_name]()
    den = gmm_denoiser(gmm, sched, "sample")
    plan = make_plan(solver, sched, nfe, spacing, final, **opts)
    x_T = _x_T(sched)
    noise_fn, draws = recording_noise()
    ours = run_plan(plan, den, x_T.clone(), noise_fn=noise_fn)
    ref = run(ref_name, gmm, plan.grid, x_T.clone(), noise_sampler=replay(draws), **(opts if ref_kw is None else ref_kw))
    return ours, ref, plan, draws


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing,final,nfe", GRIDS)
@pytest.mark.parametrize("opts", [{}, {"eta": 0.5, "s_noise": 0.8}, {"eta": 0.0}])
def test_dpmpp_2s_ancestral_equals_kdiffusion(gmm16, sched_name, spacing, final, nfe, opts):
    ours, ref, plan, draws = _ours_and_ref(gmm16, sched_name, "dpmpp_2s_ancestral", "dpmpp_2s_ancestral",
                                           spacing, final, nfe, **opts)
    assert plan.nfe == nfe and len(draws) == (0 if opts.get("eta") == 0.0 else len(plan.steps) - (final == "zero"))
    assert float((ours - ref).abs().max()) < 1e-6


@pytest.mark.parametrize("solver,opts", [("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.7}),
                                         ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.5, "r": 0.3})])
def test_per_sample_seeds_independent_of_batch(gmm16, solver, opts):
    """Sample k depends only on seed k: a batch of 4 equals each sample drawn alone."""
    sched = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sched)
    seeds = [11, 12, 13, 14]
    batch = ds.sample(den, shape=(4, 16), solver=solver, nfe=7, seeds=seeds, **opts)
    for k, s in enumerate(seeds):
        alone = ds.sample(den, shape=(1, 16), solver=solver, nfe=7, seeds=[s], **opts)
        assert torch.equal(alone[0], batch[k])
    other = ds.sample(den, shape=(1, 16), solver=solver, nfe=7, seeds=[99], **opts)
    assert not torch.allclose(other[0], batch[0])  # the noise does depend on the seed


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing,final,nfe", GRIDS)
@pytest.mark.parametrize("opts", [{}, {"eta": 0.5, "s_noise": 0.8, "r": 0.4}, {"eta": 0.0}])
def test_dpmpp_sde_equals_kdiffusion(gmm16, sched_name, spacing, final, nfe, opts):
    ours, ref, plan, draws = _ours_and_ref(gmm16, sched_name, "dpmpp_sde", "dpmpp_sde", spacing, final, nfe, **opts)
    noisy = len(plan.steps) - (final == "zero")  # two draws per step but one onto sigma = 0
    assert plan.nfe == nfe and len(draws) == (0 if opts.get("eta") == 0.0 else 2 * noisy)
    assert float((ours - ref).abs().max()) < 1e-6


# --------------------------------------------------------------------------------------------
# Brownian-tree noise: k-diffusion's BrownianTreeNoiseSampler with one tree per sample's seed
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,ref_name,opts", [
    ("dpmpp_sde", "dpmpp_sde", {}),  # Brownian noise is dpmpp_sde's default, as k-diffusion's
    ("dpmpp_sde", "dpmpp_sde", {"noise": "brownian", "r": 0.3}),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {"noise": "brownian", "lower_order_final": False}),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {"noise": "brownian", "lower_order_final": False}),
])
@pytest.mark.parametrize("sched_name,spacing,final,nfe", [("edm", "karras", "zero", 9), ("linear_vp", "logsnr", "last", 8)])
def test_brownian_tree_noise_equals_kdiffusion(gmm16, solver, ref_name, opts, sched_name, spacing, final, nfe):
    sched = SCHEDULES[sched_name]()
    den = gmm_denoiser(gmm16, sched, "sample")
    seeds = [5, 6, 7, 8]
    x_T = _x_T(sched, n=4)
    plan = make_plan(solver, sched, nfe, spacing, final, **opts)
    ours = ds.sample(den, x_T.clone(), solver=plan, seeds=seeds)
    rho = (plan.grid.sigma / plan.grid.alpha)
    v = x_T / float(plan.grid.alpha[0])
    entropies, _ = tree_seeds(per_sample_generators(seeds))  # the trees' seeds, from the samples' generators
    tree = sampling.BrownianTreeNoiseSampler(v, rho[rho > 0].min(), rho.max(), seed=entropies)
    ref_kw = {k: v for k, v in opts.items() if k == "r"}
    ref = run(ref_name, gmm16, plan.grid, x_T.clone(), noise_sampler=tree, **ref_kw)
    assert float((ours - ref).abs().max()) < 1e-6
    other = ds.sample(den, x_T.clone(), solver=make_plan(solver, sched, nfe, spacing, final, **{**opts, "noise": "gaussian"}),
                      seeds=seeds)
    assert float((ours - other).abs().max()) > 1e-2  # the option takes effect


@pytest.mark.parametrize("solver", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_brownian_per_sample_seeds_independent_of_batch(gmm16, solver):
    sched = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sched)
    seeds = [21, 22, 23]
    batch = ds.sample(den, shape=(3, 16), solver=solver, nfe=7, seeds=seeds, noise="brownian")
    for k, s in enumerate(seeds):
        alone = ds.sample(den, shape=(1, 16), solver=solver, nfe=7, seeds=[s], noise="brownian")
        assert float((alone[0] - batch[k]).abs().max()) == 0.0


def test_brownian_noise_is_step_size_independent():
    """The same Brownian path at any NFE: the draw over a span that two grids share is the same."""
    from diffsampler.samplers.brownian import BrownianTrees

    a = BrownianTrees((2, 3), 0.01, 80.0, [1, 2], torch.float64)
    b = BrownianTrees((2, 3), 0.01, 80.0, [1, 2], torch.float64)
    whole = a.draw(10.0, 1.0) * 3.0  # (W(1) - W(10)) / 3
    b.draw(10.0, 5.0)  # other queries first do not change the path
    halves = b.draw(10.0, 4.0) * 6**0.5 + b.draw(4.0, 1.0) * 3**0.5
    assert float((whole - halves).abs().max()) < 1e-5


# --------------------------------------------------------------------------------------------
# EDM's stochastic sampler (Karras et al. 2022, Alg. 2 = k-diffusion's sample_heun with churn)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sched_name,spacing,final,nfe,opts", [
    ("edm", "karras", "zero", 9, {"s_churn": 10.0}),
    ("edm", "karras", "zero", 9, {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}),
    ("linear_vp", "logsnr", "last", 8, {"s_churn": 5.0, "s_tmax": 100.0}),
])
def test_edm_stochastic_equals_kdiffusion_heun(gmm16, sched_name, spacing, final, nfe, opts):
    sched = SCHEDULES[sched_name]()
    den = gmm_denoiser(gmm16, sched, "sample")
    plan = make_plan("edm_stochastic", sched, nfe, spacing, final, **opts)
    x_T = _x_T(sched)
    noise_fn, draws = recording_noise()
    ours = run_plan(plan, den, x_T.clone(), noise_fn=noise_fn)
    it = iter(draws)
    s_noise = opts.get("s_noise", 1.0)  # k-diffusion draws eps = randn * s_noise, ours z with s_noise in c
    per_step = [next(it) if st.draws else None for st in plan.steps]
    assert sum(z is not None for z in per_step) == len(draws) > 0
    with replay_randn_like(per_step):
        ref = run("heun", gmm16, plan.grid, x_T.clone(), **opts)
    assert plan.nfe == nfe and float((ours - ref).abs().max()) < 1e-6 * max(1.0, s_noise)


def test_edm_stochastic_without_churn_is_heun(gmm16):
    sched = ds.EDM()
    den = gmm_denoiser(gmm16, sched)
    x_T = _x_T(sched)
    a = ds.sample(den, x_T.clone(), solver="edm_stochastic", nfe=9, spacing="karras")
    b = ds.sample(den, x_T.clone(), solver="heun", nfe=9, spacing="karras")
    assert float((a - b).abs().max()) < 1e-12


def test_edm_stochastic_refuses_churn_beyond_a_vp_schedule(gmm16):
    with pytest.raises(ValueError, match="s_tmax"):
        make_plan("edm_stochastic", ds.DiscreteVP.linear(), 8, "karras", s_churn=10.0)


SDE_CASES = [
    (dict(noise_sampler_seed=3), 5), (dict(noise_sampler_seed=3), 25),
    (dict(noise_sampler_seed=7, use_karras_sigmas=True), 10),
    (dict(noise_sampler_seed=7, use_exponential_sigmas=True), 10), (dict(noise_sampler_seed=7, use_beta_sigmas=True), 10),
    (dict(noise_sampler_seed=7, timestep_spacing="trailing", prediction_type="v_prediction"), 10),
    (dict(noise_sampler_seed=7, timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear"), 8),
    (dict(), 6),  # noise_sampler_seed None: the tree's seed from torch's global generator, on both sides
]


@pytest.mark.filterwarnings("ignore:Should have")
@pytest.mark.parametrize("kw,n", SDE_CASES, ids=[f"{k}-{n}" for k, n in SDE_CASES])
def test_diffusers_dpmsolver_sde_parity_by_default(gmm16, kw, n):
    """DPMSolverSDEScheduler is dpmpp_sde on its sigma-space grid with one torchsde Brownian tree for the batch,
    seeded by noise_sampler_seed and queried at the class's float32 noise levels: the same draws, the same
    samples in the standard loop.  Every config key: the schedule keys, prediction_type (epsilon /
    v_prediction), use_karras / exponential / beta_sigmas, timestep_spacing, steps_offset, noise_sampler_seed.
    Measured: max abs diff <= 1.1e-6 (samples up to 4)."""
    from diffusers import DPMSolverSDEScheduler

    from diffsampler.eval.gmm import GMMModel
    from diffsampler.pipelines import DiffSamplerScheduler
    from diffusers_loop import run_diffusers

    ref_sched = DPMSolverSDEScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    assert ours_sched.config.solver == "dpmpp_sde" and ours_sched.convention == "DPMSolverSDEScheduler"
    model = GMMModel(gmm16, ours_sched.schedule, ours_sched.prediction_kind)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    ref = run_diffusers(ref_sched, model, n, x)
    torch.manual_seed(11)
    ours = run_diffusers(ours_sched, model, n, x)
    assert torch.equal(ours_sched.sigmas, ref_sched.sigmas) and len(ours_sched.timesteps) == 2 * n - 1
    assert ours_sched.order == ref_sched.order == 2
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:Should have")
def test_diffusers_dpmsolver_sde_noise_is_the_class_tree(gmm16):
    """The draws are the class's own: the seed decides; queried at float64 levels the tree gives other
    increments (the check above can fail); s_noise and an img2img start
    it cannot honour are refused by name; naming the solver keeps the grid (per-sample trees then)."""
    from diffusers import DPMSolverSDEScheduler

    from diffsampler.eval.gmm import GMMModel
    from diffsampler.pipelines import DiffSamplerScheduler
    from diffusers_loop import run_diffusers

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    outs = {}
    for seed in (3, 4):
        sched = DiffSamplerScheduler.from_config(DPMSolverSDEScheduler(noise_sampler_seed=seed).config)
        outs[seed] = run_diffusers(sched, GMMModel(gmm16, sched.schedule), 6, x)
    assert (outs[3] - outs[4]).abs().max().item() > 1e-2
    # the query times matter: the midpoint level in float64 (sqrt(sigma sigma_next)) instead of the class's float32
    # arithmetic moves the increment by ~1e-3 (why the adapter computes the levels as the class does)
    from diffsampler.samplers.brownian import BrownianTrees

    s0, s1 = 14.614641189575195, 7.5  # float32 levels
    t, t_n = -torch.tensor(s0).log(), -torch.tensor(s1).log()
    mid32 = float((-(t + (t_n - t) * 0.5)).exp())
    trees = [BrownianTrees((4, 16), 0.03, s0, [3], batched=False) for _ in range(2)]
    d32, d64 = trees[0].draw(s0, mid32), trees[1].draw(s0, (s0 * s1) ** 0.5)
    assert mid32 != (s0 * s1) ** 0.5 and (d32 - d64).abs().max().item() > 1e-4
    sched = DiffSamplerScheduler.from_config(DPMSolverSDEScheduler(noise_sampler_seed=3).config)
    with pytest.warns(UserWarning, match="noise_sampler_seed=3 seeds the Brownian tree"):
        with_gen = run_diffusers(sched, GMMModel(gmm16, sched.schedule), 6, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(with_gen, outs[3])
    sched.set_timesteps(6)
    with pytest.raises(ValueError, match="s_noise=0.5"):
        sched.step(x, sched.timesteps[0], x, s_noise=0.5)
    sched.set_timesteps(6)
    sched.set_begin_index(2)
    with pytest.raises(ValueError, match="set_begin_index"):
        sched.step(x, sched.timesteps[2], x)
    up = DiffSamplerScheduler.from_config(DPMSolverSDEScheduler().config, solver="dpmpp_sde")
    up.set_timesteps(9)
    assert up.plan.nfe == 9 and up.plan.info["noise"] == "brownian"
    gens = [torch.Generator().manual_seed(k) for k in range(8)]
    a = run_diffusers(up, GMMModel(gmm16, up.schedule), 9, x, generator=gens)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("kw", [{}, {"eta": 0.5, "s_noise": 0.8}, {"solver_type": "heun"},
                                {"solver_type": "heun", "eta": 0.7}])
def test_dpmpp_2m_sde_equals_kdiffusion(gmm16, sched_name, kw):
    ours, ref, plan, draws = _ours_and_ref(gmm16, sched_name, "dpmpp_2m_sde", "dpmpp_2m_sde", "karras", "zero", 8,
                                           ref_kw=kw, lower_order_final=False, **kw)
    assert len(draws) == len(plan.steps) - 1
    assert float((ours - ref).abs().max()) < 1e-6
