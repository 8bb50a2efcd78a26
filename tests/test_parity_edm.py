"""EDMEulerScheduler parity by default: `DiffSamplerScheduler.from_config(its config)` runs `euler` on the class's
EDM grid (`schedules.edm_sigmas`: sigma_schedule karras / exponential, sigma_min, sigma_max, rho, final_sigmas_type)
with its preconditioning read as a v-prediction of x0 / sigma_data on `schedules.EDMPrecond` (c_in, c_noise =
log(sigma) / 4, c_skip / c_out with sigma_data; negated for prediction_type epsilon), the class's
init_noise_sigma and scale_model_input; equal to diffusers in the standard loop on the exact mixture behind an
EDM-preconditioned network.  What it cannot honour is refused by name."""

import pytest
import torch
from diffusers import EDMEulerScheduler

from diffsampler.eval.gmm import EDMGMMModel, GaussianMixture
from diffsampler.pipelines import DiffSamplerScheduler
from diffusers_loop import run_diffusers


def EDMNet(gmm, sigma_data, prediction_type):
    """The exact mixture behind EDM's preconditioning (`diffsampler.eval.gmm.EDMGMMModel`)."""
    return EDMGMMModel(gmm, sigma_data, prediction_type)


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))


def x_T(n=8, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


CASES = [
    ({}, 5), ({}, 25),
    (dict(sigma_schedule="exponential"), 10),
    (dict(sigma_data=1.0, prediction_type="v_prediction", rho=5.0), 10),
    (dict(final_sigmas_type="sigma_min", sigma_min=0.01, sigma_max=20.0), 8),
    (dict(num_train_timesteps=100), 6),  # it lays only the class's training table: no effect on sampling
]


@pytest.mark.parametrize("kw,n", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_edm_euler_parity_by_default(gmm, kw, n):
    """Every config key: sigma_min, sigma_max, sigma_data, sigma_schedule, rho, prediction_type, final_sigmas_type,
    num_train_timesteps.  Measured: max abs diff <= 2e-6 (samples up to 3)."""
    ref_sched = EDMEulerScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    assert ours_sched.config.solver == "euler" and ours_sched.convention == "EDMEulerScheduler"
    model = EDMNet(gmm, ref_sched.config.sigma_data, ref_sched.config.prediction_type)
    ref = run_diffusers(ref_sched, model, n, x_T())
    ours = run_diffusers(ours_sched, model, n, x_T())
    assert ours_sched.init_noise_sigma == ref_sched.init_noise_sigma
    m = len(ours_sched.timesteps)  # final_sigmas_type="sigma_min": diffusers' last call (sigma_min -> sigma_min) not made
    assert m == (n - 1 if kw.get("final_sigmas_type") == "sigma_min" else n)
    assert torch.equal(ours_sched.timesteps, ref_sched.timesteps[:m])
    assert torch.equal(ours_sched.sigmas[:m], ref_sched.sigmas[:m])
    assert (ours - ref).abs().max().item() <= 1e-4


def test_edm_preconditioning_sign_and_scale_matter(gmm):
    """The check above can fail: the same network read with the other c_out sign, or a plain VP schedule,
    gives other samples."""
    cfg = EDMEulerScheduler().config
    ref = run_diffusers(EDMEulerScheduler.from_config(cfg), EDMNet(gmm, 0.5, "epsilon"), 8, x_T())
    wrong = run_diffusers(DiffSamplerScheduler.from_config(cfg), EDMNet(gmm, 0.5, "v_prediction"), 8, x_T())
    assert (wrong - ref).abs().max().item() > 0.1


def test_edm_named_solver_keeps_the_preconditioning(gmm):
    """from_config(EDM config, solver=...) keeps the class's grid and network reading: heun (2n - 1 calls, its
    second calls at c_noise of the next level) at 40 steps lands within 0.03 of a 400-step euler run (measured
    0.016 against 800 steps; heun at 12 steps is 0.18 away on this mixture)."""
    cfg = EDMEulerScheduler().config
    fine = run_diffusers(DiffSamplerScheduler.from_config(cfg), EDMNet(gmm, 0.5, "epsilon"), 400, x_T())
    heun = DiffSamplerScheduler.from_config(cfg, solver="heun")
    out = run_diffusers(heun, EDMNet(gmm, 0.5, "epsilon"), 40, x_T())
    assert len(heun.timesteps) == 79 and heun.order == 2
    assert (out - fine).abs().max().item() < 0.03


def test_edm_refusals_by_name():
    sched = DiffSamplerScheduler.from_config(EDMEulerScheduler().config)
    with pytest.raises(ValueError, match="takes a ramp"):
        sched.set_timesteps(sigmas=[0.0, 0.5, 1.0])
    sched.set_timesteps(4)
    x = x_T(2)
    with pytest.raises(ValueError, match="s_churn=0.5"):
        sched.step(x, sched.timesteps[0], x, s_churn=0.5)
    with pytest.raises(TypeError, match="pred_original_sample"):
        sched.step(x, sched.timesteps[0], x, pred_original_sample=x)
    with pytest.raises(ValueError, match="add_noise"):
        DiffSamplerScheduler.from_config(EDMEulerScheduler().config).add_noise(x, x, sched.timesteps[:1])
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        DiffSamplerScheduler.from_config({**EDMEulerScheduler().config, "prediction_type": "sample"})


DPM_CASES = [
    ({}, 5), ({}, 25), (dict(solver_order=3), 10), (dict(solver_type="heun", sigma_schedule="exponential"), 10),
    (dict(algorithm_type="sde-dpmsolver++"), 10),
    (dict(prediction_type="v_prediction", sigma_data=1.0, lower_order_final=False), 8),
    (dict(euler_at_final=True, solver_order=1), 6), (dict(solver_order=1, algorithm_type="sde-dpmsolver++"), 6),
]


@pytest.mark.parametrize("kw,n", DPM_CASES, ids=[f"{k}-{n}" for k, n in DPM_CASES])
def test_edm_dpmsolver_multistep_parity_by_default(gmm, kw, n):
    """EDMDPMSolverMultistepScheduler: DPMSolverMultistep's mapping (dpmpp_2m / dpmpp_3m / ddim / dpmpp_2m_sde) on the
    EDM convention (its grid with a float32 ramp); the SDE with the same generator.  Measured <= 1.4e-5."""
    from diffusers import EDMDPMSolverMultistepScheduler

    ref_sched = EDMDPMSolverMultistepScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    assert ours_sched.convention == "EDMDPMSolverMultistepScheduler"
    model = EDMNet(gmm, ref_sched.config.sigma_data, ref_sched.config.prediction_type)
    ref = run_diffusers(ref_sched, model, n, x_T(), generator=torch.Generator().manual_seed(3))
    ours = run_diffusers(ours_sched, model, n, x_T(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours_sched.timesteps, ref_sched.timesteps) and torch.equal(ours_sched.sigmas, ref_sched.sigmas)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw,key", [(dict(thresholding=True), "thresholding"),
                                    (dict(final_sigmas_type="sigma_min"), "final_sigmas_type"),
                                    (dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order")])
def test_edm_dpmsolver_multistep_refusals_name_the_key(kw, key):
    from diffusers import EDMDPMSolverMultistepScheduler

    with pytest.raises(ValueError, match=f"EDMDPMSolverMultistepScheduler: {key}="):
        DiffSamplerScheduler.from_config(EDMDPMSolverMultistepScheduler(**kw).config)
