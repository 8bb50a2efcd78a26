"""dpm_adaptive: DPM-Solver-12 / 23 with error control, as k-diffusion's `sample_dpm_adaptive`.

Reference: k-diffusion's sampler on the same network (the exact mixture as an epsilon network with
float32 time inputs, wrapped as k-diffusion wraps an eps model: D = v - sigma eps), from the same
sigma_max to sigma_min, in float64: the same accepted / rejected attempts and NFE, the endpoint to
1e-6."""

import math
import sys

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.schedules import EDM, DiscreteVP



def _kd_model(den, schedule):
    """k-diffusion's view of `den`: model(v, sigma) = v - sigma eps(alpha v, t(sigma)), one network call."""
    def model(v, rho):
        r = rho.double().flatten()[:1]
        t = schedule.t_from_lambda(-r.log())
        a, s = schedule.alpha(t), schedule.sigma(t)
        t_in = schedule.model_time(t).to(torch.float32).expand(v.shape[0])
        eps = den.predict_at(v * a, t_in, float(a), float(s), "noise")
        return v - r * eps
    return model


CASES = [(2, {}), (3, {}), (3, {"rtol": 0.01, "atol": 0.001}), (2, {"h_init": 0.2, "pcoeff": 0.1, "icoeff": 0.9}),
         (3, {"dcoeff": 0.05, "accept_safety": 0.9})]


@pytest.mark.parametrize("order,opts", CASES, ids=[f"{o}{k}" for o, k in CASES])
@pytest.mark.parametrize("sched", ["edm", "vp"])
def test_equals_kdiffusion_sample_dpm_adaptive(K, gmm, order, opts, sched):
    schedule = EDM(0.002, 80.0) if sched == "edm" else DiscreteVP.linear()
    r = schedule.rho(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    den = gmm_denoiser(gmm, schedule)
    x_T_v = torch.randn(5, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * r[0]
    want, info = K.sample_dpm_adaptive(_kd_model(den, schedule), x_T_v.clone(), r[1].clone(), r[0].clone(),
                                       order=order, disable=True, return_info=True, **opts)
    den.nfe = 0
    plan = ds.samplers.make_plan("dpm_adaptive", schedule, None, final="last", order=order, **opts)
    a = schedule.alpha(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    got = ds.samplers.run_plan(plan, den, x_T_v * float(a[0])) / float(a[1])
    assert {k: plan.info[k] for k in info} == info and info["n_reject"] > 0
    assert den.nfe == info["nfe"]
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err


ETA_CASES = [(3, {"eta": 1.0}), (2, {"eta": 0.5, "s_noise": 0.8}), (3, {"eta": 0.7, "rtol": 0.02, "atol": 0.002})]


@pytest.mark.parametrize("order,opts", ETA_CASES, ids=[f"{o}{k}" for o, k in ETA_CASES])
@pytest.mark.parametrize("sched", ["edm", "vp"])
def test_eta_equals_kdiffusion_with_the_same_noise(K, gmm, order, opts, sched):
    """eta > 0: the pair solves to the ancestral level, an accepted attempt adds s_noise rho_up z (one draw per
    accepted attempt, from the same per-sample generators on both sides), PID order 1.5: the same attempts and
    the endpoint to 1e-6 (float64)."""
    from diffsampler.samplers.loop import ondemand_noise, per_sample_generators, per_sample_noise

    schedule = EDM(0.002, 80.0) if sched == "edm" else DiscreteVP.linear()
    r = schedule.rho(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    den = gmm_denoiser(gmm, schedule)
    x_T_v = torch.randn(5, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * r[0]
    gens = per_sample_generators(range(5))
    want, info = K.sample_dpm_adaptive(_kd_model(den, schedule), x_T_v.clone(), r[1].clone(), r[0].clone(),
                                       order=order, disable=True, return_info=True,
                                       noise_sampler=lambda a, b: per_sample_noise(x_T_v.shape, gens, "cpu",
                                                                                   torch.float64), **opts)
    plan = ds.samplers.make_plan("dpm_adaptive", schedule, None, final="last", order=order, **opts)
    assert plan.stochastic
    a = schedule.alpha(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    x = x_T_v * float(a[0])
    got = ds.samplers.run_plan(plan, den, x, noise_fn=ondemand_noise(per_sample_generators(range(5)), x)) / float(a[1])
    assert {k: plan.info[k] for k in info} == info
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err
    # the noise takes effect: without it (eta = 0) the endpoint is another
    det = ds.samplers.run_plan(ds.samplers.make_plan("dpm_adaptive", schedule, None, final="last", order=order),
                               den, x) / float(a[1])
    assert (det - got).abs().max().item() > 1e-2


def test_eta_through_sample_per_sample_seeds(gmm):
    """Sample k depends only on seed k (per-sample generators, one draw per accepted attempt) -- as long as the
    batch takes the same steps: the error norm is over the batch (k-diffusion's), so a sample run alone takes
    its own; a run with the same seeds is the same."""
    den = gmm_denoiser(gmm, DiscreteVP.linear())
    kw = dict(solver="dpm_adaptive", nfe=400, eta=1.0)
    a = ds.sample(den, shape=(3, gmm.dim), seeds=[5, 6, 7], **kw)
    b = ds.sample(den, shape=(3, gmm.dim), seeds=[5, 6, 7], **kw)
    c = ds.sample(den, shape=(3, gmm.dim), seeds=[5, 6, 8], **kw)
    assert torch.equal(a, b) and torch.isfinite(a).all() and (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="stochastic"):
        ds.samplers.run_plan(ds.samplers.make_plan("dpm_adaptive", den.schedule, 400, eta=1.0), den,
                             torch.zeros(2, gmm.dim))


def test_through_sample_budget_and_report(gmm):
    schedule = DiscreteVP.linear()
    den = gmm_denoiser(gmm, schedule)
    solver = ds.samplers.get("dpm_adaptive", rtol=0.02)
    x = ds.sample(den, shape=(4, gmm.dim), seeds=range(4), solver=solver, nfe=300)
    plan = ds.samplers.make_plan(solver, schedule, 300)
    spent = den.nfe
    assert torch.isfinite(x).all() and spent <= 300
    # final="zero" (default) adds one DPM-Solver-1 call onto sigma = 0; the report counts it
    y = ds.samplers.run_plan(plan, den, ds.samplers.initial_noise((4, gmm.dim), schedule, seeds=range(4)))
    assert plan.info["nfe"] == spent and (y - x).abs().max() == 0
    assert plan.info["nfe"] == 3 * plan.info["steps"] + 1 and plan.nfe == 300
    # the exact endpoint is close (rtol 0.02 on a smooth problem)
    ref = ds.sample(den, shape=(4, gmm.dim), seeds=range(4), solver="dpmpp_3m", nfe=200, spacing="logsnr")
    assert (x - ref).abs().max() < 0.05
    # a budget too small is refused before the attempt that would pass it
    n0 = den.nfe
    with pytest.raises(RuntimeError, match="nfe=10"):
        ds.sample(den, shape=(4, gmm.dim), seeds=range(4), solver="dpm_adaptive", nfe=10)
    assert den.nfe - n0 <= 10


@pytest.mark.parametrize("kw,match", [({"spacing": "karras"}, "spacing"), ({"order": 4}, "order"),
                                      ({"rtol": -1.0}, "rtol"), ({"h_init": 0.0}, "h_init"),
                                      ({"nfe": 1}, "nfe"), ({"eta": -1.0}, "eta"), ({"s_noise": 0.9}, "s_noise"),
                                      ({"time_shift": {"window": 4, "cutoff": 500}}, "time_shift")])
def test_refused_by_name_before_any_call(gmm, kw, match):
    den = gmm_denoiser(gmm, DiscreteVP.linear())
    with pytest.raises(ValueError, match=match):
        ds.sample(den, shape=(2, gmm.dim), seeds=range(2), solver="dpm_adaptive", **{"nfe": 200, **kw})
    assert den.nfe == 0
    with pytest.raises(ValueError, match="grid"):
        ds.samplers.make_plan("dpm_adaptive", den.schedule, grid=ds.time_grid(den.schedule, 5))


def test_adapter_refuses_by_name():
    from diffsampler.pipelines import DiffSamplerScheduler

    with pytest.raises(ValueError, match="dpm_adaptive.*set_timesteps"):
        DiffSamplerScheduler(solver="dpm_adaptive")


def test_hydra_runs_dpm_adaptive_with_options(tmp_path):
    import subprocess

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffsampler", *args, "model=gmm", "num_samples=8",
                               "shard_size=8", "progress=false"], capture_output=True, text=True, timeout=300)

    r = cli("solver=dpm_adaptive", "+solver.options.rtol=0.05", "+solver.options.order=2", "nfe=400",
            f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr
    r = cli("solver=ipndm", "nfe=6", f"hydra.run.dir={tmp_path / 'ipndm'}")
    assert r.returncode == 0, r.stderr
    r = cli("solver=dpm_adaptive", "+solver.options.s_noise=0.9", "nfe=400", f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.returncode != 0 and "s_noise" in r.stderr + r.stdout
