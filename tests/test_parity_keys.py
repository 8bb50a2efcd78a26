"""Parity by default, key by key: a config without `_class_name` is matched to its class by its keys
(`parity.source_class`), and every config key of every supported diffusers class either reproduces diffusers
or is refused / warned about by name."""

import warnings

import pytest
import torch
import diffusers

from diffsampler.eval.gmm import GMMModel
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.pipelines.parity import SUPPORTED_CLASSES, parity_arguments, solver_for_config, source_class
from diffusers_loop import run_diffusers


def x_T(n=16, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def max_diff(gmm, ref_sched, ours_sched, nfe, x=None):
    """max |ours - diffusers| in the standard loop, the same generator on both sides."""
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T() if x is None else x

    def gen():  # the same noise on both sides for stochastic methods
        return torch.Generator().manual_seed(7) if ours_sched.solver.stochastic else None

    ref = run_diffusers(ref_sched, model, nfe, x, generator=gen())
    ours = run_diffusers(ours_sched, model, nfe, x, generator=gen())
    return (ours - ref).abs().max().item()


# -- 1. configs without _class_name -----------------------------------------------------------------

_SHARED_KEYS = {"LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}


@pytest.mark.parametrize("name", sorted(SUPPORTED_CLASSES))
def test_full_config_without_class_name_is_its_class(name):
    cfg = dict(getattr(diffusers, name)().config)
    assert "_class_name" not in cfg
    if name in _SHARED_KEYS:  # the same keys: refused naming the three
        assert set(source_class(cfg)) == _SHARED_KEYS
        with pytest.raises(ValueError, match="KDPM2AncestralDiscreteScheduler.*_class_name"):
            DiffSamplerScheduler.from_config(cfg)
        return
    assert source_class(cfg) == name
    assert parity_arguments(cfg) == solver_for_config({**cfg, "_class_name": name})


#: (partial config, the class it fits alone, nfe)
PARTIAL = [
    ({"set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "trailing"}, "DDIMScheduler", 7),
    ({"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}, "PNDMScheduler", 6),
    ({"variance_type": "fixed_large", "clip_sample": False}, "DDPMScheduler", 6),
    ({"algorithm_type": "dpmsolver++", "solver_order": 3, "euler_at_final": False}, "DPMSolverMultistepScheduler", 8),
    ({"solver_type": "bh2", "predict_x0": True}, "UniPCMultistepScheduler", 8),
    ({"shift": 3.0, "use_dynamic_shifting": False, "invert_sigmas": False}, "FlowMatchEulerDiscreteScheduler", 6),
]


@pytest.mark.parametrize("cfg,name,nfe", PARTIAL, ids=[p[1] for p in PARTIAL])
def test_partial_config_is_the_one_class_it_fits(gmm16, cfg, name, nfe):
    assert source_class(cfg) == name
    ours = DiffSamplerScheduler.from_config(cfg)
    ref = getattr(diffusers, name)(**cfg)
    assert ours.config.solver == solver_for_config({**cfg, "_class_name": name})["solver"]
    assert max_diff(gmm16, ref, ours, nfe) <= 1e-4


def test_config_of_an_older_diffusers_is_its_class(gmm16):
    """A DPMSolverMultistep config saved before final_sigmas_type, euler_at_final, the sigma grids and the flow
    keys existed: a subset of that class's keys alone."""
    full = dict(diffusers.DPMSolverMultistepScheduler(solver_order=3).config)
    later = ("final_sigmas_type", "euler_at_final", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
             "rescale_betas_zero_snr", "use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type",
             "variance_type", "timestep_spacing", "steps_offset")
    old = {k: v for k, v in full.items() if k not in later}
    assert source_class(old) == "DPMSolverMultistepScheduler"
    ours = DiffSamplerScheduler.from_config(old)
    assert ours.config.solver == "dpmpp_3m"
    assert max_diff(gmm16, diffusers.DPMSolverMultistepScheduler.from_config(old), ours, 10) <= 1e-4


@pytest.mark.parametrize("cfg,names", [
    ({"solver_order": 3}, "DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler"),
    ({"use_karras_sigmas": True, "final_sigmas_type": "zero"},
     "DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler"),
    ({"clip_sample": True, "beta_schedule": "squaredcos_cap_v2"}, "DDIMScheduler, DDPMScheduler, HeunDiscreteScheduler"),
])
def test_config_fitting_several_classes_is_refused_naming_them(cfg, names):
    with pytest.raises(ValueError, match=f"fit several diffusers scheduler classes \\({names}\\): add _class_name"):
        DiffSamplerScheduler.from_config(cfg)
    # _class_name, or naming a solver, settles it
    assert DiffSamplerScheduler.from_config({**cfg, "_class_name": names.split(",")[0]}).config.solver is not None
    assert DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m").config.solver == "dpmpp_2m"


def test_config_fitting_an_unsupported_class_is_refused_naming_it():
    assert source_class({"original_inference_steps": 50, "timestep_scaling": 10.0}) == "LCMScheduler"
    with pytest.raises(ValueError, match="LCMScheduler cannot be reproduced"):
        DiffSamplerScheduler.from_config({"original_inference_steps": 50, "timestep_scaling": 10.0})


def test_config_of_schedule_keys_only_is_our_own():
    """Keys every class has (the betas, prediction_type, timestep_spacing, steps_offset) name no class: the
    config is DiffSamplerScheduler's own (its default solver), without a warning."""
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
           "timestep_spacing": "trailing", "steps_offset": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = DiffSamplerScheduler.from_config(cfg)
    assert s.config.solver == "dpmpp_2m" and s.prediction_kind == "v_prediction"
