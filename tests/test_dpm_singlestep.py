"""Singlestep DPM-Solver (`dpm_solver`, `dpmpp`, `dpm_fast`; samplers/dpm_solver.py): its options, its
plan forms (USF estimators dpm_singlestep / _midpoint / _heun) for every stage rule and both
intermediate-point rules, diffusers' order list, and what is refused.  Equality with k-diffusion:
tests/test_parity_dpm.py; with diffusers' DPMSolverSinglestepScheduler: tests/test_parity_dpm_singlestep.py."""

import logging

import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.samplers.dpm_solver import diffusers_singlestep_orders, singlestep_orders
from diffsampler.samplers.usf import SolverSpec, spec_of
from diffsampler.schedules import DiscreteVP

DT = torch.float64


@pytest.fixture(scope="module")
def setup(gmm8):
    sch = DiscreteVP.linear()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    return sch, gmm_denoiser(gmm8, sch), x


@pytest.mark.parametrize("name", ["dpm_solver", "dpmpp"])
@pytest.mark.parametrize("opts", [dict(order=3, solver_type="midpoint"), dict(order=3, solver_type="heun"),
                                  dict(order=2, solver_type="heun"), dict(order=3, intermediate="grid"),
                                  dict(order=3, intermediate="grid", solver_type="heun", lower_order_final=True),
                                  dict(order=2, intermediate="grid", solver_type="midpoint")],
                         ids=str)
@pytest.mark.parametrize("nfe,final", [(5, "zero"), (7, "last"), (9, "last")])
def test_plan_form_of_every_stage_rule(setup, name, opts, nfe, final):
    """spec_of(solver with options) computes the solver's samples: <= 1e-12 on the solver's grid (with
    intermediate="grid" the calls' log-SNRs become the steps' fractions r), and through YAML <= 1e-5."""
    sch, den, x = setup
    solver = ds.samplers.get(name, **opts)
    form = spec_of(solver, sch, nfe, "logsnr", final)
    plan = ds.samplers.make_plan(solver, sch, nfe, "logsnr", final)
    assert form.nfe == plan.nfe == nfe and form.orders == plan.orders
    assert {s.estimator for s in form.steps} == {
        {"dpm_solver": "dpm_singlestep", "midpoint": "dpm_singlestep_midpoint", "heun": "dpm_singlestep_heun"}[
            opts.get("solver_type", "dpm_solver")]}
    a = ds.sample(den, x.clone(), solver=solver, nfe=nfe, spacing="logsnr", final=final)
    assert float((a - ds.sample(den, x.clone(), solver=form.compile(grid=plan.grid))).abs().max()) <= 1e-12
    back = SolverSpec.from_yaml(form.to_yaml())
    assert back == form and float((a - ds.sample(den, x.clone(), solver=back.compile(sch))).abs().max()) <= 1e-5


def test_grid_rule_calls_at_the_grid_points(setup):
    """intermediate="grid": one call per grid point, a step of order k spans k intervals; the plan's grid
    is the steps' ends; the calls' times are the grid's exactly."""
    sch, den, x = setup
    from diffsampler.schedules import time_grid

    grid = time_grid(sch, 7, "time_uniform", final="zero")
    plan = ds.samplers.make_plan("dpmpp", sch, 7, grid=grid, order=3, intermediate="grid")
    assert plan.orders == [3, 3, 1] and plan.nfe == 7
    assert [ev.t for st in plan.steps for ev in st.evals] == grid.t[:-1].tolist()
    assert plan.grid.t.tolist() == grid.t[[0, 3, 6, 7]].tolist()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower", [False, True])
def test_diffusers_order_list(order, final, lower):
    """diffusers_singlestep_orders groups DPMSolverSinglestepScheduler's per-call order list (get_order_list,
    after set_timesteps' own forcing of lower_order_final) into steps, for every number of steps 1..30."""
    from diffusers import DPMSolverSinglestepScheduler

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    for steps in range(1, 31):
        if steps < order and not lower and final == "sigma_min":
            continue  # diffusers' own list is empty there (it forces lower_order_final only for steps % order)
        ref = DPMSolverSinglestepScheduler(solver_order=order, final_sigmas_type=final, lower_order_final=lower)
        ref.set_timesteps(steps)
        want = []
        for k in ref.order_list:
            if k == 1:
                want.append(1)
            else:
                assert want and k == want[-1] + 1
                want[-1] += 1
        assert diffusers_singlestep_orders(steps, order, lower, final == "zero") == want, (steps, ref.order_list)


def test_fast_order_list_spends_every_budget():
    """DPM-Solver-fast's list (Lu et al. 2022, Sec. 3.4; k-diffusion's dpm_solver_fast) spends exactly nfe
    calls for every nfe >= 1, with or without the first-order step onto sigma = 0."""
    for order in (1, 2, 3):
        for nfe in range(1, 40):
            for final_zero in (False, True):
                orders = singlestep_orders(nfe, order, final_zero)
                assert sum(orders) == nfe and all(1 <= k <= order for k in orders), (order, nfe, orders)
                assert not final_zero or orders[-1] == 1
    assert singlestep_orders(6, 3, False) == [3, 2, 1] and singlestep_orders(7, 3, False) == [3, 3, 1]


def test_sde_form_is_stochastic_and_per_sample_seeded(setup):
    """dpmpp with eta = 1 (SDE-DPM-Solver++ stages, diffusers' sde-dpmsolver++): stochastic, sample k depends
    only on seed k; eta = 0 gives the ODE solver back."""
    sch, den, x = setup
    s = ds.samplers.get("dpmpp", order=3, eta=1.0)
    assert s.stochastic and not ds.samplers.get("dpmpp").stochastic
    a = ds.sample(den, x[:4].clone(), solver="dpmpp", nfe=9, order=3, eta=1.0, seeds=[0, 1, 2, 3])
    b = ds.sample(den, x[2:3].clone(), solver="dpmpp", nfe=9, order=3, eta=1.0, seeds=[2])
    assert torch.equal(a[2:3], b)
    c = ds.sample(den, x[:4].clone(), solver="dpmpp", nfe=9, order=3, eta=1.0, seeds=[4, 5, 6, 7])
    assert float((a - c).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="stochastic"):
        spec_of(s, sch, 9)


@pytest.mark.parametrize("name,opts,match", [
    ("dpmpp", dict(intermediate="grid", orders="fixed"), "orders='fixed'"),
    ("dpmpp", dict(lower_order_final=True), "lower_order_final=True"),
    ("dpm_solver", dict(eta=1.0), "eta=1.0"),
    ("dpmpp", dict(eta=-1.0), "eta"),
    ("dpmpp", dict(third_order="diffusers"), "third_order='diffusers'"),
    ("dpmpp", dict(solver_type="bh2"), "solver_type"),
    ("dpmpp", dict(intermediate="middle"), "intermediate"),
    ("dpmpp", dict(order=4), "order"),
    ("dpm_fast", dict(orders="slow"), "orders"),
])
def test_options_refused_by_name(name, opts, match):
    with pytest.raises(ValueError, match=match):
        ds.samplers.get(name, **opts)


def test_grid_rule_needs_one_call_per_grid_point(setup):
    sch = setup[0]
    from diffsampler.schedules import time_grid

    grid = time_grid(sch, 6, "logsnr", final="zero")
    with pytest.raises(ValueError, match="nfe=5"):
        ds.samplers.make_plan("dpmpp", sch, 5, grid=grid, intermediate="grid")
