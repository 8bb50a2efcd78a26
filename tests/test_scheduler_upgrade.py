"""Naming a solver upgrades the method and keeps the rest (issue 15, item 2): `from_config(cfg, solver=...)`
keeps the source scheduler's noise schedule, prediction type and grid choice (timestep_spacing,
use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas, FlowMatch's shift) unless
spacing= overrides it; checked on several source classes against the sigmas diffusers lays for that grid."""

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler)

from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.schedules import DiscreteVP

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SOURCES = [
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True, **SD), "diffusers_karras", "use_karras_sigmas"),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction"), "diffusers_karras",
     "use_karras_sigmas"),
    (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True, **SD), "diffusers_exponential",
     "use_exponential_sigmas"),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "diffusers_lu", "use_lu_lambdas"),
    (UniPCMultistepScheduler, dict(use_beta_sigmas=True, prediction_type="sample"), "diffusers_beta", "use_beta_sigmas"),
    (LMSDiscreteScheduler, dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"), "diffusers_karras",
     "use_karras_sigmas"),
    (DDIMScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction", **SD), "trailing", None),
]


@pytest.mark.parametrize("solver", ["ghvb", "dpmpp_3m"])
@pytest.mark.parametrize("cls,kw,spacing,key", SOURCES, ids=[f"{c.__name__}-{s}" for c, _, s, _ in SOURCES])
def test_named_solver_keeps_schedule_prediction_and_grid(cls, kw, spacing, key, solver):
    src = cls(**kw)
    sched = DiffSamplerScheduler.from_config(src.config, solver=solver)
    assert sched.config.solver == solver and sched.spacing == spacing
    assert sched.prediction_kind == src.config.prediction_type
    want = DiscreteVP.from_diffusers_config(dict(src.config))
    assert torch.equal(sched.schedule.alphas_cumprod, want.alphas_cumprod)
    assert torch.allclose(sched.alphas_cumprod, src.alphas_cumprod)
    n = 8
    sched.set_timesteps(n)
    if key is not None:  # the grid's sigmas are diffusers' for that key (DPMSolverMultistep lays the same ones)
        ref = DPMSolverMultistepScheduler.from_config(src.config, **{key: True})
        ref.set_timesteps(n)
        assert torch.allclose(sched.sigmas.double(), ref.sigmas.double(), rtol=1e-6)
    else:
        ref = cls.from_config(src.config)
        ref.set_timesteps(n)
        assert torch.equal(sched.timesteps, ref.timesteps)


def test_spacing_overrides_the_source_grid():
    cfg = DPMSolverMultistepScheduler(use_karras_sigmas=True).config
    assert DiffSamplerScheduler.from_config(cfg, solver="ghvb", spacing="logsnr").spacing == "logsnr"
    assert DiffSamplerScheduler(solver="ghvb", use_karras_sigmas=True).spacing == "diffusers_karras"


def test_named_solver_keeps_flowmatch_shift_and_grid():
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True).config
    sched = DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m")
    assert sched.spacing == "flowmatch" and sched.prediction_kind == "flow"
    sched.set_timesteps(6)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(6)
    assert torch.allclose(sched.sigmas[1:], ref.sigmas[1:], atol=1e-7)


def test_sigma_grid_keys_on_other_flow_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="use_karras_sigmas=True cannot be honoured"):
        DiffSamplerScheduler(solver="dpmpp_2m", schedule_type="flow", use_karras_sigmas=True)
