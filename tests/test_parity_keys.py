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
    ({"algorithm_type": "dpmsolver++", "solver_order": 3, "euler_at_final": False, "beta_schedule": "linear"},
     "DPMSolverMultistepScheduler", 8),  # (without a schedule key it fits EDMDPMSolverMultistep too)
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
    keys existed: a subset of that class's keys alone (its timestep_spacing tells it from DPMSolverSinglestep's;
    without it the keys fit both classes, refused naming them)."""
    full = dict(diffusers.DPMSolverMultistepScheduler(solver_order=3).config)
    later = ("final_sigmas_type", "euler_at_final", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
             "rescale_betas_zero_snr", "use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type",
             "variance_type", "steps_offset")
    old = {k: v for k, v in full.items() if k not in later}
    oldest = {k: v for k, v in old.items() if k != "timestep_spacing"}
    assert source_class(oldest) == ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"]
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler.*_class_name"):
        DiffSamplerScheduler.from_config(oldest)
    assert source_class(old) == "DPMSolverMultistepScheduler"
    ours = DiffSamplerScheduler.from_config(old)
    assert ours.config.solver == "dpmpp_3m"
    assert max_diff(gmm16, diffusers.DPMSolverMultistepScheduler.from_config(old), ours, 10) <= 1e-4


@pytest.mark.parametrize("cfg,names", [
    ({"solver_order": 3}, "DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, "
                          "EDMDPMSolverMultistepScheduler, UniPCMultistepScheduler"),
    ({"use_karras_sigmas": True, "final_sigmas_type": "zero"},
     "DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler"),
    ({"clip_sample": True, "beta_schedule": "squaredcos_cap_v2"}, "DDIMScheduler, DDPMScheduler, HeunDiscreteScheduler"),
])
def test_config_fitting_several_classes_is_refused_naming_them(cfg, names):
    with pytest.raises(ValueError, match="fit several diffusers scheduler classes .*: add _class_name") as e:
        DiffSamplerScheduler.from_config(cfg)
    assert all(n in str(e.value) for n in names.split(", ")), str(e.value)  # (and classes supported later)
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


# -- 2. every config key of every supported class: reproduced, or refused / warned about by name ---------

import inspect  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402

#: non-default values tried for each diffusers config key (every value that is not the class's default)
ALTERNATIVES = {
    "num_train_timesteps": [500],
    "beta_start": [0.0005],
    "beta_end": [0.015],
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "trained_betas": [np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2],
    "clip_sample": [True, False],
    "set_alpha_to_one": [True, False],
    "steps_offset": [1],
    "prediction_type": ["epsilon", "v_prediction", "sample"],
    "thresholding": [True],
    "dynamic_thresholding_ratio": [0.9],
    "clip_sample_range": [0.5],
    "sample_max_value": [1.5],
    "timestep_spacing": ["linspace", "leading", "trailing"],
    "rescale_betas_zero_snr": [True],
    "variance_type": ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
    "skip_prk_steps": [True],
    "solver_order": [1, 2, 3],
    "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis", "data_prediction",
                       "noise_prediction"],
    "solver_type": ["midpoint", "heun", "logrho", "bh1", "bh2"],
    "lower_order_final": [False],
    "euler_at_final": [True],
    "use_karras_sigmas": [True],
    "use_exponential_sigmas": [True],
    "use_beta_sigmas": [True],
    "use_lu_lambdas": [True],
    "use_flow_sigmas": [True],
    "flow_shift": [3.0],
    "final_sigmas_type": ["zero", "sigma_min"],
    "lambda_min_clipped": [-5.1],
    "use_dynamic_shifting": [True],
    "time_shift_type": ["exponential", "linear"],
    "interpolation_type": ["log_linear"],
    "sigma_min": [0.1],
    "sigma_max": [10.0],
    "timestep_type": ["continuous"],
    "predict_x0": [False],
    "disable_corrector": [[0], [1, 2]],
    "solver_p": ["DDIMScheduler"],  # an instance, built in the test
    "shift": [3.0],
    "base_shift": [0.3],
    "max_shift": [1.5],
    "base_image_seq_len": [128],
    "max_image_seq_len": [2048],
    "invert_sigmas": [True],
    "shift_terminal": [0.1],
    "stochastic_sampling": [True],
    "noise_sampler_seed": [3],
    "predictor_order": [1, 3, 4],
    "corrector_order": [1, 3, 4],
    "tau_func": ["zero", "half"],  # functions, built in audit_one
    "sigma_data": [1.0],
    "sigma_schedule": ["exponential"],
    "rho": [5.0],
}
#: tau_func values (SASolverScheduler: the stochasticity tau at each timestep)
TAU_FUNCS = {"zero": lambda t: 0.0, "half": lambda t: 0.5}

#: the keys that act only together with another one: tried with it too
CONTEXT = {
    "dynamic_thresholding_ratio": {"thresholding": True},
    "sample_max_value": {"thresholding": True},
    "clip_sample_range": {"clip_sample": True},
    "sigma_min": {"use_karras_sigmas": True},
    "sigma_max": {"use_karras_sigmas": True},
    "time_shift_type": {"use_dynamic_shifting": True},
    "flow_shift": {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    "use_flow_sigmas": {"prediction_type": "flow_prediction"},
    "timestep_type": {"prediction_type": "v_prediction"},
    "rescale_betas_zero_snr": {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                               "timestep_spacing": "trailing"},
    "lambda_min_clipped": {"beta_schedule": "squaredcos_cap_v2"},
    "solver_type": {"solver_order": 3},
    # squaredcos_cap_v2's last timestep has sigma / alpha = 2e4: from there float32 round-off is ~1e-3 (below);
    # leading spacing starts below it, where the method itself is compared
    "beta_schedule": {"timestep_spacing": "leading"},
    # UniPC's noise-prediction step onto sigma = 0 is NaN in diffusers (e^h = inf times sigma = 0)
    "predict_x0": {"final_sigmas_type": "sigma_min"},
}

#: options every audited configuration of a class has: DPMSolverSDE's noise is seeded by its config, not a generator
BASE = {"DPMSolverSDEScheduler": {"noise_sampler_seed": 11}}

#: (key, value) whose configurations start from sigma / alpha >= 4096, where diffusers' and our float32 samples
#: differ by float32 round-off (ours in float32 vs float64 moves by a fifth of the gap or more): audit_one's
#: "float32 round-off"; the same keys are compared to 1e-4 in a well-conditioned context (CONTEXT)
ROUNDOFF = {("beta_schedule", "squaredcos_cap_v2"), ("rescale_betas_zero_snr", True)}


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty}


def _same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    return type(a) is type(b) and a == b


def audit_cases(classes=None):
    """(class name, config options) for every key of every class in SUPPORTED_CLASSES set to each value of
    ALTERNATIVES that is not its default, alone and (where CONTEXT has one) with the key it acts with."""
    out = []
    for name in sorted(classes or SUPPORTED_CLASSES):
        d = _defaults(getattr(diffusers, name))
        for key, default in d.items():
            assert key in ALTERNATIVES, f"{name}.{key}: no alternative value to audit (add it to ALTERNATIVES)"
            for v in ALTERNATIVES[key]:
                if _same(v, default):
                    continue
                ctx = {k: c for k, c in CONTEXT.get(key, {}).items() if k in d}
                for c in ([{}, ctx] if ctx else [{}]):
                    out.append((name, {**BASE.get(name, {}), **c, key: v}))
    return out


def audit_one(gmm, name, opts, nfe=6):
    """("diffusers raises" | "refused" | "warned" | "reproduced", detail) for the diffusers class `name` built
    with `opts`: our from_config of its config must reproduce it (max abs difference within 1e-4 relative to the
    sample's scale), or raise / warn naming the key."""
    cls = getattr(diffusers, name)
    kw = dict(opts)
    if kw.get("solver_p") == "DDIMScheduler":
        kw["solver_p"] = diffusers.DDIMScheduler()
    if isinstance(kw.get("tau_func"), str):
        kw["tau_func"] = TAU_FUNCS[kw["tau_func"]]
    try:
        ref = cls(**kw)
    except Exception as e:  # diffusers' own class refuses it
        return "diffusers raises", f"{type(e).__name__}: {e}"
    keys = [k for k in opts if not _same(opts[k], _defaults(cls).get(k, object()))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ours = DiffSamplerScheduler.from_config({**ref.config, "_class_name": name})
        except (ValueError, NotImplementedError) as e:
            msg = str(e)
            return ("refused" if any(re.search(rf"\b{k}\b", msg) for k in keys) else "refused, key not named"), msg
    named = [str(w.message) for w in caught if any(re.search(rf"\b{k}\b", str(w.message)) for k in keys)]
    set_kw = {"mu": 0.7} if kw.get("use_dynamic_shifting") else {}
    model = GMMModel(gmm, ours.schedule, ours.prediction_kind)
    if name.startswith("EDM"):  # the mixture behind EDM's preconditioning (c_in, c_noise, c_skip, c_out)
        from diffsampler.eval.gmm import EDMGMMModel

        model = EDMGMMModel(gmm, ref.config.sigma_data, ref.config.prediction_type)

    x = x_T(16).reshape(16, 1, 4, 4)

    def gen():
        return torch.Generator().manual_seed(7)

    # the same generator on both sides for stochastic methods, where the class's step takes one (DPMSolverSDE draws
    # from its noise_sampler_seed: BASE)
    stochastic = ours.solver.stochastic and "generator" in inspect.signature(ref.step).parameters
    try:
        a = run_diffusers(ref, model, nfe, x, generator=gen() if stochastic else None, **set_kw)
    except Exception as e:
        return "diffusers raises", f"in its loop: {type(e).__name__}: {e}"
    try:
        b = run_diffusers(ours, model, nfe, x, generator=gen() if stochastic else None, **set_kw)
    except (ValueError, NotImplementedError) as e:
        msg = str(e)
        return ("refused" if any(re.search(rf"\b{k}\b", msg) for k in keys) else "OURS RAISES"), msg
    if not bool(torch.isfinite(a).all()):
        return ("warned" if named else "diffusers NaN"), "; ".join(named) or "diffusers' own samples are not finite"
    scale = max(1.0, a.abs().max().item())
    err = (a - b).abs().max().item() / scale
    if err <= 1e-4:
        return "reproduced", f"{err:.1e}"
    if named:
        return "warned", f"{err:.1e} " + "; ".join(named)
    # the same method, computed in float64: where float32 round-off moves ours by a fifth of the gap or more,
    # the gap is round-off (a first step from sigma / alpha = 2e4 or 4096), not a different method
    ours64 = DiffSamplerScheduler.from_config({**ref.config, "_class_name": name})
    draw = ours64._noise_fn
    ours64._noise_fn = lambda z: draw(z.float()).to(z.dtype)  # the float32 run's noise, in float64
    b64 = run_diffusers(ours64, model, nfe, x.double(), generator=gen() if stochastic else None, **set_kw)
    roundoff = (b.double() - b64).abs().max().item() / scale
    if err <= 5 * roundoff:
        return "float32 round-off", f"{err:.1e} apart; ours float32 vs float64 {roundoff:.1e}"
    return "SILENTLY DIFFERENT", f"{err:.1e} (ours float32 vs float64 {roundoff:.1e})"


@pytest.mark.parametrize("name", sorted(SUPPORTED_CLASSES))
def test_every_config_key_is_reproduced_or_refused_by_name(gmm16, name):
    """Each __init__ key of the class (inspect) at each non-default value of ALTERNATIVES: from_config of that
    diffusers scheduler reproduces it in the standard loop (1e-4 relative to the sample's scale, 5 steps, the same
    generator), or raises / warns naming the key.  Configurations diffusers' own class refuses, or samples to
    NaN, are not ours to reproduce."""
    failures = []
    for cls_name, opts in audit_cases([name]):
        status, detail = audit_one(gmm16, cls_name, opts, nfe=5)
        if status in ("reproduced", "refused", "warned", "diffusers raises", "diffusers NaN"):
            continue
        if status == "float32 round-off" and any(opts.get(k, object()) == v for k, v in ROUNDOFF):
            continue
        failures.append(f"{opts}: {status}: {detail[:200]}")
    assert not failures, "\n".join(failures)


def test_audit_can_fail(gmm16, monkeypatch):
    """A key the mapping ignores is caught: lambda_min_clipped dropped from the config the adapter sees."""
    real = DiffSamplerScheduler.from_config.__func__

    def dropping(cls, config=None, **kw):
        return real(cls, {k: v for k, v in dict(config).items() if k != "lambda_min_clipped"}, **kw)

    monkeypatch.setattr(DiffSamplerScheduler, "from_config", classmethod(dropping))
    status, _ = audit_one(gmm16, "DPMSolverMultistepScheduler", {"lambda_min_clipped": -3.0}, nfe=5)
    assert status == "SILENTLY DIFFERENT"
