"""The engine's one stepper: driven one model call at a time it is `run_plan`; hooks replace the
noise of a stochastic step and hand over the next call's output; the adapter converts each network
output once."""

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers import make_plan, run_plan
from diffsampler.samplers.plan import Stepper


def x_T(n=4, d=16):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("solver", ["heun", "dpmpp_3m", "dpmpp_2s"])
def test_stepper_by_hand_is_run_plan(gmm16, solver):
    den = gmm_denoiser(gmm16, ds.DiscreteVP.linear())
    plan = make_plan(solver, den.schedule, 8)
    steps_ended, calls = [], 0
    stepper = Stepper(plan, den, x_T())
    while not stepper.done:
        k = stepper.k
        x = stepper.feed(den.predict_at(*stepper.next_input()))
        calls += 1
        last_call = k + 1 == len(plan.steps[len(steps_ended)].evals)
        assert (x is not None) == last_call  # feed returns x_{i+1} exactly when step i ends
        if last_call:
            steps_ended.append(x)
    assert calls == plan.nfe and len(steps_ended) == len(plan.steps) and not stepper.outs  # all outputs freed
    assert torch.equal(stepper.x, run_plan(plan, den, x_T()))


def test_transition_hook_and_handed_over_output(gmm16):
    """A transition that hands over the next step's first output saves exactly that model call."""
    den = gmm_denoiser(gmm16, ds.DiscreteVP.linear())
    plan = make_plan("ddim", den.schedule, 6, eta=1.0)
    z = torch.randn(len(plan.steps), *x_T().shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    it = iter(z)
    ref = run_plan(plan, den, x_T(), noise_fn=lambda x: next(it))
    seen = []

    def transition(i, mean, c):
        x = mean + c * z[i]
        seen.append(i)
        nxt = plan.steps[i + 1].evals[0] if i + 1 < len(plan.steps) else None
        if nxt is None or not nxt.x.is_identity:
            return x, None
        t = den.schedule.model_time(torch.tensor([nxt.t], dtype=torch.float64)).float().expand(x.shape[0])
        return x, den.predict_at(x, t, nxt.alpha, nxt.sigma, nxt.kind)

    den.reset_nfe()
    out = run_plan(plan, den, x_T(), noise_fn=lambda x: None, transition=transition)
    stochastic = [i for i, s in enumerate(plan.steps) if s.noise != 0.0]
    assert seen == stochastic
    assert (out - ref).abs().max().item() <= 1e-12
    assert den.nfe == plan.nfe  # the hook's calls replaced the stepper's, one for one


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_adapter_converts_each_output_once(gmm16, pred):
    sched = DiffSamplerScheduler(solver="ddim", prediction_type=pred)  # noise-prediction steps
    sched.set_timesteps(6)
    model, x = GMMModel(gmm16, sched.schedule, pred), x_T().float()
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    assert sched._denoiser.nfe == 6  # one counted, checked conversion per model call (x0 included)
