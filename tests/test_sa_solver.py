"""SA-Solver (samplers/sa_solver.py) on the one engine: what its formulas reduce to, its options,
per-sample seeds, the adapter and Hydra.  Its orders are in tests/test_convergence.py, its parity with
diffusers' SASolverScheduler in tests/test_parity_sasolver.py."""

import subprocess
import sys

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers import make_plan

DT = torch.float64


def _x(n=8, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("pred,tau,other,opts", [
    ("data", 1.0, "dpmpp_2m_sde", {"order": 1}),  # SDE-DPM-Solver++(1): eta = tau^2 = 1
    ("data", 0.0, "ddim", {}),
    ("noise", 1.0, "dpm_solver_2m", {"order": 1, "sde": True}),  # SDE-DPM-Solver-1 (weights doubled)
    ("noise", 0.0, "dpm_solver_2m", {"order": 1}),
])
def test_first_order_predictor_is_the_first_order_exponential_integrator(gmm16, pred, tau, other, opts):
    """SA-Predictor of order 1 without corrector is (SDE-)DPM-Solver(++)-1 (Xue et al. 2023, Sec. 4: the
    data form with tau = 1 is SDE-DPM-Solver++'s first-order step): the same samples from the same seeds."""
    sch = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sch)
    seeds = list(range(8))
    ours = ds.sample(den, _x(), solver="sa_solver", nfe=9, seeds=seeds, predictor_order=1, corrector_order=0,
                     prediction=pred, tau=tau)
    ref = ds.sample(den, _x(), solver=other, nfe=9, seeds=seeds, **opts)
    assert float((ours - ref).abs().max()) <= 1e-10


def test_corrector_costs_no_model_call_and_changes_the_result(gmm16):
    sch = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sch)
    plain = ds.sample(den, _x(), solver="sa_solver", nfe=7, seeds=range(8), corrector_order=0)
    den.reset_nfe()
    corr = ds.sample(den, _x(), solver="sa_solver", nfe=7, seeds=range(8))
    assert den.nfe == 7 and float((plain - corr).abs().max()) > 1e-3
    plan = make_plan("sa_solver", sch, 7, predictor_order=3, corrector_order=4, lower_order_final=False)
    assert plan.nfe == 7 and plan.orders == [1, 2, 3, 3, 3, 3, 1]  # the step onto sigma = 0 is first order
    assert make_plan("sa_solver", sch, 7, predictor_order=3).orders == [1, 2, 3, 3, 3, 2, 1]


def test_final_corrector_calls_the_model_at_the_last_point(gmm16):
    sch = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sch)
    plan = make_plan("sa_solver", sch, 6, "logsnr", "last", final_corrector=True)
    assert plan.nfe == 6 and plan.grid.steps == 5 and plan.steps[-1].evals[0].t == float(plan.grid.t[-1])
    assert not plan.steps[-1].update.noise and plan.steps[-1].update.cx == 1.0
    a = ds.sample(den, _x(), solver="sa_solver", nfe=6, spacing="logsnr", final="last", seeds=range(8),
                  final_corrector=True, tau=0.0)
    b = ds.sample(den, _x(), solver="sa_solver", nfe=5, spacing="logsnr", final="last", seeds=range(8), tau=0.0)
    assert float((a - b).abs().max()) > 1e-4  # the last result is corrected
    with pytest.raises(ValueError, match="final_corrector.*final='last'"):
        make_plan("sa_solver", sch, 6, final="zero", final_corrector=True)


def test_tau_interval_sets_the_noise_per_step_and_every_step_draws():
    """tau is applied where the step's start rho = sigma / alpha is in tau_interval (0 elsewhere); as
    diffusers, a noisy plan draws one normal per step (weighted 0 where tau = 0); a plan with tau = 0
    everywhere draws none."""
    sch = ds.DiscreteVP.linear()
    plan = make_plan("sa_solver", sch, 10, "linspace", "last", tau_interval=[0.7, 25.0])
    rho = (plan.grid.sigma / plan.grid.alpha).tolist()
    want = [1.0 if 0.7 <= r <= 25.0 else 0.0 for r in rho[:-1]]
    assert plan.info["taus"] == want and 0 < sum(want) < 10
    assert all(s.n_draws == 1 for s in plan.steps) and plan.n_draws == 10
    for s, tau in zip(plan.steps, want):
        assert (s.noise != 0.0) == (tau > 0)
        assert (s.draws != ()) == (tau == 0) and all(e == 0.0 for _, e in s.update.noise)
    quiet = make_plan("sa_solver", sch, 10, "linspace", "last", tau_interval=[1e3, 1e4])
    assert not quiet.stochastic and quiet.n_draws == 0
    assert not make_plan("sa_solver", sch, 10, tau=0.0).stochastic


@pytest.mark.parametrize("opts", [dict(), dict(prediction="noise", predictor_order=3, corrector_order=1),
                                  dict(tau_interval=[0.5, 10.0], predictor_order=4, corrector_order=4)])
def test_per_sample_seeds_whatever_the_batch(gmm16, opts):
    den = gmm_denoiser(gmm16, ds.DiscreteVP.linear())
    seeds = [11, 12, 13, 14, 15, 16]
    big = ds.sample(den, shape=(6, 16), solver="sa_solver", nfe=8, seeds=seeds, **opts)
    for rows in ([3, 5], [0]):
        small = ds.sample(den, shape=(len(rows), 16), solver="sa_solver", nfe=8, seeds=[seeds[k] for k in rows], **opts)
        torch.testing.assert_close(big[rows], small, rtol=0, atol=1e-6)
    other = ds.sample(den, shape=(1, 16), solver="sa_solver", nfe=8, seeds=[99], **opts)
    assert float((other - big[0]).abs().max()) > 1e-2


@pytest.mark.parametrize("opts,message", [
    (dict(predictor_order=5), "predictor_order must be an integer in 1..4, got 5"),
    (dict(predictor_order=0), "predictor_order must be an integer in 1..4"),
    (dict(corrector_order=5), "corrector_order must be an integer in 0..4, got 5"),
    (dict(corrector_order=2.0), "corrector_order=2.0 must be int"),
    (dict(prediction="x0"), "prediction must be one of"),
    (dict(tau=-1.0), "tau .* must be a finite number >= 0"),
    (dict(tau=float("inf")), "tau .* must be a finite number >= 0"),
    (dict(tau_interval=[5.0, 1.0]), "tau_interval must be"),
    (dict(tau_interval=[1.0]), "tau_interval must be"),
    (dict(tau_interval="0.1,2"), "tau_interval must be"),
    (dict(second_order="half"), "second_order must be one of"),
    (dict(second_order="unipc", prediction="noise"), "second_order='unipc' is the data-prediction form"),
    (dict(final_corrector=True, corrector_order=0), "final_corrector=True needs a corrector"),
    (dict(eta=1.0), "unknown option"),
])
def test_options_refused_by_name(opts, message):
    with pytest.raises(ValueError, match=message):
        ds.samplers.get("sa_solver", **opts)


def test_through_the_adapter_with_options(gmm16):
    """DiffSamplerScheduler(solver="sa_solver") in the standard loop gives sample()'s result with the
    same per-sample generators."""
    from diffsampler.eval.gmm import GMMModel

    sched = DiffSamplerScheduler(solver="sa_solver", solver_options={"predictor_order": 3, "tau": 0.5})
    model = GMMModel(gmm16, sched.schedule, "epsilon")
    sched.set_timesteps(8)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    x = _x(4).float()
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x, generator=gens).prev_sample
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule), _x(4).float(), solver="sa_solver", nfe=8, seeds=range(4),
                    predictor_order=3, tau=0.5, spacing=sched.spacing, final=sched.final)
    assert float((x - ref).abs().max()) <= 1e-5


def test_from_hydra(tmp_path):
    """`solver=sa_solver` with options through the CLI (one run), and a bad option refused by the config
    check before any work (composed in-process)."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "diffsampler", "solver=sa_solver", "+solver.options.tau=0.5",
                        "+solver.options.tau_interval=[0.5,20.0]", "+solver.options.predictor_order=3", "nfe=8",
                        "num_samples=16", "progress=false", f"hydra.run.dir={run}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(run / "results.csv")
    assert df.solver[0] == "sa_solver" and '"tau_interval": [0.5, 20.0]' in df.solver_options[0]
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.run_checks import validate

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        cfg = compose("config", overrides=["solver=sa_solver", "+solver.options.predictor_order=7", "nfe=8"])
    with pytest.raises(ValueError, match="predictor_order must be an integer in 1..4, got 7"):
        validate(cfg)
