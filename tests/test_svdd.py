"""SVDD (soft value-based decoding) on the analytic Gaussian mixture, where the reward-tilted target
and the exact soft value are closed form, plus its rewards and input checks.

Statistical margins: n samples give a fraction's standard error sqrt(p (1 - p) / n); every
tolerance below is stated next to the figure it bounds (measured values in comments).
"""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.guidance import (SVDD, ClassifierLogProb, JPEGCompressibility, NegativeDistance, ValueNet,
                                  train_value_model)
from diffsampler.samplers.loop import make_plan
from diffsampler.schedules import DiscreteVP

SCHED = DiscreteVP.linear()  # diffusers' linear 1000-step DDPM schedule; ddim with eta = 1 is DDPM


@pytest.fixture(scope="module")
def tri():
    """2-d mixture of three well separated modes (weights 0.6 / 0.3 / 0.1)."""
    return GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]), [0.5, 0.5, 0.5], [0.6, 0.3, 0.1])


def _svdd(den, n, guidance, nfe=20, seeds=None, **kw):
    kw.setdefault("eta", 1.0)
    solver = kw.pop("solver", "ddim")
    if solver != "ddim":
        kw.pop("eta")
    return ds.sample(den, shape=(n, den.model.gmm.dim), seeds=range(n) if seeds is None else seeds,
                     solver=solver, nfe=nfe, guidance=guidance, **kw)


# ---------------------------------------------------------------------------------------------
# (a) reward rises with M and beats best-of-N at equal model calls
# ---------------------------------------------------------------------------------------------

def test_reward_rises_with_M_and_beats_best_of_n(gmm8):
    target = gmm8.means[int(gmm8.weights.argmin())] + 0.5  # near the lightest mode, off its mean
    r = NegativeDistance(target.float())
    n, N = 300, 20
    svdd, calls = {}, {}
    for M in (1, 2, 4, 8):
        den = gmm_denoiser(gmm8, SCHED)
        g = SVDD(r, num_candidates=M)
        svdd[M] = r(_svdd(den, n, g, nfe=N))
        calls[M] = den.nfe
        assert calls[M] == g.nfe(make_plan("ddim", SCHED, N, eta=1.0)) == 1 + (N - 1) * M
    means = [float(svdd[M].mean()) for M in (1, 2, 4, 8)]  # measured -5.8, -1.6, -0.82, -0.51 (n = 500)
    se = [float(svdd[M].std()) / math.sqrt(n) for M in (1, 2, 4, 8)]
    for k in range(3):  # each doubling of M raises the mean reward by more than 3 combined standard errors
        assert means[k + 1] - means[k] > 3 * math.hypot(se[k], se[k + 1]), (means, se)
    # best-of-K: K independent runs of the same sampler, keep the best sample; K chosen so that it
    # spends at least as many model calls as SVDD (K = 4: 80 >= 77 calls; K = 8: 160 >= 153)
    den = gmm_denoiser(gmm8, SCHED)
    runs = torch.stack([r(_svdd(den, n, None, nfe=N, seeds=range(j * n, (j + 1) * n))) for j in range(8)])
    for M, K in ((4, 4), (8, 8)):
        assert K * N >= calls[M]
        bon = runs[:K].max(0).values
        # measured best-of-4 -2.75, best-of-8 -2.02 against SVDD -0.82 / -0.51: a margin of 1.0
        assert float(svdd[M].mean()) > float(bon.mean()) + 1.0, (M, float(svdd[M].mean()), float(bon.mean()))


def test_nfe_accounting_matches_model_calls(tri):
    r = NegativeDistance(torch.tensor([2.0, 0.0]))
    for solver, opts, M, final in (("ddim", {"eta": 0.7}, 3, "zero"), ("dpmpp_2m_sde", {}, 4, "zero"),
                                   ("ddim", {"eta": 1.0}, 2, "last")):
        den = gmm_denoiser(tri, SCHED)
        g = SVDD(r, M)
        plan = make_plan(solver, SCHED, 8, final=final, **opts)
        x = ds.sample(den, solver=plan, shape=(16, 2), seeds=range(16), guidance=g)
        # onto sigma = 0 the chosen candidate's prediction is the next step's call: 1 + M (N - 1);
        # with final="last" the last step's M candidates are valued at t_min (no next call to reuse)
        want = 1 + M * 7 if final == "zero" else 1 + M * 7 + M
        assert den.nfe == g.last_nfe == g.nfe(plan) == want, (solver, final, den.nfe, want)
        assert torch.isfinite(x).all()
    # SVDD-MC: the value net costs no model calls
    den = gmm_denoiser(tri, SCHED)
    g = SVDD(r, 8, value=lambda x, t: -x.square().sum(1))
    _svdd(den, 16, g, nfe=10)
    assert den.nfe == g.nfe(make_plan("ddim", SCHED, 10, eta=1.0)) == 10


def test_rare_mode_toy_of_the_paper():
    """The 1-d toy of SVDD (Li et al. 2024): 0.9 N(-2, .3^2) + 0.1 N(2, .3^2), r = sigmoid(5x), 50 DDPM steps.
    Reference: rare-mode fraction 0.09 (M = 1), 0.97 (M = 2), 1.00 (M >= 4); alpha = 0.1, M = 8: 0.37."""
    g = GaussianMixture(torch.tensor([[-2.0], [2.0]]), [0.3, 0.3], [0.9, 0.1])
    n = 2000  # standard error of a fraction <= 0.011
    frac = {}
    for M, alpha in ((1, 0.0), (2, 0.0), (4, 0.0), (8, 0.0), (8, 0.1)):
        den = gmm_denoiser(g, SCHED)
        x = ds.sample(den, shape=(n, 1), generator=torch.Generator().manual_seed(0), solver="ddim", nfe=50,
                      eta=1.0, guidance=SVDD(lambda x: torch.sigmoid(5 * x[:, 0]), M, alpha))
        frac[(M, alpha)] = float((x[:, 0] > 0).float().mean())
    # measured: 0.096, 0.969, 1.000, 1.000, 0.376
    assert abs(frac[(1, 0.0)] - 0.1) < 0.02  # M = 1 is the pre-trained sampler: the 10% base rate (3 s.e.)
    assert frac[(2, 0.0)] > 0.94 and frac[(4, 0.0)] > 0.99 and frac[(8, 0.0)] > 0.99
    assert abs(frac[(8, 0.1)] - 0.37) < 0.05, frac  # soft selection keeps most samples in the big mode


# ---------------------------------------------------------------------------------------------
# (b) alpha > 0: the samples follow the reward-tilted target (closed form for a linear reward)
# ---------------------------------------------------------------------------------------------

def test_exact_value_approaches_tilted_mixture(tri):
    """r(x) = a.x tilts N(m_k, s_k^2 I), w_k into N(m_k + s_k^2 a / alpha, s_k^2 I) with weight
    ∝ w_k exp(a.m_k / alpha + s_k^2 |a|^2 / (2 alpha^2)); SVDD-MC with the exact soft value
    alpha log E[exp(r(x0)/alpha) | x_t] (closed form under the mixture posterior) samples it as M grows."""
    a, alpha = torch.tensor([1.0, 0.5]), 1.0
    tilted = tri.linear_tilt(a, alpha)  # weights 0.031 / 0.837 / 0.132, from 0.6 / 0.3 / 0.1

    def value(x, t):  # all candidates of a step share t
        return tri.linear_soft_value(x, SCHED.alpha(t[:1]), SCHED.sigma(t[:1]), a, alpha)

    n = 1500
    res = {}
    for M in (1, 4, 32):
        den = gmm_denoiser(tri, SCHED)
        g = SVDD(lambda x: x.double() @ a.double(), M, alpha, value=value)
        x = ds.sample(den, shape=(n, 2), generator=torch.Generator().manual_seed(0), solver="ddim", nfe=100,
                      eta=1.0, guidance=g).double()
        mode = tri.responsibilities(x, 1.0, 0.0).argmax(1)
        frac = torch.bincount(mode, minlength=3).double() / n
        tv = 0.5 * float((frac - tilted.weights).abs().sum())
        res[M] = (frac, tv, x[mode == 1].mean(0) - tilted.means[1], x.mean(0) - tilted.mean.double())
    base_tv = 0.5 * float((res[1][0] - tri.weights).abs().sum())
    assert base_tv < 0.04  # M = 1: the untilted mixture (measured 0.024; s.e. of a fraction 0.013 at n = 1500)
    # total variation of the mode fractions to the tilted weights: measured 0.59, 0.11, 0.024
    assert res[1][1] > 0.5 and res[4][1] < 0.15 and res[32][1] < 0.045, {M: v[1] for M, v in res.items()}
    # the big mode's mean moves by s^2 a / alpha = (0.25, 0.125); measured residual at M = 32: 0.058
    # (the rest is the 100-step discretisation: 0.02 with 200 steps at M = 64)
    assert float(res[32][2].abs().max()) < 0.09 and float(res[1][2].abs().max()) > 0.2
    assert float(res[32][3].norm()) < 0.2 < float(res[1][3].norm())  # overall mean: off by 0.14 (M = 32), 2.5 (M = 1)


def test_value_model_regresses_posterior_reward_and_guides(tri, tmp_path):
    """SVDD-MC: a value net trained on r(x0) from noised x_t approximates E[r(x0) | x_t] (= a.D(x_t)
    exactly for a linear reward); SVDD with it raises the reward at the solver's own NFE."""
    torch.manual_seed(0)
    a = torch.tensor([1.0, 0.5], dtype=torch.float64)
    rew = lambda x: x.double() @ a  # noqa: E731
    x0 = tri.sample(3000, generator=torch.Generator().manual_seed(1)).float()
    net = train_value_model(rew, x0, SCHED, steps=300, batch_size=256, hidden=64, depth=2,
                            path=tmp_path / "v.safetensors")
    gen = torch.Generator().manual_seed(2)
    t = torch.rand(1000, generator=gen, dtype=torch.float64) * SCHED.t_max
    al, si = SCHED.alpha(t), SCHED.sigma(t)
    xt = al[:, None] * tri.sample(1000, generator=gen) + si[:, None] * torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    exact = tri.posterior_mean(xt, al, si) @ a
    with torch.no_grad():
        pred = net(xt.float(), t).double()
    r2 = 1 - float((pred - exact).square().mean() / exact.var())
    assert r2 > 0.9, r2  # measured 0.99 after 1500 steps; the variance of r(x0) around it is irreducible
    again = ValueNet.load(tmp_path / "v.safetensors")
    with torch.no_grad():
        assert torch.equal(again(xt.float(), t), net(xt.float(), t))
    base = rew(_svdd(gmm_denoiser(tri, SCHED), 500, None)).mean()
    den = gmm_denoiser(tri, SCHED)
    guided = rew(_svdd(den, 500, SVDD(rew, 8, value=net))).mean()
    assert den.nfe == 20 and float(guided) > float(base) + 2.0, (float(base), float(guided))  # measured -0.47 -> 3.9


# ---------------------------------------------------------------------------------------------
# (c) bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input_errors(tri):
    r = NegativeDistance(torch.zeros(2))
    for M in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_candidates"):
            SVDD(r, M)
    for alpha in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            SVDD(r, 2, alpha)
    with pytest.raises(ValueError, match="value must be 'pm'"):
        SVDD(r, 2, value="mc")
    with pytest.raises(ValueError, match="reward must be callable"):
        SVDD("reward", 2)

    def run(reward, **kw):
        return _svdd(gmm_denoiser(tri, SCHED), 4, SVDD(reward, 2, **kw), nfe=5)

    with pytest.raises(ValueError, match=r"returned shape \(8, 1\) for a batch of 8; expected shape \(8,\)"):
        run(lambda x: x[:, :1])
    with pytest.raises(ValueError, match="NaN/Inf for 8 of 8"):
        run(lambda x: x[:, 0] * float("nan"))
    with pytest.raises(ValueError, match="must return a torch.Tensor of shape \\(8,\\), got ndarray"):
        run(lambda x: x[:, 0].numpy())
    with pytest.raises(ValueError, match="value model returned shape"):
        run(r, value=lambda x, t: x)
    # a deterministic solver: the error names the stochastic ones
    with pytest.raises(ValueError, match=r"no noise; use a stochastic solver: .*ddim \(eta > 0\).*dpmpp_2m_sde"):
        _svdd(gmm_denoiser(tri, SCHED), 4, SVDD(r, 2), solver="dpmpp_2m", nfe=5)
    with pytest.raises(ValueError, match=r"no noise"):
        _svdd(gmm_denoiser(tri, SCHED), 4, SVDD(r, 2), nfe=5, eta=0.0)
    with pytest.raises(ValueError, match="time_shift"):
        _svdd(gmm_denoiser(tri, SCHED), 4, SVDD(r, 2), nfe=5, time_shift={"window": 2, "cutoff": 5})


# ---------------------------------------------------------------------------------------------
# (d) reproducibility
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,alpha", [("pm", 0.0), ("pm", 0.5), ("mc", 0.3)])
def test_same_seed_same_sample_whatever_the_batch(tri, value, alpha):
    r = NegativeDistance(torch.tensor([0.0, 2.5]))
    v = "pm" if value == "pm" else (lambda x, t: -(x - torch.tensor([2.0, 0.0])).square().sum(1))

    def run(seeds):
        return _svdd(gmm_denoiser(tri, SCHED), len(seeds), SVDD(r, 4, alpha, value=v), nfe=10, seeds=seeds)

    full = run(list(range(6)))
    parts = torch.cat([run([0, 1, 2]), run([3, 4, 5])])
    assert torch.allclose(full, parts, atol=1e-6, rtol=0)
    assert torch.allclose(run([4]), full[4:5], atol=1e-6, rtol=0)
    assert not torch.allclose(full[0], full[1])  # different seeds, different samples


# ---------------------------------------------------------------------------------------------
# (e) rewards
# ---------------------------------------------------------------------------------------------

def test_jpeg_reward_orders_smooth_above_noise():
    j = JPEGCompressibility(quality=75)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = (0.8 * torch.sin(2 * xx) * torch.cos(yy)).expand(2, 3, 32, 32)
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = j(torch.cat([smooth, noise]))
    assert r.shape == (4,) and float(r[:2].max()) > float(r[2:].min()) + 0.5  # kB: ~0.7 vs ~2.6 measured
    # [0, 1] images with value_range=(0, 1) give the same bytes as the [-1, 1] images
    assert torch.equal(JPEGCompressibility(75, value_range=(0, 1))(smooth / 2 + 0.5), r[:2])
    assert JPEGCompressibility()(torch.zeros(1, 1, 8, 8)).shape == (1,)
    for bad in (0, 100, 50.0):
        with pytest.raises(ValueError, match="quality"):
            JPEGCompressibility(quality=bad)
    with pytest.raises(ValueError, match="C in \\(1, 3\\)"):
        j(torch.zeros(2, 2, 8, 8))


def test_classifier_reward_is_log_softmax_of_target():
    from diffsampler.eval.digits import digits_dataset, load_digits_classifier

    clf = load_digits_classifier()
    x, y = digits_dataset("test")
    x, y = x[:32], y[:32]
    with torch.no_grad():
        logp = torch.log_softmax(clf(x), 1)
        assert torch.allclose(ClassifierLogProb(clf, 3)(x), logp[:, 3], atol=1e-6)
        assert torch.allclose(ClassifierLogProb(clf, y)(x), logp.gather(1, y[:, None])[:, 0], atol=1e-6)
        assert float(ClassifierLogProb(clf, y)(x).mean()) > -0.5  # the true labels are likely
        with pytest.raises(ValueError, match="expects 16x16 images, got x0 of shape \\(4, 1, 8, 8\\)"):
            ClassifierLogProb(clf, 3)(torch.zeros(4, 1, 8, 8))
        with pytest.raises(ValueError, match="expects 32x32 images"):
            ClassifierLogProb(clf, 3, resolution=32)(x)
        with pytest.raises(ValueError, match="out of range for a classifier with 10 classes"):
            ClassifierLogProb(clf, 10)(x)
        with pytest.raises(ValueError, match="got 3 targets for a batch of 32"):
            ClassifierLogProb(clf, [1, 2, 3])(x)


def test_negative_distance():
    r = NegativeDistance(torch.tensor([1.0, 2.0]))
    x = torch.tensor([[1.0, 2.0], [4.0, 6.0]])
    assert torch.allclose(r(x), torch.tensor([0.0, -5.0]))
    assert torch.allclose(NegativeDistance(torch.tensor([1.0, 2.0]), squared=True)(x), torch.tensor([0.0, -25.0]))
    with pytest.raises(ValueError, match="does not broadcast"):
        r(torch.zeros(2, 3))


def test_digits_classifier_reward_raises_target_share():
    """On the packaged digits UNet: SVDD-PM with r = log p_clf(3 | x0_hat) turns samples into 3s
    (judged by the same classifier) at 1 + 9 M model calls for a 10-step ddim."""
    from diffsampler.eval.digits import load_digits_classifier, load_digits_pipeline
    from diffsampler.pipelines import denoiser_from_pipeline

    clf = load_digits_classifier()
    den = denoiser_from_pipeline(load_digits_pipeline())
    kw = dict(shape=den.sample_shape(8), seeds=range(8), solver="ddim", eta=1.0, nfe=10)
    base = ds.sample(den, **kw)
    den.reset_nfe()
    guided = ds.sample(den, guidance=SVDD(ClassifierLogProb(clf, 3), 4), **kw)
    assert den.nfe == 1 + 9 * 4
    with torch.no_grad():
        logp = [torch.log_softmax(clf(x.clamp(-1, 1)), 1) for x in (base, guided)]
    share = [float((lp.argmax(1) == 3).double().mean()) for lp in logp]
    assert share[0] <= 0.25 and share[1] >= 0.75, share  # measured 1/8 -> 7/8 (base: the data's ~10% rate)
    assert float(logp[1][:, 3].mean()) > float(logp[0][:, 3].mean()) + 3.0  # mean log p(3) up by > 3 nats


def test_exact_tilt_and_soft_value_against_quadrature():
    """The closed forms used above, checked by quadrature on a 1-d mixture: the tilted density
    p(x0) exp(a x0 / T) / Z, and exp(v(x_t)/T) = ∫ p(x0 | x_t) exp(a x0 / T) dx0."""
    g = GaussianMixture(torch.tensor([[-1.5], [1.0], [3.0]]), [0.4, 0.7, 0.3], [0.5, 0.3, 0.2])
    a, T = torch.tensor([0.8]), 0.7
    x0 = torch.linspace(-12, 14, 40001, dtype=torch.float64)[:, None]
    dx = float(x0[1, 0] - x0[0, 0])
    logp = g.log_prob(x0) + a.double() * x0[:, 0] / T
    tilted = torch.exp(logp - torch.logsumexp(logp, 0) - math.log(dx))
    assert torch.allclose(g.linear_tilt(a, T).log_prob(x0).exp(), tilted, atol=1e-9)
    for al, si in ((0.9, 0.3), (0.5, 0.8), (0.05, 1.0)):
        xt = torch.tensor([[-2.0], [0.3], [2.5]], dtype=torch.float64)
        lik = -0.5 * ((xt[:, 0][:, None] - al * x0[:, 0][None]) / si) ** 2  # log N(x_t; alpha x0, sigma^2) + c
        post = g.log_prob(x0)[None] + lik
        want = T * (torch.logsumexp(post + a.double() * x0[:, 0] / T, 1) - torch.logsumexp(post, 1))
        assert torch.allclose(g.linear_soft_value(xt, al, si, a, T), want, atol=1e-8)
    # T -> infinity: the posterior-mean reward a.E[x0 | x_t] (what SVDD-PM values with)
    xt = torch.tensor([[0.3]], dtype=torch.float64)
    assert torch.allclose(g.linear_soft_value(xt, 0.5, 0.8, a, 1e4), g.posterior_mean(xt, 0.5, 0.8)[:, 0] * 0.8, atol=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        g.linear_tilt(a, 0.0)
    with pytest.raises(ValueError, match="1 elements"):
        g.linear_tilt(torch.ones(2), 1.0)
