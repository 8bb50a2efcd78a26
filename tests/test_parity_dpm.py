"""The DPM-Solver family on the one engine (samplers/dpm_solver.py `dpm_weights`): parity by default
with diffusers' DPMSolverMultistepScheduler (every algorithm_type, solver_type, solver_order,
euler_at_final, final_sigmas_type, sigma grids, thresholding) in the standard loop, stochastic ones with
the same generator; equality with k-diffusion's sample_dpmpp_2m_sde / 3m_sde on the same sigmas and noise."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers.dpm_solver import dpm_weights
from diffsampler.schedules import DiscreteVP
from diffusers_loop import run_diffusers
from test_parity import x_T
from test_parity_kdiffusion import _kdiff, _noise_list, _ours

MIN = dict(final_sigmas_type="sigma_min")
#: (DPMSolverMultistepScheduler options, the solver the mapping picks)
DPM_MULTISTEP = [
    (dict(solver_type="heun"), "dpmpp_2m"),
    (dict(solver_order=3, solver_type="heun"), "dpmpp_3m"),
    (dict(solver_type="heun", use_lu_lambdas=True, solver_order=3), "dpmpp_3m"),
    (dict(euler_at_final=True, **MIN), "dpmpp_2m"),
    (dict(euler_at_final=True, solver_order=3, **MIN), "dpmpp_3m"),
    (dict(algorithm_type="dpmsolver", solver_order=1, **MIN), "dpm_solver_2m"),
    (dict(algorithm_type="dpmsolver", **MIN), "dpm_solver_2m"),
    (dict(algorithm_type="dpmsolver", solver_type="heun", **MIN), "dpm_solver_2m"),
    (dict(algorithm_type="dpmsolver", solver_order=3, **MIN), "dpm_solver_3m"),
    (dict(algorithm_type="dpmsolver", use_karras_sigmas=True, **MIN), "dpm_solver_2m"),
    (dict(algorithm_type="dpmsolver", thresholding=True, sample_max_value=1.5, **MIN), "dpm_solver_2m"),
    (dict(algorithm_type="dpmsolver", prediction_type="v_prediction", timestep_spacing="trailing", **MIN),
     "dpm_solver_2m"),
    # stochastic: the same generator on both sides
    (dict(algorithm_type="sde-dpmsolver++", solver_order=1), "dpmpp_2m_sde"),
    (dict(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
    (dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), "dpmpp_2m_sde"),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3), "dpmpp_3m_sde"),
    (dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, prediction_type="v_prediction"), "dpmpp_2m_sde"),
    (dict(algorithm_type="sde-dpmsolver++", **MIN), "dpmpp_2m_sde"),
    (dict(algorithm_type="sde-dpmsolver", **MIN), "dpm_solver_2m"),
    (dict(algorithm_type="sde-dpmsolver", solver_type="heun", solver_order=1, **MIN), "dpm_solver_2m"),
    # the cosine schedule's clipped log-SNR (stable diffusion 2's / DeepFloyd's configs): the grid stops short
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), "dpmpp_2m"),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-3.0, timestep_spacing="trailing"), "dpmpp_2m"),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-3.0, timestep_spacing="leading",
          algorithm_type="sde-dpmsolver++", solver_order=3), "dpmpp_3m_sde"),
    # zero terminal SNR: diffusers' last alpha_bar 2^-24 (scaled_linear keeps the table decreasing)
    (dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction",
          timestep_spacing="trailing"), "dpmpp_2m"),
]


def _errors(gmm, cls, kw, nfe):
    ref_sched = cls(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T(32)
    if kw.get("thresholding"):
        x = x.reshape(32, 1, 4, 4)
    ref = run_diffusers(ref_sched, model, nfe, x, generator=torch.Generator().manual_seed(7))
    ours = run_diffusers(ours_sched, model, nfe, x, generator=torch.Generator().manual_seed(7))
    return ours_sched, (ours - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("kw,solver", DPM_MULTISTEP, ids=[str(c[0]) for c in DPM_MULTISTEP])
def test_dpm_solver_multistep_options_reproduced(gmm16, kw, solver, nfe):
    sched, err, scale = _errors(gmm16, DPMSolverMultistepScheduler, kw, nfe)
    assert sched.config.solver == solver
    assert sched.solver.stochastic == kw.get("algorithm_type", "").startswith("sde")
    assert err <= 1e-4 * max(1.0, scale), (err, scale)


REFUSED = [
    (dict(algorithm_type="sde-dpmsolver", solver_order=3, **MIN), "solver_order=3"),
    (dict(variance_type="learned"), "variance_type='learned'"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True with beta_schedule='linear'"),
    (dict(euler_at_final=True, use_karras_sigmas=True, **MIN), "euler_at_final=True"),
]


@pytest.mark.parametrize("kw,match", REFUSED, ids=[str(c[0]) for c in REFUSED])
def test_what_cannot_be_honoured_is_refused_by_key(kw, match):
    with pytest.raises(ValueError, match=match):
        DiffSamplerScheduler.from_config(DPMSolverMultistepScheduler(**kw).config)


def test_dpm_weights_forms():
    """The noise-prediction SDE doubles the ODE's weights; the data SDE is the ODE at H = 2h; the
    step onto sigma = 0 is the first-order limit; bad options are refused by name."""
    import math

    def vp(lam):  # alpha, sigma of a variance-preserving point with log-SNR lam
        return 1 / math.sqrt(1 + math.exp(-2 * lam)), 1 / math.sqrt(1 + math.exp(2 * lam))

    lams, l_t = [-1.0, -1.6, -2.0], -0.4
    (a_s, s_s), (a_t, s_t) = vp(lams[0]), vp(l_t)
    for st in ("midpoint", "heun"):
        for k in (1, 2, 3):
            ode = dpm_weights(lams[:k], l_t, a_s, s_s, a_t, s_t, predict="noise", solver_type=st)
            sde = dpm_weights(lams[:k], l_t, a_s, s_s, a_t, s_t, predict="noise", solver_type=st, eta=1.0)
            assert sde[0] == ode[0] and sde[1] == pytest.approx([2 * w for w in ode[1]], rel=1e-14) and sde[2] > 0
    # data and noise forms are one method: eps = (x - alpha D) / sigma turns one into the other (first order)
    cx_d, (w_d,), _ = dpm_weights(lams[:1], l_t, a_s, s_s, a_t, s_t)
    cx_n, (w_n,), _ = dpm_weights(lams[:1], l_t, a_s, s_s, a_t, s_t, predict="noise")
    assert cx_n + w_n / s_s == pytest.approx(cx_d, rel=1e-12) and -w_n * a_s / s_s == pytest.approx(w_d, rel=1e-12)
    assert dpm_weights(lams[:2], float("-inf"), a_s, s_s, 1.0, 0.0) == (0.0, [1.0], 0.0)
    with pytest.raises(ValueError, match="solver_type"):
        dpm_weights(lams, l_t, a_s, s_s, a_t, s_t, solver_type="rk")
    with pytest.raises(ValueError, match="eta"):
        dpm_weights(lams, l_t, a_s, s_s, a_t, s_t, predict="noise", eta=0.5)
    for name, opts, key in [("dpmpp_2m", {"solver_type": "bh2"}, "solver_type"),
                            ("dpmpp_2m_sde", {"eta": -1.0}, "eta"),
                            ("dpmpp_3m_sde", {"third_order": "x"}, "third_order"),
                            ("dpm_solver_3m", {"order": 4}, "order")]:
        with pytest.raises(ValueError, match=key):
            ds.samplers.get(name, **opts)


# -- k-diffusion: sample_dpmpp_2m_sde / sample_dpmpp_3m_sde on the same sigmas and noise (float64) --------

KD = [
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.6, "s_noise": 0.8}, "sample_dpmpp_2m_sde", {"eta": 0.6, "s_noise": 0.8}),
    ("dpmpp_2m_sde", {"eta": 0.0}, "sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.2}, "sample_dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.2}),
]


@pytest.mark.parametrize("solver,opts,ref,ref_kw", KD, ids=[f"{c[0]}{c[1]}" for c in KD])
def test_equals_kdiffusion_on_the_same_sigmas_and_noise(K, solver, opts, ref, ref_kw):
    from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser

    gmm = GaussianMixture.random(6, 3, seed=3, scale=1.5, std=(0.3, 0.6))
    n = 8
    schedule = DiscreteVP.linear()
    r = schedule.rho(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    sigmas = K.get_sigmas_karras(n, float(r[1]), float(r[0]) * (1 - 1e-9), device="cpu").double()
    den = gmm_denoiser(gmm, schedule)
    x_T_v = torch.randn(5, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    noise = _noise_list(n, x_T_v.shape)
    want = _kdiff(K, getattr(K, ref), gmm, schedule, sigmas, x_T_v, noise, noise_sampler=True, **ref_kw)
    # k-diffusion keeps the order on the last steps (no lower_order_final)
    got, plan = _ours(solver, {**opts, "lower_order_final": False}, schedule, den, sigmas, x_T_v, noise)
    assert plan.nfe == n
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err


# -- singlestep DPM-Solver: k-diffusion's sample_dpm_fast (DPM-Solver-fast) on the same lambda grid -------

def _float64_times(fn):
    """`fn` run with torch's default dtype float64 (k-diffusion's DPMSolver makes its time grid with
    torch.linspace, which takes the default dtype), restored afterwards."""
    def run(*args, **kw):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return fn(*args, **kw)
        finally:
            torch.set_default_dtype(old)
    return run


def _singlestep_case(solver, nfe, final_zero=False, dtype=torch.float64):
    """Our `solver` at `nfe` on a grid uniform in t = -log rho (k-diffusion's DPMSolver grid) from rho_max
    to rho_min (and 0 with `final_zero`), with the exact mixture at the plan's float64 alpha, sigma:
    (our sample as v = x / alpha, the grid's t values, the mixture, x_T as v); `dtype` of our run's tensors."""
    from diffsampler.eval.gmm import GaussianMixture
    from diffsampler.samplers.plan import run_plan
    from diffsampler.schedules import time_grid

    gmm = GaussianMixture.random(6, 3, seed=3, scale=1.5, std=(0.3, 0.6))
    schedule = DiscreteVP.linear()
    r = schedule.rho(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    s_max, s_min = float(r[0]) * (1 - 1e-9), float(r[1])
    m = solver.steps_for_nfe(nfe, final_zero=final_zero) - (1 if final_zero else 0)
    ts = torch.linspace(-math.log(s_max), -math.log(s_min), m + 1, dtype=torch.float64)
    t_grid = schedule.t_from_lambda(ts)
    grid = time_grid(schedule, m + (1 if final_zero else 0), t_grid, final="zero" if final_zero else "last")
    plan = ds.samplers.make_plan(solver, schedule, nfe, grid=grid)
    assert plan.nfe == nfe
    x_T_v = torch.randn(5, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s_max

    class Exact:  # the mixture's E[x0 | x] at the plan's float64 alpha, sigma (not the float32 model time)
        def __init__(self):
            self.schedule = schedule

        def predict_at(self, x, t, a, s, kind):
            d = gmm.posterior_mean(x, torch.full((len(x),), a, dtype=x.dtype), torch.full((len(x),), s, dtype=x.dtype))
            return d if kind == "data" else (x - a * d) / s

        def raise_if_nonfinite(self):
            pass

    x0 = run_plan(plan, Exact(), (x_T_v * float(grid.alpha[0])).to(dtype)).double()
    got = x0 if final_zero else x0 / float(grid.alpha[-1])
    return got, ts, gmm, schedule, x_T_v


def _close(got, want):
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("nfe", [2, 3, 4, 5, 6, 7, 8, 10])
def test_dpm_fast_equals_kdiffusion(K, nfe):
    got, ts, gmm, schedule, x_T_v = _singlestep_case(ds.samplers.get("dpm_fast"), nfe)
    t0, t1 = torch.tensor(float(ts[0]), dtype=torch.float64), torch.tensor(float(ts[-1]), dtype=torch.float64)
    # DPMSolver.dpm_solver_fast builds its times with torch.linspace in the default dtype: float32 unless
    # set (in float32 its grid alone moves the nfe=2 sample by 4e-3); float64 here, as ours.
    want = _kdiff(K, _float64_times(lambda model, x, sigmas, **kw: K.DPMSolver(model).dpm_solver_fast(x, t0, t1, nfe)),
                  gmm, schedule, None, x_T_v, [])
    _close(got, want)


@pytest.mark.parametrize("nfe", [5, 10])
def test_dpm_fast_float32_within_1e4_of_kdiffusion(K, nfe):
    """Our float32 run of dpm_fast against k-diffusion's DPMSolver.dpm_solver_fast (float64): 1e-4."""
    got, ts, gmm, schedule, x_T_v = _singlestep_case(ds.samplers.get("dpm_fast"), nfe, dtype=torch.float32)
    t0, t1 = torch.tensor(float(ts[0]), dtype=torch.float64), torch.tensor(float(ts[-1]), dtype=torch.float64)
    want = _kdiff(K, _float64_times(lambda model, x, sigmas, **kw: K.DPMSolver(model).dpm_solver_fast(x, t0, t1, nfe)),
                  gmm, schedule, None, x_T_v, [])
    err = (got - want).abs().max().item()
    assert 0 < err <= 1e-4 * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("order,steps", [(1, 5), (2, 4), (3, 3), (3, 1)])
def test_dpm_solver_fixed_order_equals_kdiffusion_steps(K, order, steps):
    """dpm_solver with every step of `order` = k-diffusion's DPMSolver.dpm_solver_{order}_step, step after step."""
    got, ts, gmm, schedule, x_T_v = _singlestep_case(ds.samplers.get("dpm_solver", order=order, orders="fixed"),
                                                     order * steps)

    def loop(model, x, sigmas, **kw):
        dpm = K.DPMSolver(model)
        step = getattr(dpm, f"dpm_solver_{order}_step")
        for i in range(len(ts) - 1):
            x, _ = step(x, ts[i], ts[i + 1])
        return x

    _close(got, _kdiff(K, loop, gmm, schedule, None, x_T_v, []))


def test_dpmpp_order2_equals_kdiffusion_2s(K):
    """dpmpp order 2 (r = 1/2, the last step onto sigma = 0 first order) = sample_dpmpp_2s_ancestral with
    eta = 0 on the same sigmas."""
    got, ts, gmm, schedule, x_T_v = _singlestep_case(ds.samplers.get("dpmpp", order=2, orders="fixed"), 2 * 4 + 1,
                                                     final_zero=True)
    sigmas = torch.cat([ts.neg().exp(), torch.zeros(1, dtype=torch.float64)])
    _close(got, _kdiff(K, K.sample_dpmpp_2s_ancestral, gmm, schedule, sigmas, x_T_v, [], eta=0.0))


@pytest.mark.parametrize("name", ["dpm_solver", "dpmpp"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_runs_every_budget_exactly(gmm16, name, order):
    from diffsampler.eval.gmm import gmm_denoiser

    den = gmm_denoiser(gmm16, DiscreteVP.linear())
    for nfe in (4, 5, 6, 9):
        den.nfe = 0
        x = ds.sample(den, x_T(4), solver=name, nfe=nfe, order=order)
        assert den.nfe == nfe and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="orders"):
        ds.samplers.get(name, orders="slow")
    if order > 1:
        with pytest.raises(ValueError, match="multiple"):
            ds.samplers.make_plan(ds.samplers.get(name, order=order, orders="fixed"), DiscreteVP.linear(), 1 + order + 1,
                                  "logsnr", "zero")
