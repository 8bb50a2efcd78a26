"""Solver plans (USF): registered solvers as plans, YAML, validation, measured orders, use by name."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, GMMModel, gmm_denoiser
from diffsampler.samplers.usf import SolverSpec, StepSpec, available_plans, load_plan, spec_of

D, M, DT, N = "data", "multistep", torch.float64, 64


@pytest.fixture(scope="module")
def vp():
    gmm = GaussianMixture.random(8, 4, seed=0, scale=1.5, std=(0.3, 0.6))
    sch = ds.DiscreteVP.linear()
    x = torch.randn(N, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    return gmm, sch, gmm_denoiser(gmm, sch, "epsilon"), x


# ---------------------------------------------------------------------------------------------
# the registered solvers are plans
# ---------------------------------------------------------------------------------------------

#: adaptive solvers (dpm_adaptive) choose their steps at run time: no fixed plan form (refused, tested below)
DETERMINISTIC = [n for n in ds.available()
                 if not ds.samplers.info(n)["stochastic"] and not ds.samplers.info(n).get("adaptive")]


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("nfe,spacing,final", [(4, "logsnr", "zero"), (5, "time_uniform", "zero"),
                                               (7, "time_quadratic", "last"), (10, "logsnr", "last")])
def test_plan_form_gives_the_named_solvers_samples(vp, name, nfe, spacing, final):
    """Every deterministic registered solver has a solver spec with the same samples (float64, exact
    mixture): <= 1e-12 compiled on the solver's grid; through YAML and back <= 1e-5 (measured
    <= 1e-12: the only difference is the time round trip through the normalised log-SNR)."""
    gmm, sch, den, x = vp
    form = spec_of(name, sch, nfe, spacing, final)
    sp = SolverSpec.from_yaml(form.to_yaml())
    a = ds.sample(den, x.clone(), solver=name, nfe=nfe, spacing=spacing, final=final)
    grid = ds.samplers.make_plan(name, sch, nfe, spacing, final).grid
    assert float((a - ds.sample(den, x.clone(), solver=form.compile(grid=grid))).abs().max()) <= 1e-12
    b = ds.sample(den, x.clone(), solver=sp.compile(sch))
    assert sp == form and sp.nfe == nfe and float((a - b).abs().max()) <= 1e-5


def test_every_deterministic_solver_has_a_plan_form():
    from diffsampler.samplers.usf import spec_solvers

    assert set(DETERMINISTIC) <= set(spec_solvers())
    with pytest.raises(ValueError, match="stochastic"):
        spec_of("dpmpp_2m_sde", ds.DiscreteVP.linear(), 5)
    adaptive = [n for n in ds.available() if ds.samplers.info(n).get("adaptive")]
    assert adaptive and not set(adaptive) & set(spec_solvers())
    for name in adaptive:
        with pytest.raises(ValueError, match="adaptive"):
            spec_of(name, ds.DiscreteVP.linear(), 5)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("nfe", [4, 5, 10])
def test_unipc_plan_equals_diffusers_unipc(vp, order, nfe):
    """The 'unipc' estimator with a corrector on every step but the last is diffusers'
    UniPCMultistepScheduler (bh2, data prediction) on its default grid: max abs diff <= 1e-4
    (measured <= 3e-6, diffusers computes in float32 inside; solvers differ by 0.05-0.4 here)."""
    import diffusers

    gmm, sch, den, x = vp
    s = diffusers.UniPCMultistepScheduler(solver_order=order)
    s.set_timesteps(nfe)
    model, y = GMMModel(gmm, sch, "epsilon"), x.clone()
    for t in s.timesteps:
        y = s.step(model(y, t).sample, t, y).prev_sample
    sp = spec_of(f"unipc_{order}", sch, nfe, "linspace")
    assert all(st.corrector for st in sp.steps[:-1]) and sp.nfe == nfe
    assert float((ds.sample(den, x.clone(), solver=sp.compile(sch)) - y).abs().max()) <= 1e-4


def test_yaml_round_trip_and_fields():
    sp = SolverSpec((StepSpec(D, 1, M, analytic=True), StepSpec(D, 2, "singlestep", r=(0.4,)),
                     StepSpec(D, 2, M, corrector=True), StepSpec(D, 3, M), StepSpec(D, 1, M)),
                    (0.0, 0.1, 0.3, 0.6, 0.8, 1.0), name="demo")
    text = sp.to_yaml()
    back = SolverSpec.from_yaml(text)
    assert back == sp and back.nfe == 5 == sp.nfe  # analytic: 0 calls, singlestep order 2: 2 calls
    assert "analytic: true" in text and "corrector: true" in text and "r: [0.4]" in text
    assert sp.orders == [1, 2, 2, 3, 1]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

T3 = (0.0, 0.3, 0.6, 1.0)


@pytest.mark.parametrize("steps,times,kw,message", [
    ((StepSpec(D, 2, M), StepSpec(D, 1, M), StepSpec(D, 1, M)), T3, {},
     "step 0: order 2 with estimator 'multistep' needs data outputs at grid points [-1]"),
    ((StepSpec(D, 1, M), StepSpec("noise", 2, M), StepSpec(D, 1, M)), T3, {},
     "step 1: order 2 with estimator 'multistep' needs noise outputs"),
    ((StepSpec("noise", 1, M, analytic=True), StepSpec("noise", 2, "multistep_t"), StepSpec("noise", 1, M)), T3, {},
     "an analytic first step gives no noise output"),
    ((StepSpec(D, 1, M),) * 3, (0.0, 0.6, 0.3, 1.0), {}, "strictly increasing (noise -> data): times[1]=0.6"),
    ((StepSpec(D, 1, M),) * 3, (0.0, 0.3, 1.0), {}, "3 steps need 4 time points, got 3"),
    ((StepSpec(D, 1, M),) * 3, (-0.1, 0.3, 0.6, 1.0), {}, "time points run from a start in [0, 1)"),
    ((StepSpec(D, 1, M),) * 3, (0.0, 0.3, 0.6, 0.9), {}, "got first 0.0, last 0.9"),
    ((StepSpec(D, 1, M), StepSpec(D, 1, M), StepSpec(D, 1, M, corrector=True)), T3, {}, "no corrector on the last step"),
    ((StepSpec(D, 1, M, corrector=True), StepSpec("noise", 1, M), StepSpec(D, 1, M)), T3, {},
     "its corrector reuses the noise output of step 1"),
    ((StepSpec(D, 1, M), StepSpec(D, 1, M, analytic=True), StepSpec(D, 1, M)), T3, {}, "only the first step can be analytic"),
    ((StepSpec(D, 1, M), StepSpec(D, 2, M), StepSpec(D, 2, M)), T3, {}, "the step onto sigma = 0"),
    ((StepSpec(D, 1, M), StepSpec(D, 1, M), StepSpec(D, 2, "singlestep")), T3, {}, "intermediate points would sit at sigma = 0"),
    ((StepSpec(D, 1, M),) * 3, T3, {"info": {"nfe": 4}}, "declares nfe=4 but its steps spend 3 model calls"),
    ((StepSpec(D, 1, M),) * 3, T3, {"final": "end"}, "final must be one of ('zero', 'last')"),
    ((StepSpec(D, 1, M), StepSpec(D, 2, "ghvb", beta=0.5), StepSpec(D, 1, M)), T3, {},
     "step 1: order 2 with estimator 'ghvb' needs velocities at the previous 1 grid points"),
])
def test_invalid_plans_are_rejected(steps, times, kw, message):
    with pytest.raises(ValueError, match=None) as e:
        SolverSpec(steps, times, **kw)
    assert message in str(e.value)


@pytest.mark.parametrize("kw,message", [
    (dict(prediction="x0"), "prediction must be one of ('data', 'noise'), got 'x0'"),
    (dict(order=5), "order must be an integer in 1..4, got 5"),
    (dict(estimator="rk"), "estimator must be one of"),
    (dict(estimator="multistep_t"), "integrates the noise prediction"),
    (dict(order=2, estimator="singlestep", corrector=True), "a corrector runs on 'multistep', 'unipc' or 'fallback' steps"),
    (dict(order=3, estimator="singlestep", r=(0.6, 0.3)), "r must be 2 increasing fractions in (0, 1)"),
    (dict(order=2, analytic=True), "an analytic step is first order"),
    (dict(order=2, beta=0.5), "beta (momentum) is given with estimator 'multistep_dpm', 'multistep_t', 'ghvb'"),
    (dict(order=2, estimator="ghvb"), "beta (momentum) is given with estimator"),
    (dict(order=3, estimator="singlestep_dpm"), "integrates the data prediction with order <= 2"),
    (dict(order=2, estimator="ghvb", beta=1.5), "beta (GHVB momentum) must be in (0, 1], got 1.5"),
    (dict(order=2, estimator="ghvb", beta=0.5, relax=0.1), "relax scales the first-derivative estimate"),
])
def test_invalid_steps_are_rejected(kw, message):
    with pytest.raises(ValueError) as e:
        StepSpec(**kw)
    assert message in str(e.value)


def test_yaml_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"unknown step field\(s\) \['oder'\]"):
        SolverSpec.from_yaml("times: [0.0, 1.0]\nsteps:\n- {prediction: data, oder: 1}\n")
    with pytest.raises(ValueError, match="solver plan has no 'times'"):
        SolverSpec.from_yaml("steps: []\n")
    with pytest.raises(ValueError, match="declares nfe=3"):
        SolverSpec.from_yaml("nfe: 3\ntimes: [0.0, 1.0]\nsteps:\n- {prediction: data, order: 1}\n")


def test_fallback_uses_the_history_it_has():
    sp = SolverSpec((StepSpec(D, 3, "fallback"),) * 4 + (StepSpec(D, 1, M),), (0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    assert sp.orders == [1, 2, 3, 3, 1]


# ---------------------------------------------------------------------------------------------
# measured convergence orders (as tests/test_convergence.py: continuous VP, RMSE vs the exact
# PF-ODE endpoint at t_min, final="last", least-squares slope of log error vs log NFE, +-0.3)
# ---------------------------------------------------------------------------------------------

def _uniform(step: StepSpec, n: int, first: StepSpec | None = None) -> SolverSpec:
    steps = [step] * n
    if step.corrector:
        steps[-1] = StepSpec(step.prediction, step.order, step.estimator)
    if first is not None:
        steps[0] = first
    return SolverSpec(tuple(steps), tuple(np.linspace(0.0, 1.0, n + 1)), final="last")


ORDERS = {  # plan -> (expected order, steps, why)
    "data, multistep 1": (StepSpec(D, 1, "fallback"), 1, (80, 160, 320), "DDIM"),
    "data, multistep 2": (StepSpec(D, 2, "fallback"), 2, (40, 80, 160), "exact Taylor, 2 points"),
    "data, multistep 3": (StepSpec(D, 3, "fallback"), 3, (40, 80, 160),
                          "exact Taylor weights keep order 3 despite the first-order start"),
    "data, DPM-Solver++ 3M weights": (StepSpec(D, 3, "fallback"), 2, (160, 320, 640),
                                      "half-weight second derivative: second order (see dpmpp_3m)"),
    "noise, multistep 3": (StepSpec("noise", 3, "fallback"), 3, (40, 80, 160), "DPM-Solver multistep, exact Taylor"),
    "data, singlestep 2": (StepSpec(D, 2, "singlestep"), 2, (40, 80, 160), "one midpoint"),
    "data, singlestep 3": (StepSpec(D, 3, "singlestep"), 3, (20, 40, 80), "two intermediate points"),
    "data, multistep 1 + corrector": (StepSpec(D, 1, "fallback", corrector=True), 2, (40, 80, 160), "UniC raises the order by 1"),
    "data, multistep 2 + corrector": (StepSpec(D, 2, "fallback", corrector=True), 3, (40, 80, 160), "UniC raises the order by 1"),
}


@pytest.fixture(scope="module")
def linear_vp():
    gmm = GaussianMixture.random(8, 4, seed=0, scale=1.5, std=(0.3, 0.6))
    sch = ds.LinearVP()
    x = torch.randn(N, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    a0, s0 = float(sch.alpha(sch.t_max)), float(sch.sigma(sch.t_max))
    a1, s1 = float(sch.alpha(sch.t_min)), float(sch.sigma(sch.t_min))
    return sch, gmm_denoiser(gmm, sch, "epsilon"), x, gmm.ode_endpoint(x, a0, s0, a1, s1)


@pytest.mark.parametrize("label", sorted(ORDERS))
def test_plan_convergence_order(linear_vp, label):
    sch, den, x, ref = linear_vp
    step, order, steps, why = ORDERS[label]
    errs, nfes = [], []
    for n in steps:
        sp = _uniform(step, n)
        if "DPM-Solver++" in label:
            sp = sp.with_steps([StepSpec(D, k, "multistep_dpm") for k in sp.orders])
        plan = sp.compile(sch)
        errs.append(float((ds.sample(den, x.clone(), solver=plan) - ref).pow(2).mean().sqrt()))
        nfes.append(plan.nfe)
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.3, f"{label}: measured order {slope:.2f}, expected {order} ({why}); errors {errs}"


def test_corrector_and_analytic_first_step_cost_no_model_call(vp):
    gmm, sch, den, x = vp
    times = (0.0, 0.3, 0.5, 0.7, 1.0)
    plain = SolverSpec((StepSpec(D, 1, M), StepSpec(D, 2, M), StepSpec(D, 2, M), StepSpec(D, 1, M)), times)
    corr = SolverSpec((StepSpec(D, 1, M, corrector=True), StepSpec(D, 2, M, corrector=True), StepSpec(D, 2, M),
                       StepSpec(D, 1, M)), times)
    ana = SolverSpec((StepSpec(D, 1, M, analytic=True),) + plain.steps[1:], times)
    den.reset_nfe()
    ds.sample(den, x.clone(), solver=corr.compile(sch))
    assert den.nfe == plain.nfe == corr.nfe == 4
    p = ana.compile(sch)
    assert ana.nfe == p.nfe == 3 and p.steps[0].evals == ()
    g = p.grid
    assert p.steps[0].update.cx == pytest.approx(float(g.sigma[1] / g.sigma[0])) and not p.steps[0].update.terms
    den.reset_nfe()
    ds.sample(den, x.clone(), solver=p)
    assert den.nfe == 3


# ---------------------------------------------------------------------------------------------
# use by name
# ---------------------------------------------------------------------------------------------

def test_plan_by_path_and_by_name_in_sample(vp, tmp_path, monkeypatch):
    gmm, sch, den, x = vp
    sp = spec_of("dpmpp_3m", sch, 6, "logsnr")
    path = sp.save(tmp_path / "mine.yaml")
    ref = ds.sample(den, x.clone(), solver="dpmpp_3m", nfe=6, spacing="logsnr")

    def same(y):  # float64; the times differ from the solver's by the log-SNR round trip (~1e-15)
        return float((y - ref).abs().max()) <= 1e-10

    assert same(ds.sample(den, x.clone(), solver=f"plan:{path}", nfe=6))
    assert same(ds.sample(den, x.clone(), solver="plan", path=str(path), nfe=None))
    monkeypatch.setenv("DIFFSAMPLER_PLAN_PATH", str(tmp_path))
    assert "mine" in available_plans()
    assert same(ds.sample(den, x.clone(), solver="plan:mine", nfe=6))
    assert ds.samplers.info("plan:mine")["min_nfe"] == 6
    with pytest.raises(ValueError, match="spends exactly 6 model calls .* got nfe=5"):
        ds.sample(den, x.clone(), solver="plan:mine", nfe=5)
    with pytest.raises(ValueError, match="carries its own time points; spacing='karras'"):
        ds.sample(den, x.clone(), solver="plan:mine", nfe=6, spacing="karras")
    with pytest.raises(ValueError, match="unknown plan 'nope'"):
        ds.sample(den, x.clone(), solver="plan:nope", nfe=6)
    with pytest.raises(ValueError, match="solver 'plan' needs exactly one of path="):
        ds.sample(den, x.clone(), solver="plan", nfe=6)
    with pytest.raises(ValueError, match="final='last'"):
        ds.sample(den, x.clone(), solver="plan:mine", nfe=6, final="last")


def test_plan_in_the_diffusers_adapter(vp, tmp_path):
    """The adapter runs a plan at the plan's own times, model call by model call, exactly as it
    runs the registered solver the plan reproduces."""
    from diffsampler.pipelines.scheduler import DiffSamplerScheduler

    gmm, sch, den, x = vp
    path = spec_of("dpmpp_3m", sch, 6, "logsnr").save(tmp_path / "p.yaml")
    model = GMMModel(gmm, sch, "epsilon")
    outs = []
    for kw in (dict(solver=f"plan:{path}"), dict(solver="dpmpp_3m", spacing="logsnr")):
        s = DiffSamplerScheduler(**kw)
        s.set_timesteps(6)
        y = x.clone()
        for t in s.timesteps:
            y = s.step(model(y, t).sample, t, y).prev_sample
        outs.append((s.timesteps.clone(), y))
    assert torch.equal(outs[0][0], outs[1][0]) and float((outs[0][1] - outs[1][1]).abs().max()) <= 1e-10
    with pytest.raises(ValueError, match="spends exactly 6 model calls"):
        DiffSamplerScheduler(solver=f"plan:{path}").set_timesteps(7)


def test_plan_from_hydra(tmp_path):
    path = spec_of("dpmpp_2m", ds.DiscreteVP.linear(), 5, "logsnr").save(tmp_path / "p.yaml")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "diffsampler", "solver=plan", f"solver.path={path}", "nfe=5",
                        "num_samples=16", "progress=false", f"hydra.run.dir={run}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(run / "results.csv")
    assert df.solver[0] == "plan" and df.nfe_counted[0] == 5 and df.spacing[0] == "plan" and str(path) in df.solver_options[0]
    # a plan that ends at t_min runs without final=last: the plan's own end point is the default
    last = spec_of("dpmpp_2m", ds.DiscreteVP.linear(), 5, "logsnr", final="last").save(tmp_path / "last.yaml")
    r = subprocess.run([sys.executable, "-m", "diffsampler", "solver=plan", f"solver.path={last}", "nfe=5",
                        "num_samples=16", "progress=false", f"hydra.run.dir={run}3"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(run / "results.csv").final.tolist() == ["zero"] and pd.read_csv(run.parent / "run3" / "results.csv").final[0] == "last"
    r = subprocess.run([sys.executable, "-m", "diffsampler", "solver=plan", "nfe=5", f"hydra.run.dir={run}2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "solver 'plan' needs exactly one of path=" in r.stderr


def test_shipped_plans_load_by_name():
    """benchmarks/search.py ships the plans it found for the mixture at NFE 4, 5, 6, 8 and 10."""
    names = [n for n in available_plans() if n.startswith("gmm_nfe")]
    assert sorted(names) == sorted(f"gmm_nfe{k}" for k in (4, 5, 6, 8, 10)), names
    for n in names:
        sp = load_plan(n)
        assert sp.nfe == int(n.rsplit("nfe", 1)[1]) and ds.samplers.get(f"plan:{n}").plan == sp


# ---------------------------------------------------------------------------------------------
# linear relaxation of the first-derivative estimate
# ---------------------------------------------------------------------------------------------

def test_relaxation_scales_the_first_derivative_term():
    """exp_weights with relax = c differs from the plain weights by exactly the first-derivative
    term times c h: alpha_t h^2 phi_2(-h) * c h * (D_s - D_prev) / (lambda_s - lambda_prev)."""
    from diffsampler.samplers.usf import exp_weights, phi

    lam_prev, lam_s, lam_t = -1.3, -0.4, 0.9
    a_s, s_s, a_t, s_t = 0.55, 0.83, 0.93, 0.37
    h, c = lam_t - lam_s, 0.35
    _, w0 = exp_weights("data", [lam_s, lam_prev], lam_s, lam_t, a_s, s_s, a_t, s_t)
    _, w1 = exp_weights("data", [lam_s, lam_prev], lam_s, lam_t, a_s, s_s, a_t, s_t, relax=c)
    extra = a_t * h ** 2 * phi(2, -h) * c * h / (lam_s - lam_prev)
    assert np.allclose(np.subtract(w1, w0), [extra, -extra], rtol=1e-12, atol=0)
    # with three points D' is the derivative at lambda_s of the quadratic through them: the change
    # of each weight is the first-derivative weight times c h times l_j'(lambda_s)
    nodes = [lam_s, lam_prev, lam_prev - 0.7]
    _, v0 = exp_weights("data", nodes, lam_s, lam_t, a_s, s_s, a_t, s_t)
    _, v1 = exp_weights("data", nodes, lam_s, lam_t, a_s, s_s, a_t, s_t, relax=c)
    dl = [np.polyval(np.polyder(np.polyfit(nodes, np.eye(3)[j], 2)), lam_s) for j in range(3)]
    assert np.allclose(np.subtract(v1, v0), a_t * h ** 2 * phi(2, -h) * c * h * np.array(dl), rtol=1e-9, atol=1e-12)


def test_relaxation_round_trip_validation_and_order(linear_vp):
    sp = SolverSpec((StepSpec(D, 1, M), StepSpec(D, 2, M, relax=-0.25), StepSpec(D, 2, "singlestep", relax=0.1),
                     StepSpec(D, 1, M)), (0.0, 0.3, 0.5, 0.7, 1.0))
    text = sp.to_yaml()
    assert "relax: -0.25" in text and SolverSpec.from_yaml(text) == sp
    for kw, msg in [(dict(order=1, relax=0.2), "order 1"), (dict(prediction="noise", order=2, estimator="multistep_t", relax=0.2),
                    "multistep_t"), (dict(order=2, relax=float("nan")), "relax must be a finite number, got nan"),
                    (dict(order=2, relax="big"), "relax must be a finite number, got 'big'")]:
        with pytest.raises(ValueError, match=msg):
            StepSpec(**kw)
    # relax = c adds an O(h) relative error to the first-derivative term: an order-2 step keeps
    # order 2, an order-3 step drops to 2; relaxing does change the samples
    sch, den, x, ref = linear_vp
    for order, expected in ((2, 2), (3, 2)):
        errs, nfes = [], []
        for n in (40, 80, 160):
            plan = _uniform(StepSpec(D, order, "fallback", relax=0.5), n).compile(sch)
            errs.append(float((ds.sample(den, x.clone(), solver=plan) - ref).pow(2).mean().sqrt()))
            nfes.append(plan.nfe)
        slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
        assert abs(slope - expected) <= 0.3, (order, slope, errs)
    plain = _uniform(StepSpec(D, 3, "fallback"), 40).compile(sch)
    assert float((ds.sample(den, x.clone(), solver=plain) - ref).pow(2).mean().sqrt()) < errs[0]
