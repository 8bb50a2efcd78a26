"""Restart sampling (Xu et al. 2023) has no reference implementation to compare with: its stated
properties, exactly, on Gaussian data (the output law is Gaussian, `_exact_moments`)."""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.samplers import make_plan

from test_convergence import _exact_moments

MU, S = 0.5, 0.5


@pytest.fixture(scope="module")
def gauss():
    g = GaussianMixture(torch.tensor([[MU]], dtype=torch.float64), torch.tensor([S], dtype=torch.float64))
    sch = ds.LinearVP()
    return sch, gmm_denoiser(g, sch, "epsilon")


def weak_error(plan, den):
    """|mean error| + |std error| of the output against the data N(MU, S^2) (final sigma = 0)."""
    m, v = _exact_moments(plan, den)
    return abs(m - MU) + abs(math.sqrt(v) - S)


@pytest.mark.parametrize("sched", [ds.EDM(), ds.DiscreteVP.linear()])
def test_no_restarts_is_heun(gmm16, sched):
    den = gmm_denoiser(gmm16, sched)
    for opts in ({"intervals": []}, {"intervals": [[0.1, 2.0, 0, 3]]}):
        a = ds.sample(den, shape=(4, 16), solver="restart", nfe=13, spacing="karras", seeds=range(4), **opts)
        b = ds.sample(den, shape=(4, 16), solver="heun", nfe=13, spacing="karras", seeds=range(4))
        assert torch.equal(a, b)


@pytest.mark.parametrize("sched", [ds.EDM(), ds.LinearVP()])
def test_restart_noise_gives_the_exact_marginal_at_t_max(sched):
    """The forward jump from t_min to t_max is the forward process: a state with the exact marginal at
    t_min (Gaussian data N(mu, s^2): mean alpha mu, variance alpha^2 s^2 + sigma^2) gets the exact
    marginal at t_max."""
    plan = make_plan("restart", sched, 29, "karras", intervals=[[0.1, 2.0, 2, 3]])
    (lo, hi, k, n), = plan.info["restart"]
    jumps = [(i, st) for i, st in enumerate(plan.steps) if st.draws]
    assert len(jumps) == k == 2 and plan.nfe == 29
    for i, st in jumps:
        ev = st.evals[0]  # its input: (alpha_hi / alpha_lo) x + alpha_hi c z
        assert st.draws == ((lo, hi),) and abs(ev.sigma / ev.alpha - hi) < 1e-9 * hi
        t_lo = float(sched.t_from_lambda(-math.log(lo)))
        a_lo, s_lo = float(sched.alpha(t_lo)), float(sched.sigma(t_lo))
        (_, c), = ev.x.noise
        mean = ev.x.cx * a_lo * MU
        var = ev.x.cx**2 * (a_lo**2 * S**2 + s_lo**2) + c**2
        assert abs(mean - ev.alpha * MU) < 1e-12
        assert abs(var - (ev.alpha**2 * S**2 + ev.sigma**2)) < 1e-9 * var


def test_restart_contracts_the_accumulated_error(gauss):
    """The paper's point: re-noising to t_max contracts the error accumulated before t_min; with an
    accurate restart ODE the output is closer in law than the Heun ODE on the same grid (measured on
    the exact Gaussian: 1.4e-3 vs 2.3e-2 with 32 inner steps)."""
    sch, den = gauss
    heun = weak_error(make_plan("heun", sch, 41, "karras"), den)
    restart = weak_error(make_plan("restart", sch, 41 + 2 * 32, "karras", intervals=[[0.1, 2.0, 1, 32]]), den)
    assert restart < 0.25 * heun, (restart, heun)


@pytest.mark.parametrize("opts", [{}, {"intervals": [[0.1, 2.0, 2, 2]], "s_noise": 1.003}])
def test_per_sample_seeds_independent_of_batch(gmm16, opts):
    den = gmm_denoiser(gmm16, ds.DiscreteVP.linear())
    seeds = [3, 4, 5]
    batch = ds.sample(den, shape=(3, 16), solver="restart", nfe=21, spacing="karras", seeds=seeds, **opts)
    for k, s in enumerate(seeds):
        alone = ds.sample(den, shape=(1, 16), solver="restart", nfe=21, spacing="karras", seeds=[s], **opts)
        assert torch.equal(alone[0], batch[k])


def test_options_refused_by_name():
    sch = ds.EDM()
    with pytest.raises(ValueError, match="t_min < t_max"):
        make_plan("restart", sch, 21, intervals=[[2.0, 0.1, 1, 2]])
    with pytest.raises(ValueError, match="K must be an integer"):
        make_plan("restart", sch, 21, intervals=[[0.1, 2.0, 1.5, 2]])
    with pytest.raises(ValueError, match="leaves no model call"):
        make_plan("restart", sch, 9, intervals=[[0.1, 2.0, 2, 4]])
    with pytest.raises(ValueError, match="above the schedule"):
        make_plan("restart", ds.DiscreteVP.linear(), 21, intervals=[[0.1, 500.0, 1, 2]])
