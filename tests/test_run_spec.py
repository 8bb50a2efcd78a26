"""The run spec: the composed config resolved once into frozen, typed values; the config is only read."""

import dataclasses

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffsampler.cli import _register_solver_configs
from diffsampler.tools.run_checks import validate
from diffsampler.tools.run_spec import ModelSpec, RunSpec, resolve


def composed(*overrides):
    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        return compose("config", overrides=list(overrides))


def test_resolving_leaves_the_config_as_it_was():
    cfg = composed("solver=plan", "solver.path=gmm_nfe5", "nfe=5")
    before = OmegaConf.to_yaml(cfg)
    spec = validate(cfg)
    assert OmegaConf.to_yaml(cfg) == before and cfg.final is None
    assert spec.sampling.final == "last"  # the saved plan's own end point
    assert spec.solver.path == "gmm_nfe5" and spec.solver.options == {"path": "gmm_nfe5"}


def test_the_spec_is_typed_and_frozen():
    spec = resolve(composed("solver=ddim", "nfe=4", "num_samples=8", "seed=3", "+solver.options.eta=0.5"))
    assert isinstance(spec, RunSpec) and isinstance(spec.model, ModelSpec)
    assert spec.model.name == "gmm" and spec.model.std == (0.3, 0.6) and spec.model.dim == 16
    assert spec.sampling.seeds == list(range(3, 11)) and spec.sampling.final == "zero"
    assert spec.solver.options == {"eta": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sampling.nfe = 5  # type: ignore[misc]
