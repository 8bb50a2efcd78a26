"""What users of other sampler libraries keep asking for, one test each (the number in a test's name
indexes the need): explicit grids used verbatim (1), a finite first-order final step (2), order
warm-up and cool-down (3), batch-independent seeds (5), low-precision networks (7), every prediction
type (8, 17), per-sample times (13), no solver state between calls (14), registry metadata (15)."""

import threading

import pytest
import torch

import diffsampler as ds
from diffsampler.denoisers import Denoiser
from diffsampler.eval.gmm import GMMModel, GaussianMixture, gmm_denoiser
from diffsampler.samplers import make_plan
from diffsampler.schedules import DiscreteVP, LinearVP, RectifiedFlow, time_grid

ALL = [n for n in ds.available() if not ds.samplers.info(n)["adaptive"]]  # fixed plans (nfe a budget for dpm_adaptive: tests/test_dpm_adaptive.py)


def test_1_explicit_grid_used_verbatim():
    sch = DiscreteVP.linear()
    times = [999.0, 700.5, 421.0, 130.25, 17.0]
    plan = make_plan("dpmpp_2m", sch, spacing=times, final="zero", nfe=5)
    assert [s.evals[0].t for s in plan.steps] == times  # no re-shift, no rounding
    assert plan.grid.sigma[-1] == 0


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_2m_sde", "ddim", "heun"])
def test_2_final_step_onto_sigma_zero_is_first_order_and_finite(gmm8, name):
    sch = DiscreteVP.linear()
    plan = make_plan(name, sch, 7, "logsnr", final="zero")
    assert plan.steps[-1].order == 1 and plan.grid.sigma[-1] == 0
    assert all(e.sigma > 0 for s in plan.steps for e in s.evals)  # the model never sees sigma = 0
    x = ds.sample(gmm_denoiser(gmm8, sch), shape=(16, 8), solver=name, nfe=7, seeds=range(16))
    assert torch.isfinite(x).all()


def test_3_order_warmup_and_cooldown_from_remaining_steps():
    sch = LinearVP()
    assert make_plan("dpmpp_3m", sch, 6, final="last").orders == [1, 2, 3, 3, 2, 1]
    assert make_plan("dpmpp_3m", sch, 6, final="zero").orders == [1, 2, 3, 3, 2, 1]
    assert make_plan("dpmpp_3m", sch, 20, final="last").orders == [1, 2] + [3] * 18  # >= 15 steps: no cool-down
    assert make_plan("dpmpp_3m", sch, 20, final="zero").orders[-1] == 1
    assert make_plan("dpmpp_3m", sch, 6, final="last", lower_order_final=False).orders == [1, 2, 3, 3, 3, 3]
    assert make_plan("dpmpp_2m", sch, 1).orders == [1]


@pytest.mark.parametrize("name", ALL)
def test_3_every_nfe_from_1_to_50(gmm8, name):
    """Every solver runs at every budget 1..50, spends exactly that many calls, stays finite, and
    is far more accurate at 50 than at 2."""
    sch = DiscreteVP.linear()
    den = gmm_denoiser(gmm8, sch)
    x_T = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    ref = gmm8.ode_endpoint(x_T.double(), float(sch.alpha(999)), float(sch.sigma(999)), 1.0, 0.0)
    err = {}
    for nfe in range(1, 51):
        den.reset_nfe()
        x = ds.sample(den, x_T.clone(), solver=name, nfe=nfe, seeds=range(8))
        assert den.nfe == nfe, f"{name} spent {den.nfe} calls for nfe={nfe}"
        assert torch.isfinite(x).all(), f"{name} non-finite at nfe={nfe}"
        err[nfe] = float((x.double() - ref).pow(2).mean().sqrt())
    if not ds.samplers.info(name)["stochastic"]:
        assert err[50] < 0.2 * err[2], err


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "ddim"])
def test_5_same_seed_same_sample_whatever_the_batch(gmm8, name):
    den = gmm_denoiser(gmm8, LinearVP())
    opts = {"eta": 1.0} if name == "ddim" else {}
    big = ds.sample(den, shape=(6, 8), solver=name, nfe=8, seeds=[10, 11, 12, 13, 14, 15], **opts)
    small = ds.sample(den, shape=(2, 8), solver=name, nfe=8, seeds=[13, 15], **opts)
    torch.testing.assert_close(big[[3, 5]], small, rtol=0, atol=1e-6)
    again = ds.sample(den, shape=(2, 8), solver=name, nfe=8, seeds=[13, 15], **opts)
    assert torch.equal(small, again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dpmpp_3m", "dpmpp_2m", "deis_3", "heun", "ddim"])
def test_7_low_precision_model_output(gmm8, dtype, name):
    """The network runs in fp16/bf16; schedule and solver coefficients stay float64 and the state
    in x_T's dtype.  No NaN at NFE 5-50, and the float32 state adds nothing visible to the network's
    own rounding: same low-precision network, float32 state vs float64 state, agree to 5e-3 relative."""
    sch = DiscreteVP.linear()
    exact = GMMModel(gmm8, sch)

    def lowp(x, t):
        return exact(x.to(dtype), t).sample.to(dtype)

    x_T = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    for nfe in (5, 10, 25, 50):
        lo = ds.sample(Denoiser(lowp, sch), x_T.clone(), solver=name, nfe=nfe)
        lo64 = ds.sample(Denoiser(lowp, sch), x_T.double(), solver=name, nfe=nfe)
        assert lo.dtype == torch.float32 and torch.isfinite(lo).all()
        assert (lo.double() - lo64).abs().max() < 5e-3 * max(1.0, float(lo64.abs().max())), nfe
    plan = make_plan(name, sch, 50)
    assert plan.grid.sigma.dtype == torch.float64 and bool((plan.grid.sigma[1:] < plan.grid.sigma[:-1]).all())


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_8_prediction_types_reach_the_exact_endpoint(gmm8, pred):
    sch = DiscreteVP.linear()
    x_T = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = gmm8.ode_endpoint(x_T, float(sch.alpha(999)), float(sch.sigma(999)), 1.0, 0.0)
    errs = [float((ds.sample(gmm_denoiser(gmm8, sch, pred), x_T.clone(), "dpmpp_2m", nfe=n) - ref).pow(2).mean().sqrt())
            for n in (10, 20, 40)]
    assert errs[0] > 2.5 * errs[1] > 2.5 * 2.5 * errs[2] * 0.9 and errs[2] < 0.02


def test_8_and_17_flow_models_with_every_solver(gmm8):
    sch = RectifiedFlow()
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = gmm8.ode_endpoint(x_T, float(sch.alpha(sch.t_max)), float(sch.sigma(sch.t_max)), 1.0, 0.0)
    for name in ALL:
        if ds.samplers.info(name)["stochastic"]:
            continue
        e10, e40 = (float((ds.sample(gmm_denoiser(gmm8, sch, "flow"), x_T.clone(), name, nfe=n) - ref)
                          .pow(2).mean().sqrt()) for n in (10, 40))
        assert e40 < 0.3 * e10, (name, e10, e40)  # first order alone gives 0.25


def test_13_per_sample_times_in_one_batch(gmm8):
    sch = LinearVP()
    den = gmm_denoiser(gmm8, sch)
    # float64 state, so the comparison measures the time handling, not float32 cancellation in
    # D = (x - sigma eps) / alpha at alpha ~ 0.01
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    mixed = den.data_pred(x, t)
    rows = torch.cat([den.data_pred(x[i:i + 1], float(t[i])) for i in range(3)])
    torch.testing.assert_close(mixed, rows, rtol=1e-10, atol=1e-10)


def test_14_solvers_hold_no_state_between_calls(gmm8):
    """Solver state lives in the sampling call: concurrent threads on one solver object agree with
    sequential runs."""
    sch = LinearVP()
    solver = ds.samplers.get("dpmpp_3m")
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [ds.sample(gmm_denoiser(gmm8, sch), x.clone(), solver, nfe=12) for x in xs]
    got = [None] * 4

    def work(i):
        got[i] = ds.sample(gmm_denoiser(gmm8, sch), xs[i].clone(), solver, nfe=12)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_15_registry_metadata():
    assert ds.samplers.info("heun") == {"name": "heun", "order": 2, "nfe_per_step": 2, "stochastic": False,
                                        "kind": "noise", "min_nfe": 1, "adaptive": False}
    assert ds.samplers.info("dpm_adaptive")["adaptive"] is True
    assert ds.samplers.info("dpmpp_2m_sde")["stochastic"] is True
    assert ds.samplers.info("dpmpp_3m")["order"] == 3
    assert ds.samplers.info("dpmpp_2s")["nfe_per_step"] == 2


def test_user_registered_solver_works_everywhere(gmm8):
    """A user solver registered by decorator runs through sample() like a built-in."""
    from diffsampler.samplers import MultistepSolver, register, unregister

    @register("my_ddim_eps")
    class MyDDIM(MultistepSolver):  # DDIM written in eps form: x_t = alpha_t (v_s + (rho_t - rho_s) eps)
        max_order, kind, first_order_to_zero = 1, "noise", False

        def coefficients(self, grid, i, k):
            a_s, a_t = float(grid.alpha[i]), float(grid.alpha[i + 1])
            return a_t / a_s, [a_t * float(grid.rho[i + 1] - grid.rho[i])], 0.0

    try:
        assert "my_ddim_eps" in ds.available()
        den = gmm_denoiser(gmm8, LinearVP())
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.testing.assert_close(ds.sample(den, x.clone(), "my_ddim_eps", nfe=10),
                                   ds.sample(den, x.clone(), "ddim", nfe=10), rtol=1e-9, atol=1e-9)
    finally:
        unregister("my_ddim_eps")


def test_thresholding_matches_diffusers_formula():
    from diffusers import DPMSolverMultistepScheduler

    from diffsampler.denoisers import Thresholded

    sched = DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    d = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inner = Denoiser(lambda x, t: d, LinearVP(), "sample")
    ours = Thresholded(inner, ratio=0.9, max_value=1.5).data_pred(torch.zeros_like(d), 0.5)
    torch.testing.assert_close(ours, sched._threshold_sample(d.clone()))
