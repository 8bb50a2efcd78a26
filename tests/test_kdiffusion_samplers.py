"""The stochastic samplers users know from k-diffusion equal its `sample_*` functions on the same
noise levels and the same noise (float64, exact mixture, 1e-6), and keep per-sample seeds."""

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.samplers import make_plan, run_plan

from kdiffusion_ref import recording_noise, replay, run

SCHEDULES = {"edm": ds.EDM, "linear_vp": ds.LinearVP}
#: (spacing, final, nfe): k-diffusion's two calls on every step but a final one onto sigma = 0
GRIDS = [("karras", "zero", 9), ("logsnr", "last", 8)]


def _x_T(sched, n=6, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sched.prior_std


def _ours_and_ref(gmm, sched_name, solver, ref_name, spacing, final, nfe, ref_kw=None, **opts):
    sched = SCHEDULES[sched_name]()
    den = gmm_denoiser(gmm, sched, "sample")
    plan = make_plan(solver, sched, nfe, spacing, final, **opts)
    x_T = _x_T(sched)
    noise_fn, draws = recording_noise()
    ours = run_plan(plan, den, x_T.clone(), noise_fn=noise_fn)
    ref = run(ref_name, gmm, plan.grid, x_T.clone(), noise_sampler=replay(draws), **(ref_kw or opts))
    return ours, ref, plan, draws


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing,final,nfe", GRIDS)
@pytest.mark.parametrize("opts", [{}, {"eta": 0.5, "s_noise": 0.8}, {"eta": 0.0}])
def test_dpmpp_2s_ancestral_equals_kdiffusion(gmm16, sched_name, spacing, final, nfe, opts):
    ours, ref, plan, draws = _ours_and_ref(gmm16, sched_name, "dpmpp_2s_ancestral", "dpmpp_2s_ancestral",
                                           spacing, final, nfe, **opts)
    assert plan.nfe == nfe and len(draws) == (0 if opts.get("eta") == 0.0 else len(plan.steps) - (final == "zero"))
    assert float((ours - ref).abs().max()) < 1e-6


@pytest.mark.parametrize("solver,opts", [("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.7})])
def test_per_sample_seeds_independent_of_batch(gmm16, solver, opts):
    """Sample k depends only on seed k: a batch of 4 equals each sample drawn alone."""
    sched = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sched)
    seeds = [11, 12, 13, 14]
    batch = ds.sample(den, shape=(4, 16), solver=solver, nfe=7, seeds=seeds, **opts)
    for k, s in enumerate(seeds):
        alone = ds.sample(den, shape=(1, 16), solver=solver, nfe=7, seeds=[s], **opts)
        assert torch.equal(alone[0], batch[k])
    other = ds.sample(den, shape=(1, 16), solver=solver, nfe=7, seeds=[99], **opts)
    assert not torch.allclose(other[0], batch[0])  # the noise does depend on the seed
