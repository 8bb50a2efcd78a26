"""The grids users pick by name (diffsampler/grids.py) equal their reference implementations:
k-diffusion's get_sigmas_karras / _exponential / _polyexponential, diffusers' use_beta_sigmas
(`_convert_to_beta`) and `AysSchedules`, ComfyUI's simple / normal / sgm_uniform / ddim_uniform
schedulers (comfy/samplers.py, transcribed below over ComfyUI's ModelSamplingDiscrete table) and the
AYS authors' log-linear interpolation.  final="zero": the reference's list for `steps` points, then
0; final="last": its list for steps + 1 points."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers import AysSchedules

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.schedules import EDM, SPACINGS, DiscreteVP, LinearVP, time_grid

SD_CFG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _sd() -> DiscreteVP:
    return DiscreteVP.from_diffusers_config(DDPMScheduler(**SD_CFG).config)


SCHEDULES = {"linear": DiscreteVP.linear, "sd": _sd, "edm": lambda: EDM(0.002, 80.0)}


def _kdiffusion_sampling():
    from kdiffusion_ref import sampling  # k-diffusion's sampling.py, loaded on its own

    return sampling


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _levels(g) -> np.ndarray:
    """The grid's noise levels sigma / alpha (k-diffusion's sigma), trailing 0 included."""
    return (g.sigma / g.alpha).numpy()


def _ends(sch):
    return float(sch.rho(sch.t_min)), float(sch.rho(sch.t_max))


KDIFF = [("karras", "get_sigmas_karras", {}), ("karras", "get_sigmas_karras", {"rho": 5.0}),
         ("exponential", "get_sigmas_exponential", {}), ("polyexponential", "get_sigmas_polyexponential", {}),
         ("polyexponential", "get_sigmas_polyexponential", {"rho": 2.0})]


@pytest.mark.parametrize("spacing, fn, kw", KDIFF)
@pytest.mark.parametrize("sch", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_kdiffusion_sigma_grids(spacing, fn, kw, sch, steps):
    kd = _kdiffusion_sampling()
    schedule = SCHEDULES[sch]()
    s_min, s_max = _ends(schedule)
    with _default_dtype(torch.float64):  # k-diffusion's ramp in float64: the formula, not its float32 round-off
        want = getattr(kd, fn)(steps, s_min, s_max, **kw).numpy()
        want_last = getattr(kd, fn)(steps + 1, s_min, s_max, **kw).numpy()[:-1]
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, spacing, final="zero", **kw)), want,
                               rtol=1e-10, atol=0)
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, spacing, final="last", **kw)), want_last,
                               rtol=1e-10, atol=0)
    # and what k-diffusion computes by default (float32 ramp), to its precision
    want32 = getattr(kd, fn)(steps, s_min, s_max, **kw).numpy()
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, spacing, final="zero", **kw)), want32, rtol=1e-5)


def test_karras_ends_at_sigma_min_then_zero():
    # DPM++ 2M Karras: n calls at n Karras levels, the last at sigma_min, then the step to 0
    schedule = _sd()
    g = time_grid(schedule, 10, "karras")
    assert g.steps == 10 and float(g.t[-2]) == schedule.t_min and float(g.sigma[-1]) == 0
    assert float(g.t[0]) == schedule.t_max


@pytest.mark.parametrize("sch", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_beta_is_diffusers_use_beta_sigmas(sch, steps):
    schedule = SCHEDULES[sch]()
    s_min, s_max = _ends(schedule)
    ref = EulerDiscreteScheduler(**SD_CFG)
    ends = torch.tensor([s_max, s_min], dtype=torch.float64)
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, "beta"))[:-1], ref._convert_to_beta(ends, steps),
                               rtol=1e-10)
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, "beta", final="last")),
                               ref._convert_to_beta(ends, steps + 1), rtol=1e-10)
    got = _levels(time_grid(schedule, steps, "beta", alpha=0.5, beta=0.7))[:-1]
    np.testing.assert_allclose(got, ref._convert_to_beta(ends, steps, alpha=0.5, beta=0.7), rtol=1e-10)


# --- ComfyUI (comfy/samplers.py, comfyanonymous/ComfyUI), over its ModelSamplingDiscrete ----------

class _ComfyDiscrete:
    """ComfyUI's ModelSamplingDiscrete: sigma table sqrt((1 - acp) / acp), `timestep(sigma)` the
    nearest table index, `sigma(t)` log-sigma interpolated between table entries."""

    def __init__(self, acp: torch.Tensor, dtype):
        self.sigmas = (((1 - acp) / acp) ** 0.5).to(dtype)
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, t):
        t = torch.clamp(torch.as_tensor(t).to(self.log_sigmas.dtype), 0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


def _comfy_simple(s, steps):
    ss = len(s.sigmas) / steps
    return [float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def _comfy_ddim_uniform(s, steps):
    ss, x, sigs = max(len(s.sigmas) // steps, 1), 1, []
    while x < len(s.sigmas):
        sigs.append(float(s.sigmas[x]))
        x += ss
    return sigs[::-1] + [0.0]


def _comfy_normal(s, steps, sgm=False):
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    dtype = s.sigmas.dtype
    ts = (torch.linspace(start, end, steps + 1, dtype=dtype)[:-1] if sgm
          else torch.linspace(start, end, steps, dtype=dtype))
    return [float(s.sigma(t)) for t in ts] + [0.0]


COMFY = {"simple": _comfy_simple, "ddim_uniform": _comfy_ddim_uniform, "normal": _comfy_normal,
         "sgm_uniform": lambda s, n: _comfy_normal(s, n, sgm=True)}


@pytest.mark.parametrize("spacing", list(COMFY))
@pytest.mark.parametrize("sch", ["linear", "sd"])
@pytest.mark.parametrize("steps", [1, 4, 8, 10, 20, 25])
def test_comfyui_schedulers(spacing, sch, steps):
    schedule = SCHEDULES[sch]()
    ref = COMFY[spacing]
    exact, as_comfy = _ComfyDiscrete(schedule.alphas_cumprod, torch.float64), \
        _ComfyDiscrete(schedule.alphas_cumprod, torch.float32)
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, spacing)), ref(exact, steps), rtol=1e-10)
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, spacing)), ref(as_comfy, steps), rtol=5e-6)
    if spacing == "ddim_uniform" and len(ref(exact, steps + 1)) != steps + 2:  # ComfyUI lays another count
        with pytest.raises(ValueError, match=f"lays {len(ref(exact, steps + 1)) - 1} points, not {steps + 1}"):
            time_grid(schedule, steps, spacing, final="last")
        return
    np.testing.assert_allclose(_levels(time_grid(schedule, steps, spacing, final="last")),
                               ref(exact, steps + 1)[:-1], rtol=1e-10)


def test_sgm_uniform_is_time_uniform_and_normal_is_time_uniform_last():
    schedule = _sd()
    np.testing.assert_allclose(time_grid(schedule, 7, "sgm_uniform").t, time_grid(schedule, 7, "time_uniform").t,
                               rtol=1e-12)
    np.testing.assert_allclose(time_grid(schedule, 7, "normal", final="last").t,
                               time_grid(schedule, 7, "time_uniform", final="last").t, rtol=1e-12)


def test_ddim_uniform_refuses_counts_comfyui_cannot_lay():
    # ComfyUI's ddim_uniform lays 8 points when asked for 7 on 1000 training steps (c = 142): refused
    with pytest.raises(ValueError, match=r"'ddim_uniform' lays 8 points, not 7.*near 7: \[.*8"):
        time_grid(_sd(), 7, "ddim_uniform")


# --- Align Your Steps --------------------------------------------------------------------------

def _authors_loglinear_interp(t_steps, num_steps):
    """The AYS authors' interpolation (AlignYourSteps/howto), as ComfyUI's AlignYourStepsScheduler uses it."""
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num_steps), xs, ys))[::-1].copy()


AYS = {"ays_sd15": ("StableDiffusionSigmas", 0.029), "ays_sdxl": ("StableDiffusionXLSigmas", 0.029),
       "ays_svd": ("StableDiffusionVideoSigmas", 0.002)}


def _ays_schedule(name):
    return EDM(0.002, 700.0) if name == "ays_svd" else _sd()


@pytest.mark.parametrize("name", list(AYS))
def test_ays_10_steps_are_diffusers_ays_schedules(name):
    key, _ = AYS[name]
    schedule = _ays_schedule(name)
    got, want = _levels(time_grid(schedule, 10, name)), np.array(AysSchedules[key])
    assert len(got) == len(want) == 11 and got[-1] == want[-1] == 0.0
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-10)
    # the first point is the schedule's own sigma_max, which the published value rounds (14.615 vs 14.6146)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    assert float(time_grid(schedule, 10, name).t[0]) == schedule.t_max


@pytest.mark.parametrize("name", list(AYS))
@pytest.mark.parametrize("steps", [4, 7, 15, 25])
def test_ays_other_steps_are_the_authors_loglinear_interpolation(name, steps):
    key, sigma_min = AYS[name]
    schedule = _ays_schedule(name)
    published = AysSchedules[key][:-1] + [sigma_min]  # the authors' lists end at sigma_min, not 0
    want = _authors_loglinear_interp(published, steps + 1)
    want_zero = np.append(want[:-1], 0.0)  # ComfyUI / diffusers: the last point replaced by 0
    got = _levels(time_grid(schedule, steps, name))
    np.testing.assert_allclose(got[1:], want_zero[1:], rtol=1e-10)
    got_last = _levels(time_grid(schedule, steps, name, final="last"))
    np.testing.assert_allclose(got_last[1:-1], want[1:-1], rtol=1e-10)
    np.testing.assert_allclose(got_last[-1], want[-1], rtol=1e-2)  # the schedule's sigma_min, rounded there


def test_ays_refuses_a_schedule_it_was_not_published_for():
    with pytest.raises(ValueError, match=r"'ays_sd15' is published for noise levels sigma = 14.615"):
        time_grid(DiscreteVP.linear(), 10, "ays_sd15")
    with pytest.raises(ValueError, match=r"'ays_svd'"):
        time_grid(EDM(0.002, 80.0), 10, "ays_svd")


# --- options and refusals ------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, kw, match", [
    ("simple", {"rho": 3.0}, r"spacing 'simple' takes no option\(s\) \['rho'\]"),
    ("exponential", {"rho": 3.0}, r"spacing 'exponential' takes no option\(s\) \['rho'\]"),
    ("logsnr", {"rho": 3.0}, r"spacing 'logsnr' takes no option\(s\) \['rho'\]"),
    ("karras", {"alpha": 0.5}, r"spacing 'karras' takes no option\(s\) \['alpha'\]"),
    ("karras", {"rho": -1.0}, r"rho must be a positive number"),
    ("ays_sd15", {"t_start": 500.0}, r"spacing 'ays_sd15' takes no option\(s\) \['t_start'\]"),
    ("diffusers_karras", {"t_start": 500.0}, r"takes no t_start"),
])
def test_options_a_grid_does_not_take_are_refused(spacing, kw, match):
    with pytest.raises(ValueError, match=match):
        time_grid(_sd(), 10, spacing, **kw)


def test_table_grids_need_a_discrete_schedule():
    with pytest.raises(ValueError, match=r"'simple' picks times of a discrete schedule's table.*LinearVP"):
        time_grid(LinearVP(), 10, "simple")
    g = time_grid(LinearVP(), 10, "normal", final="last")  # uniform in time on any schedule
    np.testing.assert_allclose(g.t, np.linspace(1.0, 1e-3, 11))


def test_karras_between_given_times():
    schedule = _sd()
    g = time_grid(schedule, 6, "karras", final="last", t_start=800.0, t_end=100.0)
    kd = _kdiffusion_sampling()
    with _default_dtype(torch.float64):
        want = kd.get_sigmas_karras(7, float(schedule.rho(100.0)), float(schedule.rho(800.0))).numpy()[:-1]
    np.testing.assert_allclose(_levels(g), want, rtol=1e-10)


# --- usable wherever a spacing is ------------------------------------------------------------------

NAMED = ("karras", "exponential", "polyexponential", "beta", "simple", "normal", "sgm_uniform", "ddim_uniform",
         "ays_sd15", "ays_sdxl")


def test_named_spacings_are_spacings():
    assert set(NAMED) | {"ays_svd"} <= set(SPACINGS)


@pytest.mark.parametrize("spacing", NAMED)
def test_sample_and_adapter_use_the_named_grid(spacing):
    schedule = _sd()
    gmm = GaussianMixture.random(4, 3, seed=0)
    den = gmm_denoiser(gmm, schedule, "epsilon")
    x = ds.samplers.initial_noise((6, 4), schedule, seeds=range(6), dtype=torch.float64)
    got = ds.sample(den, x.clone(), solver="dpmpp_2m", nfe=8, spacing=spacing)
    grid = time_grid(schedule, 8, spacing)
    want = ds.sample(den, x.clone(), solver="dpmpp_2m", grid=grid)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    sched = DiffSamplerScheduler.from_config(DDPMScheduler(**SD_CFG).config, solver="dpmpp_2m", spacing=spacing,
                                             final="zero")
    sched.set_timesteps(8)
    np.testing.assert_allclose(sched.sigmas.double().numpy(), _levels(grid).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("spacing", NAMED[:-2] + ("SGM Uniform",))
def test_hydra_accepts_named_spacings(spacing):
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.run_checks import validate

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        spec = validate(compose("config", overrides=["model=gmm", "solver=dpmpp_2m", f"spacing={spacing}"]))
    assert spec.sampling.spacing == spacing


def test_hydra_refuses_ays_on_another_schedule():
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.run_checks import ConfigError, validate

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        cfg = compose("config", overrides=["model=gmm", "spacing=ays_sd15"])
    with pytest.raises(ConfigError, match=r"spacing='ays_sd15' does not apply.*published for noise levels"):
        validate(cfg)


# --- AUTOMATIC1111's schedule-type labels ----------------------------------------------------------

@pytest.mark.parametrize("label, name", [("Karras", "karras"), ("Exponential", "exponential"),
                                         ("Polyexponential", "polyexponential"), ("SGM Uniform", "sgm_uniform"),
                                         ("Simple", "simple"), ("Normal", "normal"), ("Uniform", "normal"),
                                         ("DDIM", "ddim_uniform")])
def test_a1111_schedule_labels_are_the_grids(label, name):
    schedule = _sd()
    assert label in SPACINGS
    for final in ("zero", "last"):
        np.testing.assert_array_equal(time_grid(schedule, 8, label, final=final).t,
                                      time_grid(schedule, 8, name, final=final).t)
    sched = DiffSamplerScheduler.from_config(DDPMScheduler(**SD_CFG).config, solver="dpmpp_2m", spacing=label)
    assert sched.spacing == name


def test_a1111_uniform_is_kdiffusion_discrete_get_sigmas():
    # k-diffusion's DiscreteSchedule.get_sigmas(n): t = linspace(T - 1, 0, n), sigma by log-sigma interpolation
    schedule = _sd()
    s = _ComfyDiscrete(schedule.alphas_cumprod, torch.float64)
    t = torch.linspace(999, 0, 10, dtype=torch.float64)
    want = np.append(s.sigma(t).numpy(), 0.0)
    np.testing.assert_allclose(_levels(time_grid(schedule, 10, "Uniform")), want, rtol=1e-10)


def test_a1111_labels_with_sampler_names():
    from diffsampler.samplers.loop import make_plan

    schedule = _sd()
    a = make_plan("DPM++ 2M", schedule, 8, spacing="Karras")
    b = make_plan("DPM++ 2M Karras", schedule, 8, spacing="Karras")  # the same grid: accepted
    np.testing.assert_array_equal(a.grid.t, b.grid.t)
    with pytest.raises(ValueError, match=r"fixes spacing='karras'; spacing='Exponential' cannot apply"):
        make_plan("DPM++ 2M Karras", schedule, 8, spacing="Exponential")
