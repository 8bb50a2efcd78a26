"""Bad input gets a clear error naming the bad value and what is allowed."""

import pytest
import torch

import diffsampler as ds
from diffsampler.denoisers import Denoiser, NonFiniteModelOutput
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.schedules import DiscreteVP, LinearVP, TimeGrid, time_grid


def test_unknown_solver_lists_available():
    with pytest.raises(ValueError, match=r"unknown solver 'dpmpp_9m'.*available: .*dpmpp_2m"):
        ds.samplers.get("dpmpp_9m")


def test_unknown_solver_option_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['etaa'\]; allowed: \[.*'eta',.*\]"):
        ds.samplers.get("ddim", etaa=1.0)


@pytest.mark.parametrize("nfe", [0, -3, 2.5, True])
def test_nfe_too_small(nfe):
    with pytest.raises(ValueError, match=r"needs an integer nfe >= 1, got"):
        ds.samplers.make_plan("dpmpp_3m", LinearVP(), nfe)


def test_order_out_of_range():
    with pytest.raises(ValueError, match=r"order must be an integer in 1..3, got 5"):
        ds.samplers.get("dpmpp_2m", order=5)


def test_non_monotone_grid():
    with pytest.raises(ValueError, match=r"strictly decreasing.*t\[1\]=0.3 is followed by t\[2\]=0.5"):
        time_grid(LinearVP(), 3, [0.9, 0.3, 0.5, 0.1], final="last")


def test_grid_out_of_range_and_wrong_length():
    with pytest.raises(ValueError, match=r"leaves the schedule's range \[0.001, 1\]"):
        time_grid(LinearVP(), 2, [1.5, 0.5, 0.1], final="last")
    with pytest.raises(ValueError, match=r"explicit grid has 3 times; 3 steps with final='last' need 4"):
        time_grid(LinearVP(), 3, [0.9, 0.5, 0.1], final="last")


def test_unknown_spacing_and_final():
    with pytest.raises(ValueError, match=r"unknown spacing 'cubic'; choose one of"):
        time_grid(LinearVP(), 3, "cubic")
    with pytest.raises(ValueError, match=r"final must be one of \('zero', 'last'\), got 'end'"):
        time_grid(LinearVP(), 3, final="end")


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match=r"unknown prediction_type 'eps'; allowed: \('epsilon', 'v_prediction', 'sample', 'flow'\)"):
        Denoiser(lambda x, t: x, LinearVP(), "eps")
    with pytest.raises(ValueError, match=r"'flow' needs a RectifiedFlow schedule, got LinearVP"):
        Denoiser(lambda x, t: x, LinearVP(), "flow")


class NaNAfter:
    """A model that returns NaN from its k-th call on."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, x, t):
        self.calls += 1
        return x * 0.1 if self.calls < self.k else torch.full_like(x, float("nan"))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "deis_3"])
def test_nan_from_model_raised_at_its_step(solver):
    den = Denoiser(NaNAfter(4), LinearVP())
    with pytest.raises(NonFiniteModelOutput, match=r"NaN/Inf at model call 4"):
        ds.sample(den, torch.randn(2, 3), solver=solver, nfe=9)
    assert den.nfe == 4  # nothing ran after the bad call


def test_nan_deferred_check_names_first_bad_call():
    den = Denoiser(NaNAfter(3), LinearVP(), check_finite="end")
    with pytest.raises(NonFiniteModelOutput, match=r"first at model call 3"):
        ds.sample(den, torch.randn(2, 3), solver="dpmpp_2m", nfe=6)


def test_shape_mismatch():
    den = Denoiser(lambda x, t: x[:, :2], LinearVP())
    with pytest.raises(ValueError, match=r"model output shape \(2, 2\) does not match input shape \(2, 3\)"):
        ds.sample(den, torch.randn(2, 3), nfe=3)
    with pytest.raises(ValueError, match=r"got 3 seeds for a batch of 2"):
        ds.sample(Denoiser(lambda x, t: x, LinearVP()), torch.randn(2, 3), nfe=3, seeds=[0, 1, 2])


def test_stochastic_solver_needs_randomness(gmm8):
    den = gmm_denoiser(gmm8, LinearVP())
    with pytest.raises(ValueError, match=r"'dpmpp_2m_sde' is stochastic: pass seeds= or generator="):
        ds.sample(den, torch.randn(2, 8), solver="dpmpp_2m_sde", nfe=5)


def test_bad_schedule_values():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match=r"need 0 < sigma_min < sigma_max, got 5, 1"):
        ds.EDM(5, 1)


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match=r"solver 'ddim' is already registered"):
        ds.samplers.register("ddim", lambda: None)


def test_mixed_per_sample_grid_rejected():
    rows = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.5, 0.1]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"per-sample time grids differ between rows"):
        time_grid(LinearVP(), 2, rows, final="last")
    same = time_grid(LinearVP(), 2, rows[:1].expand(2, 3), final="last")
    assert isinstance(same, TimeGrid) and same.steps == 2
