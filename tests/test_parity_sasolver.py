"""SA-Solver parity by default: `DiffSamplerScheduler.from_config(SASolverScheduler config)` is sa_solver
on the class's grid with its options, and reproduces diffusers' samples in the standard loop with the
same generator (one draw per step), on the exact mixture."""

import inspect

import pytest
import torch
from diffusers import SASolverScheduler

from diffsampler.eval.gmm import GMMModel
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.pipelines.parity import solver_for_config
from diffusers_loop import run_diffusers
from test_parity import x_T


def _gen():
    return torch.Generator().manual_seed(0)


def _run(gmm, kw, nfe, float64_ref=False):
    """(our scheduler, max |ours - diffusers|, max |diffusers|) in the standard loop, same generator.
    float64_ref: diffusers' coefficients computed from its sigmas in float64 (see below)."""
    ref_sched = SASolverScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T(32)
    if kw.get("thresholding"):
        x = x.reshape(32, 1, 4, 4)
    if float64_ref:
        ref_sched.set_timesteps(nfe)
        ref_sched.sigmas = ref_sched.sigmas.double()
        xr, g = x, _gen()  # float32 samples and noise; the coefficients (0-d tensors) in float64
        for t in ref_sched.timesteps:
            xr = ref_sched.step(model(xr, t).sample, t, xr, generator=g).prev_sample
        ref = xr
    else:
        ref = run_diffusers(ref_sched, model, nfe, x, generator=_gen())
    ours = run_diffusers(ours_sched, model, nfe, x, generator=_gen())
    return ours_sched, (ours - ref).abs().max().item(), ref.abs().max().item()


CONSTANT = lambda t: 0.5  # noqa: E731
INTERVAL = lambda t: 0.7 if 100 <= t <= 500 else 0  # noqa: E731
ODE = lambda t: 0  # noqa: E731

#: data_prediction (diffusers' default algorithm_type) in the standard loop
DATA = [
    dict(),  # predictor 2, corrector 2, tau 1 on timesteps 200..800
    dict(predictor_order=1, corrector_order=1),
    dict(predictor_order=3, corrector_order=3),
    dict(predictor_order=4, corrector_order=4),
    dict(predictor_order=2, corrector_order=4),
    dict(predictor_order=4, corrector_order=1, tau_func=CONSTANT),
    dict(tau_func=CONSTANT),
    dict(tau_func=ODE, predictor_order=3, corrector_order=3),
    dict(use_karras_sigmas=True),
    dict(use_karras_sigmas=True, predictor_order=3, corrector_order=3),
    dict(use_exponential_sigmas=True, tau_func=INTERVAL),
    dict(use_beta_sigmas=True, predictor_order=3, corrector_order=4),
    dict(lower_order_final=False, predictor_order=3, corrector_order=3),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(prediction_type="sample", predictor_order=3),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True),
    dict(thresholding=True, sample_max_value=1.5),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing"),  # clipped grid
]


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("kw", DATA, ids=[str({k: v for k, v in c.items() if k != "tau_func"}) +
                                          ("tau_func" if "tau_func" in c else "") for c in DATA])
def test_data_prediction_reproduced(gmm16, kw, nfe):
    """Measured max abs differences: <= 4e-5 at NFE 10 / 25 on the linspace / leading / trailing grids;
    the use_*_sigmas grids at NFE 5 (samples up to 20 in size, both) 1e-4 - 5e-4."""
    sched, err, scale = _run(gmm16, kw, nfe)
    assert sched.config.solver == "sa_solver"
    assert err <= 1e-4 * max(1.0, scale), (err, scale)


#: noise_prediction: diffusers integrates e^{-lambda} times the Lagrange polynomial in absolute lambda with
#: float32 arithmetic, whose rounding moves its own samples by up to 5e-3 (measured: default, 5 steps; 7e-4 order 1 corrector 4,
#: 25 steps); with its sigmas in float64 (the same formulas, no other change) it agrees with sa_solver.
NOISE = [
    dict(algorithm_type="noise_prediction"),
    dict(algorithm_type="noise_prediction", predictor_order=3, corrector_order=3, tau_func=ODE),
    dict(algorithm_type="noise_prediction", predictor_order=1, corrector_order=4, tau_func=ODE),
    dict(algorithm_type="noise_prediction", predictor_order=4, corrector_order=2, use_karras_sigmas=True),
    dict(algorithm_type="noise_prediction", tau_func=CONSTANT, prediction_type="v_prediction"),
]


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("kw", NOISE, ids=[str({k: v for k, v in c.items() if k != "tau_func"}) +
                                           ("tau_func" if "tau_func" in c else "") for c in NOISE])
def test_noise_prediction_reproduced(gmm16, kw, nfe):
    sched, err, scale = _run(gmm16, kw, nfe, float64_ref=True)
    assert sched.config.solver_options["prediction"] == "noise"
    assert err <= 1e-4 * max(1.0, scale), (err, scale)


def test_noise_prediction_difference_is_diffusers_float32_rounding(gmm16):
    """In the standard loop (float32 coefficients) the difference is diffusers' own rounding: no larger
    than the distance between diffusers' float32 and float64-sigma runs, up to our 1e-5."""
    kw = dict(algorithm_type="noise_prediction", predictor_order=1, corrector_order=4, tau_func=ODE)
    _, err32, _ = _run(gmm16, kw, 25)
    _, err64, _ = _run(gmm16, kw, 25, float64_ref=True)
    ref = SASolverScheduler(**kw)
    model = GMMModel(gmm16, DiffSamplerScheduler.from_config(ref.config).schedule, "epsilon")
    a = run_diffusers(ref, model, 25, x_T(32), generator=_gen())
    ref.set_timesteps(25)
    ref.sigmas = ref.sigmas.double()
    b, g = x_T(32), _gen()
    for t in ref.timesteps:
        b = ref.step(model(b, t).sample, t, b, generator=g).prev_sample
    own = (a - b).abs().max().item()
    assert err64 <= 1e-5 and own > 1e-4 and abs(err32 - own) <= 1e-5 + 1e-3 * own, (err32, err64, own)


def test_mapping_of_options():
    base = SASolverScheduler().config
    m = solver_for_config(dict(base))
    assert m["solver"] == "sa_solver" and m["spacing"] == "linspace" and m["final"] == "last"
    o = m["solver_options"]
    assert (o["predictor_order"], o["corrector_order"], o["prediction"], o["tau"]) == (2, 2, "data", 1.0)
    lo, hi = o["tau_interval"]  # timesteps 200..800 as noise levels: rho(199.5) .. rho(800.5)
    sched = DiffSamplerScheduler.from_config(base).schedule
    rho = lambda t: float(sched.rho(torch.tensor(float(t), dtype=torch.float64)))  # noqa: E731
    assert rho(199) < lo < rho(200) and rho(800) < hi < rho(801)
    m = solver_for_config({**base, "tau_func": CONSTANT, "use_karras_sigmas": True})
    assert m["spacing"] == "diffusers_karras" and m["solver_options"]["tau"] == 0.5
    assert "tau_interval" not in m["solver_options"] and m["solver_options"]["final_corrector"] is True
    lo, hi = solver_for_config({**base, "tau_func": lambda t: 1 if t <= 300 else 0})["solver_options"]["tau_interval"]
    assert lo == 0.0 and hi == pytest.approx(rho(300.5))
    lo, hi = solver_for_config({**base, "tau_func": INTERVAL, "use_beta_sigmas": True})["solver_options"]["tau_interval"]
    assert (lo, hi) == (pytest.approx(rho(100)), pytest.approx(rho(501)))  # beta grids truncate the timestep


@pytest.mark.parametrize("kw,message", [
    (dict(tau_func=lambda t: t / 1000), "tau_func cannot be reproduced"),
    (dict(tau_func=lambda t: 1 if t < 100 or t > 900 else 0), "tau_func cannot be reproduced"),
    (dict(tau_func=lambda t: -1.0), "tau_func gives -1.0"),
    (dict(tau_func=lambda t: t.shape), "tau_func could not be read"),
    (dict(algorithm_type="noise_prediction", thresholding=True), "thresholding=True with algorithm_type"),
    (dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (dict(prediction_type="flow_prediction"), "prediction_type='flow_prediction'"),
    (dict(variance_type="learned_range"), "variance_type='learned_range'"),
    (dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"), "squaredcos_cap_v2"),
])
def test_refused_by_name(kw, message):
    cfg = SASolverScheduler(**{k: v for k, v in kw.items() if k != "use_flow_sigmas"}).config
    cfg = {**cfg, **{k: v for k, v in kw.items() if k == "use_flow_sigmas"}}
    with pytest.raises(ValueError, match=f"SASolverScheduler.*{message}|{message}.*SASolverScheduler"):
        DiffSamplerScheduler.from_config(cfg)


def test_named_solver_keeps_the_source_grid(gmm16):
    """Naming another solver keeps SASolver's grid choices (karras) and schedule."""
    ours = DiffSamplerScheduler.from_config(SASolverScheduler(use_karras_sigmas=True).config, solver="dpmpp_2m")
    assert ours.config.solver == "dpmpp_2m" and ours.spacing == "diffusers_karras"
    assert "generator" in inspect.signature(ours.step).parameters
