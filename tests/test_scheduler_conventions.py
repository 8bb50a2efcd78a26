"""The conventions diffusers' own common scheduler tests (tests/schedulers/test_schedulers.py) check, for every
registered solver behind `DiffSamplerScheduler` (parametrized over `diffsampler.available()` at collection time,
so solvers added later are covered): save_pretrained / from_pretrained round trip with an identical config and
identical samples, `trained_betas`, `add_noise`, step output shapes and return_dict equivalence, the public
API and the attributes pipelines read, the `_deprecated_kwargs` convention, config attribute access; and
`from_config` of every diffusers scheduler class: a class in `SUPPORTED_CLASSES` is reproduced (same samples
as diffusers' own in the standard loop), any other is refused naming the class.  Tiny tensors, NFE 3."""

import inspect
import warnings

import pytest
import torch
import diffusers
import diffusers.schedulers as dsched

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.pipelines.parity import SUPPORTED_CLASSES
from diffusers_loop import run_diffusers

#: adaptive solvers (dpm_adaptive) choose their steps while they sample: set_timesteps cannot fix them, so
#: the adapter refuses them by name (test_adaptive_solvers_refused_by_name); every other solver is driven
ADAPTIVE = [n for n in ds.available() if ds.samplers.info(n).get("adaptive")]
SOLVERS = [n for n in ds.available() if n not in ADAPTIVE]
NFE = 3


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_solvers_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"solver '{name}' chooses its step sizes while it samples"):
        DiffSamplerScheduler(solver=name)
    with pytest.raises(ValueError, match=rf"solver '{name}' chooses its step sizes"):
        DiffSamplerScheduler.from_config(diffusers.DDIMScheduler().config, solver=name)


def x_T(n=2, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def nfe_for(sched) -> int:
    """NFE 3, or the least a solver accepts above it (two-call solvers: an odd count, plans: their own)."""
    for n in range(NFE, NFE + 8):
        try:
            sched.set_timesteps(n)
            return n
        except ValueError:
            continue
    raise AssertionError(f"{sched.config.solver}: no NFE in {NFE}..{NFE + 7} accepted")


def run(sched, gmm, x, seed=0):
    n = nfe_for(sched)
    return run_diffusers(sched, GMMModel(gmm, sched.schedule, sched.prediction_kind), n, x,
                         generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gmm4():
    return ds.eval.gmm.GaussianMixture.random(4, 3, seed=2, scale=1.0, std=(0.3, 0.5))


# --------------------------------------------------------------------------------------------------
# every registered solver
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SOLVERS)
def test_save_pretrained_round_trip(tmp_path, gmm4, name):
    sched = DiffSamplerScheduler(solver=name, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 timestep_spacing="trailing")
    sched.save_pretrained(tmp_path)
    back = DiffSamplerScheduler.from_pretrained(tmp_path)
    same = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # diffusers' own bookkeeping
    assert same(back.config) == same(sched.config)
    x = x_T()
    assert torch.equal(run(sched, gmm4, x), run(back, gmm4, x))


@pytest.mark.parametrize("name", SOLVERS)
def test_trained_betas(gmm4, name):
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    sched = DiffSamplerScheduler(solver=name, trained_betas=betas.tolist())
    assert torch.allclose(sched.betas.double(), betas, atol=1e-9)
    assert torch.allclose(sched.alphas_cumprod, diffusers.DDPMScheduler(trained_betas=betas.numpy()).alphas_cumprod)
    assert torch.isfinite(run(sched, gmm4, x_T())).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_add_noise_and_get_velocity_equal_ddpm(name):
    sched, ref = DiffSamplerScheduler(solver=name), diffusers.DDPMScheduler()
    x0, eps = x_T(4), x_T(4, seed=1)
    t = torch.tensor([999, 500, 10, 0])
    assert (sched.add_noise(x0, eps, t) - ref.add_noise(x0, eps, t)).abs().max().item() <= 1e-6
    assert (sched.get_velocity(x0, eps, t) - ref.get_velocity(x0, eps, t)).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="outside the schedule's range"):
        sched.add_noise(x0, eps, torch.tensor([1000, 0, 0, 0]))


@pytest.mark.parametrize("name", SOLVERS)
def test_step_output_shapes_and_return_dict(gmm4, name):
    outs = []
    for return_dict in (True, False):
        sched = DiffSamplerScheduler(solver=name)
        n = nfe_for(sched)
        model = GMMModel(gmm4, sched.schedule)
        x = x_T(3, 4) * sched.init_noise_sigma
        g = torch.Generator().manual_seed(0)
        trail = []
        for t in sched.timesteps:
            out = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x, generator=g, return_dict=return_dict)
            x, x0 = (out.prev_sample, out.pred_original_sample) if return_dict else out
            assert x.shape == x0.shape == (3, 4) and x.dtype == torch.float32
            trail.append(x)
        assert len(trail) == n == len(sched.timesteps)
        outs.append(torch.stack(trail))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", SOLVERS)
def test_public_api_and_pipeline_attribute_reads(name):
    """What pipelines read: init_noise_sigma, order, timesteps (int64 where diffusers' are), sigmas,
    alphas_cumprod / alphas / betas, step_index / begin_index / set_begin_index, scale_model_input,
    config.num_train_timesteps, len(); and previous_timestep."""
    sched = DiffSamplerScheduler(solver=name)
    for attr in ("init_noise_sigma", "scale_model_input", "step", "set_timesteps", "add_noise", "order"):
        assert hasattr(sched, attr), attr
    assert sched.step_index is None and sched.begin_index is None and len(sched) == sched.config.num_train_timesteps
    n = nfe_for(sched)
    assert len(sched.timesteps) == n and len(sched.sigmas) == n + 1 and sched.sigmas.dtype == torch.float32
    assert sched.timesteps.dtype in (torch.int64, torch.float32)
    if all(len(st.evals) == 1 for st in sched.plan.steps) and getattr(sched.solver, "own_grid", None) is None:
        assert sched.timesteps.dtype == torch.int64  # one call per step on a discrete schedule: as DDIM / DPM-Solver
    assert sched.alphas_cumprod.shape == sched.alphas.shape == sched.betas.shape == (1000,)
    x = x_T()
    assert torch.equal(sched.scale_model_input(x, sched.timesteps[0]), x) or sched.moves_x_T
    nxt = sched.previous_timestep(sched.timesteps[0])
    assert float(nxt) == float(sched.timesteps[1])
    sched.set_begin_index(0)
    assert sched.begin_index == 0


@pytest.mark.parametrize("name", SOLVERS)
def test_from_config_of_a_diffusers_config_with_a_named_solver(gmm4, name):
    src = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    sched = DiffSamplerScheduler.from_config(src.config, solver=name)
    assert sched.config.solver == name and sched.prediction_kind == "v_prediction"
    assert torch.allclose(sched.alphas_cumprod, src.alphas_cumprod)
    assert torch.isfinite(run(sched, gmm4, x_T())).all()


# --------------------------------------------------------------------------------------------------
# the class itself
# --------------------------------------------------------------------------------------------------

def test_deprecated_kwargs_convention():
    """diffusers' test_deprecated_kwargs: a scheduler whose __init__ takes **kwargs lists them in
    _deprecated_kwargs; ours are the other diffusers classes' config keys (kept, unused or routed)."""
    cls = DiffSamplerScheduler
    assert "kwargs" in inspect.signature(cls.__init__).parameters
    assert len(cls._deprecated_kwargs) > 0
    assert "use_karras_sigmas" in cls._deprecated_kwargs and "solver" not in cls._deprecated_kwargs


def test_config_attribute_access_as_diffusers():
    """diffusers' test_getattr_is_correct: config keys read through the instance (with diffusers' deprecation
    warning), unknown names an AttributeError naming the class."""
    sched = DiffSamplerScheduler(solver="dpmpp_2m")
    sched.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert sched.test_attribute == 5
    assert sched.config.test_attribute == 5
    with pytest.raises(AttributeError, match="DiffSamplerScheduler"):
        sched.does_not_exist


def test_unknown_keywords_and_top_level_options():
    with pytest.raises(TypeError, match=r"spacng.*did you mean 'spacing'"):
        DiffSamplerScheduler(solver="dpmpp_2m", spacng="logsnr")
    with pytest.raises(TypeError, match="spacng"):
        DiffSamplerScheduler.from_config(diffusers.DDIMScheduler().config, spacng="logsnr")
    sched = DiffSamplerScheduler.from_config(diffusers.DDIMScheduler().config, solver="ghvb", order=1.5)
    assert sched.config.solver_options == {"order": 1.5}
    named = DiffSamplerScheduler.from_config(diffusers.DDIMScheduler().config, solver="ghvb", solver_options={"order": 1.5})
    default = DiffSamplerScheduler.from_config(diffusers.DDIMScheduler().config, solver="ghvb")
    for s in (sched, named, default):
        s.set_timesteps(6)
    w = lambda s: [st.update for st in s.plan.steps]  # the steps' combinations of model outputs
    assert repr(w(sched)) == repr(w(named)) != repr(w(default))


# --------------------------------------------------------------------------------------------------
# from_config of every diffusers scheduler class
# --------------------------------------------------------------------------------------------------

def _classes():
    out = []
    for n in sorted({n for g in getattr(dsched, "_import_structure", {}).values() for n in g if n.endswith("Scheduler")}):
        try:
            cls = getattr(dsched, n)
            cls()
        except Exception:  # a class needing arguments or a missing optional backend: not constructible bare
            continue
        out.append(n)
    return out


CLASSES = _classes()


def test_every_diffusers_class_is_covered():
    assert len(CLASSES) >= 30 and "FlowMatchEulerDiscreteScheduler" in CLASSES


@pytest.mark.parametrize("name", CLASSES)
def test_from_config_of_every_diffusers_class(gmm4, name):
    """Supported classes (SUPPORTED_CLASSES, read at test time): the same samples as the class itself in the
    standard loop (stochastic classes with the same generator).  Any other: a ValueError naming the class,
    from the scheduler instance and from its config with _class_name."""
    cls = getattr(dsched, name)
    src = cls()
    sources = (src, {**src.config, "_class_name": name})
    if name not in SUPPORTED_CLASSES:
        for s in sources:
            with pytest.raises(ValueError, match=name):
                DiffSamplerScheduler.from_config(s)
        return
    x = x_T(4, 4)
    for s in sources:
        ours = DiffSamplerScheduler.from_config(s)
        model = GMMModel(gmm4, ours.schedule, ours.prediction_kind)
        if name.startswith("EDM"):  # the mixture behind EDM's preconditioning (c_in, c_noise, c_skip, c_out)
            from diffsampler.eval.gmm import EDMGMMModel

            model = EDMGMMModel(gmm4, src.config.sigma_data, src.config.prediction_type)
        ref_sched = cls.from_config(src.config)
        # the same generator where the class's step takes one; where it takes none (DPMSolverSDE seeds its
        # Brownian tree from torch's global generator) neither gets one, from the same global seed
        kw = lambda: ({"generator": torch.Generator().manual_seed(0)}
                      if "generator" in inspect.signature(ref_sched.step).parameters else {})
        torch.manual_seed(5)
        ref = run_diffusers(ref_sched, model, 5, x, **kw())
        torch.manual_seed(5)
        got = run_diffusers(ours, model, 5, x, **kw())
        assert (got - ref).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------------
# explicit grids: diffusers' own lists and k-diffusion's from the schedule's range
# --------------------------------------------------------------------------------------------------

def test_set_timesteps_accepts_diffusers_and_k_diffusion_lists():
    from diffsampler import grids

    euler = diffusers.EulerDiscreteScheduler()
    euler.set_timesteps(6)  # ends with 0: the plan ends at sigma = 0
    sched = DiffSamplerScheduler(solver="euler")
    sched.set_timesteps(sigmas=euler.sigmas)
    assert torch.equal(sched.sigmas, euler.sigmas) and sched.plan.grid.final_zero
    dpm = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    dpm.set_timesteps(6)  # ends sigma_min, sigma_min: its last step leaves x as it is
    sched = DiffSamplerScheduler(solver="dpmpp_2m")
    sched.set_timesteps(sigmas=dpm.sigmas)
    assert not sched.plan.grid.final_zero and len(sched.timesteps) == 5
    assert torch.allclose(sched.sigmas, dpm.sigmas[:-1], rtol=1e-6)
    # k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max) from the schedule's own float32 ends
    acp = sched.alphas_cumprod
    table = ((1 - acp) / acp) ** 0.5
    k = grids.karras_sigmas(8, float(table.min()), float(table.max())).tolist() + [0.0]
    sched.set_timesteps(sigmas=k)
    assert float(sched.timesteps[0]) == 999 and len(sched.timesteps) == 8
    with pytest.raises(ValueError, match="outside the schedule's range"):
        sched.set_timesteps(sigmas=[float(table.max()) * 1.01] + k[1:])


# --------------------------------------------------------------------------------------------------
# every shipped (searched) plan is drivable through the adapter
# --------------------------------------------------------------------------------------------------

from diffsampler.samplers.usf import available_plans, load_plan  # noqa: E402


@pytest.mark.parametrize("plan", available_plans())
def test_shipped_plans_drive_through_the_adapter(gmm4, plan):
    """The search's own outputs run in the standard loop and equal diffsampler.sample on the same plan
    (an analytic first step, where a plan has one, runs in scale_model_input); a plan that carries a
    time shift (its per-sample times cannot be a pipeline's timesteps) is refused by name."""
    name = plan if plan.startswith("plan:") else f"plan:{plan}"
    spec = load_plan(plan.removeprefix("plan:"))
    if spec.time_shift is not None:
        with pytest.raises(ValueError, match="carries time_shift"):
            DiffSamplerScheduler(solver=name).set_timesteps(spec.nfe)
        return
    sched = DiffSamplerScheduler(solver=name)
    x = x_T(3, 4)
    sched.set_timesteps(sched.solver.plan.nfe if hasattr(sched.solver, "plan") else None)
    out = run_diffusers(sched, GMMModel(gmm4, sched.schedule), len(sched.timesteps), x)
    ref = ds.sample(gmm_denoiser(gmm4, sched.schedule), x.clone(), solver=sched.plan)
    assert (out - ref).abs().max().item() <= 1e-6
