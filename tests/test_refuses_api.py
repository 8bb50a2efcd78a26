"""The core API refuses what it cannot honour: every argument of `sample()` / `make_plan()` / the
solver registry takes effect or is refused, naming the bad argument and what is allowed, before any
model call; guidance composes with every denoiser transform and counts on the user's denoiser;
the deferred finite check tests elements and belongs to one run; model outputs are accepted by type."""

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.denoisers import Denoiser, NonFiniteModelOutput, Thresholded
from diffsampler.eval.gmm import ConditionalGMMModel, GaussianMixture, gmm_denoiser
from diffsampler.guidance import ClassifierFreeGuidance
from diffsampler.samplers import make_plan
from diffsampler.schedules import CosineVP, DiscreteVP, LinearVP, time_grid

TARGET = 1


@pytest.fixture(scope="module")
def labelled():
    means = torch.randn(4, 8, generator=torch.Generator().manual_seed(5)) * 2.0
    return GaussianMixture(means, [0.4] * 4, None, component_labels=[0, 0, 1, 1])


@pytest.fixture
def den(labelled):
    """A counting denoiser: den.nfe == 0 proves a refusal came before any model call."""
    return gmm_denoiser(labelled, LinearVP())


def x_T(n=4, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def cond_denoiser(gmm, pred="epsilon"):
    schedule = LinearVP()
    return Denoiser(ConditionalGMMModel(gmm, schedule, pred), schedule, pred,
                    cond={"class_labels": torch.tensor([TARGET])})


def cfg(scale):
    return ClassifierFreeGuidance(scale, uncond={"class_labels": torch.tensor([-1])})


def closed_form_threshold(d, ratio, max_value):
    s = torch.quantile(d.flatten(1).abs(), ratio, dim=1).clamp(1.0, max_value).view(-1, 1)
    return d.clamp(-s, s) / s


# --- item 11: classifier-free guidance composes with transforms and counts on the user's denoiser ---

@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_item11_cfg_keeps_thresholding(labelled, pred):
    """CFG over Thresholded(den): the data prediction is the closed-form thresholding of the exact
    guided posterior mean (the transform is kept, applied after guidance)."""
    ratio, max_value, w = 0.8, 1.5, 3.0
    guided = cfg(w).wrap(Thresholded(cond_denoiser(labelled, pred), ratio=ratio, max_value=max_value))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    schedule = LinearVP()
    for t in (0.8, 0.3):
        tt = torch.tensor(t, dtype=torch.float64)
        exact = labelled.guided_posterior_mean(x, schedule.alpha(tt), schedule.sigma(tt), TARGET, w)
        want = closed_form_threshold(exact, ratio, max_value)
        assert not torch.allclose(want, exact, atol=1e-3)  # the thresholding does act here
        assert torch.allclose(guided.data_pred(x, t), want, atol=1e-6)  # Thresholded: float32 quantile


def test_item11_cfg_counts_on_the_users_denoiser(labelled):
    """sample(..., guidance=CFG) spends its calls on the user's denoiser (one batched pass per call),
    also through a transform."""
    plain = cond_denoiser(labelled)
    ds.sample(plain, x_T(), solver="dpmpp_2m", nfe=6, guidance=cfg(2.0))
    assert plain.nfe == 6
    inner = cond_denoiser(labelled)
    th = Thresholded(inner, ratio=0.9, max_value=2.0)
    ds.sample(th, x_T(), solver="dpmpp_2m", nfe=5, guidance=cfg(2.0))
    assert inner.nfe == 5 and th.nfe == 5


def test_item11_cfg_sampling_equals_thresholded_guided_field(labelled):
    """A whole trajectory with CFG over Thresholded equals the same solver on the closed-form
    thresholded guided field."""
    ratio, max_value, w = 0.8, 1.5, 3.0
    schedule = LinearVP()

    def exact(x, t_model):
        t = t_model.double()
        d = labelled.guided_posterior_mean(x.double(), schedule.alpha(t), schedule.sigma(t), TARGET, w)
        return closed_form_threshold(d, ratio, max_value).to(x.dtype)

    ref = ds.sample(Denoiser(exact, schedule, "sample"), x_T(32).double(), solver="dpmpp_2m", nfe=8)
    th = Thresholded(cond_denoiser(labelled), ratio=ratio, max_value=max_value)
    x = ds.sample(th, x_T(32).double(), solver="dpmpp_2m", nfe=8, guidance=cfg(w))
    assert (x - ref).abs().max() < 1e-6  # Thresholded takes its quantile in float32


def test_item11_cfg_refuses_double_guidance_and_bad_denoiser(labelled):
    once = cfg(2.0).wrap(cond_denoiser(labelled))
    with pytest.raises(ValueError, match=r"already has classifier-free guidance"):
        cfg(3.0).wrap(once)
    with pytest.raises(ValueError, match=r"wraps a Denoiser.*got function"):
        cfg(3.0).wrap(lambda x, t: x)
    with pytest.raises(ValueError, match=r"cond keys \['class_labels'\] and uncond keys \['labels'\] differ"):
        ClassifierFreeGuidance(2.0, uncond={"labels": torch.tensor([-1])}).wrap(cond_denoiser(labelled))


# --- item 12: sample() and make_plan() refuse arguments they cannot honour, before any model call ---

def test_item12_grid_with_nfe_refused(den):
    grid = time_grid(LinearVP(), 4)
    with pytest.raises(ValueError, match=r"nfe=10.*grid.*4 model calls"):
        ds.sample(den, x_T(), solver="dpmpp_2m", nfe=10, grid=grid)
    assert den.nfe == 0
    ds.sample(den, x_T(), solver="dpmpp_2m", nfe=4, grid=grid)  # the grid's own NFE is consistent
    assert den.nfe == 4
    den.reset_nfe()
    ds.sample(den, x_T(), solver="dpmpp_2m", grid=grid)  # nfe left at its default: the grid decides
    assert den.nfe == 4


@pytest.mark.parametrize("kw, bad", [(dict(spacing="karras"), r"spacing='karras'"),
                                     (dict(spacing="time_uniform"), r"spacing='time_uniform'"),
                                     (dict(final="last"), r"final='last'")])
def test_item12_grid_with_spacing_or_final_refused(den, kw, bad):
    with pytest.raises(ValueError, match=bad + r".*grid"):
        ds.sample(den, x_T(), solver="dpmpp_2m", grid=time_grid(LinearVP(), 4), **kw)
    with pytest.raises(ValueError, match=bad + r".*grid"):
        make_plan("dpmpp_2m", LinearVP(), grid=time_grid(LinearVP(), 4), **kw)
    assert den.nfe == 0
    ds.sample(den, x_T(), solver="dpmpp_2m", grid=time_grid(LinearVP(), 4), final="zero")  # consistent


def test_item12_make_plan_grid_with_other_nfe_refused():
    grid = time_grid(LinearVP(), 5)
    for solver in ("dpmpp_2m", "heun", "ddim"):
        with pytest.raises(ValueError, match=r"nfe=3"):
            make_plan(solver, LinearVP(), 3, grid=grid)


@pytest.mark.parametrize("kw, bad", [
    (dict(nfe=12), r"nfe=12 cannot apply to a compiled Plan.*10 model calls"),
    (dict(spacing="karras"), r"spacing='karras' cannot apply to a compiled Plan"),
    (dict(final="last"), r"final='last' cannot apply with the compiled Plan.*final='zero'"),
    (dict(eta=1.0), r"solver options \['eta'\] cannot apply to a compiled Plan.*make_plan"),
    (dict(order=3), r"solver options \['order'\] cannot apply to a compiled Plan.*make_plan")])
def test_item12_precompiled_plan_refuses_options(den, kw, bad):
    plan = make_plan("dpmpp_2m", LinearVP(), 10)
    with pytest.raises(ValueError, match=bad):
        ds.sample(den, x_T(), solver=plan, **kw)
    with pytest.raises(ValueError, match=r"grid="):
        ds.sample(den, x_T(), solver=plan, grid=time_grid(LinearVP(), 10))
    assert den.nfe == 0
    ds.sample(den, x_T(), solver=plan, nfe=10, final="zero")  # what the plan already is: accepted
    assert den.nfe == 10


def test_item12_grid_or_plan_of_another_schedule_refused(den):
    with pytest.raises(ValueError, match=r"grid.*CosineVP.*denoiser.*LinearVP"):
        ds.sample(den, x_T(), solver="dpmpp_2m", grid=time_grid(CosineVP(), 4))
    with pytest.raises(ValueError, match=r"plan.*CosineVP.*denoiser.*LinearVP"):
        ds.sample(den, x_T(), solver=make_plan("dpmpp_2m", CosineVP(), 4))
    with pytest.raises(ValueError, match=r"plan was built for another schedule.*beta_1: 10 vs 20"):
        ds.sample(den, x_T(), solver=make_plan("dpmpp_2m", LinearVP(beta_1=10.0), 4))
    with pytest.raises(ValueError, match=r"grid.*CosineVP.*LinearVP"):
        make_plan("dpmpp_2m", LinearVP(), grid=time_grid(CosineVP(), 4))
    assert den.nfe == 0
    # an equal schedule built twice is the same schedule
    ds.sample(den, x_T(), solver=make_plan("dpmpp_2m", LinearVP(), 4))
    assert den.nfe == 4


def test_item12_equal_discrete_schedules_are_the_same(labelled):
    den = gmm_denoiser(labelled, DiscreteVP.linear())
    ds.sample(den, x_T(), solver=make_plan("ddim", DiscreteVP.linear(), 3))
    assert den.nfe == 3
    with pytest.raises(ValueError, match=r"another schedule"):
        ds.sample(den, x_T(), solver=make_plan("ddim", DiscreteVP.linear(beta_end=0.03), 3))


def test_item12_seeds_with_generator_refused(den):
    with pytest.raises(ValueError, match=r"seeds=.*generator=.*one of"):
        ds.sample(den, shape=(2, 8), seeds=[0, 1], generator=torch.Generator().manual_seed(0))
    assert den.nfe == 0


def test_item12_x_T_with_other_shape_refused(den):
    with pytest.raises(ValueError, match=r"shape=\(3, 8\).*x_T.*\(4, 8\)"):
        ds.sample(den, x_T(4), shape=(3, 8))
    assert den.nfe == 0
    ds.sample(den, x_T(4), shape=(4, 8), nfe=2)  # the same shape is consistent
    assert den.nfe == 2


@pytest.mark.parametrize("bad, name", [(7.5, "float"), ("cfg", "str"), (object(), "object")])
def test_item12_guidance_must_be_a_guidance_object(den, bad, name):
    with pytest.raises(ValueError, match=rf"guidance.*got {name}.*wrap\(denoiser\).*run\(plan"):
        ds.sample(den, x_T(), guidance=bad)
    assert den.nfe == 0


@pytest.mark.parametrize("seeds, why", [([1.7, 2], r"1.7"), ([True, 2], r"True"), ("12", r"'12'"),
                                         (5, r"5"), ([np.float64(3.0)], r"3.0")])
def test_item12_seeds_must_be_integers(den, seeds, why):
    with pytest.raises(ValueError, match=rf"seeds.*integer.*{why}"):
        ds.sample(den, shape=(2, 8), seeds=seeds)
    assert den.nfe == 0
    ds.sample(den, shape=(2, 8), seeds=[np.int64(3), 4], nfe=2)  # numpy integers are integers
    assert den.nfe == 2


@pytest.mark.parametrize("kw, bad", [
    (dict(generator=42), r"generator must be a torch.Generator.*got int 42"),
    (dict(callback=3), r"callback must be callable.*got int"),
    (dict(progress="no"), r"progress must be a bool, got str 'no'"),
    (dict(spacing={"rho": 5.0}), r"spacing given as a dict needs its 'name'.*got keys \['rho'\]"),
])
def test_item12_other_sample_arguments_checked(den, kw, bad):
    with pytest.raises(ValueError, match=bad):
        ds.sample(den, shape=(2, 8), nfe=3, **kw)
    assert den.nfe == 0


def test_item12_solver_plan_spends_its_own_nfe(den):
    """The default NFE applies only where nothing else fixes it: a solver plan brings its own."""
    ds.sample(den, x_T(), solver="plan:gmm_nfe4")
    assert den.nfe == 4
    with pytest.raises(ValueError, match=r"spends exactly 4 model calls.*nfe=10"):
        ds.sample(den, x_T(), solver="plan:gmm_nfe4", nfe=10)
    assert den.nfe == 4


@pytest.mark.parametrize("solver, opt, value, want", [
    ("dpmpp_2m", "lower_order_final", "false", "bool"),
    ("dpmpp_2m", "lower_order_final", 0, "bool"),
    ("ddim", "eta", "1.0", "float"),
    ("ddim", "eta", True, "float"),
    ("deis_3", "order", 2.0, "int"),
    ("ghvb", "base", 3, "str"),
])
def test_item12_solver_option_types_enforced(den, solver, opt, value, want):
    with pytest.raises(ValueError, match=rf"solver {solver!r}.*{opt}={value!r}.*must be {want}"):
        ds.samplers.get(solver, **{opt: value})
    with pytest.raises(ValueError, match=rf"{opt}={value!r}.*must be {want}"):
        ds.sample(den, x_T(), solver=solver, nfe=4, **{opt: value})
    assert den.nfe == 0


def test_item12_solver_option_types_accept_numbers():
    assert ds.samplers.get("ddim", eta=1).eta == 1.0  # an int is a valid float
    assert ds.samplers.get("dpmpp_2m", order=np.int64(1)).order == 1
    assert ds.samplers.get("dpmpp_2m", lower_order_final=np.bool_(False)).lower_order_final is False
    assert ds.samplers.get("pndm", momentum=None).momentum is None


# --- item 14: the deferred finite check tests elements, and its flags belong to one run ---

class Const:
    """A data-prediction network returning `value` everywhere (in the input's dtype)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, x, t):
        return torch.full_like(x, self.value)


def test_item14_end_check_large_finite_fp16_is_not_nan():
    """5000 elements of 1000.0 in fp16: every element is finite, their sum is not."""
    den = Denoiser(Const(1000.0), LinearVP(), "sample", check_finite="end")
    x = torch.randn(2, 5000).half()
    assert not torch.isfinite(x.new_full((2, 5000), 1000.0).sum())
    out = ds.sample(den, x, solver="ddim", nfe=3)
    assert torch.isfinite(out).all() and den.nfe == 3
    nan = Denoiser(Const(float("nan")), LinearVP(), "sample", check_finite="end")
    with pytest.raises(NonFiniteModelOutput, match=r"first at model call 1"):
        ds.sample(nan, x, solver="ddim", nfe=3)


def test_item14_step_check_large_finite_fp16_is_not_nan():
    den = Denoiser(Const(1000.0), LinearVP(), "sample", check_finite="step")
    out = ds.sample(den, torch.randn(2, 5000).half(), solver="ddim", nfe=3)
    assert torch.isfinite(out).all()


class Switch:
    """Returns NaN while `bad` is set, else a finite prediction."""

    bad = False

    def __call__(self, x, t):
        return torch.full_like(x, float("nan")) if self.bad else 0.1 * x


def test_item14_direct_call_flags_do_not_leak_into_a_run():
    net = Switch()
    den = Denoiser(net, LinearVP(), check_finite="end")
    net.bad = True
    den.data_pred(torch.randn(2, 3), 0.5)  # a direct call outside any run
    net.bad = False
    out = ds.sample(den, torch.randn(2, 3), solver="dpmpp_2m", nfe=4)  # healthy run: no error
    assert torch.isfinite(out).all()


def test_item14_aborted_run_flags_do_not_leak_into_the_next():
    net = Switch()
    den = Denoiser(net, LinearVP(), check_finite="end")
    net.bad = True

    def stop(i, x, out):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ds.sample(den, torch.randn(2, 3), solver="dpmpp_2m", nfe=4, callback=stop)
    net.bad = False
    out = ds.sample(den, torch.randn(2, 3), solver="dpmpp_2m", nfe=4)
    assert torch.isfinite(out).all()
    net.bad = True  # and a bad run is still caught, naming its own first call
    with pytest.raises(NonFiniteModelOutput, match=r"first at model call 1"):
        ds.sample(den, torch.randn(2, 3), solver="dpmpp_2m", nfe=4)


# --- item 15: model outputs are accepted by type (what diffusers returns) or refused by type ---

@dataclass
class Output:  # a dataclass output, as diffusers' BaseOutput subclasses are
    sample: torch.Tensor


def wrapped(kind):
    def net(x, t):
        out = 0.5 * x
        return {"tensor": out, "sample_attr": SimpleNamespace(sample=out), "dataclass": Output(out),
                "tuple": (out,), "dict": {"sample": out}}[kind]
    return net


@pytest.mark.parametrize("kind", ["tensor", "sample_attr", "dataclass", "tuple", "dict"])
def test_item15_accepted_model_outputs(kind):
    x = torch.randn(3, 4)
    want = Denoiser(wrapped("tensor"), LinearVP()).data_pred(x, 0.5)
    assert torch.equal(Denoiser(wrapped(kind), LinearVP()).data_pred(x, 0.5), want)


def test_item15_diffusers_base_output_accepted():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    x = torch.randn(3, 4)
    den = Denoiser(lambda x, t: UNet2DConditionOutput(sample=0.5 * x), LinearVP())
    assert torch.equal(den.data_pred(x, 0.5), Denoiser(wrapped("tensor"), LinearVP()).data_pred(x, 0.5))


@pytest.mark.parametrize("make, name", [
    (lambda x: {"out": x}, r"dict with keys \['out'\]"),
    (lambda x: None, r"NoneType"),
    (lambda x: x.numpy(), r"numpy.ndarray"),
    (lambda x: x.long(), r"torch.int64 tensor"),
    (lambda x: x > 0, r"torch.bool tensor"),
    (lambda x: x.to(torch.complex64), r"torch.complex64 tensor"),
    (lambda x: [x], r"list"),
    (lambda x: (), r"empty tuple"),
    (lambda x: (x.numpy(),), r"tuple whose first element is numpy.ndarray"),
    (lambda x: SimpleNamespace(sample=None), r"types.SimpleNamespace with \.sample of type NoneType"),
])
def test_item15_refused_model_outputs(make, name):
    den = Denoiser(lambda x, t: make(x), LinearVP())
    with pytest.raises(TypeError, match=rf"model returned (a |an )?{name}.*accepted:.*floating-point torch.Tensor"):
        ds.sample(den, torch.randn(3, 4), solver="ddim", nfe=2)


def test_item15_output_fn_result_checked_too():
    den = Denoiser(lambda x, t: x, LinearVP(), output_fn=lambda out: out.int())
    with pytest.raises(TypeError, match=r"output_fn returned a torch.int32 tensor"):
        den.data_pred(torch.randn(3, 4), 0.5)


def test_item14_adapter_aborted_trajectory_flags_do_not_leak(gmm16):
    """The diffusers adapter: a trajectory aborted after a NaN model output (check_finite='end') does
    not fail the next, healthy trajectory started by set_timesteps."""
    from diffsampler.eval.gmm import GMMModel
    from diffsampler.pipelines import DiffSamplerScheduler

    sched = DiffSamplerScheduler(solver="dpmpp_2m")
    sched._denoiser.check_finite = "end"
    model = GMMModel(gmm16, sched.schedule)
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(5)
    x = x0.clone()
    for t in sched.timesteps[:2]:  # the pipeline is interrupted after two calls, the first was NaN
        out = model(x, t).sample
        x = sched.step(torch.full_like(out, float("nan")) if t == sched.timesteps[0] else out, t, x).prev_sample
    sched.set_timesteps(5)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    assert torch.isfinite(x).all()
