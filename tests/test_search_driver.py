"""The pieces of the S^3 driver on their own: the objective, the evolution loop and verification."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.samplers.usf import spec_of
from diffsampler.tools.search import (Batch, Objective, PlanSpace, Population, S3Settings, SearchResult, best_verified,
                                      calibration, calibration_seeds, evaluate, evolve, search, verify)
from diffsampler.tools.search_log import SearchLog

NFE = 4


@pytest.fixture(scope="module")
def problem(search_problem):
    gmm, sch, exact = search_problem
    return gmm_denoiser(gmm, sch, "epsilon"), sch, exact


def _batch(problem, n=16, offset=0):
    den, sch, exact = problem
    x = ds.samplers.initial_noise((n, 8), sch, seeds=calibration_seeds(n, offset)).double()
    ref = exact(x)
    return Batch(x, lambda y: float((y - ref).pow(2).mean().sqrt()))


def test_evaluate_scores_a_plan_on_its_batch(problem):
    den, sch, _ = problem
    batch = _batch(problem)
    plan = spec_of("dpmpp_2m", sch, NFE, "logsnr")
    x0 = batch.x_T.clone()
    expected = float((ds.sample(den, batch.x_T.clone(), solver=plan.compile(sch)) - _ref(problem, batch)).pow(2).mean().sqrt())
    assert evaluate(plan, den, batch) == pytest.approx(expected, rel=1e-12)
    assert torch.equal(batch.x_T, x0)  # the batch's noise is not overwritten
    assert evaluate(plan, den, Batch(batch.x_T, lambda y: float("nan"))) == math.inf


def _ref(problem, batch):
    return problem[2](batch.x_T)


def test_objective_caches_counts_and_logs(problem, tmp_path):
    den, sch, _ = problem
    log = SearchLog(tmp_path / "o.jsonl", {"nfe": NFE})
    obj = Objective(den, {"calib": _batch(problem), "verify": _batch(problem, 8, 16)}, log)
    plan = spec_of("deis_2", sch, NFE, "time_uniform")
    s = obj(plan)
    assert obj(plan) == s and obj.model_calls == NFE and obj.sample_evaluations == NFE * 16
    v = obj(plan, "verify")
    assert v != s and obj.model_calls == 2 * NFE and obj.sample_evaluations == NFE * (16 + 8)
    again = Objective(den, obj.batches, SearchLog(tmp_path / "o.jsonl", {"nfe": NFE}))
    assert again(plan) == s and again(plan, "verify") == v and again.model_calls == 0  # replayed from the log


def test_calibration_without_a_verifiable_reference_has_no_verify_batch(problem):
    den, sch, exact = problem
    seeds = calibration_seeds(24)
    x = ds.samplers.initial_noise((16, 8), sch, seeds=seeds[:16]).double()
    cal = calibration(den, (8,), seeds, 16, "rmse", exact(x), torch.float64)
    assert set(cal.batches) == {"calib"} and cal.model_calls == 0
    cal = calibration(den, (8,), seeds, 16, "rmse", exact, torch.float64)
    assert set(cal.batches) == {"calib", "verify"} and cal.batches["verify"].x_T.shape == (8, 8)
    with pytest.raises(ValueError, match="reference has shape"):
        calibration(den, (8,), seeds, 16, "rmse", exact(x[:4]), torch.float64)


def test_verify_rescores_the_top_k_and_picks_the_best_there(problem):
    den, sch, _ = problem
    plans = [spec_of("dpmpp_2m", sch, NFE, s) for s in ("logsnr", "time_uniform", "time_quadratic")]
    ranked = list(zip(plans, [0.1, 0.2, 0.3]))
    second = {p.key(): v for p, v in zip(plans, [0.5, 0.4, 0.1])}
    calls = []

    def objective(p):
        calls.append(p.key())
        return second[p.key()]

    top = verify(ranked, objective, 2)
    assert [p for p, _, _ in top] == plans[:2] and calls == [p.key() for p in plans[:2]]
    assert best_verified(top) == (plans[1], 0.2, 0.4)
    assert verify(ranked, None, 5) == [(plans[0], 0.1, 0.1)]  # nothing to verify on: calibration stands in
    assert verify(ranked, objective, 0) == [(plans[0], 0.1, 0.1)] and len(calls) == 2


def test_evolution_spends_the_budget_on_distinct_plans_deterministically(problem):
    den, sch, _ = problem
    space = PlanSpace(sch, NFE, ("zero",))

    def run():
        pop = Population(lambda p: float(np.mean(p.times)), budget=60)  # a cheap stand-in objective
        return evolve(space, pop, seed=1, batch=4, screen=4)

    a, b = run(), run()
    assert len(a.scored) == 60 and len({h["key"] for h in a.history}) == 60
    assert a.history == b.history
    assert all(p.nfe == NFE and p.final == "zero" for p, _ in a.scored.values())
    assert a.ranked()[0][1] == min(h["score"] for h in a.history)


def test_settings_check_every_value(problem):
    with pytest.raises(ValueError, match="batch must be >= 1"):
        S3Settings(batch=0).check()
    with pytest.raises(ValueError, match="seeds must be distinct"):
        S3Settings(n_calib=2, seeds=(1, 1, 2, 3)).check()
    assert S3Settings(n_calib=3, n_verify_samples=2).noise_seeds() == calibration_seeds(5)


def test_search_is_the_pieces_together(problem):
    den, sch, exact = problem
    r = search(den, NFE, shape=(8,), reference=exact, budget=12, n_calib=16, n_verify=2, dtype=torch.float64,
               progress=False)
    assert isinstance(r, SearchResult) and r.evaluations == 12 and len(r.top) == 2
    assert (r.plan.key(), r.calib_score, r.verify_score) == (best_verified(r.top)[0].key(), *best_verified(r.top)[1:])
