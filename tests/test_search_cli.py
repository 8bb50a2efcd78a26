"""`diffsampler search` as a Hydra job: every key checked before the model is built, disjoint seed
ranges, reference endpoints cached by model fingerprint, resumable log, plans with provenance that
load by name, time shift carried by a plan, the analytic first step kept out for non-zero means, and
a generation spread over 2 gloo ranks with the result of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import gmm_denoiser
from diffsampler.samplers.search import encode, has_analytic
from diffsampler.samplers.usf import SolverSpec, spec_of
from diffsampler.tools.config_schema import ConfigError
from diffsampler.tools.search import CALIBRATION_SEED_BASE, PlanSpace, Population, evolve
from diffsampler.tools.search_job import search_seeds, validate_search

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["search.nfe=4", "search.budget=10", "search.calib=16", "search.verify=16", "search.top_k=2",
         "search.batch=4", "progress=false"]


def composed(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("diffsampler.configs", version_base=None):
        return compose("search", overrides=list(overrides))


def _run(args, cwd, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "diffsampler", "search", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("overrides,message", [
    (["search.nfe=0"], "search.nfe must be an integer >= 1, got 0"),
    (["search.refine=-5"], "search.refine must be an integer >= 0, got -5"),
    (["search.refine=0.5"], "search.refine"),
    (["+search.budgt=3"], "unknown key search.budgt (did you mean search.budget?)"),
    (["search.metric=fid"], "search.metric=fid is for image models"),
    (["search.metric=fid_proxy"], "search.metric=fid_proxy (the digits classifier's features) needs model=digits"),
    (["search.metric=nope"], "search.metric must be one of ('rmse', 'fid', 'fid_proxy') or package.module:callable"),
    (["search.metric=math:nope"], "search.metric 'math:nope' cannot be loaded"),
    (["search.metric=math:pi"], "is not callable"),
    (["search.base=dpmpp_2m_sde"], "search.base='dpmpp_2m_sde' has no solver spec"),
    (["search.reference_solver=euler_ancestral"], "search.reference_solver must be a deterministic registered solver"),
    (["search.reference_nfe=50"], "search.reference_solver / search.reference_nfe take effect only with search.metric=rmse on a network model"),
    (["search.name=a/b"], "search.name must be a plan name"),
    (["search.holdout=2000000"], "search.holdout must be <= 1000000"),
    (["search.analytic=maybe"], "search.analytic must be true, false or auto"),
    (["guidance=svdd"], "guidance=svdd cannot be searched over"),
    (["eval.kid=true"], "eval.kid does not apply to diffsampler search"),
    (["eval.feature=digits"], "eval.feature takes effect only with search.metric=fid"),
    (["search.time_shift=true", "search.base=dpmpp_2m"], "search.time_shift=true with search.base"),
    (["device=cuda:7"], "device 'cuda:7'"),
    (["+search.extra=1"], "unknown key search.extra"),
])
def test_every_key_is_checked_before_the_model(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_search(composed(*overrides))
    assert message in str(e.value)


def test_defaults_validate_and_name_the_plan():
    spec = validate_search(composed("search.nfe=6"))
    assert spec.name == "gmm_nfe6" and spec.time_shift is False and spec.metric == "rmse"
    assert validate_search(composed("model=digits")).time_shift is True  # auto: on for trained networks
    assert validate_search(composed("model=digits", "search.metric=fid_proxy")).metric == "fid_proxy"


def test_calibration_verification_and_evaluation_seeds_never_overlap():
    for calib, verify, holdout in ((16, 16, 16), (1, 0, 1), (512, 512, CALIBRATION_SEED_BASE)):
        s = search_seeds(calib, verify, holdout)
        sets = [set(s[k]) for k in ("calib", "verify", "holdout")]
        assert [len(x) for x in sets] == [calib, verify, holdout]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    with pytest.raises(ConfigError):
        search_seeds(4, 4, CALIBRATION_SEED_BASE + 1)


def test_search_job_end_to_end_resume_and_plan_by_name(tmp_path):
    run, plans = tmp_path / "run", tmp_path / "plans"
    args = SMALL + [f"hydra.run.dir={run}", f"search.plan_dir={plans}", "search.name=my_gmm4", "search.holdout=32"]
    r = _run(args, tmp_path)
    assert r.returncode == 0, r.stderr
    for f in ("plan.yaml", "search.jsonl", "convergence.csv", "convergence.png", "comparison.csv", "comparison.md",
              "summary.json"):
        assert (run / f).is_file(), f
    plan = SolverSpec.load(plans / "my_gmm4.yaml")
    info = plan.info["search"]
    assert plan.nfe == 4 and info["metric"] == "rmse" and info["budget"] == 10 and info["model"] == "gmm"
    assert info["calib_seeds"] == "1000000..1000015" and info["verify_seeds"] == "1000016..1000031"
    assert info["holdout_seeds"] == "0..31" and len(info["model_hash"]) == 16
    assert info["analytic_first_step"].startswith("excluded (auto: data mean rms")  # the mixture's mean is not 0
    table = (run / "comparison.md").read_text()
    assert "searched plan my_gmm4" in table and "dpmpp_3m" in table and "diffusers DPMSolverMultistepScheduler" in table
    conv = (run / "convergence.csv").read_text().splitlines()
    assert conv[0] == "evaluations,best_calib,verify,key" and conv[-1].startswith("10,")
    lines = (run / "search.jsonl").read_text().splitlines()
    cli_log = (run / "cli.log").read_text()  # what happened, in order
    for needle in ("search (single, rank 0 of 1): ", "search.name=my_gmm4", "model=gmm ready",
                   "search done in", "10 evaluations", "wrote plan.yaml, convergence.csv, comparison.csv",
                   f"{plans}/my_gmm4.yaml", "best plan: name=my_gmm4"):
        assert needle in cli_log, needle
    # resume: the same run dir replays the log; nothing is evaluated twice
    r = _run(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "search.jsonl").read_text().splitlines() == lines
    assert SolverSpec.load(run / "plan.yaml").key() == plan.key()
    r = _run(args + ["model.seed=1"], tmp_path)  # another model: its log is not replayed
    assert r.returncode == 2 and "was written by a different search" in r.stderr and "model_hash" in r.stderr
    # by name: sample() (DIFFSAMPLER_PLAN_PATH), the adapter and Hydra (solver.plan_dir)
    from diffsampler.eval.gmm import GaussianMixture

    gmm = GaussianMixture.random(16, 6, seed=0, scale=1.5, std=(0.3, 0.6))  # configs/model/gmm.yaml
    den = gmm_denoiser(gmm, ds.DiscreteVP.linear(), "epsilon")
    os.environ["DIFFSAMPLER_PLAN_PATH"] = str(plans)
    try:
        x = ds.sample(den, shape=(4, 16), seeds=range(4), solver="plan:my_gmm4")
        y = ds.sample(den, shape=(4, 16), seeds=range(4), solver=plan.compile(den.schedule))
        assert torch.equal(x, y)
        from diffsampler.pipelines import DiffSamplerScheduler

        sched = DiffSamplerScheduler(solver="plan:my_gmm4")
        sched.set_timesteps(4)
        assert sched.plan.nfe == 4
    finally:
        del os.environ["DIFFSAMPLER_PLAN_PATH"]
    r = subprocess.run([sys.executable, "-m", "diffsampler", "solver=plan", "solver.path=my_gmm4",
                        f"solver.plan_dir={plans}", "nfe=4", "num_samples=8", "progress=false",
                        f"hydra.run.dir={tmp_path / 'sample'}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    assert "rmse=" in r.stdout
    r = subprocess.run([sys.executable, "-m", "diffsampler", "solver=plan", "solver.path=nope",
                        f"solver.plan_dir={plans}", "nfe=4"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 2 and "is not a plan name in solver.plan_dir" in r.stderr and "my_gmm4" in r.stderr


def test_a_sweep_over_nfe_writes_one_plan_per_nfe(tmp_path):
    plans = tmp_path / "plans"
    r = _run(["-m", "search.nfe=3,4", "search.budget=6", "search.calib=8", "search.verify=0", "search.holdout=0",
              "search.batch=3", "progress=false", f"search.plan_dir={plans}", f"hydra.sweep.dir={tmp_path / 'sw'}"],
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in plans.glob("*.yaml")) == ["gmm_nfe3.yaml", "gmm_nfe4.yaml"]
    assert [SolverSpec.load(plans / f"gmm_nfe{k}.yaml").nfe for k in (3, 4)] == [3, 4]


def test_time_shift_is_part_of_a_plan(search_problem):
    gmm, sch, _ = search_problem
    den = gmm_denoiser(gmm, sch, "epsilon")
    plain = spec_of("dpmpp_2m", sch, 6, "time_uniform")
    shifted = SolverSpec(plain.steps, plain.times, plain.final, time_shift={"window": 20, "cutoff": 300})
    again = SolverSpec.from_yaml(shifted.to_yaml())
    assert again.time_shift == {"window": 20, "cutoff": 300} and again.key() == shifted.key() != plain.key()
    assert not np.array_equal(encode(plain, 7), encode(shifted, 7))
    x_T = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = ds.sample(den, x_T.clone(), solver=shifted.compile(sch))
    b = ds.sample(den, x_T.clone(), solver=plain.compile(sch), time_shift={"window": 20, "cutoff": 300})
    assert torch.equal(a, b) and not torch.equal(a, ds.sample(den, x_T.clone(), solver=plain.compile(sch)))
    with pytest.raises(ValueError, match="carries its own time_shift"):
        ds.sample(den, x_T.clone(), solver=shifted.compile(sch), time_shift={"window": 4, "cutoff": 300})
    with pytest.raises(ValueError, match="time_shift window must be an integer >= 2"):
        SolverSpec(plain.steps, plain.times, time_shift={"window": 1, "cutoff": 300})
    with pytest.raises(ValueError, match="exactly the keys"):
        SolverSpec(plain.steps, plain.times, time_shift={"window": 4})
    from diffsampler.pipelines import DiffSamplerScheduler

    with pytest.raises(ValueError, match="carries time_shift"):
        DiffSamplerScheduler(solver="plan", solver_options={"plan": shifted}).set_timesteps(6)


def test_the_search_space_keeps_out_the_analytic_step_and_searches_the_time_shift(search_problem):
    _, sch, _ = search_problem
    space = PlanSpace(sch, 4, ("zero", "last"), analytic=False, time_shift=True)
    pop = evolve(space, Population(lambda p: float(np.mean(p.times)) + (0.1 if p.time_shift else 0.0), 120),
                 seed=0, batch=8, screen=4)
    plans = [p for p, _ in pop.scored.values()]
    assert not any(has_analytic(p) for p in plans)
    shifts = [p.time_shift for p in plans]
    assert any(s is None for s in shifts) and sum(s is not None for s in shifts) > 10
    assert all(2 <= s["window"] <= 100 and 0 <= s["cutoff"] < 1000 for s in shifts if s)
    full = PlanSpace(sch, 4, ("zero",))
    rng = np.random.default_rng(0)
    assert any(has_analytic(full.random(rng)) for _ in range(200))  # the default space has it


def test_two_gloo_ranks_give_the_log_and_plan_of_one_process(tmp_path):
    """The evolution's generations and the CMA-ES refinement's (search.refine) spread over 2 ranks."""
    args = SMALL + ["search.holdout=0", "search.budget=12", "search.refine=8"]
    one = _run(args + [f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr
    env = {**ENV, "MASTER_ADDR": "127.0.0.1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "diffsampler", "search", *args, f"hydra.run.dir={tmp_path / 'two'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def evals(d):
        return [(r["phase"], r["key"], r["score"]) for r in map(json.loads, (d / "search.jsonl").read_text().splitlines())
                if r["type"] == "eval"]

    assert evals(tmp_path / "one") == evals(tmp_path / "two")
    assert len([e for e in evals(tmp_path / "two") if e[0] == "calib"]) == 12 + 8
    assert (tmp_path / "one" / "plan.yaml").read_text().replace("world_size: 1", "") == \
        (tmp_path / "two" / "plan.yaml").read_text().replace("world_size: 2", "")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_a_plan_scored_in_chunks_scores_the_same(search_problem):
    from diffsampler.tools.search import Batch, evaluate

    gmm, sch, exact = search_problem
    den = gmm_denoiser(gmm, sch, "epsilon")
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact(x)

    def score(y):
        return float((y - ref).pow(2).mean().sqrt())

    plan = spec_of("dpmpp_3m", sch, 5, "logsnr")
    whole, chunked = evaluate(plan, den, Batch(x, score)), evaluate(plan, den, Batch(x, score, chunk=3))
    assert chunked == pytest.approx(whole, rel=1e-12) and den.nfe == 5 + 5 * 4  # 4 chunks of 3, 3, 3, 1
