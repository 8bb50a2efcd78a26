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
    if a.refused:  # checked by test_every_comfyui_and_a1111_sampler_name_resolves_or_is_refused_by_name
        with pytest.raises(ValueError, match=re.escape(f"{name!r} ({a.source}) is not registered in diffsampler")):
            ds.sample(den, x.clone(), solver=name, nfe=8, seeds=range(6))
        return
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
    missing = next((n for n, a in ALIASES.items() if not a.refused and a.solver not in available()), None)
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


# --- the authoritative name lists: every name is a registered solver, an alias, or refused by name ---------

#: ComfyUI comfy/samplers.py (comfyanonymous/ComfyUI; the lists moved to comfy/sampler_names.py later):
#: KSAMPLER_NAMES as of ComfyUI 0.3.7x (exp_heun_2_x0*, dpmpp_2m_sde_heun*, cfgpp_ud10_ab are the latest additions)
COMFY_KSAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]
#: comfy/samplers.py: SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
COMFY_SAMPLER_NAMES = COMFY_KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
#: comfy/samplers.py SCHEDULER_NAMES (SCHEDULER_HANDLERS' keys)
COMFY_SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                         "linear_quadratic", "kl_optimal"]
#: AUTOMATIC1111 modules/sd_samplers_kdiffusion.py samplers_k_diffusion labels (1.10; before 1.9 the schedule was
#: part of the label: "DPM++ 2M Karras", ...), modules/sd_samplers_timesteps.py (DDIM, DDIM CFG++, PLMS, UniPC),
#: modules/sd_samplers_lcm.py (LCM)
A1111_SAMPLER_LABELS = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler",
    "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC",
    "LCM",
    # A1111 < 1.9
    "LMS Karras", "DPM2 Karras", "DPM2 a Karras", "DPM++ 2S a Karras", "DPM++ 2M Karras", "DPM++ SDE Karras",
    "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential", "DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun Exponential",
    "DPM++ 3M SDE Karras", "DPM++ 3M SDE Exponential"]
#: A1111 modules/sd_schedulers.py `schedulers` labels ("Automatic" is the sampler's own default)
A1111_SCHEDULE_LABELS = ["Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                         "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]

#: what each name is expected to give here: (registered solver, options that must hold) or "refused"
EXPECTED = {
    "euler": ("euler", {}), "heun": ("heun", {}), "lms": ("lms", {"order": 4}),
    "euler_ancestral": ("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "dpm_2": ("dpm2", {}), "dpm_2_ancestral": ("dpm2_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "dpm_fast": ("dpm_fast", {"eta": 0.0}),
    "dpm_adaptive": ("dpm_adaptive", {"eta": 0.0, "order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05,
                                      "pid": (0.0, 1.0, 0.0, 0.81)}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "dpmpp_sde": ("dpmpp_sde", {"eta": 1.0, "s_noise": 1.0, "r": 0.5, "noise": "brownian"}),
    "dpmpp_sde_gpu": ("dpmpp_sde", {"eta": 1.0, "s_noise": 1.0, "r": 0.5, "noise": "brownian"}),
    "dpmpp_2m": ("dpmpp_2m", {"order": 2}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}),  # noise: see notes
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint", "noise": "brownian"}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"eta": 1.0, "s_noise": 1.0, "solver_type": "heun", "noise": "brownian"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"eta": 1.0, "s_noise": 1.0, "solver_type": "heun",
                                               "noise": "brownian"}),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {"eta": 1.0, "s_noise": 1.0}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {"eta": 1.0, "s_noise": 1.0, "noise": "brownian"}),
    "ddpm": ("ddpm", {"variance": "fixed_small"}),
    "ipndm": ("ipndm", {"order": 4, "first_order_to_zero": True}),
    "ddim": ("ddim", {"eta": 0.0}),
    "uni_pc": ("unipc", {"solver_type": "bh1", "order": 3}),
    "uni_pc_bh2": ("unipc", {"solver_type": "bh2", "order": 3}),
    "sa_solver": ("sa_solver", {}),  # the registered name wins; ComfyUI's defaults differ (REGISTERED_NAMES_NOTES)
    # A1111
    "Euler a": ("euler_ancestral", {"eta": 1.0}), "Euler": ("euler", {}), "LMS": ("lms", {"order": 4}),
    "Heun": ("heun", {}), "DPM2": ("dpm2", {}), "DPM2 a": ("dpm2_ancestral", {"eta": 1.0}),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", {"eta": 1.0}), "DPM++ 2M": ("dpmpp_2m", {}),
    "DPM++ SDE": ("dpmpp_sde", {"noise": "brownian", "r": 0.5}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", {"noise": "brownian", "solver_type": "midpoint"}),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", {"noise": "brownian", "solver_type": "heun"}),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", {"noise": "brownian"}),
    "DPM fast": ("dpm_fast", {"eta": 0.0}), "DPM adaptive": ("dpm_adaptive", {"eta": 0.0}),
    "Restart": ("restart", {}), "DDIM": ("ddim", {"eta": 0.0}), "PLMS": ("plms", {}),
    "UniPC": ("unipc", {"solver_type": "bh1", "order": 3}),
}
REFUSED = {"euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
           "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp", "heunpp2",
           "exp_heun_2_x0", "exp_heun_2_x0_sde", "lcm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep",
           "res_multistep_ancestral", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "sa_solver_pece",
           "DDIM CFG++", "LCM"}


def _base_label(name):
    for suffix in (" Karras", " Exponential"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix.strip().lower()
    return name, None


@pytest.mark.parametrize("name", COMFY_SAMPLER_NAMES + A1111_SAMPLER_LABELS)
def test_every_comfyui_and_a1111_sampler_name_resolves_or_is_refused_by_name(name):
    from diffsampler.samplers.aliases import REGISTERED_NAMES_NOTES

    if name in REFUSED:
        assert ALIASES[name].refused and name not in available()
        with pytest.raises(ValueError, match=re.escape(f"{name!r} ({ALIASES[name].source}) is not registered in "
                                                       f"diffsampler: {ALIASES[name].refused}")):
            get(name)
        return
    base, spacing = _base_label(name)
    solver, options = EXPECTED[base]
    s = get(name)
    assert s.name == solver, (name, s.name)
    for k, v in options.items():
        assert getattr(s, k) == v, (name, k, getattr(s, k), v)
    if name in available():  # a ComfyUI name that is a registered name: how ComfyUI's sampler relates is said
        assert name in REGISTERED_NAMES_NOTES, name
    else:
        # the grid a name fixes: its schedule suffix; sample_dpm_fast's log-SNR-uniform grid; A1111 runs Restart on
        # Karras sigmas (sd_samplers_extra.restart_sampler)
        spacing = spacing or {"DPM fast": "logsnr", "Restart": "karras"}.get(name)
        assert s.alias == name and s.alias_spacing == spacing


def test_every_table_entry_is_on_a_list():
    listed = set(COMFY_SAMPLER_NAMES) | set(A1111_SAMPLER_LABELS)
    assert set(ALIASES) <= listed, sorted(set(ALIASES) - listed)


def test_refused_names_are_refused_everywhere(problem):
    schedule, den, x = problem
    with pytest.raises(ValueError, match=r"'er_sde' \(ComfyUI\) is not registered in diffsampler: ER-SDE"):
        ds.sample(den, x.clone(), solver="er_sde", nfe=8, seeds=range(6))
    with pytest.raises(ValueError, match=r"'LCM' \(A1111\) is not registered in diffsampler"):
        DiffSamplerScheduler.from_config(DDPMScheduler(**SD_CFG).config, solver="LCM")
    from diffsampler.tools.run_checks import ConfigError, validate

    with pytest.raises(ConfigError, match=r"'sa_solver_pece' \(ComfyUI\) is not registered in diffsampler: "
                                          r"SA-Solver in PECE mode"):
        validate(_composed("solver=sa_solver_pece", "nfe=6"))


def test_comfyui_ddim_is_euler(problem):
    """ComfyUI's "ddim" sampler runs its euler sampler: DDIM (eta = 0) equals Euler in sigma / alpha."""
    schedule, den, x = problem
    for spacing in ("karras", "time_uniform"):
        got = ds.sample(den, x.clone(), solver="ddim", nfe=10, spacing=spacing)
        want = ds.sample(den, x.clone(), solver="euler", nfe=10, spacing=spacing)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def _comfy_ddpm(model, x, sigmas, noises):
    """ComfyUI's sample_ddpm (comfy/k_diffusion/sampling.py, generic_step_sampler + DDPMSampler_step), written
    from its formula: on v = x / sqrt(1 + sigma^2), acp = 1 / (1 + sigma^2), the DDPM posterior mean
    (epsilon form) plus sqrt((1 - a)(1 - acp') / (1 - acp)) z, a = acp / acp'; back to x-scaling after."""
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        eps = (x - model(x, torch.tensor([s], dtype=torch.float64))) / s
        acp, acp1 = 1.0 / (s * s + 1.0), 1.0 / (s1 * s1 + 1.0)
        a = acp / acp1
        v = x / (1.0 + s * s) ** 0.5
        mu = (1.0 / a) ** 0.5 * (v - (1.0 - a) * eps / (1.0 - acp) ** 0.5)
        if s1 > 0:
            mu = mu + ((1.0 - a) * (1.0 - acp1) / (1.0 - acp)) ** 0.5 * noises[i]
            mu = mu * (1.0 + s1 * s1) ** 0.5
        x = mu
    return x


def test_comfyui_ddpm_is_registered_ddpm(problem):
    """ComfyUI's ddpm on karras sigmas equals the registered ddpm (fixed_small) on the same grid and noise."""
    schedule, den, x = problem
    from kdiffusion_ref import kdiff_model

    grid = time_grid(schedule, 10, "karras")
    sig = (grid.sigma / grid.alpha).double()
    sig[-1] = 0.0
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
              for i in range(10)]
    model = kdiff_model(den.model.gmm, schedule)
    want = _comfy_ddpm(model, x / float(schedule.alpha(schedule.t_max)), [float(v) for v in sig], noises)
    plan = make_plan("ddpm", schedule, grid=grid)
    assert plan.n_draws == 9
    it = iter(noises)
    got = ds.samplers.run_plan(plan, den, x.clone(), noise_fn=lambda _: next(it))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_list_prints_refusals_notes_and_registered_name_notes():
    from diffsampler.cli import list_main
    from diffsampler.samplers.aliases import REGISTERED_NAMES_NOTES

    out = io.StringIO()
    list_main(out, sections=("aliases",))
    text = " ".join(out.getvalue().split())
    assert "'er_sde' -> not registered: ER-SDE-Solver" in text and "[refused: solver not registered]" in text
    assert "'uni_pc' -> unipc, solver_type='bh1', order=3; note: ComfyUI replaces a final sigma = 0 by 0.001" in text
    assert set(REGISTERED_NAMES_NOTES) <= set(available())
    for name, note in REGISTERED_NAMES_NOTES.items():
        assert f"{name!r} {' '.join(note.split())}" in text, name
    assert "'sa_solver' NOT ComfyUI's defaults" in text
