"""The Hydra config is checked against a schema before any work: an unknown key is refused naming the
nearest valid one and the keys allowed there, a value of the wrong type names its key, and every
value that can be checked without loading the model (spacing vs the model's schedule, device,
model paths, prompts, sizes, guidance and eval settings) is checked before the model is built."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import diffsampler
from diffsampler.tools import runner
from diffsampler.cli import _register_solver_configs
from diffsampler.tools.runner import ConfigError, validate

DIGITS_DDPM = Path(diffsampler.__file__).parent / "assets" / "digits" / "ddpm"


def composed(*overrides, hydra=False):
    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def refused(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(composed(*overrides))
    return str(e.value)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "diffsampler", *args], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# item 8: a schema for the config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key,allowed", [
    ("+solver.order=1.5", "solver.order", ["name", "options"]),
    ("+eta=1", "eta", ["nfe", "spacing", "solver", "model"]),
    ("+momentum=0.8", "momentum", ["nfe", "spacing", "time_shift"]),
    ("+eval.feture=digits", "eval.feture", ["feature", "weights_path", "kid"]),
    ("+model.heigth=64", "model.heigth", ["dim", "schedule", "prediction_type"]),
    ("+guidance.scael=2", "guidance.scael", ["name"]),
])
def test_item08_unknown_keys_are_refused_with_the_allowed_ones(override, key, allowed):
    msg = refused(override)
    assert f"unknown key {key}" in msg, msg
    for k in allowed:
        assert k in msg, (k, msg)


@pytest.mark.parametrize("override,nearest", [
    ("+eval.feture=digits", "eval.feature"),
    ("+nfes=5", "nfe"),
    ("+model.schedul=edm", "model.schedule"),
    ("+solver.option={eta:1}", "solver.options"),
])
def test_item08_a_typo_names_the_nearest_valid_key(override, nearest):
    assert f"did you mean {nearest}?" in refused(override)


def test_item08_solver_options_typed_at_the_wrong_level_point_to_solver_options():
    for override in ("+solver.order=1.5", "+momentum=0.8", "+eta=1"):
        key, value = override[1:].split("=")
        assert f"+solver.options.{key.split('.')[-1]}={value}" in refused(override)


def test_item08_each_group_option_has_its_own_keys():
    assert "unknown key model.dim" in refused("model=digits", "+model.dim=3")
    assert "unknown key model.prompt" in refused("model=digits", "+model.prompt=cat")
    assert "model=digits" in refused("model=digits", "+model.prompt=cat")
    assert "unknown key guidance.scale" in refused("+guidance.scale=2")
    assert "unknown key guidance.num_candidates" in refused("guidance=cfg", "+guidance.num_candidates=2",
                                                            "model=diffusers", f"model.path={DIGITS_DDPM}")
    assert "unknown key solver.path" in refused("solver=ddim", "+solver.path=x.yaml")


@pytest.mark.parametrize("override,message", [
    ("nfe=abc", "nfe must be an integer, got 'abc'"),
    ("nfe=2.5", "nfe must be an integer, got 2.5"),
    ("progress=maybe", "progress must be a boolean (true or false), got 'maybe'"),
    ("batch_size=true", "batch_size must be an integer, got True"),
    ("model.dim=16.5", "model.dim must be an integer, got 16.5"),
    ("model.std=0.3", "model.std must be a list of numbers, got 0.3"),
    ("solver.options=3", "solver.options must be a mapping, got 3"),
    ("time_shift=5", "time_shift must be a mapping or null, got 5"),
    ("eval.kid=yes", "eval.kid must be a boolean (true or false), got 'yes'"),
    ("seed=x", "seed must be an integer, got 'x'"),
])
def test_item08_values_of_the_wrong_type_name_their_key(override, message):
    assert message in refused(override)


def test_item08_deleted_keys_are_refused():
    assert "missing key nfe" in refused("~nfe")


def test_item08_valid_configs_pass():
    """The README's command lines, launchers, hydra.* and user-registered solvers."""
    from diffsampler.samplers import ddim, register, unregister

    for overrides in (
        ["model=gmm", "solver=dpmpp_3m", "nfe=8"],
        ["solver=ddim", "+solver.options.eta=1.0", "nfe=10"],
        ["solver=dpmpp_3m", "+solver.options.momentum=0.8", "time_shift={window:80,cutoff:300}", "nfe=8"],
        ["model=digits", "guidance=minority", "guidance.scale=5", "nfe=20"],
        ["model=digits", "guidance=svdd", "guidance.target=7", "solver=dpmpp_2m_sde", "nfe=10"],
        ["model=diffusers", f"model.path={DIGITS_DDPM}", "solver=dpmpp_2m", "nfe=10"],
        ["solver=plan", "solver.path=gmm_nfe5", "nfe=5"],
        ["solver=ghvb", "+solver.options.order=1.5", "time_shift={window:10,cutoff:300}", "nfe=6"],
        ["model=digits", "eval.kid=true", "hydra.run.dir=/tmp/x", "hydra.job.chdir=true"],
    ):
        validate(composed(*overrides))
    cfg = composed("+launcher=slurm", hydra=True)
    assert "hydra" in cfg
    validate(cfg)
    register("my_ddim_for_schema_test")(type("MyDDIM", (ddim.DDIM,), {}))
    try:
        validate(composed("solver=my_ddim_for_schema_test", "nfe=4"))
    finally:
        unregister("my_ddim_for_schema_test")


def test_item08_schema_knows_every_key_of_the_shipped_yaml():
    """The schema and the YAML files cannot drift apart: every key of every shipped config is known."""
    import yaml

    from diffsampler.tools.config_schema import GROUPS, TOP

    root = Path(diffsampler.__file__).parent / "configs"
    top = {k for k in yaml.safe_load((root / "config.yaml").read_text()) if k not in ("defaults", "hydra")}
    assert top == set(TOP) - set(GROUPS)
    for group in GROUPS:
        for f in (root / group).glob("*.yaml"):
            keys = set(yaml.safe_load(f.read_text()) or {})
            option = f.stem if group != "eval" else None
            assert keys == set(GROUPS[group](option)), (group, f.name)


def test_item08_cli_refuses_an_unknown_key_before_any_work(tmp_path):
    run = tmp_path / "run"
    r = cli("+eval.feture=digits", "model=digits", "num_samples=4", f"hydra.run.dir={run}")
    assert r.returncode == 2, r.stderr
    assert "unknown key eval.feture (did you mean eval.feature?)" in r.stderr and "Traceback" not in r.stderr
    assert not (run / "samples").exists()


# ---------------------------------------------------------------------------------------------
# item 9: every value checked before the model is built
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["spacing=bogus"], "spacing must be one of ('logsnr', 'time_uniform'"),
    (["model.schedule=edm", "spacing=linspace"], "spacing='linspace' does not apply to model.schedule=edm"),
    (["model.schedule=edm", "spacing=linspace"], "needs a DiscreteVP schedule"),
    (["solver=plan", "solver.path=gmm_nfe5", "nfe=5", "spacing=karras"], "spacing='karras' cannot apply"),
    (["device=gpu"], "device 'gpu' is not a device; allowed: auto, cpu, cuda, cuda:<index>"),
    (["model=diffusers"], "model.path is required for model=diffusers"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "model.dtype=float8"],
     "model.dtype must be one of ('float32', 'float16', 'bfloat16'), got 'float8'"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "model.height=0"], "model.height must be an integer >= 1, got 0"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "model.width=32"], "model.width=32 needs model.height"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "model.prompt=a cat"],
     "model.prompt needs a text-to-image pipeline; DDPMPipeline at"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "guidance=cfg"],
     "guidance=cfg with guidance.scale=7.5 needs a condition: model.prompt or model.class_label"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "guidance=cfg", "model.class_label=3"],
     "model.class_label with guidance=cfg needs model.null_class"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "model.null_class=0"],
     "model.null_class takes effect only with guidance=cfg"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "model.negative_prompt=ugly"],
     "model.negative_prompt takes effect only with model.prompt and guidance=cfg"),
    (["grid_size=0"], "grid_size must be an integer >= 1, got 0"),
    (["model.prediction_type=x0"], "model.prediction_type must be one of"),
    (["model.schedule=flow", "model.prediction_type=v_prediction"],
     "model.schedule=flow predicts the flow velocity; model.prediction_type='v_prediction' cannot apply"),
    (["model.std=[0.3]"], "model.std must be [low, high]"),
    (["eval.feature=nope"], "eval.feature must be one of ('auto', 'inception', 'digits'"),
    (["eval.feature=nope"], "or package.module:callable, got 'nope'"),
    (["model=digits", "eval.feature=nosuchmodule:fn"], "eval.feature 'nosuchmodule:fn' cannot be loaded"),
    (["eval.feature=inception"], "eval.feature does not apply to model=gmm"),
    (["model=digits", "eval.weights_path=/no/such/file.pt"], "eval.weights_path '/no/such/file.pt' is not a file"),
    (["model=diffusers", f"model.path={DIGITS_DDPM}", "eval.feature=inception"],
     "eval.feature takes effect only with eval.reference"),
    (["model=digits", "eval.sha256=abc"], "eval.sha256 takes effect only with eval.weights_path"),
    (["model=digits", "eval.reference=/no/such/dir"], "eval.reference: /no/such/dir does not exist"),
    (["model=digits", "guidance=minority", "guidance.interval=[0.5,0.2]"],
     "guidance.interval must be [lo, hi] with 0 <= lo < hi <= 1, got [0.5, 0.2]"),
    (["model=digits", "guidance=minority", "guidance.target=12"],
     "guidance.target must be a class of the minority classifier (0..9), got 12"),
    (["model=digits", "guidance=svdd", "solver=dpmpp_2m_sde", "guidance.target=12"],
     "guidance.target must be a digit 0..9 for guidance.reward=classifier, got 12"),
    (["guidance=svdd", "solver=dpmpp_2m_sde", "guidance.target=[1,2]"],
     "guidance.target must be a point of model.dim=16 numbers for guidance.reward=distance"),
])
def test_item09_late_failures_are_refused_by_validate(overrides, message):
    assert message in refused(*overrides)


def test_item09_cuda_refused_when_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "device 'cuda' is not available on this machine" in refused("device=cuda")
    assert "device 'cuda:0' is not available on this machine" in refused("device=cuda:0")


def test_item09_cuda_index_beyond_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "device 'cuda:3' is not available on this machine (1 CUDA device" in refused("device=cuda:3")
    validate(composed("device=cuda:0"))


def test_item09_spacing_checked_on_the_pipeline_schedule(tmp_path):
    """A local pipeline's scheduler config gives its real schedule before any weight is loaded."""
    pipe = tmp_path / "flowpipe"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    msg = refused("model=diffusers", f"model.path={pipe}", "spacing=trailing")
    assert "spacing='trailing' does not apply to" in msg and "RectifiedFlow" in msg
    validate(composed("model=diffusers", f"model.path={pipe}", "spacing=logsnr"))
    validate(composed("model=digits", "spacing=trailing"))  # the digits DDPM is a DiscreteVP


def test_item09_image_size_checked_against_the_vae(tmp_path):
    pipe = tmp_path / "latent"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    (pipe / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    msg = refused("model=diffusers", f"model.path={pipe}", "model.height=500")
    assert "model.height=500 must be a multiple of 8" in msg and "496 pixels" in msg
    validate(composed("model=diffusers", f"model.path={pipe}", "model.height=512", "model.width=384",
                      "model.prompt=a cat", "guidance=cfg"))


def test_item09_nothing_is_loaded_before_validation_fails(tmp_path, monkeypatch):
    """run() refuses before building the model or drawing a sample."""
    def boom(*a, **k):
        raise AssertionError("the model was built before validation")

    monkeypatch.setattr(runner, "build_gmm", boom)
    monkeypatch.setattr(runner, "_pipeline_denoiser", boom)
    for overrides in (["spacing=bogus"], ["model.schedule=edm", "spacing=linspace"], ["device=gpu"],
                      ["solver=plan", "solver.path=gmm_nfe5", "nfe=5", "spacing=karras"], ["model=diffusers"],
                      ["+eta=1"]):
        with pytest.raises(ConfigError):
            runner.run(composed(*overrides), tmp_path / "run", tmp_path / "results.csv")
        assert not (tmp_path / "run" / "samples").exists() and not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("args,message", [
    (["model.schedule=edm", "spacing=linspace"], "spacing='linspace' does not apply to model.schedule=edm"),
    (["model=diffusers"], "model.path is required for model=diffusers"),
])
def test_item09_cli_refuses_late_failures_before_any_work(tmp_path, args, message):
    run = tmp_path / "run"
    r = cli(*args, "num_samples=4", f"hydra.run.dir={run}")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (run / "samples").exists()
