"""The diffusers conventions pipelines rely on, checked against diffusers' own schedulers of the same
config: attributes (`sigmas`, `alphas_cumprod`, `alphas`, `betas`, `timesteps` dtype), `get_velocity`,
`scale_noise`, `previous_timestep` and a range-checked `add_noise`."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffsampler.pipelines import DiffSamplerScheduler

VP_CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("spacing", ["trailing"])
def test_sigmas_and_timesteps_match_euler(spacing):
    ref = EulerDiscreteScheduler(**VP_CFG, timestep_spacing=spacing)
    ref.set_timesteps(10)
    ours = DiffSamplerScheduler.from_config(ref.config, solver="euler")
    ours.set_timesteps(10)
    assert torch.equal(ours.timesteps.float(), ref.timesteps)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == ref.sigmas.shape
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
    assert ours.sigmas[-1].item() == 0.0


def test_timesteps_int64_as_ddpm_ddim():
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(**VP_CFG, timestep_spacing="trailing")
        ref.set_timesteps(10)
        ours = DiffSamplerScheduler.from_config(ref.config, solver="ddim")
        ours.set_timesteps(10)
        assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, ref.timesteps)


def test_timesteps_float_where_times_are_not_integers():
    ours = DiffSamplerScheduler(solver="euler", spacing="time_uniform")
    ours.set_timesteps(7)
    assert ours.timesteps.dtype == torch.float32


def test_flow_sigmas_timesteps_match_flowmatch_euler():
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0)
    grid = [0.99 - 0.11 * i for i in range(8)]  # a pipeline's own `sigmas=` list
    ref.set_timesteps(sigmas=grid)
    ours = DiffSamplerScheduler.from_config(ref.config, solver="euler", schedule_type="flow")
    ours.set_timesteps(sigmas=grid)
    assert ours.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-3)
    for name in ("alphas_cumprod", "alphas", "betas"):
        with pytest.raises(AttributeError, match=f"{name} exists for discrete VP schedules only"):
            getattr(ours, name)
        assert not hasattr(ours, name)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = ref.timesteps[3]
    torch.testing.assert_close(ours.scale_noise(x0, t.expand(2), eps),
                               ref.scale_noise(x0, t.expand(2), eps), rtol=0, atol=1e-6)


def test_sigmas_before_set_timesteps_is_an_attribute_error_with_reason():
    with pytest.raises(AttributeError, match="set_timesteps"):
        DiffSamplerScheduler().sigmas


@pytest.mark.parametrize("cfg", [VP_CFG, dict(beta_schedule="squaredcos_cap_v2"),
                                 dict(beta_schedule="linear", rescale_betas_zero_snr=True)])
def test_betas_alphas_alphas_cumprod_equal_ddpm(cfg):
    ref = DDPMScheduler(**cfg)
    ours = DiffSamplerScheduler.from_config(ref.config, solver="ddim")
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == getattr(ref, name).dtype
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_get_velocity_and_add_noise_equal_ddpm():
    ref = DDPMScheduler(**VP_CFG)
    ours = DiffSamplerScheduler.from_config(ref.config, solver="ddim")  # DDPM's ancestral method is not mapped
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=2e-6)
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=2e-6)


@pytest.mark.parametrize("bad", [1000, -1, 1500.0, float("nan")])
def test_add_noise_refuses_out_of_range(bad):
    ours = DiffSamplerScheduler()
    x = torch.zeros(1, 2)
    for fn in (lambda: ours.add_noise(x, x, torch.tensor([bad])), lambda: ours.get_velocity(x, x, torch.tensor([bad]))):
        with pytest.raises(ValueError, match=r"outside the schedule's range \[0.0, 999.0\]"):
            fn()


def test_add_noise_accepts_float32_rounding_of_the_ends():
    ours = DiffSamplerScheduler()
    x0, eps = torch.ones(2, 1), torch.ones(2, 1)
    out = ours.add_noise(x0, eps, torch.tensor([999.0000072, -0.0002], dtype=torch.float64))
    ref = ours.add_noise(x0, eps, torch.tensor([999.0, 0.0]))
    assert torch.equal(out, ref)


def test_previous_timestep_matches_ddpm():
    ref = DDPMScheduler(**VP_CFG, timestep_spacing="trailing")
    ref.set_timesteps(10)
    ours = DiffSamplerScheduler.from_config(ref.config, solver="ddim")
    ours.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps)
    for t in ref.timesteps:
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t))
    assert int(ours.previous_timestep(ours.timesteps[-1])) == -1
    with pytest.raises(ValueError, match="not in this schedule's timesteps"):
        ours.previous_timestep(5)


def test_step_index_and_begin_index():
    ours = DiffSamplerScheduler(solver="dpmpp_2m")
    ours.set_timesteps(5)
    assert ours.step_index is None and ours.begin_index is None
    x = torch.randn(1, 2)
    ours.step(torch.zeros_like(x), ours.timesteps[0], x)
    assert ours.step_index == 1
    ours.set_timesteps(5)
    ours.set_begin_index(2)
    assert ours.begin_index == 2


# --------------------------------------------------------------------------------------------
# strict arguments
# --------------------------------------------------------------------------------------------

def test_step_refuses_a_timestep_other_than_the_next_call():
    sched = DiffSamplerScheduler(solver="dpmpp_2m")
    sched.set_timesteps(5)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match=rf"timestep 500.0, but the next model call is at timestep {float(sched.timesteps[0])}"):
        sched.step(torch.zeros_like(x), 500, x)
    x = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample  # the right one is taken
    with pytest.raises(ValueError, match=r"timesteps\[1\]"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    sched.step(torch.zeros_like(x), sched.timesteps[1].expand(1), x)  # a per-sample tensor of it is fine


def test_step_refuses_unknown_keywords_and_clipped_output_it_cannot_honour():
    sched = DiffSamplerScheduler(solver="ddim", clip_sample=True)
    sched.set_timesteps(3)
    x = torch.randn(1, 2)
    with pytest.raises(TypeError, match="s_chrun"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, s_chrun=1.0)
    with pytest.raises(ValueError, match="s_churn=1.0"):  # diffusers' Euler churn argument: refused above 0
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, s_churn=1.0)
    with pytest.raises(ValueError, match="use_clipped_model_output=False"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, use_clipped_model_output=False)
    sched.step(torch.zeros_like(x), sched.timesteps[0], x, use_clipped_model_output=True, eta=0.0)


def test_variance_noise_is_the_step_noise():
    """Stochastic DDIM (eta=1) fed variance_noise at every noisy step equals the engine run with those
    draws as its noise."""
    from diffsampler.denoisers import Denoiser
    from diffsampler.samplers.plan import run_plan

    sched = DiffSamplerScheduler(solver="ddim", solver_options={"eta": 1.0})
    sched.set_timesteps(4)
    noisy = [st.noise != 0.0 for st in sched.plan.steps]
    assert sum(noisy) >= 2
    zs = [torch.randn(2, 3, generator=torch.Generator().manual_seed(10 + k)) for k in range(4)]
    x = torch.ones(2, 3)
    for k, t in enumerate(sched.timesteps):
        kw = {"variance_noise": zs[k]} if noisy[k] else {}
        x = sched.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(0), **kw).prev_sample
    it = iter([z for z, n in zip(zs, noisy) if n])
    den = Denoiser(lambda y, t: 0.1 * y, sched.schedule, "epsilon")
    ref = run_plan(sched.plan, den, torch.ones(2, 3), noise_fn=lambda _: next(it))
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_variance_noise_refused_where_no_noise_is_added():
    sched = DiffSamplerScheduler(solver="dpmpp_2m")
    sched.set_timesteps(3)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="variance_noise cannot take effect"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, variance_noise=torch.zeros_like(x))


def test_top_level_solver_options_are_applied_and_typos_refused(tmp_path):
    cfg = DDIMScheduler(**VP_CFG).config
    s = DiffSamplerScheduler.from_config(cfg, solver="ghvb", order=1.5)
    assert s.config.solver_options == {"order": 1.5} and "order" not in s.config
    assert s.solver.beta == DiffSamplerScheduler(solver="ghvb", solver_options={"order": 1.5}).solver.beta
    s.save_pretrained(tmp_path)
    assert DiffSamplerScheduler.from_pretrained(tmp_path).config.solver_options == {"order": 1.5}
    assert DiffSamplerScheduler.from_config(cfg, solver="ddim", eta=1.0).solver.eta == 1.0
    assert DiffSamplerScheduler(solver="dpmpp_2m", momentum=0.8).config.solver_options == {"momentum": 0.8}
    with pytest.raises(TypeError, match=r"\['spacng'\].*did you mean 'spacing'"):
        DiffSamplerScheduler.from_config(cfg, spacng="karras")
    with pytest.raises(TypeError, match="bogus"):
        DiffSamplerScheduler(bogus=1)
    with pytest.raises(ValueError, match="both at top level and in solver_options"):
        DiffSamplerScheduler(solver="ddim", eta=1.0, solver_options={"eta": 0.5})


@pytest.mark.parametrize("cls_name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                      "EulerDiscreteScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                                      "FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_diffusers_configs_keep_loading(cls_name):
    import diffusers

    cfg = getattr(diffusers, cls_name)().config
    sched = DiffSamplerScheduler.from_config(cfg, solver="dpmpp_2m")
    sched.set_timesteps(4)


def test_deprecated_kwargs_convention():
    """diffusers' common scheduler test: a class with **kwargs declares _deprecated_kwargs."""
    import inspect

    assert "kwargs" in inspect.signature(DiffSamplerScheduler.__init__).parameters
    assert len(DiffSamplerScheduler._deprecated_kwargs) > 0


# --------------------------------------------------------------------------------------------
# every plan is drivable: an analytic first step moves x_T before the first model call
# --------------------------------------------------------------------------------------------

ANALYTIC_PLAN = """format: diffsampler.solver_plan/1
name: analytic_first
coordinate: logsnr
final: last
nfe: 4
times: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
steps:
- {prediction: data, order: 1, estimator: multistep, analytic: true}
- {prediction: data, order: 2, estimator: multistep}
- {prediction: data, order: 2, estimator: multistep}
- {prediction: data, order: 2, estimator: multistep}
- {prediction: data, order: 1, estimator: multistep}
"""


def test_analytic_first_step_plan_equals_sample(gmm16, tmp_path):
    import diffsampler as ds
    from diffsampler.eval.gmm import GMMModel, gmm_denoiser

    path = tmp_path / "analytic_first.yaml"
    path.write_text(ANALYTIC_PLAN)
    sched = DiffSamplerScheduler(solver=f"plan:{path}")
    sched.set_timesteps(4)
    assert sched.moves_x_T and len(sched.timesteps) == 4 and not sched.plan.steps[0].evals
    model = GMMModel(gmm16, sched.schedule)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    y = x * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([y, y]), t)[:8]  # a CFG-doubled batch moves alike
        y = sched.step(model(inp, t).sample, t, y).prev_sample
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule), x.clone(), solver=f"plan:{path}", nfe=4)
    assert (y - ref).abs().max().item() <= 1e-5
    # a pipeline that evaluates the model at x_T without scale_model_input is refused, not misled
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="first model call is not at x_T.*scale_model_input"):
        sched.step(model(x, sched.timesteps[0]).sample, sched.timesteps[0], x)


# --------------------------------------------------------------------------------------------
# explicit grids: diffusers' own float32 lists are accepted
# --------------------------------------------------------------------------------------------

def _karras(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's get_sigmas_karras (float64 ramp, trailing 0)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def test_karras_sigmas_from_the_schedule_float32_ends():
    ours = DiffSamplerScheduler.from_config(EulerDiscreteScheduler(**VP_CFG).config, solver="euler")
    acp = ours.alphas_cumprod  # float32, as pipelines read it
    s = ((1 - acp) / acp) ** 0.5
    sigmas = _karras(10, float(s[0]), float(s[-1]))
    ours.set_timesteps(sigmas=sigmas)
    assert len(ours.timesteps) == 10
    assert abs(float(ours.timesteps[0]) - 999) < 1e-3 and abs(float(ours.timesteps[-1])) < 1e-3
    torch.testing.assert_close(ours.sigmas.double(), sigmas, rtol=1e-5, atol=0)


def test_euler_karras_sigmas_and_timesteps_are_accepted():
    ref = EulerDiscreteScheduler(**VP_CFG, use_karras_sigmas=True)
    ref.set_timesteps(12)
    ours = DiffSamplerScheduler.from_config(ref.config, solver="euler")
    ours.set_timesteps(sigmas=ref.sigmas)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.timesteps.float(), ref.timesteps, rtol=0, atol=2e-3)
    ours.set_timesteps(timesteps=ref.timesteps)  # its float32 timesteps, as a pipeline's `timesteps=`
    torch.testing.assert_close(ours.timesteps.float(), ref.timesteps, rtol=0, atol=1e-4)


def test_explicit_grids_beyond_round_off_are_refused():
    ours = DiffSamplerScheduler(solver="euler")
    with pytest.raises(ValueError, match=r"timesteps\[0\] = 999.5 is outside the schedule's range \[0.0, 999.0\]"):
        ours.set_timesteps(timesteps=[999.5, 500.0, 10.0])
    with pytest.raises(ValueError, match=r"sigmas\[0\] = 1000.0 is outside the schedule's range sigma in"):
        ours.set_timesteps(sigmas=[1000.0, 1.0, 0.0])
    ours.set_timesteps(timesteps=[999.0000072, 500.0, -0.0002])
    assert float(ours.timesteps[0]) == 999.0
