"""UniPC on the one engine (samplers/unipc.py): parity by default with diffusers'
UniPCMultistepScheduler (predict_x0 True / False; bh1 / bh2, solver_order 1-3, disable_corrector,
lower_order_final, sigma grids, thresholding) in the standard loop on the exact mixture."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers import get, make_plan
from diffsampler.schedules import DiscreteVP
from diffsampler.samplers.unipc import bh_system_weights, unipc_weights
from diffsampler.eval.gmm import GMMModel
from diffusers_loop import run_diffusers
from test_parity import x_T


def _errors(gmm, kw, nfe):
    """(our scheduler, max |ours - diffusers|, max |diffusers|) in the standard loop (UniPC is
    deterministic: its step takes no generator)."""
    ref_sched = UniPCMultistepScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    model = GMMModel(gmm, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T(32)
    if kw.get("thresholding"):
        x = x.reshape(32, 1, 4, 4)
    ref = run_diffusers(ref_sched, model, nfe, x)
    ours = run_diffusers(ours_sched, model, nfe, x)
    return ours_sched, (ours - ref).abs().max().item(), ref.abs().max().item()

MIN = dict(final_sigmas_type="sigma_min")
UNIPC = [
    dict(),  # bh2, order 2
    dict(solver_type="bh1", **MIN),  # bh1 onto sigma = 0 is NaN in diffusers (test below)
    dict(solver_type="bh1", disable_corrector=[0, 3], **MIN),
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, solver_type="bh1", **MIN),
    dict(solver_order=2, solver_type="bh1", timestep_spacing="leading", **MIN),
    dict(disable_corrector=[0]),
    dict(solver_order=3, disable_corrector=[1, 2]),
    dict(use_karras_sigmas=True),
    dict(solver_order=3, use_karras_sigmas=True),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True, solver_order=3),
    dict(lower_order_final=False, solver_order=3, **MIN),  # onto sigma = 0 diffusers' is singular (below)
    dict(solver_order=3, **MIN),
    dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(thresholding=True, sample_max_value=1.5),
    # noise prediction (predict_x0=False; diffusers' step onto sigma = 0 is NaN there: e^h = inf times sigma = 0)
    dict(predict_x0=False, **MIN),
    dict(predict_x0=False, solver_type="bh1", solver_order=3, **MIN),
    dict(predict_x0=False, solver_order=1, timestep_spacing="trailing", prediction_type="v_prediction", **MIN),
    dict(predict_x0=False, disable_corrector=[1], thresholding=True, **MIN),  # diffusers thresholds x0 only: not here
    # zero terminal SNR on scaled_linear (diffusers' last alpha_bar 2^-24)
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
]


@pytest.mark.parametrize("nfe", [5, 10, 25])
@pytest.mark.parametrize("kw", UNIPC, ids=[str(c) for c in UNIPC])
def test_unipc_options_reproduced(gmm16, kw, nfe):
    sched, err, scale = _errors(gmm16, kw, nfe)
    assert sched.config.solver == "unipc"
    assert err <= 1e-4 * max(1.0, scale), (err, scale)


def test_options_take_effect():
    """corrector, disable_corrector, solver_type and lower_order_final each change the plan's weights
    where they should (and only there)."""
    sched = DiscreteVP.linear()

    def weights(**kw):
        plan = make_plan("unipc", sched, nfe=8, **kw)
        return [dict(s.update.terms) for s in plan.steps], plan

    base, plan = weights(order=3)
    assert plan.orders == [1, 2, 3, 3, 3, 3, 2, 1] and plan.nfe == 8
    off, _ = weights(order=3, corrector=False)
    assert all(base[i] != off[i] for i in range(1, 7)) and base[0] == off[0]
    assert base[7] == off[7]  # onto sigma = 0: x_0 = D, the corrected state drops out
    skip, _ = weights(order=3, disable_corrector=[2, 4])
    assert [i for i in range(8) if skip[i] != base[i]] == [3, 5]
    assert skip[3] == off[3] and skip[5] == off[5]
    bh1, _ = weights(order=3, solver_type="bh1")
    assert all(bh1[i] != base[i] for i in range(1, 7))
    _, plan = weights(order=3, lower_order_final=False)
    assert plan.orders == [1, 2, 3, 3, 3, 3, 3, 1]


def _states(sched, model, nfe, x):
    """x after each step of the standard loop."""
    sched.set_timesteps(nfe)
    out = []
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("kw", [dict(solver_type="bh1"), dict(solver_order=3, lower_order_final=False)],
                         ids=["bh1", "order3-no-lower-final"])
def test_step_onto_zero_where_diffusers_breaks(gmm16, kw):
    """diffusers' last step onto sigma = 0 is NaN with bh1 (B(h) = h = -inf times 0) and singular at
    order > 1 (r_k = 0); unipc's is the limit x_0 = D (first order).  Every step before it agrees."""
    ref_sched = UniPCMultistepScheduler(**kw)
    ours_sched = DiffSamplerScheduler.from_config(ref_sched.config)
    model = GMMModel(gmm16, ours_sched.schedule, ours_sched.prediction_kind)
    x = x_T(32)
    ours = _states(ours_sched, model, 10, x)
    try:
        ref = _states(ref_sched, model, 10, x)
        assert not torch.isfinite(ref[-1]).all()
    except RuntimeError:  # torch.linalg.solve: singular
        ref_sched = UniPCMultistepScheduler(**kw)
        ref_sched.set_timesteps(10)
        ref, xr = [], x
        for t in ref_sched.timesteps[:-1]:
            xr = ref_sched.step(model(xr, t).sample, t, xr).prev_sample
            ref.append(xr)
    assert len(ref) >= 9
    for a, b in zip(ours[:9], ref[:9]):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    assert torch.isfinite(ours[-1]).all()


def test_bh2_system_is_usf_unipc():
    """bh2's linear system (diffusers' rhos) has USF's exact-Taylor unipc weights as its solution: the
    solver takes bh2's weights from usf.exp_weights (one copy); bh1 differs."""
    lams, lam_t = [0.1, -0.3, -0.8], 0.6
    for corrector in (False, True):
        for p in (1, 2, 3):
            a = bh_system_weights(lams[:p], lam_t, 0.7, "bh2", corrector)
            b = unipc_weights(lams[:p], lam_t, 0.7, "bh2", corrector)
            assert max(abs(u - v) for u, v in zip(a, b)) < 1e-14 and len(a) == len(b) == p + corrector
            # B(h) cancels where the system is solved; bh1 differs only at the fixed 1/2 (UniP-2, UniC-1)
            c = bh_system_weights(lams[:p], lam_t, 0.7, "bh1", corrector)
            differs = max(abs(u - v) for u, v in zip(a, c)) > 1e-3
            assert differs == ((p, corrector) in ((2, False), (1, True))), (p, corrector)


def test_corrector_weights_are_unic():
    """UniC-1 (c = 1/2) is the trapezoid on the data prediction: weights -alpha_t e1 ... consistent sums:
    the UniC and UniP weights both sum to -alpha_t (e^{-h} - 1) (exact for a constant prediction)."""
    lams, lam_t, a_t = [0.1, -0.3, -0.8], 0.5, 0.7
    for variant in ("bh1", "bh2"):
        for p in (1, 2, 3):
            want = -a_t * torch.expm1(torch.tensor(-(lam_t - lams[0]), dtype=torch.float64)).item()
            assert abs(sum(unipc_weights(lams[:p], lam_t, a_t, variant)) - want) < 1e-12
            assert abs(sum(unipc_weights(lams[:p], lam_t, a_t, variant, corrector=True)) - want) < 1e-12
    assert unipc_weights([0.1], 0.5, 0.7, "bh1") == pytest.approx(unipc_weights([0.1], 0.5, 0.7, "bh2"), abs=1e-15)


REFUSED = [
    (dict(solver_order=4), "solver_order=4"),
    (dict(sigma_min=0.1, use_karras_sigmas=True), "sigma_min=0.1 with use_karras_sigmas"),
    (dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (dict(solver_order=2, use_karras_sigmas=True, **MIN), "final_sigmas_type='sigma_min'"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True with beta_schedule='linear'"),
]


@pytest.mark.parametrize("kw,match", REFUSED, ids=[str(c[0]) for c in REFUSED])
def test_what_cannot_be_honoured_is_refused_by_key(kw, match):
    with pytest.raises(ValueError, match=match):
        DiffSamplerScheduler.from_config(UniPCMultistepScheduler(**kw).config)


def test_bad_options_refused():
    for kw, match in [(dict(solver_type="bh3"), "solver_type"), (dict(order=4), "order"),
                      (dict(disable_corrector=[-1]), "disable_corrector"), (dict(disable_corrector="0"), "disable_corrector")]:
        with pytest.raises(ValueError, match=match):
            get("unipc", **kw)


def test_hydra_and_sample(gmm16):
    """solver=unipc with +solver.options.* from Hydra builds the options asked for; sample() runs it."""
    from diffsampler.samplers import sample
    from test_parity_ddpm_era import hydra_spec

    spec = hydra_spec("solver=unipc", "+solver.options.disable_corrector=[0,2]", "+solver.options.solver_type=bh1",
                      "+solver.options.order=3", "nfe=6")
    solver = get(spec.solver.name, **spec.solver.options)
    assert (solver.order, solver.solver_type, solver.disable_corrector) == (3, "bh1", frozenset({0, 2}))
    with pytest.raises(ValueError, match="solver_type"):
        hydra_spec("solver=unipc", "+solver.options.solver_type=bh3", "nfe=6")
    assert get("UniPC").solver_type == "bh1" and get("uni_pc_bh2").solver_type == "bh2"


def test_noise_prediction_form_through_sample(gmm16):
    """unipc(prediction="noise") through sample(): the same ODE as the data form (their gap shrinks by more than
    20x from 5 to 25 calls: second order or better; measured 1.05 -> 0.015), and a bad value is refused by name."""
    import diffsampler as ds
    from diffsampler.eval.gmm import gmm_denoiser
    from diffsampler.samplers import get
    from diffsampler.schedules import DiscreteVP

    sch = DiscreteVP.linear()
    den = gmm_denoiser(gmm16, sch)
    x = x_T(32)
    gaps = []
    for nfe in (5, 25):
        a = ds.sample(den, x.clone(), solver="unipc", nfe=nfe, final="last")
        b = ds.sample(den, x.clone(), solver=get("unipc", prediction="noise"), nfe=nfe, final="last")
        gaps.append((a - b).abs().max().item())
    assert gaps[1] < 0.03 and gaps[1] < gaps[0] / 20, gaps
    with pytest.raises(ValueError, match="prediction must be 'data' or 'noise'"):
        get("unipc", prediction="eps")
