"""DiffSamplerScheduler: every registered solver behind diffusers' scheduler interface gives the same
samples as `diffsampler.sample`, matches diffusers' own schedulers from their configs, and accepts
diffusers configs silently."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers import per_sample_generators
from diffsampler.schedules import RectifiedFlow, TimeGrid, time_grid
from diffusers_loop import run_diffusers




def x_T(n=8, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# 1. the adapter is the plan engine: same result as sample() for every registered solver
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in ds.available() if not ds.samplers.info(n)["adaptive"]])  # the adapter refuses adaptive solvers
@pytest.mark.parametrize("nfe,spacing,final", [(5, "linspace", "zero"), (8, "logsnr", "last")])
def test_adapter_matches_sample(gmm16, name, nfe, spacing, final):
    sched = DiffSamplerScheduler(solver=name, spacing=spacing, final=final)
    x = x_T()
    stochastic = ds.samplers.info(name)["stochastic"]
    seeds = list(range(100, 108))
    gens = per_sample_generators(seeds) if stochastic else None
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), nfe, x, generator=gens)
    assert len(sched.timesteps) == sched.plan.nfe == nfe
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule), x.clone(), solver=name, nfe=nfe, spacing=spacing,
                    final=final, seeds=seeds if stochastic else None)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_adapter_stochastic_one_generator_and_reuse(gmm16):
    """One shared generator: each stochastic step draws randn of the sample's shape from it, as
    diffusers' schedulers do (= the same draws passed as variance_noise); set_timesteps restarts."""
    sched = DiffSamplerScheduler(solver="dpmpp_2m_sde")
    model = GMMModel(gmm16, sched.schedule)
    x = x_T()
    a = run_diffusers(sched, model, 6, x, generator=torch.Generator().manual_seed(3))
    b = run_diffusers(sched, model, 6, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    sched.set_timesteps(6)
    s = x.clone()
    noisy = [st.noise != 0.0 for st in sched.plan.steps]  # one call per step; the last one adds none
    assert noisy == [True] * 5 + [False]
    for t, adds in zip(sched.timesteps, noisy):
        z = torch.randn(s.shape, generator=g) if adds else None
        s = sched.step(model(sched.scale_model_input(s, t), t).sample, t, s, variance_noise=z).prev_sample
    assert torch.equal(a, s)
    c = run_diffusers(sched, model, 6, x, generator=torch.Generator().manual_seed(4))
    assert (a - c).abs().max().item() > 1e-2  # the generator's draws take effect


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_adapter_prediction_types(gmm16, pred):
    sched = DiffSamplerScheduler(solver="heun", prediction_type=pred)
    x = x_T()
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule, pred), 7, x)
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule, pred), x.clone(), solver="heun", nfe=7, spacing="linspace")
    assert (ours - ref).abs().max().item() <= 1e-6


def test_adapter_step_outputs(gmm16):
    """pred_original_sample is the data prediction at the evaluated input; step beyond the plan raises."""
    sched = DiffSamplerScheduler(solver="dpmpp_2s")
    sched.set_timesteps(5)
    model = GMMModel(gmm16, sched.schedule, "epsilon")
    x = x_T()
    den = gmm_denoiser(gmm16, sched.schedule)
    for t in sched.timesteps:
        out = sched.step(model(x, t).sample, t, x)
        want = den.data_pred(x, float(t) / sched.schedule.time_scale)
        assert (out.pred_original_sample - want).abs().max().item() <= 1e-5
        x = out.prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(model(x, t).sample, t, x)


def test_adapter_begin_index_and_explicit_timesteps(gmm16):
    """set_begin_index starts at a step boundary: same as sample() on the remaining grid."""
    sched = DiffSamplerScheduler(solver="dpmpp_2m")
    sched.set_timesteps(10)
    full_ts = sched.timesteps.clone()
    grid = sched.plan.grid
    x = x_T()
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), 10, x, begin_index=4)
    assert torch.equal(sched.timesteps, full_ts)
    sub = TimeGrid(t=grid.t[4:], alpha=grid.alpha[4:], sigma=grid.sigma[4:], lam=grid.lam[4:],
                   final_zero=grid.final_zero, schedule=grid.schedule)
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule), x.clone(), solver="dpmpp_2m", grid=sub)
    assert (ours - ref).abs().max().item() <= 1e-6
    sched.set_timesteps(10)  # a new schedule starts at its first call again, as in diffusers
    assert sched.begin_index is None and sched.step_index is None
    with pytest.raises(ValueError, match="begin_index 10 is outside"):
        sched.set_begin_index(10)


def img2img_endpoint(gmm, name, nfe, k, x0, eps, spacing="linspace"):
    """What an img2img pipeline does: slice `timesteps[k:]` (a view), then set_begin_index(k), noise the
    image to the first sliced time, run the remaining calls."""
    sched = DiffSamplerScheduler(solver=name, spacing=spacing)
    sched.set_timesteps(nfe)
    timesteps = sched.timesteps[k:]
    sched.set_begin_index(k)
    t0 = float(timesteps[0])
    x = sched.add_noise(x0, eps, torch.tensor([t0]))
    model, calls = GMMModel(gmm, sched.schedule), 0
    for t in timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
        calls += 1
    assert calls == nfe - k
    assert torch.equal(timesteps, sched.timesteps[k:])  # the evaluated times are the plan's
    return x, sched.schedule, t0


def exact_from(gmm, schedule, t_model, x_t):
    t = torch.tensor(t_model / schedule.time_scale, dtype=torch.float64)
    return gmm.ode_endpoint(x_t.double(), schedule.alpha(t), schedule.sigma(t), 1.0, 0.0)


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("name", ["heun", "dpmpp_2s"])
def test_begin_index_inside_a_step(gmm16, name):
    """img2img with a two-call solver: t_start = nfe - int(0.6 nfe) falls inside a step (steps start
    at calls 0, 1, 3, 5, ...), so the remaining calls are re-gridded from that call's time.  The result
    solves the PF-ODE from the noised image there as accurately as a fresh grid of the same budget."""
    x0 = gmm16.sample(8, generator=torch.Generator().manual_seed(4))
    eps = x_T(seed=5)
    for nfe in (10, 20, 40):
        k = nfe - int(0.6 * nfe)
        assert k not in sched_step_starts(name, nfe)
        x, schedule, t0 = img2img_endpoint(gmm16, name, nfe, k, x0, eps, "time_uniform")
        x_t = DiffSamplerScheduler(solver=name).add_noise(x0, eps, torch.tensor([t0]))
        exact = exact_from(gmm16, schedule, t0, x_t)
        m = nfe - k
        fresh = time_grid(schedule, ds.samplers.get(name).steps_for_nfe(m), "time_uniform",
                          t_start=t0 / schedule.time_scale)
        y = ds.sample(gmm_denoiser(gmm16, schedule), x_t.clone(), solver=name, grid=fresh, nfe=m)
        assert rms(x, exact) <= 1.05 * rms(y, exact), (nfe, rms(x, exact), rms(y, exact))


def test_begin_index_inside_a_step_converges(gmm16):
    """heun from the same mid-step time (t = 499.5 at calls 4/10, 10/22, 22/46, 46/94): the error of
    the re-gridded remainder shrinks faster than first order (x2.1 or more per doubled budget; the
    grid's Euler first and last steps keep it from the asymptotic 4x at these budgets)."""
    x0 = gmm16.sample(8, generator=torch.Generator().manual_seed(4))
    eps = x_T(seed=5)
    errs = []
    for nfe, k in ((10, 4), (22, 10), (46, 22), (94, 46)):
        x, schedule, t0 = img2img_endpoint(gmm16, "heun", nfe, k, x0, eps, "time_uniform")
        assert t0 == pytest.approx(499.5)
        x_t = DiffSamplerScheduler(solver="heun").add_noise(x0, eps, torch.tensor([t0]))
        errs.append(rms(x, exact_from(gmm16, schedule, t0, x_t)))
    assert all(a / b >= 2.1 for a, b in zip(errs, errs[1:])), errs


def sched_step_starts(name, nfe):
    s = DiffSamplerScheduler(solver=name)
    s.set_timesteps(nfe)
    return np.cumsum([0] + [len(st.evals) for st in s.plan.steps])[:-1].tolist()


def test_set_timesteps_sigmas_matches_euler_discrete(gmm16):
    """Custom diffusers sigmas (sigma/alpha, trailing 0) on a VP model: ours (euler) equals diffusers'
    EulerDiscreteScheduler given the same list, timesteps and samples."""
    sigmas = [14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0]
    # "leading": its init_noise_sigma is sqrt(sigma_max^2 + 1), the exact prior scale (with "linspace"
    # diffusers rounds it to sigma_max, a 0.2% different start)
    ref_sched = EulerDiscreteScheduler(timestep_spacing="leading")
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="euler")
    x = x_T()
    ref = run_diffusers(ref_sched, GMMModel(gmm16, ours_sched.schedule), None, x, sigmas=sigmas)
    ours = run_diffusers(ours_sched, GMMModel(gmm16, ours_sched.schedule), None, x, sigmas=sigmas)
    assert len(ours_sched.timesteps) == ours_sched.num_inference_steps == len(sigmas) - 1
    assert (ours_sched.timesteps - ref_sched.timesteps).abs().max().item() <= 1e-3
    assert (ours - ref).abs().max().item() <= 1e-4


def test_flow_sigmas_and_dynamic_shift(gmm16):
    """Flow models: `sigmas` are flow times, shifted by `mu` with use_dynamic_shifting exactly as
    FlowMatchEulerDiscreteScheduler does (same samples with euler); set_timesteps(n, mu=...) applies
    the exponential shift t -> e^mu / (e^mu + 1/t - 1) to our own grid."""
    cfg = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    sigmas, mu = [0.95, 0.8, 0.6, 0.4, 0.2, 0.05], 0.8
    ref_sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ours_sched = DiffSamplerScheduler.from_config(cfg, solver="euler")
    model = GMMModel(gmm16, ours_sched.schedule, "flow")
    x = x_T()
    ref = run_diffusers(ref_sched, model, None, x, sigmas=sigmas, mu=mu)
    ours = run_diffusers(ours_sched, model, None, x, sigmas=sigmas, mu=mu)
    assert (ours_sched.timesteps - ref_sched.timesteps).abs().max().item() <= 1e-3
    assert (ours - ref).abs().max().item() <= 1e-4

    plain = DiffSamplerScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, solver="dpmpp_2m",
                                             spacing="time_uniform")
    plain.set_timesteps(8)
    ours_sched = DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m", spacing="time_uniform")
    ours_sched.set_timesteps(8, mu=mu)
    t = plain.plan.grid.t[:-1]
    shifted = (math.exp(mu) / (math.exp(mu) + 1 / t - 1)).clamp(max=ours_sched.schedule.t_max)
    assert torch.allclose(ours_sched.plan.grid.t[:-1], shifted, atol=1e-12)
    errs = []
    for nfe in (8, 16):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        out = run_diffusers(DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m", spacing="time_uniform"), model,
                            nfe, x, mu=mu)
        s = ours_sched.schedule
        t0 = torch.tensor(s.t_max, dtype=torch.float64)
        exact = gmm16.ode_endpoint(x.double(), s.alpha(t0), s.sigma(t0), 1.0, 0.0)
        errs.append((out.double() - exact).pow(2).mean().sqrt().item())
    assert errs[1] < errs[0] / 2.5, errs


def test_add_noise(gmm16):
    sched = DiffSamplerScheduler()
    x0, eps = x_T(4), x_T(4, seed=1)
    t = torch.tensor([999, 500, 10, 0])
    acp = DDPMScheduler().alphas_cumprod[t].double().view(-1, 1)
    want = acp.sqrt() * x0.double() + (1 - acp).sqrt() * eps.double()
    assert (sched.add_noise(x0, eps, t).double() - want).abs().max().item() <= 1e-5
    assert len(sched) == 1000


def test_flow_config(gmm16):
    sched = DiffSamplerScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, solver="dpmpp_2m")
    assert isinstance(sched.schedule, RectifiedFlow) and sched.schedule.time_scale == 1000
    assert sched.prediction_kind == "flow"
    x = x_T()
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule, "flow"), 6, x)
    # a named solver keeps FlowMatchEuler's grid (its 4 points from t = 1, then 0), from t_max = 0.999 where the
    # solver cannot start at t = 1 (alpha = 0)
    ref_sched = FlowMatchEulerDiscreteScheduler()
    ref_sched.set_timesteps(sched.solver.steps_for_nfe(6, final_zero=True))
    assert torch.allclose(sched.plan.grid.t[1:-1].float(), ref_sched.sigmas[1:-1], atol=1e-7)
    assert float(sched.timesteps[0]) == pytest.approx(999.0)
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule, "flow"), x.clone(), solver=sched.plan)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert sched.spacing == "flowmatch"
    other = DiffSamplerScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, solver="dpmpp_2m",
                                             spacing="time_uniform")
    # (on its own schedule: FlowMatchEuler's convention spans t down to 1e-6, where its grids may end)
    ours = run_diffusers(other, GMMModel(gmm16, other.schedule, "flow"), 6, x)
    ref = ds.sample(gmm_denoiser(gmm16, other.schedule, "flow"), x.clone(), solver="dpmpp_2m", nfe=6,
                    spacing="time_uniform")
    assert (ours - ref).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------------------------
# 2. from diffusers configs: same samples as diffusers' own schedulers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_from_dpm_config_matches_diffusers(gmm16, nfe):
    ref_sched = DPMSolverMultistepScheduler()
    sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="dpmpp_2m")
    x = x_T(64, seed=0)
    ref = run_diffusers(ref_sched, GMMModel(gmm16, sched.schedule), nfe, x)
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), nfe, x)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_from_ddim_config_matches_diffusers(gmm16, nfe):
    # DDIM's "leading" grid (T // n) is not the multistep schedulers' "leading" (T // (n + 1)):
    # drive it with DDIM's own timesteps; its "trailing" grid is ours and comes from the config.
    x = x_T(64, seed=1)
    ref_sched = DDIMScheduler(clip_sample=False)
    sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="ddim")
    ref = run_diffusers(ref_sched, GMMModel(gmm16, sched.schedule), nfe, x)
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), None, x, timesteps=ref_sched.timesteps)
    assert (ours - ref).abs().max().item() <= 1e-4

    for alpha_one in (True, False):
        ref_sched = DDIMScheduler(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=alpha_one)
        sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="ddim")
        assert sched.spacing == "trailing" and sched.final == ("zero" if alpha_one else "last")
        ref = run_diffusers(ref_sched, GMMModel(gmm16, sched.schedule), nfe, x)
        ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), nfe, x)
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_from_deis_config_matches_diffusers(gmm16, nfe):
    ref_sched = DEISMultistepScheduler(solver_order=3)
    sched = DiffSamplerScheduler.from_config(ref_sched.config, solver="deis_logrho_3", final="last")
    x = x_T(64, seed=0)  # seed 2 at NFE 10 gives 1.7e-4: float32 round-off, sample() alike
    ref = run_diffusers(ref_sched, GMMModel(gmm16, sched.schedule), nfe, x)
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), nfe, x)
    assert (ours - ref).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------
# 3. metadata, configs, errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,nfe,steps", [("heun", 9, 5), ("dpmpp_2s", 8, 5), ("heun", 1, 1)])
def test_timesteps_one_per_model_call(name, nfe, steps):
    sched = DiffSamplerScheduler(solver=name)
    sched.set_timesteps(nfe)
    assert len(sched.timesteps) == nfe == sched.plan.nfe
    assert len(sched.plan.steps) == steps
    assert sched.timesteps.dtype == torch.float32
    assert sched.order == 1 and sched.solver_order == 2  # pipelines read `order` as calls per entry


def test_save_load_round_trip(tmp_path):
    sched = DiffSamplerScheduler(solver="dpmpp_2m_sde", spacing="karras", final="last",
                                 prediction_type="v_prediction", solver_options={"lower_order_final": False})
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    back = DiffSamplerScheduler.from_pretrained(tmp_path)
    for k in ("solver", "spacing", "final", "prediction_type", "solver_options"):
        assert back.config[k] == sched.config[k]
    sched.set_timesteps(7)
    back.set_timesteps(7)
    assert torch.equal(sched.timesteps, back.timesteps)
    # a foreign config survives the round trip through our class
    src = DiffSamplerScheduler.from_config(DPMSolverMultistepScheduler(solver_order=3).config)
    src.save_pretrained(tmp_path / "b")
    assert DiffSamplerScheduler.from_pretrained(tmp_path / "b").config["solver_order"] == 3


CONFIG_SOURCES = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                  PNDMScheduler, UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("cls", CONFIG_SOURCES, ids=lambda c: c.__name__)
def test_diffusers_configs_accepted_silently(cls):
    handler = _Records()
    lib_logger = logging.getLogger("diffusers")
    lib_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sched = DiffSamplerScheduler.from_config(cls().config, solver="dpmpp_2m")
            sched.set_timesteps(6)
    finally:
        lib_logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]
    assert len(sched.timesteps) == 6
    assert isinstance(sched.schedule, RectifiedFlow) == (cls is FlowMatchEulerDiscreteScheduler)
    # foreign keys are kept in the config, not dropped
    foreign = {k for k in cls().config if not k.startswith("_")}
    assert foreign <= set(sched.config)


def test_config_key_mapping():
    s = DiffSamplerScheduler.from_config(DPMSolverMultistepScheduler(final_sigmas_type="sigma_min",
                                                                     timestep_spacing="trailing").config)
    assert (s.final, s.spacing) == ("last", "trailing")
    s = DiffSamplerScheduler.from_config(DPMSolverMultistepScheduler(timestep_spacing="trailing").config,
                                         spacing="logsnr")
    assert s.spacing == "logsnr"
    s = DiffSamplerScheduler.from_config(
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction").config,
        solver="dpmpp_2m")
    assert isinstance(s.schedule, RectifiedFlow) and s.prediction_kind == "flow"


def test_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        DiffSamplerScheduler(solver="nope")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffSamplerScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="prediction_type|flow"):
        DiffSamplerScheduler(prediction_type="flow", schedule_type="vp")
    with pytest.raises(ValueError, match="unknown option"):
        DiffSamplerScheduler(solver="dpmpp_2m", solver_options={"bogus": 1})
    with pytest.raises(ValueError, match="spacing"):
        DiffSamplerScheduler(spacing="weird")
    with pytest.raises(ValueError, match="set_timesteps"):
        DiffSamplerScheduler().step(torch.zeros(1, 2), 0, torch.zeros(1, 2))
