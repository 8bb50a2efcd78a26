import pytest
import torch

from diffsampler.eval.gmm import GaussianMixture


@pytest.fixture(scope="session")
def gmm8():
    """An 8-d, 4-component mixture used by the convergence tests."""
    return GaussianMixture.random(8, 4, seed=0, scale=1.5, std=(0.3, 0.6))


@pytest.fixture(scope="session")
def gmm16():
    return GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))


@pytest.fixture(scope="session")
def K():
    """k-diffusion's sampling module (k_diffusion/sampling.py loaded on its own: tests/kdiffusion_ref.py)."""
    from kdiffusion_ref import sampling

    return sampling


@pytest.fixture(scope="session")
def gmm():
    """A 6-d, 3-component mixture of the k-diffusion comparisons (test files may define their own `gmm`)."""
    return GaussianMixture.random(6, 3, seed=3, scale=1.5, std=(0.3, 0.6))


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="session")
def search_problem():
    """The search tests' problem: an 8-d mixture on diffusers' default schedule and its exact
    PF-ODE endpoint (the metric's reference)."""
    import diffsampler as ds

    gmm = GaussianMixture.random(8, 4, seed=0, scale=1.5, std=(0.3, 0.6))
    sch = ds.DiscreteVP.linear()
    aT, sT = float(sch.alpha(sch.t_max)), float(sch.sigma(sch.t_max))

    def exact(x):
        return gmm.ode_endpoint(x.double(), aT, sT, 1.0, 0.0)

    return gmm, sch, exact


@pytest.fixture(autouse=True)
def _fresh_runner_cache():
    """Each test starts without pipelines or feature networks kept by an earlier test's run (the
    runner keeps them per process for a sweep's later jobs; a test's fake loader must not leak)."""
    import sys

    yield
    runner = sys.modules.get("diffsampler.tools.runner")
    if runner is not None:
        runner.clear_cache()
