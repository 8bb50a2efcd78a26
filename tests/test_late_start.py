"""Plans that start after t_max (issue 17: the searched start; diffusers' "leading" timesteps start
there too): the grid keeps the start, the engine takes x_T as the sample there, the search seeds and
moves it, the adapter runs it, and variance-exploding schedules refuse it by name."""

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GMMModel, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers.search import INIT_STARTS, START_MAX, START_SOLVERS, mutate, with_start
from diffsampler.samplers.usf import SolverSpec, StepSpec, spec_of
from diffsampler.schedules import EDM, time_grid
from diffsampler.tools.config_schema import ConfigError
from diffsampler.tools.search import PlanSpace, Population, evolve, search
from diffsampler.tools.search_job import late_start_rule, validate_search

from diffusers_loop import run_diffusers
from test_search_cli import composed


def _x(n=8, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ipndm", "deis_3"])
def test_spec_of_keeps_a_grids_later_start(search_problem, solver):
    """spec_of on diffusers' leading timesteps (first call at t = 830 of 999 for 6 steps) starts there,
    and the plan computes what the solver computes on that grid."""
    gmm, sch, _ = search_problem
    den = gmm_denoiser(gmm, sch, "epsilon")
    sp = spec_of(solver, sch, 6, "leading")
    grid = time_grid(sch, 6, "leading", final="zero")
    assert sp.times[0] > 0.1 and float(grid.t[0]) < sch.t_max
    assert torch.allclose(sp.grid(sch).t, grid.t, atol=1e-6)
    again = SolverSpec.from_yaml(sp.to_yaml())
    assert again.times == sp.times and again.key() == sp.key()
    a = ds.sample(den, _x(), solver=sp.compile(sch))
    b = ds.sample(den, _x(), solver=solver, nfe=6, spacing="leading", final="zero")
    assert (a - b).abs().max().item() < 1e-8
    assert spec_of(solver, sch, 6, "time_uniform").times[0] == 0.0


def test_a_later_start_takes_x_T_as_the_sample_there(search_problem):
    """One DDIM step onto sigma = 0 from the start returns the exact posterior mean E[x0 | x_t0 = x_T]
    at the start's time, not at t_max."""
    gmm, sch, _ = search_problem
    den = gmm_denoiser(gmm, sch, "epsilon")
    plan = SolverSpec((StepSpec("data", 1, "multistep"),), (0.3, 1.0), "zero")
    t0 = plan.grid(sch).t[0]
    assert sch.t_min < float(t0) < sch.t_max
    x = _x()
    out = ds.sample(den, x.clone(), solver=plan.compile(sch))
    exact = gmm.posterior_mean(x, sch.alpha(t0), sch.sigma(t0))
    assert (out - exact).abs().max().item() < 1e-6  # the network runs in float32
    at_t_max = gmm.posterior_mean(x, sch.alpha(torch.tensor(sch.t_max)), sch.sigma(torch.tensor(sch.t_max)))
    assert (out - at_t_max).abs().max().item() > 1e-2


def test_the_adapter_runs_a_plan_with_a_later_start(gmm16):
    """In a diffusers loop (init_noise_sigma = 1) the plan's first timestep is its start."""
    sch = ds.DiscreteVP.linear()
    plan = with_start(spec_of("dpmpp_2m", sch, 5, "time_uniform").times, 0.2)
    sp = spec_of("dpmpp_2m", sch, 5, "time_uniform").with_times(plan)
    sched = DiffSamplerScheduler(solver="plan", solver_options={"plan": sp})
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    ours = run_diffusers(sched, GMMModel(gmm16, sched.schedule), 5, x)
    assert float(sched.timesteps[0]) < sch.t_max - 50
    ref = ds.sample(gmm_denoiser(gmm16, sched.schedule), x.clone(), solver=sp.compile(sched.schedule))
    assert (ours - ref).abs().max().item() <= 1e-6


def test_variance_exploding_schedules_refuse_a_later_start(search_problem):
    gmm, _, _ = search_problem
    ve = EDM()
    plan = SolverSpec((StepSpec("data", 1, "multistep"),) * 2, (0.1, 0.5, 1.0), "zero")
    with pytest.raises(ValueError, match=r"starts at times\[0\] = 0.1, after t_max.*variance-exploding"):
        plan.grid(ve)
    den = gmm_denoiser(gmm, ve, "epsilon")
    with pytest.raises(ValueError, match="late_start=True needs a unit-variance prior"):
        search(den, 4, shape=(8,), budget=4, n_calib=8, n_verify=0, late_start=True, progress=False,
               reference=torch.zeros(8, 8))
    assert den.nfe == 0  # refused before any model call
    spec = validate_search(composed("model.schedule=edm", "search.late_start=true"))
    with pytest.raises(ConfigError, match="search.late_start=true needs a unit-variance prior"):
        late_start_rule(spec, ve)
    assert late_start_rule(validate_search(composed("model.schedule=edm")), ve) is False  # auto
    assert late_start_rule(validate_search(composed()), ds.DiscreteVP.linear()) is True
    assert late_start_rule(validate_search(composed("search.late_start=false")), ds.DiscreteVP.linear()) is False
    with pytest.raises(ConfigError, match="search.late_start must be true, false or auto"):
        validate_search(composed("search.late_start=maybe"))


def test_the_search_seeds_and_moves_the_start(search_problem):
    """With late_start the initial population holds START_SOLVERS at INIT_STARTS and mutation moves
    the start within [0, START_MAX] (back to t_max included); without it every plan starts at t_max."""
    _, sch, _ = search_problem
    space = PlanSpace(sch, 5, ("zero", "last"), late_start=True)
    seeds = space.seed_plans()
    late = [p for p in seeds if p.times[0] > 0]
    assert len(late) == len(START_SOLVERS) * len(INIT_STARTS)
    assert sorted({round(p.times[0], 12) for p in late}) == list(INIT_STARTS)
    # an objective that rewards a start near 0.15 and is indifferent to the rest
    pop = evolve(space, Population(lambda p: abs(p.times[0] - 0.15) + 1e-3 * float(np.mean(p.times)), 150),
                 seed=0, batch=8, screen=4)
    starts = [p.times[0] for p, _ in pop.scored.values()]
    assert all(0.0 <= s <= START_MAX for s in starts)
    assert len({round(s, 6) for s in starts}) > 10
    assert abs(pop.ranked()[0][0].times[0] - 0.15) < 0.02
    rng = np.random.default_rng(0)
    moved = [mutate(rng, late[0], finals=("zero",), late_start=True) for _ in range(400)]
    assert any(c is not None and c.times[0] == 0.0 for c in moved)  # back to t_max
    off = PlanSpace(sch, 5, ("zero", "last"))
    assert all(p.times[0] == 0.0 for p in off.seed_plans())
    pop = evolve(off, Population(lambda p: float(np.mean(p.times)), 60), seed=0, batch=8, screen=4)
    assert all(p.times[0] == 0.0 for p, _ in pop.scored.values())
