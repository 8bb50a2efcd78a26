"""iPNDM (`ipndm`): the registered `pndm` (Adams-Bashforth 1-4 on eps in rho with the lower-order
warm-up, Zhang & Chen 2023, App. B) with an Euler step onto sigma = 0, as ComfyUI's k-diffusion
`sample_ipndm` (from Zhou et al.'s diff-solvers) runs it.  k-diffusion 0.1.1 has no sample_ipndm, so
the oracle below is that loop, written out in sigma (= rho) space as the reference states it."""

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.schedules import EDM, DiscreteVP

from test_parity_kdiffusion import _kdiff, _ours

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


@pytest.mark.parametrize("cls,match", [("LCMScheduler", "not in the registry")])
def test_diffusers_classes_not_reproduced_are_refused_by_name(cls, match):
    import diffusers

    from diffsampler.pipelines import DiffSamplerScheduler

    with pytest.raises(ValueError, match=f"{cls} cannot be reproduced.*{match}"):
        DiffSamplerScheduler.from_config(getattr(diffusers, cls)().config)


# --------------------------------------------------------------------------------------------------
# diffusers' IPNDMScheduler: pndm on its own trigonometric schedule, from alpha = 0
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,n", [({}, 2), ({}, 5), ({}, 10), ({}, 25), (dict(num_train_timesteps=50), 7)])
def test_ipndm_scheduler_parity_by_default(kw, n):
    """from_config(IPNDMScheduler config): pndm (AB 1-4, full order onto sigma = 0) on TrigVP (alpha = cos(pi t/2),
    the network given t) at the class's float32 times, v-prediction; its first step from alpha = 0 takes the x0
    estimate as 0 (x_1 = sigma_1 eps = sigma_1 x_T).  num_train_timesteps does nothing in the class (checked:
    50 gives the same as 1000 on both sides).  Measured: max abs diff <= 2e-6 at 2-25 steps."""
    from diffusers import IPNDMScheduler

    from diffsampler.eval.gmm import GMMModel
    from diffsampler.pipelines import DiffSamplerScheduler
    from diffusers_loop import run_diffusers

    gmm = GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))
    ref_sched = IPNDMScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    assert ours_sched.config.solver == "pndm" and isinstance(ours_sched.schedule, ds.schedules.TrigVP)
    model = GMMModel(gmm, ours_sched.schedule, "v_prediction")
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    ref = run_diffusers(ref_sched, model, n, x)
    ours = run_diffusers(ours_sched, model, n, x)
    assert torch.equal(ours_sched.timesteps, ref_sched.timesteps) and ours_sched.timesteps[0] == 1.0
    assert ours_sched.init_noise_sigma == ref_sched.init_noise_sigma == 1.0
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ours.abs().max().item() > 1.0  # a real sample, not the 0 of one step


def test_ipndm_from_a_ddpm_config_ignores_its_clip_sample_and_thresholding():
    """IPNDMScheduler.from_config(a DDPM config) keeps clip_sample / thresholding in its config but never uses
    them (not its arguments): parity by default must not clip either (the digits pipeline's case: its images
    moved by 0.8 when the inherited clip_sample=True was applied)."""
    from diffusers import DDPMScheduler, IPNDMScheduler

    from diffsampler.eval.gmm import GMMModel
    from diffsampler.pipelines import DiffSamplerScheduler
    from diffusers_loop import run_diffusers

    gmm = GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))
    for inherited in (dict(clip_sample=True, clip_sample_range=0.2), dict(clip_sample=False, thresholding=True)):
        ref_sched = IPNDMScheduler.from_config(DDPMScheduler(**inherited).config)
        ours_sched = DiffSamplerScheduler.from_config(ref_sched)  # the instance names its class
        model = GMMModel(gmm, ours_sched.schedule, "v_prediction")
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        ref, ours = (run_diffusers(s, model, 5, x) for s in (ref_sched, ours_sched))
        assert ref.abs().max().item() > 1.0  # clipping x0 to 0.2 (or thresholding) would have moved it
        assert (ours - ref).abs().max().item() <= 1e-4, inherited


def test_trig_schedule_reaches_pure_noise():
    sch = ds.schedules.TrigVP()
    t = torch.tensor([1.0, 0.5, 1e-3], dtype=torch.float64)
    assert float(sch.alpha(t)[0]) == 0.0 and float(sch.sigma(t)[0]) == 1.0
    assert torch.allclose(sch.alpha(t)[1:], torch.cos(t[1:] * torch.pi / 2), rtol=1e-14)
    assert torch.allclose(sch.t_from_lambda(sch.lambda_(t)), t, rtol=1e-12)
    assert torch.equal(torch.as_tensor(ds.schedules.ipndm_times(3))[:1], torch.tensor([1.0], dtype=torch.float64))


def test_ipndm_scheduler_keys_refused_or_kept_by_name():
    from diffusers import IPNDMScheduler

    from diffsampler.pipelines import DiffSamplerScheduler

    with pytest.raises(ValueError, match="trained_betas"):
        DiffSamplerScheduler.from_config(IPNDMScheduler(trained_betas=[0.5] * 11).config)
    # a named solver keeps the class's schedule and grid; one that divides by alpha at t = 1 is refused by name
    up = DiffSamplerScheduler.from_config(IPNDMScheduler().config, solver="dpmpp_2m")
    assert isinstance(up.schedule, ds.schedules.TrigVP) and up.spacing == "ipndm"
    up.set_timesteps(5)
    assert float(up.timesteps[0]) == 1.0
    with pytest.raises(ValueError, match="'heun' cannot start at IPNDMScheduler's first time t = 1"):
        DiffSamplerScheduler.from_config(IPNDMScheduler().config, solver="heun")
