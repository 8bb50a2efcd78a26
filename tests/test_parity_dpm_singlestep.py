"""Parity by default with diffusers' DPMSolverSinglestepScheduler: `from_config(its config)` with no solver
named is `dpmpp` / `dpm_solver` with intermediate="grid" (a step of order k spans k grid intervals, its
intermediate calls at diffusers' own timesteps; samplers/dpm_solver.py), equal to diffusers in the standard
loop (tests/diffusers_loop.py) for every algorithm_type, solver_type, solver_order, lower_order_final,
final_sigmas_type, sigma grid, thresholding and prediction type, at NFE 1-3, 5, 7, 10, 25 (the SDE form with
the same generator), restarted by set_begin_index (img2img) too; and with diffusers' tables in float64 to
1e-10.  Where diffusers' float32 arithmetic moves its own samples by more than 1e-4 (noise prediction
over a three-interval step, the third-order heun D2 weight (e^-h - 1 + h) / h^2 - 1/2 at small h), our
float32 samples are within 1e-4 of diffusers run on float64 tables, and diffusers' float32 ones are not."""

import logging

import numpy as np
import pytest
import torch
from diffusers import DPMSolverSinglestepScheduler

from diffsampler.eval.gmm import GMMModel
from diffsampler.pipelines import DiffSamplerScheduler
from diffusers_loop import run_diffusers
from test_parity import x_T

logging.getLogger("diffusers").setLevel(logging.ERROR)  # its lower_order_final / deprecation warnings

MIN = dict(final_sigmas_type="sigma_min")
#: (DPMSolverSinglestepScheduler options, the solver the mapping picks)
CONFIGS = [
    (dict(), "dpmpp"),
    (dict(solver_order=1), "dpmpp"),
    (dict(solver_order=3), "dpmpp"),
    (dict(solver_type="heun"), "dpmpp"),
    (dict(solver_order=3, solver_type="heun"), "dpmpp"),
    (dict(lower_order_final=False, **MIN), "dpmpp"),
    (dict(solver_order=3, lower_order_final=False, **MIN), "dpmpp"),
    (dict(solver_order=3, lower_order_final=True, **MIN), "dpmpp"),
    (dict(algorithm_type="dpmsolver", **MIN), "dpm_solver"),
    (dict(algorithm_type="dpmsolver", solver_order=3, **MIN), "dpm_solver"),
    (dict(algorithm_type="dpmsolver", solver_order=3, solver_type="heun", **MIN), "dpm_solver"),
    (dict(algorithm_type="dpmsolver", prediction_type="v_prediction", **MIN), "dpm_solver"),
    (dict(algorithm_type="sde-dpmsolver++"), "dpmpp"),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3), "dpmpp"),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), "dpmpp"),
    (dict(algorithm_type="sde-dpmsolver++", solver_type="heun", **MIN), "dpmpp"),
    (dict(use_karras_sigmas=True, solver_order=3), "dpmpp"),
    (dict(use_exponential_sigmas=True), "dpmpp"),
    (dict(use_beta_sigmas=True, solver_order=3, solver_type="heun"), "dpmpp"),
    (dict(use_karras_sigmas=True, solver_order=1, **MIN), "dpmpp"),
    (dict(prediction_type="v_prediction", solver_order=3), "dpmpp"),
    (dict(prediction_type="sample", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "dpmpp"),
    (dict(thresholding=True, sample_max_value=1.5, solver_order=3), "dpmpp"),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3), "dpmpp"),
]
NFES = [1, 2, 3, 5, 7, 10, 25]


def _float64_tables(kw, nfe):
    """DPMSolverSinglestepScheduler(**kw) after set_timesteps(nfe) with its tables and sigmas in float64
    (a sigma grid's values are its float32 ones, as ours: `schedules.diffusers_*` reproduce them)."""
    ref = DPMSolverSinglestepScheduler(**kw)
    for k in ("alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        setattr(ref, k, getattr(ref, k).double())
    ref.set_timesteps(nfe)
    acp = ref.alphas_cumprod.numpy()
    table = np.sqrt((1 - acp) / acp)
    c = ref.config
    if c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas:
        ref.sigmas = ref.sigmas.double()
        return ref
    last = table[:1] if c.final_sigmas_type == "sigma_min" else [0.0]
    ref.sigmas = torch.tensor(np.concatenate([table[ref.timesteps.numpy()], last]), dtype=torch.float64)
    return ref


def _runs(gmm, kw, nfe, begin_index=None):
    """(ours, ours in float64, diffusers, diffusers on float64 tables) in the standard loop, each with a
    generator seeded alike."""
    ours_sched = DiffSamplerScheduler.from_config(DPMSolverSinglestepScheduler(**kw).config)
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T(32)
    if kw.get("thresholding"):
        x = x.reshape(32, 1, 4, 4)

    def loop(sched, x):
        return run_diffusers(sched, model, nfe, x, generator=torch.Generator().manual_seed(7), begin_index=begin_index)

    ours = loop(ours_sched, x)
    ours64 = loop(ours_sched, x.double())
    ref32 = loop(DPMSolverSinglestepScheduler(**kw), x)
    ref64 = _float64_tables(kw, nfe)
    ref64.set_timesteps = lambda n, **k: None  # keep the float64 tables set above
    ref64 = loop(ref64, x.double())
    return ours_sched, ours, ours64, ref32, ref64


def _check(sched, ours, ours64, ref32, ref64, where, exact=True):
    """`exact`: on float64 tables the same samples to 1e-10; else (a sigma grid: its float32 sigmas become
    our schedule's times and back, which moves alpha, sigma by ~1e-8 -- the third-order heun D2 of the beta
    grid's short first steps amplifies that to 6e-6; thresholding's quantile) to 1e-5."""
    scale = max(1.0, ref64.abs().max().item())
    assert (ours64 - ref64).abs().max().item() <= (1e-10 if exact else 1e-5) * scale, where
    err, own = (ours - ref32).abs().max().item(), (ref32 - ref64).abs().max().item()
    # equal to diffusers to 1e-4; where diffusers' own float32 round-off is above that (noise prediction over
    # a three-interval step: x_t = (alpha_t / alpha_s) x_s - ... cancels terms ~1e3 |x|), both float32 runs
    # are off the float64 samples by their round-off, and ours is within 3x diffusers' own of diffusers'
    assert err <= max(1e-4 * scale, 3 * own), (where, err, own, scale)
    return err, own


@pytest.mark.parametrize("kw,solver", CONFIGS, ids=[str(c[0]) for c in CONFIGS])
def test_singlestep_reproduced_by_default(gmm16, kw, solver):
    for nfe in NFES:
        if nfe == 1 and kw.get("use_karras_sigmas") and kw.get("final_sigmas_type") == "sigma_min":
            continue  # one step from sigma_max to sigma_min: the diffusers_karras grid needs 2 (refused by name)
        sched, *runs = _runs(gmm16, kw, nfe)
        assert sched.config.solver == solver and sched.solver.intermediate == "grid"
        assert sched.solver.stochastic == (kw.get("algorithm_type") == "sde-dpmsolver++")
        assert sched.timesteps.dtype == torch.int64 or kw.get("use_exponential_sigmas") or kw.get("use_beta_sigmas")
        exact = not any(kw.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                            "thresholding"))
        _check(sched, *runs, nfe, exact)


@pytest.mark.parametrize("kw", [dict(solver_order=3), dict(solver_type="heun"), dict(algorithm_type="sde-dpmsolver++",
                                                                                      solver_order=3)], ids=str)
@pytest.mark.parametrize("nfe,begin", [(10, 1), (10, 2), (10, 3), (10, 4), (7, 5), (25, 8)])
def test_restarted_by_set_begin_index(gmm16, kw, nfe, begin):
    """img2img: a pipeline starts at timesteps[begin]; diffusers finishes the step it is in with the outputs
    it has (lowered order) and goes on with its order list: `build_from` does the same."""
    sched, *runs = _runs(gmm16, kw, nfe, begin_index=begin)
    _check(sched, *runs, (nfe, begin))
    assert sched.plan.nfe == nfe - begin


REFUSED = [
    (dict(algorithm_type="dpmsolver", thresholding=True, **MIN), "thresholding=True"),
    (dict(variance_type="learned"), "variance_type='learned'"),
    (dict(use_karras_sigmas=True, solver_order=2, **MIN), "solver_order=2 with use_karras_sigmas"),
    (dict(use_beta_sigmas=True, solver_order=3, **MIN), "solver_order=3 with use_beta_sigmas"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "use_flow_sigmas=True"),
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True"),
]


@pytest.mark.parametrize("kw,match", REFUSED, ids=[str(c[0]) for c in REFUSED])
def test_what_cannot_be_honoured_is_refused_by_key(kw, match):
    cfg = dict(DPMSolverSinglestepScheduler(**{k: v for k, v in kw.items() if k != "lambda_min_clipped"}).config)
    cfg.update(kw)
    with pytest.raises(ValueError, match=match):
        DiffSamplerScheduler.from_config(cfg)


def test_keys_diffusers_ignores_are_ignored(gmm16):
    """timestep_spacing / steps_offset / rescale_betas_zero_snr / clip_sample are no DPMSolverSinglestep
    keys: carried over from another class's config (a pipeline's), diffusers ignores them, and so do we;
    diffusers' init turns solver_type 'bh2' into 'midpoint' and algorithm_type 'deis' into 'dpmsolver++'."""
    base = dict(DPMSolverSinglestepScheduler().config, _class_name="DPMSolverSinglestepScheduler")
    cfg = dict(base, timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True, clip_sample=True,
               solver_type="bh2", algorithm_type="deis")
    ours, ref = DiffSamplerScheduler.from_config(cfg), DiffSamplerScheduler.from_config(base)
    assert ours.solver.solver_type == "midpoint" and ours.config.solver == "dpmpp"
    model = GMMModel(gmm16, ref.schedule)
    a = run_diffusers(ours, model, 7, x_T(8))
    b = run_diffusers(ref, model, 7, x_T(8))
    assert ours.timesteps.tolist() == ref.timesteps.tolist() and torch.equal(a, b)
