"""Every time-shift setting and every plan-file field either takes effect or is refused, before any
model call, with an error naming the key or field, the bad value and what is allowed."""

import re

import pytest
import torch
import yaml

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, gmm_denoiser
from diffsampler.samplers.loop import make_plan
from diffsampler.samplers.plan import run_plan
from diffsampler.samplers.time_shift import TimeShift
from diffsampler.samplers.usf import SpecSolver, SolverSpec, StepSpec, load_plan

GMM = GaussianMixture.random(4, 3, seed=0)


def counting(schedule):
    return gmm_denoiser(GMM, schedule)


def noise(n=64, seed=1):
    return torch.randn(n, GMM.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# time shift: one unit (training steps) on every schedule, no silent no-op
# ----------------------------------------------------------------------------------------------

def test_item13_paper_setting_shifts_on_a_continuous_schedule():
    """w = 80, t_c = 300 (training steps) moves samples on LinearVP as it does on DiscreteVP."""
    for sch in (ds.LinearVP(), ds.DiscreteVP.linear()):
        den, x = counting(sch), noise()
        plain = ds.sample(den, x.clone(), "ddim", nfe=10)
        shifted = ds.sample(den, x.clone(), "ddim", nfe=10, time_shift=dict(window=80, cutoff=300))
        assert (shifted - plain).abs().max() > 1e-6, sch


def test_item13_same_steps_and_noise_levels_on_discrete_vp_and_its_continuous_limit():
    """LinearVP is the continuous limit of DiscreteVP.linear(); read in training steps, the same
    setting shifts the same steps with candidates of (nearly) the same noise levels."""
    ts = TimeShift(window=80, cutoff=300)
    tabs = []
    for sch in (ds.DiscreteVP.linear(), ds.LinearVP()):
        tabs.append(ts.tables(make_plan("ddim", sch, 10, "time_uniform"), sch, "cpu"))
    assert sorted(tabs[0]) == sorted(tabs[1]) == [1, 2, 3, 4, 5, 6]
    for i in tabs[0]:
        lev_d, lev_c = tabs[0][i][0], tabs[1][i][0]
        assert lev_d.shape == lev_c.shape == (81,)
        torch.testing.assert_close(lev_c, lev_d, rtol=0.02, atol=1e-3)


class _OldTables(TimeShift):
    """The tables as they were before the unit was defined (DiscreteVP: one training timestep)."""

    def tables(self, plan, schedule, device):
        unit = 1.0
        offsets = torch.arange(-(self.window // 2), self.window // 2 + 1, dtype=torch.float64) * unit
        out = {}
        for i, step in enumerate(plan.steps):
            if i == 0 or not step.evals or step.evals[0].t <= self.cutoff:
                continue
            cand = (step.evals[0].t + offsets).clamp(schedule.t_min, schedule.t_max).unique()
            a, s = schedule.alpha(cand), schedule.sigma(cand)
            out[i] = tuple(v.to(device) for v in (s**2 / (a**2 + s**2), schedule.model_time(cand).float(), a, s))
        return out


@pytest.mark.parametrize("solver,nfe,window,cutoff", [("ddim", 10, 80, 300), ("dpmpp_2m", 5, 10, 600),
                                                      ("heun", 9, 30, 300), ("pndm", 10, 30, 300)])
def test_item13_discrete_vp_results_are_bitwise_unchanged(solver, nfe, window, cutoff):
    sch = ds.DiscreteVP.linear()
    den, x = counting(sch), noise()
    new = ds.sample(den, x.clone(), solver, nfe=nfe, time_shift=dict(window=window, cutoff=cutoff))
    old = ds.sample(den, x.clone(), solver, nfe=nfe, time_shift=_OldTables(window, cutoff))
    torch.testing.assert_close(new, old, rtol=0, atol=0)


@pytest.mark.parametrize("schedule,spec,nfe,pattern", [
    (ds.LinearVP(), dict(window=80, cutoff=1000), 10,
     r"cutoff=1000 is outside .* training steps 0\.\.999, i\.e\. t in \[0\.001, 1\] on LinearVP.*\); allowed: 0 <= cutoff < 999"),
    (ds.DiscreteVP.linear(), dict(window=80, cutoff=-5), 10, r"cutoff=-5 is outside .* steps 0\.\.999"),
    (ds.DiscreteVP.linear(), dict(window=30, cutoff=950), 10,
     r"cutoff=950 is at or above every step it could shift: .* start at training steps 99\.9+\d*\.\.899\.1.*"
     r"allowed: cutoff < 899\.1 on this plan \(the schedule spans training steps 0\.\.999"),
    (ds.EDM(), dict(window=30, cutoff=990), 10, r"cutoff=990 is at or above every step .* t in \[0\.002, 80\]"),
    (ds.DiscreteVP.linear(), dict(window=30, cutoff=300), 1, r"nothing to shift: .* no model call after its first step"),
])
def test_item13_settings_that_shift_nothing_are_refused_before_any_model_call(schedule, spec, nfe, pattern):
    den = counting(schedule)
    with pytest.raises(ValueError, match=pattern):
        ds.sample(den, noise(8), "ddim", nfe=nfe, time_shift=spec)
    assert den.nfe == 0
    plan = make_plan("ddim", schedule, nfe, "time_uniform")
    with pytest.raises(ValueError, match=pattern):
        run_plan(plan, den, noise(8), time_shift=TimeShift(**spec))
    assert den.nfe == 0


@pytest.mark.parametrize("spec,pattern", [
    (dict(window=1), r"window must be an integer >= 2 .*window 1 holds only the planned time\), got 1"),
    (dict(window=True), r"window must be an integer >= 2 .*got True"),
    (dict(cutoff="300"), r"cutoff must be a finite number of training steps .*got '300'"),
    (dict(cutoff=float("nan")), r"cutoff must be a finite number .*got nan"),
])
def test_item13_bad_window_and_cutoff_values_name_the_key_and_what_is_allowed(spec, pattern):
    den = counting(ds.DiscreteVP.linear())
    with pytest.raises(ValueError, match=pattern):
        ds.sample(den, noise(8), "ddim", nfe=10, time_shift=spec)
    assert den.nfe == 0


# ----------------------------------------------------------------------------------------------
# plan files: every field typed, every error names the file, the field and the expected type
# ----------------------------------------------------------------------------------------------

def valid_plan_dict() -> dict:
    return load_plan("gmm_nfe5").to_dict()


def write(tmp_path, text: str):
    p = tmp_path / "my_plan.yaml"
    p.write_text(text)
    return p


def test_item16_malformed_yaml_names_the_file_and_line(tmp_path):
    p = write(tmp_path, "times: [0.0, 1.0\nsteps:\n- {prediction: data}\n")
    for load in (load_plan, SolverSpec.load, lambda f: SpecSolver(path=str(f))):
        with pytest.raises(ValueError, match=re.escape(str(p)) + r": not valid YAML: line \d+, column \d+: ") as e:
            load(p)
        assert isinstance(e.value, ValueError)


def test_item16_duplicate_keys_are_refused(tmp_path):
    d = load_plan("gmm_nfe5").to_yaml()
    p = write(tmp_path, d + "nfe: 4\n")
    with pytest.raises(ValueError, match=re.escape(str(p)) + r": not valid YAML: line \d+, column \d+: duplicate key 'nfe' \(first at line \d+"):
        load_plan(p)
    step = "{prediction: data, order: 1, estimator: multistep}"
    assert d.count(step) == 1
    p = write(tmp_path, d.replace(step, "{prediction: data, order: 1, estimator: multistep, order: 2}"))
    with pytest.raises(ValueError, match=re.escape(str(p)) + r": not valid YAML: line 12, column \d+: duplicate key 'order' "
                       r"\(first at line 12"):
        load_plan(p)


@pytest.mark.parametrize("change,pattern", [
    (dict(times=5), r"times: expected a list of numbers, got 5 \(int\)"),
    (dict(times=[0.0, "0.3", 0.4, 0.5, 0.6, 1.0]), r"times\[1\]: expected a number, got '0\.3' \(str\)"),
    (dict(times=[0.0, True, 0.4, 0.5, 0.6, 1.0]), r"times\[1\]: expected a number, got True \(bool\)"),
    (dict(steps=5), r"steps: expected a list of step mappings, got 5 \(int\)"),
    (dict(steps={"prediction": "data"}), r"steps: expected a list of step mappings, got \{'prediction': 'data'\} \(dict\)"),
    (dict(info=[1, 2]), r"info: expected a mapping, got \[1, 2\] \(list\)"),
    (dict(nfe="2"), r"nfe: expected an integer, got '2' \(str\)"),
    (dict(nfe=5.0), r"nfe: expected an integer, got 5\.0 \(float\)"),
    (dict(name=5), r"name: expected a string, got 5 \(int\)"),
    (dict(final=0), r"final: expected a string \('zero' or 'last'\), got 0 \(int\)"),
    (dict(coordinate=["logsnr"]), r"coordinate: expected a string \('logsnr' or 'time'\), got \['logsnr'\] \(list\)"),
    (dict(format=1), r"format: expected a string .*got 1 \(int\)"),
])
def test_item16_plan_fields_are_type_checked(tmp_path, change, pattern):
    d = {**valid_plan_dict(), **change}
    p = write(tmp_path, yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ValueError, match=re.escape(str(p)) + ": " + pattern):
        load_plan(p)
    with pytest.raises(ValueError, match=pattern):
        SolverSpec.from_dict(d)


@pytest.mark.parametrize("i,change,pattern", [
    (0, dict(order="1"), r"steps\[0\]\.order: expected an integer, got '1' \(str\)"),
    (0, dict(order=1.0), r"steps\[0\]\.order: expected an integer, got 1\.0 \(float\)"),
    (1, dict(corrector="true"), r"steps\[1\]\.corrector: expected true or false, got 'true' \(str\)"),
    (1, dict(relax="0.1"), r"steps\[1\]\.relax: expected a number, got '0\.1' \(str\)"),
    (2, dict(prediction=1), r"steps\[2\]\.prediction: expected a string \('data' or 'noise'\), got 1 \(int\)"),
    (2, dict(estimator=None), r"steps\[2\]\.estimator: expected a string \(one of .*'unipc'.*\), got None"),
    (4, dict(estimator="singlestep", order=2, r=0.5), r"steps\[4\]\.r: expected a list of numbers, got 0\.5 \(float\)"),
    (4, dict(estimator="singlestep", order=2, r=["0.5"]), r"steps\[4\]\.r\[0\]: expected a number, got '0\.5' \(str\)"),
    (4, dict(estimator="ghvb", beta="0.5"), r"steps\[4\]\.beta: expected a number, got '0\.5' \(str\)"),
    (3, dict(analytic=1), r"steps\[3\]\.analytic: expected true or false, got 1 \(int\)"),
])
def test_item16_step_fields_are_type_checked(tmp_path, i, change, pattern):
    d = valid_plan_dict()
    d["steps"][i] = {**d["steps"][i], **change}
    p = write(tmp_path, yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ValueError, match=re.escape(str(p)) + ": " + pattern):
        load_plan(p)


def test_item16_a_step_that_is_not_a_mapping_and_value_errors_name_the_step(tmp_path):
    d = valid_plan_dict()
    d["steps"][1] = [1, 2]
    p = write(tmp_path, yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ValueError, match=re.escape(str(p)) + r": steps\[1\]: expected a mapping of step fields, got \[1, 2\] \(list\)"):
        load_plan(p)
    d = valid_plan_dict()
    d["steps"][2]["order"] = 7
    with pytest.raises(ValueError, match=r"steps\[2\]: order must be an integer in 1\.\.4, got 7"):
        SolverSpec.from_dict(d)


def test_item16_direct_construction_refuses_strings_for_numbers():
    with pytest.raises(ValueError, match=r"times\[1\]: expected a number, got '0\.5' \(str\)"):
        SolverSpec((StepSpec(), StepSpec()), (0.0, "0.5", 1.0))
    with pytest.raises(ValueError, match=r"r\[0\]: expected a number, got '0\.5' \(str\)"):
        StepSpec("data", 2, "singlestep", r=("0.5",))


def test_item16_plan_solver_refuses_solver_options_before_any_model_call():
    sch = ds.LinearVP()
    pattern = (r"solver 'plan:gmm_nfe5' takes no options; got \['eta'\]: its steps, times and NFE come from the "
               r"plan file.*allowed: none")
    with pytest.raises(ValueError, match=pattern):
        make_plan("plan:gmm_nfe5", sch, eta=1.0)
    den = counting(sch)
    with pytest.raises(ValueError, match=pattern):
        ds.sample(den, noise(8), "plan:gmm_nfe5", nfe=5, eta=1)
    assert den.nfe == 0
    with pytest.raises(ValueError, match=r"takes no options; got \['eta', 'order'\]"):
        ds.samplers.get("plan", path="gmm_nfe5", eta=1, order=2)


def test_item13_cli_refuses_a_time_shift_that_shifts_nothing_before_any_work():
    """The Hydra config's time shift is checked against the plan on the model's own schedule in
    validation (before the model is built), not first at sampling time."""
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.runner import ConfigError, validate

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        ok = compose("config", overrides=["solver=ddim", "nfe=5", "time_shift={window:80,cutoff:300}"])
        bad = compose("config", overrides=["solver=ddim", "nfe=5", "time_shift={window:8,cutoff:990}"])
    validate(ok)
    with pytest.raises(ConfigError, match=r"time_shift .*cutoff=990"):
        validate(bad)
