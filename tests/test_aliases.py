"""A1111 / ComfyUI sampler names (samplers/aliases.py) work wherever a solver name does -- sample(),
make_plan, the diffusers adapter, Hydra -- and give exactly the registered solver on the grid and
with the options the name stands for; what cannot apply is refused naming the alias."""

from __future__ import annotations

import io
import re

import pytest
import torch
from diffusers import DDPMScheduler

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers import available, get, make_plan
from diffsampler.samplers.aliases import ALIASES
from diffsampler.schedules import DiscreteVP, time_grid

SD_CFG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
              steps_offset=1)


@pytest.fixture(scope="module")
def problem():
    schedule = DiscreteVP.from_diffusers_config(DDPMScheduler(**SD_CFG).config)
    gmm = GaussianMixture.random(4, 3, seed=0)
    den = gmm_denoiser(gmm, schedule, "epsilon")
    x = ds.samplers.initial_noise((6, 4), schedule, seeds=range(6), dtype=torch.float64)
    return schedule, den, x


def _usable(name) -> bool:
    try:
        get(name)
        return True
    except ValueError:
        return False


def test_the_table_names_what_users_type():
    for name in ("Euler a", "Euler", "Heun", "DPM++ 2M Karras", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 3M SDE",
                 "LMS Karras", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "UniPC", "Restart", "DDIM", "PLMS",
                 "dpmpp_2m_sde_gpu", "dpm_2", "uni_pc_bh2"):
        assert name in ALIASES, name
    assert ALIASES["DPM++ 2M Karras"].solver == "dpmpp_2m" and ALIASES["DPM++ 2M Karras"].spacing == "karras"
    assert ALIASES["DPM++ 2M SDE Exponential"].spacing == "exponential"
    assert ALIASES["Euler a"].solver == "euler_ancestral" and ALIASES["Euler a"].spacing is None
    assert not set(ALIASES) & set(available()), "an alias may not shadow a registered name"


@pytest.mark.parametrize("name", list(ALIASES))
def test_every_alias_is_its_solver_or_refused_by_name(problem, name):
    schedule, den, x = problem
    a = ALIASES[name]
    if a.solver not in available():
        with pytest.raises(ValueError, match=re.escape(f"'{name}' maps to solver '{a.solver}', which is not registered")):
            ds.sample(den, x.clone(), solver=name, nfe=8, seeds=range(6))
        return
    try:
        get(a.solver, **a.options)
    except ValueError:  # the solver is there, one of the alias's options not (yet)
        with pytest.raises(ValueError, match=re.escape(f"'{name}' maps to solver '{a.solver}' with option")):
            get(name)
        return
    s = get(name)
    assert s.name == a.solver and s.alias == name and s.alias_spacing == a.spacing
    adaptive = getattr(s, "adaptive", False)  # dpm_adaptive: nfe is a budget, None = unbounded
    nfe = None if adaptive else max(8, s.min_nfe)
    kw = {"seeds": range(6)} if s.stochastic else {}
    got = ds.sample(den, x.clone(), solver=name, nfe=nfe, **kw)
    want = ds.sample(den, x.clone(), solver=a.solver, nfe=nfe, spacing=a.spacing, **a.options, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if a.spacing is not None:  # the grid the name fixes is the plan's
        assert make_plan(name, schedule, nfe).info["spacing"] == a.spacing


def test_dpmpp_2m_karras_is_dpmpp_2m_on_kdiffusion_karras_sigmas(problem):
    schedule, den, x = problem
    got = ds.sample(den, x.clone(), solver="DPM++ 2M Karras", nfe=10)
    want = ds.sample(den, x.clone(), solver="dpmpp_2m", grid=time_grid(schedule, 10, "karras"))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a name without its schedule leaves the spacing to the caller
    got = ds.sample(den, x.clone(), solver="DPM++ 2M", nfe=10, spacing="exponential")
    want = ds.sample(den, x.clone(), solver="dpmpp_2m", nfe=10, spacing="exponential")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_fixed_spacing_refuses_another(problem):
    schedule, den, x = problem
    with pytest.raises(ValueError, match=r"solver 'DPM\+\+ 2M Karras' fixes spacing='karras'; spacing='logsnr' "
                                         r"cannot apply .*solver='dpmpp_2m'"):
        ds.sample(den, x.clone(), solver="DPM++ 2M Karras", nfe=8, spacing="logsnr")
    with pytest.raises(ValueError, match=r"fixes spacing='karras'; grid= cannot apply"):
        ds.sample(den, x.clone(), solver="DPM++ 2M Karras", grid=time_grid(schedule, 8, "karras"))
    with pytest.raises(ValueError, match=r"fixes spacing='karras'; grid= cannot apply"):
        make_plan("DPM++ 2M Karras", schedule, grid=time_grid(schedule, 8, "karras"))
    # the same spacing, also as a dict with options, is fine
    ds.sample(den, x.clone(), solver="DPM++ 2M Karras", nfe=8, spacing="karras")
    ds.sample(den, x.clone(), solver="DPM++ 2M Karras", nfe=8, spacing={"name": "karras", "rho": 5.0})


def test_options_are_the_callers_on_top_unless_they_contradict(problem):
    schedule, den, x = problem
    s = get("DPM++ 2M", order=1)  # an option the alias does not fix
    assert s.order == 1 and s.alias == "DPM++ 2M"
    with pytest.raises(ValueError, match=r"'uni_pc_bh2' is 'unipc' with solver_type='bh2'; got solver_type='bh1'|"
                                         r"'uni_pc_bh2' maps to solver 'unipc'"):
        get("uni_pc_bh2", solver_type="bh1")
    with pytest.raises(ValueError, match=r"'DPM\+\+ 2M SDE Heun' is 'dpmpp_2m_sde' with solver_type='heun'; got "
                                         r"solver_type='midpoint'|'DPM\+\+ 2M SDE Heun' maps to solver"):
        get("DPM++ 2M SDE Heun", solver_type="midpoint")
    with pytest.raises(ValueError, match=r"solver 'dpmpp_2m' got unknown option\(s\) \['etaa'\]"):
        get("DPM++ 2M Karras", etaa=1.0)


def test_unknown_names_point_at_the_list():
    with pytest.raises(ValueError, match=r"unknown solver 'DPM\+\+ 9M'.*A1111 / ComfyUI sampler name \(diffsampler list\)"):
        get("DPM++ 9M")


def test_adapter_takes_aliases():
    cfg = DDPMScheduler(**SD_CFG).config
    sched = DiffSamplerScheduler.from_config(cfg, solver="DPM++ 2M Karras")
    assert sched.spacing == "karras" and sched.solver.name == "dpmpp_2m"  # not the config's "leading"
    sched.set_timesteps(10)
    want = time_grid(sched.schedule, 10, "karras")
    torch.testing.assert_close(sched.sigmas.double(), (want.sigma / want.alpha).float().double())
    with pytest.raises(ValueError, match=r"fixes spacing='karras'; spacing='logsnr' cannot apply"):
        DiffSamplerScheduler.from_config(cfg, solver="DPM++ 2M Karras", spacing="logsnr")
    # options of the alias's solver go through the keyword routing
    sched = DiffSamplerScheduler.from_config(cfg, solver="DPM++ 2M", order=1)
    assert sched.solver.order == 1 and sched.spacing == "leading"
    # a saved config round-trips through the alias
    again = DiffSamplerScheduler.from_config(DiffSamplerScheduler.from_config(cfg, solver="DPM++ 2M Karras").config)
    assert again.spacing == "karras" and again.solver.alias == "DPM++ 2M Karras"


def _composed(*overrides):
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return compose("config", overrides=list(overrides))


def test_hydra_takes_aliases():
    from diffsampler.tools.run_checks import ConfigError, validate

    spec = validate(_composed("solver=DPM++ 2M Karras", "nfe=6"))
    assert spec.solver.name == "DPM++ 2M Karras" and spec.sampling.spacing == "karras"
    assert validate(_composed("solver=DPM++ 2M", "nfe=6")).sampling.spacing == "time_uniform"
    assert validate(_composed("solver=dpmpp_2m", "nfe=6")).sampling.spacing == "time_uniform"
    with pytest.raises(ConfigError, match=r"fixes spacing='karras'; spacing='logsnr' cannot apply"):
        validate(_composed("solver=DPM++ 2M Karras", "spacing=logsnr"))
    missing = next((n for n, a in ALIASES.items() if a.solver not in available()), None)
    if missing is not None:
        with pytest.raises(ConfigError, match=re.escape(f"'{missing}' maps to solver '{ALIASES[missing].solver}', "
                                                        "which is not registered")):
            validate(_composed(f"solver={missing}"))


def test_list_prints_solvers_aliases_spacings_guidance_plans():
    from diffsampler.cli import list_main

    out = io.StringIO()
    list_main(out)
    text = out.getvalue()
    for needle in ("solvers (solver=<name>)", "dpmpp_2m ", "'DPM++ 2M Karras'", "-> dpmpp_2m, spacing=karras",
                   "spacings (spacing=<name>)", "ays_sdxl", "guidance (guidance=<name>)", "cfg ", "interval",
                   "shipped plans", "gmm_nfe5"):
        assert needle in text, needle
    for name, a in ALIASES.items():
        line = next(l for l in text.splitlines() if l.strip().startswith(repr(name)))
        assert ("[refused" in line) == (not _usable(name)), line


# --- the names give what A1111 / ComfyUI give: k-diffusion's sampler on k-diffusion's sigmas -----

def _kdiffusion():
    from kdiffusion_ref import sampling  # k-diffusion's sampling.py, loaded on its own

    return sampling


KDIFF_RUNS = [  # (alias, spacing given, k-diffusion sampler, sigma function, model calls for 10 sigmas)
    ("DPM++ 2M Karras", None, "sample_dpmpp_2m", "get_sigmas_karras", 10),
    ("DPM++ 2M", "exponential", "sample_dpmpp_2m", "get_sigmas_exponential", 10),
    ("LMS Karras", None, "sample_lms", "get_sigmas_karras", 10),
    ("Euler", "karras", "sample_euler", "get_sigmas_karras", 10),
    ("Heun", "karras", "sample_heun", "get_sigmas_karras", 19),
    ("DPM2 Karras", None, "sample_dpm_2", "get_sigmas_karras", 19),
]


@pytest.mark.parametrize("name, spacing, fn, sigmas_fn, nfe", KDIFF_RUNS)
def test_alias_equals_kdiffusion_on_its_sigmas(problem, name, spacing, fn, sigmas_fn, nfe):
    schedule, den, x = problem
    if not _usable(name):
        pytest.skip(f"{name!r}: {ALIASES[name].solver} is not registered")
    K = _kdiffusion()
    rho_min, rho_max = float(schedule.rho(schedule.t_min)), float(schedule.rho(schedule.t_max))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion's sigma ramp in float64
    try:
        sigmas = getattr(K, sigmas_fn)(10, rho_min, rho_max)
    finally:
        torch.set_default_dtype(old)
    from kdiffusion_ref import kdiff_model

    model = kdiff_model(den.model.gmm, schedule)
    want = getattr(K, fn)(model, x / float(schedule.alpha(schedule.t_max)), sigmas, disable=True)
    got = ds.sample(den, x.clone(), solver=name, nfe=nfe, spacing=spacing)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dpm_fast_is_kdiffusion_sample_dpm_fast_grid():
    """"DPM fast" (A1111: sample_dpm_fast(sigma_min, sigma_max, n)): DPM-Solver-fast's order list on a grid
    uniform in lambda = -log(sigma / alpha) from the schedule's ends (its values: tests/test_parity_dpm.py)."""
    schedule = ds.schedules.DiscreteVP.linear()
    for nfe in (5, 6, 10):
        plan = make_plan("DPM fast", schedule, nfe, final="last")
        lam = plan.grid.lam
        m = nfe // 3 + 1
        assert plan.nfe == nfe and len(plan.steps) == m and plan.info["spacing"] == "logsnr"
        want = torch.linspace(float(lam[0]), float(lam[-1]), m + 1, dtype=torch.float64)
        torch.testing.assert_close(lam, want, rtol=0, atol=1e-9)
        assert [s.order for s in plan.steps] == ([3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3])
