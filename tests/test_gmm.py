"""Tests for the exact Gaussian-mixture evaluation model (diffsampler.eval.gmm)."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffsampler.eval.gmm import GaussianMixture

F64 = torch.float64


@pytest.fixture
def gmm1d():
    return GaussianMixture(
        torch.tensor([[-2.0], [0.5], [3.0]], dtype=F64),
        torch.tensor([0.3, 0.7, 0.5], dtype=F64),
        torch.tensor([0.2, 0.5, 0.3], dtype=F64),
    )


@pytest.fixture
def gmm2d():
    return GaussianMixture.random(2, 4, seed=3, scale=2.0, std=(0.2, 0.6), n_classes=2)


# --------------------------------------------------------------------------- #
# construction / validation
# --------------------------------------------------------------------------- #
def test_construction_and_properties(gmm2d):
    assert gmm2d.dim == 2 and gmm2d.n_components == 4
    assert torch.isclose(gmm2d.weights.sum(), torch.tensor(1.0, dtype=F64))
    g_same = GaussianMixture.random(2, 4, seed=3, scale=2.0, std=(0.2, 0.6), n_classes=2)
    assert torch.equal(g_same.means, gmm2d.means) and torch.equal(g_same.stds, gmm2d.stds)
    assert not torch.equal(GaussianMixture.random(2, 4, seed=4).means, gmm2d.means)
    # scalar std and default (uniform) weights
    g = GaussianMixture(torch.zeros(3, 5), 0.5)
    assert torch.allclose(g.stds, torch.full((3,), 0.5, dtype=F64))
    assert torch.allclose(g.weights, torch.full((3,), 1 / 3, dtype=F64))
    assert g.dtype == torch.float32 and g.mean.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=torch.zeros(3), stds=1.0), "means"),
        (dict(means=torch.zeros(2, 2), stds=-1.0), "stds"),
        (dict(means=torch.zeros(2, 2), stds=torch.tensor([1.0, 0.0])), "stds"),
        (dict(means=torch.zeros(2, 2), stds=torch.ones(3)), "stds"),
        (dict(means=torch.zeros(2, 2), stds=1.0, weights=torch.ones(3)), "weights"),
        (dict(means=torch.zeros(2, 2), stds=1.0, weights=torch.tensor([1.0, -1.0])), "weights"),
        (dict(means=torch.zeros(2, 2), stds=1.0, weights=torch.zeros(2)), "weights"),
        (dict(means=torch.tensor([[float("nan"), 0.0]]), stds=1.0), "means"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_call_errors(gmm2d):
    x = torch.zeros(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="prod"):
        gmm2d.posterior_mean(torch.zeros(5, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gmm2d.posterior_mean(x, 1.0, -0.1)
    with pytest.raises(ValueError, match="alpha"):
        gmm2d.posterior_mean(x, float("nan"), 1.0)
    with pytest.raises(ValueError, match="both be 0"):
        gmm2d.posterior_mean(x, 0.0, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        gmm2d.posterior_mean(x, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="monotone"):
        gmm2d.ode_trajectory(x, [1.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="rho"):
        gmm2d.ode_solution(x, -1.0, 0.0)
    with pytest.raises(ValueError, match="alpha_to"):
        gmm2d.ode_endpoint(x, 1.0, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="component indices"):
        gmm2d.component_subset([0, 7])
    with pytest.raises(ValueError, match="label"):
        gmm2d.class_conditional(5)


# --------------------------------------------------------------------------- #
# clean distribution
# --------------------------------------------------------------------------- #
def test_sample_statistics():
    g = GaussianMixture.random(3, 5, seed=0, scale=1.5)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x, labels = g.sample(n, generator=gen, return_labels=True)
    assert x.shape == (n, 3) and labels.shape == (n,)
    cov = g.covariance
    assert torch.allclose(cov, cov.T)
    se = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - g.mean).abs() < 5 * se).all()
    emp_cov = torch.cov(x.T)
    assert torch.allclose(emp_cov, cov, atol=6 * math.sqrt(2 / n) * float(torch.diagonal(cov).max()))
    freq = torch.bincount(labels, minlength=5).to(F64) / n
    assert torch.allclose(freq, g.weights, atol=5e-3)
    # reproducibility
    x2 = g.sample(10, generator=torch.Generator().manual_seed(1))
    x3 = g.sample(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x2, x3)


def test_log_prob_integrates_to_one(gmm1d):
    f = lambda t: math.exp(gmm1d.log_prob(torch.tensor([t], dtype=F64)).item())
    total, _ = quad(f, -np.inf, np.inf, limit=200)
    assert abs(total - 1.0) < 1e-8
    # marginal of x_t also normalised
    fm = lambda t: math.exp(gmm1d.marginal_log_prob(torch.tensor([t], dtype=F64), 0.8, 0.6).item())
    total_m, _ = quad(fm, -np.inf, np.inf, limit=200)
    assert abs(total_m - 1.0) < 1e-8


def test_component_log_prob(gmm2d):
    x = gmm2d.sample(7, generator=torch.Generator().manual_seed(0))
    comp = gmm2d.component_log_prob(x)
    assert comp.shape == (7, 4)
    mvn = torch.distributions.MultivariateNormal(
        gmm2d.means[1], covariance_matrix=gmm2d.stds[1] ** 2 * torch.eye(2, dtype=F64)
    )
    assert torch.allclose(comp[:, 1], mvn.log_prob(x), atol=1e-12)
    lp = torch.logsumexp(comp + torch.log(gmm2d.weights), dim=1)
    assert torch.allclose(gmm2d.log_prob(x), lp, atol=1e-12)


# --------------------------------------------------------------------------- #
# posterior quantities
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("alpha, sigma", [(1.0, 0.5), (0.6, 0.8), (0.3, 2.0)])
def test_posterior_mean_matches_quadrature_1d(gmm1d, alpha, sigma):
    """E[x0|x] = int x0 p(x0) N(x; alpha x0, sigma^2) dx0 / int p(x0) N(...) dx0."""

    def integrand(x0, x, power):
        px0 = math.exp(gmm1d.log_prob(torch.tensor([x0], dtype=F64)).item())
        lik = math.exp(-0.5 * ((x - alpha * x0) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return x0**power * px0 * lik

    xs = torch.tensor([-2.5, -0.3, 0.4, 1.7, 3.1], dtype=F64)
    d = gmm1d.posterior_mean(xs[:, None], alpha, sigma)[:, 0]
    logp = gmm1d.marginal_log_prob(xs[:, None], alpha, sigma)
    pts = [-2.0, 0.5, 3.0]
    for i, x in enumerate(xs.tolist()):
        num, _ = quad(integrand, -15, 15, args=(x, 1), points=pts, limit=200, epsabs=1e-13)
        den, _ = quad(integrand, -15, 15, args=(x, 0), points=pts, limit=200, epsabs=1e-13)
        assert abs(d[i].item() - num / den) < 1e-7
        assert abs(math.exp(logp[i].item()) - den) < 1e-9


def test_posterior_mean_limits(gmm2d):
    x = gmm2d.sample(20, generator=torch.Generator().manual_seed(0)) * 1.3
    # sigma = 0: x_t = alpha x0 exactly
    assert torch.allclose(gmm2d.posterior_mean(x, 1.0, 0.0), x, atol=1e-12)
    assert torch.allclose(gmm2d.posterior_mean(x, 0.5, 0.0), x / 0.5, atol=1e-12)
    # alpha = 0 and huge sigma: the mixture mean
    m = gmm2d.mean.expand(20, 2)
    assert torch.allclose(gmm2d.posterior_mean(x, 0.0, 1.0), m, atol=1e-12)
    out = gmm2d.posterior_mean(x * 1e6, 1.0, 1e8)
    assert torch.isfinite(out).all() and torch.allclose(out, m, atol=1e-3)
    out = gmm2d.posterior_mean(x, 1e-12, 1.0)
    assert torch.isfinite(out).all() and torch.allclose(out, m, atol=1e-8)
    # tiny sigma, far from all means: still finite
    assert torch.isfinite(gmm2d.posterior_mean(x + 50.0, 1.0, 1e-6)).all()


def test_posterior_mean_shapes_dtypes_and_per_sample(gmm2d):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    alphas = torch.linspace(0.2, 1.0, 6, dtype=F64)
    sigmas = torch.linspace(1.5, 0.1, 6, dtype=F64)
    batched = gmm2d.posterior_mean(x, alphas, sigmas)
    for i in range(6):
        single = gmm2d.posterior_mean(x[i : i + 1], alphas[i].item(), sigmas[i].item())
        assert torch.allclose(batched[i], single[0], atol=1e-14)
    # (n, 1) shaped schedule tensors are accepted too
    assert torch.allclose(gmm2d.posterior_mean(x, alphas[:, None], sigmas[:, None]), batched)
    # float32 in -> float32 out
    out32 = gmm2d.posterior_mean(x.float(), 0.7, 0.7)
    assert out32.dtype == torch.float32
    # image-like input: (n, 1, 4, 4) with d = 16
    g16 = GaussianMixture.random(16, 3, seed=1)
    img = torch.randn(5, 1, 4, 4, generator=gen)
    d_img = g16.posterior_mean(img, 0.9, 0.4)
    assert d_img.shape == img.shape and d_img.dtype == img.dtype
    assert torch.allclose(d_img.reshape(5, 16), g16.posterior_mean(img.reshape(5, 16), 0.9, 0.4))
    assert g16.noise_pred(img, 0.9, 0.4).shape == img.shape


def test_noise_pred_and_score(gmm2d):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, generator=gen, dtype=F64) * 2
    alpha, sigma = 0.8, 0.6
    d = gmm2d.posterior_mean(x, alpha, sigma)
    eps = gmm2d.noise_pred(x, alpha, sigma)
    assert torch.allclose(eps, (x - alpha * d) / sigma, atol=1e-12)
    score = gmm2d.score(x, alpha, sigma)
    assert torch.allclose(score, -eps / sigma, atol=1e-12)
    # score equals the autograd gradient of the marginal log density
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm2d.marginal_log_prob(xr, alpha, sigma).sum(), xr)
    assert torch.allclose(score, grad, atol=1e-10)
    # finite at sigma = 0
    assert torch.isfinite(gmm2d.score(x, 1.0, 0.0)).all()
    assert torch.equal(gmm2d.noise_pred(x, 1.0, 0.0), torch.zeros_like(x))
    # data model callable
    f = gmm2d.as_data_model()
    assert torch.equal(f(x, alpha, sigma), d)


def test_conditional_and_guidance(gmm2d):
    cond = gmm2d.class_conditional(1)
    assert cond.n_components == 2
    assert torch.allclose(cond.means, gmm2d.means[[1, 3]])
    assert torch.isclose(cond.weights.sum(), torch.tensor(1.0, dtype=F64))
    assert torch.allclose(cond.weights, gmm2d.weights[[1, 3]] / gmm2d.weights[[1, 3]].sum())
    mask = torch.tensor([False, True, False, True])
    assert torch.equal(gmm2d.component_subset(mask).means, cond.means)
    assert torch.equal(gmm2d.conditional([1, 3]).means, cond.means)
    assert torch.equal(gmm2d.conditional(1).means, cond.means)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    d_u = gmm2d.posterior_mean(x, 0.7, 0.7)
    d_c = cond.posterior_mean(x, 0.7, 0.7)
    assert torch.allclose(gmm2d.guided_posterior_mean(x, 0.7, 0.7, cond, 0.0), d_u)
    assert torch.allclose(gmm2d.guided_posterior_mean(x, 0.7, 0.7, cond, 1.0), d_c)
    assert torch.allclose(gmm2d.guided_posterior_mean(x, 0.7, 0.7, 1, 3.0), d_u + 3.0 * (d_c - d_u))


# --------------------------------------------------------------------------- #
# exact probability-flow ODE
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("rho_from", [80.0, 1e3])
def test_ode_single_gaussian_closed_form(rho_from):
    """K = 1: v(rho) = mu + sqrt((s^2 + rho^2) / (s^2 + rho_from^2)) (v_from - mu)."""
    d, s = 8, 0.4
    mu = torch.linspace(-1.0, 2.0, d, dtype=F64)
    g = GaussianMixture(mu[None], s)
    gen = torch.Generator().manual_seed(0)
    v = mu + rho_from * torch.randn(200, d, generator=gen, dtype=F64)
    rhos = [rho_from, 5.0, 0.3, 0.0]
    traj = g.ode_trajectory(v, rhos)
    assert traj.shape == (4, 200, d)
    for j, rho in enumerate(rhos):
        exact = mu + math.sqrt((s**2 + rho**2) / (s**2 + rho_from**2)) * (v - mu)
        assert (traj[j] - exact).abs().max().item() < 1e-8
    assert torch.allclose(g.ode_solution(v, rho_from, 0.0), traj[-1], atol=1e-9)


def test_ode_pushes_marginal_to_data():
    g = GaussianMixture.random(2, 3, seed=5, scale=2.0, std=(0.3, 0.6))
    gen = torch.Generator().manual_seed(11)
    n, rho = 2000, 80.0
    v = g.sample(n, generator=gen) + rho * torch.randn(n, 2, generator=gen, dtype=F64)
    x0 = g.ode_solution(v, rho, 0.0)
    cov = g.covariance
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x0.mean(0) - g.mean).abs() < 4 * se_mean).all()
    assert torch.allclose(torch.cov(x0.T), cov, atol=0.15 * float(torch.diagonal(cov).max()))
    # the generated samples sit on the mixture: their mean log-likelihood matches true samples'
    ref = g.log_prob(g.sample(20000, generator=gen)).mean()
    assert abs(g.log_prob(x0).mean().item() - ref.item()) < 0.15


def test_ode_round_trip_and_endpoint():
    g = GaussianMixture.random(4, 5, seed=2, scale=1.5, std=(0.2, 0.5))
    gen = torch.Generator().manual_seed(3)
    x0 = g.sample(300, generator=gen)
    vT = g.ode_solution(x0, 0.0, 40.0)
    back = g.ode_solution(vT, 40.0, 0.0)
    assert (back - x0).abs().max().item() < 1e-7
    v1 = g.ode_solution(vT, 40.0, 0.7)
    assert (g.ode_solution(v1, 0.7, 40.0) - vT).abs().max().item() < 1e-7
    # schedule independence: VP (alpha, sigma) endpoints are alpha * v
    t0, t1 = 1.5, 0.4
    a0, s0, a1, s1 = math.cos(t0), math.sin(t0), math.cos(t1), math.sin(t1)
    x_from = a0 * (x0[:50] + (s0 / a0) * torch.randn(50, 4, generator=gen, dtype=F64))
    x_to = g.ode_endpoint(x_from, a0, s0, a1, s1)
    expected = a1 * g.ode_solution(x_from / a0, s0 / a0, s1 / a1)
    assert torch.allclose(x_to, expected, atol=1e-12)
    # float32 in -> float32 out, image-like shapes
    out = g.ode_solution(vT[:10].float().reshape(10, 2, 2), 40.0, 0.0)
    assert out.dtype == torch.float32 and out.shape == (10, 2, 2)
    assert torch.allclose(out.reshape(10, 4).double(), back[:10], atol=1e-4)
