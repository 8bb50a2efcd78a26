"""Same samples as diffusers' own schedulers on the same grid (max abs diff <= 1e-4), and tAB-DEIS
coefficients against a direct numerical evaluation of the paper's integrals."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler
from scipy.integrate import quad

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.samplers.deis import DEIS
from diffsampler.schedules import DiscreteVP, LinearVP, time_grid
from diffusers_loop import run_diffusers




CASES = [
    (DPMSolverMultistepScheduler, dict(solver_order=2), "dpmpp_2m", "zero"),
    (DPMSolverMultistepScheduler, dict(solver_order=3), "dpmpp_3m", "zero"),
    (DPMSolverMultistepScheduler, dict(solver_order=2, final_sigmas_type="sigma_min"), "dpmpp_2m", "last"),
    (DPMSolverMultistepScheduler, dict(solver_order=3, prediction_type="v_prediction"), "dpmpp_3m", "zero"),
    (DEISMultistepScheduler, dict(solver_order=2), "deis_logrho_2", "last"),
    (DEISMultistepScheduler, dict(solver_order=3), "deis_logrho_3", "last"),
]


@pytest.mark.parametrize("nfe", [5, 10, 20])
@pytest.mark.parametrize("cls,kw,name,final", CASES, ids=[f"{c[2]}-{c[3]}-{c[1].get('prediction_type', 'eps')}" for c in CASES])
def test_matches_diffusers_multistep(gmm16, cls, kw, name, final, nfe):
    sched = cls(**kw)
    schedule = DiscreteVP.from_diffusers_config(sched.config)
    pred = sched.config.prediction_type
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    ref = run_diffusers(sched, GMMModel(gmm16, schedule, pred), nfe, x_T)
    ours = ds.sample(gmm_denoiser(gmm16, schedule, pred), x_T.clone(), solver=name, nfe=nfe,
                     spacing="linspace", final=final)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("nfe", [5, 10, 50])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_matches_diffusers_ddim(gmm16, nfe, set_alpha_to_one):
    # Stable Diffusion's DDIM config: steps_offset=1, set_alpha_to_one=False (ends at t = 0)
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=int(not set_alpha_to_one))
    schedule = DiscreteVP.from_diffusers_config(sched.config)
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    ref = run_diffusers(sched, GMMModel(gmm16, schedule), nfe, x_T)
    # DDIM's own grid: its timesteps, then alpha_bar = 1 (sigma = 0) or alpha_bar_0 (t = 0)
    ts = sched.timesteps.double()
    if set_alpha_to_one:
        ours = ds.sample(gmm_denoiser(gmm16, schedule), x_T.clone(), "ddim", nfe=nfe, spacing=ts, final="zero")
    else:
        grid = ds.TimeGrid.from_times(schedule, torch.cat([ts, ts.new_zeros(1)]))
        ours = ds.sample(gmm_denoiser(gmm16, schedule), x_T.clone(), "ddim", grid=grid)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_ddim_eta_matches_diffusers_noise_scale(gmm16):
    """DDIM with eta = 1: our noise coefficient equals diffusers' std_dev_t at every step."""
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(10)
    schedule = DiscreteVP.from_diffusers_config(sched.config)
    grid = time_grid(schedule, 10, sched.timesteps.double(), final="zero")
    plan = ds.samplers.get("ddim", eta=1.0).build(grid)
    for i, t in enumerate(sched.timesteps):
        prev = int(t) - 1000 // 10
        want = float(sched._get_variance(t, prev)) ** 0.5
        assert plan.steps[i].noise == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("step", [0, 3, 7])
def test_tab_deis_coefficients_match_direct_quadrature(order, step):
    """C_ij = int_{t_i}^{t_i+1} sqrt(abar(t_i+1)/abar(tau)) * (-1/2 dlog abar/dtau) / sqrt(1 - abar(tau)) * l_j(tau) dtau
    (DEIS eq. 15), evaluated by scipy.quad directly in t, against our coefficients."""
    sch = LinearVP()
    grid = time_grid(sch, 10, "time_quadratic", final="last")
    solver = DEIS(order=order, basis="t", lower_order_final=False)
    k = solver.step_orders(grid)[step]
    _, ours, _ = solver.coefficients(grid, step, k)
    b0, b1 = sch.beta_0, sch.beta_1
    abar = lambda tau: np.exp(-0.5 * tau**2 * (b1 - b0) - tau * b0)  # noqa: E731
    dlog_abar = lambda tau: -(b0 + tau * (b1 - b0))  # noqa: E731
    t = grid.t.numpy()
    nodes = [t[step - j] for j in range(k)]

    def lag(j, tau):
        return np.prod([(tau - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j])

    for j in range(k):
        f = lambda tau: (np.sqrt(abar(t[step + 1]) / abar(tau)) * (-0.5 * dlog_abar(tau))  # noqa: E731
                         / np.sqrt(1 - abar(tau)) * lag(j, tau))
        want = quad(f, t[step], t[step + 1], epsabs=1e-13, epsrel=1e-12, limit=200)[0]
        assert ours[j] == pytest.approx(want, rel=1e-8, abs=1e-10)
