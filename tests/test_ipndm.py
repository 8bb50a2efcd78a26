"""iPNDM (`ipndm`): the registered `pndm` (Adams-Bashforth 1-4 on eps in rho with the lower-order
warm-up, Zhang & Chen 2023, App. B) with an Euler step onto sigma = 0, as ComfyUI's k-diffusion
`sample_ipndm` (from Zhou et al.'s diff-solvers) runs it.  k-diffusion 0.1.1 has no sample_ipndm, so
the oracle below is that loop, written out in sigma (= rho) space as the reference states it."""

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.schedules import EDM, DiscreteVP

from test_parity_kdiffusion import _kdiff, _load_kdiffusion_sampling, _ours

AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm_reference(model, x, sigmas, max_order=4):
    """ComfyUI comfy/k_diffusion/sampling.py `sample_ipndm`: d = (x - D)/sigma; the step onto
    sigma = 0 is x = D; otherwise x += (sigma' - sigma) sum_j w_j d_{i-j} with AB weights of order
    min(max_order, i + 1); the buffer keeps the last max_order - 1 derivatives."""
    buf = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = model(x, s * x.new_ones(x.shape[0]))
        d = (x - den) / s
        order = min(max_order, i + 1)
        if s_next == 0:
            x = den
        else:
            ds_ = [d] + buf[::-1]
            x = x + (s_next - s) * sum(w * dj for w, dj in zip(AB[order], ds_))
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


@pytest.fixture(scope="module")
def K():
    return _load_kdiffusion_sampling()


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(6, 3, seed=3, scale=1.5, std=(0.3, 0.6))


@pytest.mark.parametrize("order", [4, 3, 2, 1])
@pytest.mark.parametrize("sched", ["edm", "vp"])
def test_ipndm_equals_comfyui_sample_ipndm_on_the_same_sigmas(K, gmm, sched, order):
    n = 9
    if sched == "edm":
        schedule = EDM(0.002, 80.0)
        sigmas = K.get_sigmas_karras(n, 0.002, 80.0, device="cpu").double()
    else:
        schedule = DiscreteVP.linear()
        r = schedule.rho(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
        sigmas = K.get_sigmas_exponential(n, float(r[1]), float(r[0]) * (1 - 1e-9), device="cpu").double()
    den = gmm_denoiser(gmm, schedule)
    x_T_v = torch.randn(5, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    want = _kdiff(K, lambda model, x, sig, disable=None, **kw: ipndm_reference(model, x, sig, **kw),
                  gmm, schedule, sigmas, x_T_v, [], max_order=order)
    got, plan = _ours("ipndm", {"order": order}, schedule, den, sigmas, x_T_v, [])
    assert plan.nfe == n and plan.orders == [min(order, i + 1) for i in range(n - 1)] + [1]
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), err
    # pndm keeps the AB-k weights on the step onto sigma = 0: a different (and here worse-defined) last step
    other, _ = _ours("pndm", {"order": order}, schedule, den, sigmas, x_T_v, [])
    if order > 1:
        assert (other - want).abs().max().item() > 1e-4


def test_ipndm_is_pndm_with_an_euler_last_step():
    a, b = ds.samplers.get("ipndm"), ds.samplers.get("pndm")
    sch = DiscreteVP.linear()
    grid = ds.time_grid(sch, 6, spacing="time_uniform", final="zero")
    pa, pb = a.build(grid), b.build(grid)
    assert pa.orders == [1, 2, 3, 4, 4, 1] and pb.orders == [1, 2, 3, 4, 4, 4]
    assert pa.steps[:-1] == pb.steps[:-1]
    assert ds.samplers.get("ipndm", first_order_to_zero=False).build(grid).steps == pb.steps


def test_ipndm_through_sample_and_options(gmm):
    den = gmm_denoiser(gmm, DiscreteVP.linear())
    x = ds.sample(den, shape=(4, gmm.dim), seeds=range(4), solver="ipndm", nfe=8, spacing="karras")
    assert torch.isfinite(x).all() and den.nfe == 8
    with pytest.raises(ValueError, match="order"):
        ds.samplers.get("ipndm", order=5)
    with pytest.raises(ValueError, match="max_order"):
        ds.samplers.get("ipndm", max_order=3)


@pytest.mark.parametrize("cls,match", [("IPNDMScheduler", "alpha = 0"), ("SASolverScheduler", "SA-Solver")])
def test_diffusers_classes_not_reproduced_are_refused_by_name(cls, match):
    import diffusers

    from diffsampler.pipelines import DiffSamplerScheduler

    with pytest.raises(ValueError, match=f"{cls} cannot be reproduced.*{match}"):
        DiffSamplerScheduler.from_config(getattr(diffusers, cls)().config)
