"""The run spec: a composed Hydra config, checked by `config_schema`, turned once into typed, frozen
values.  Everything below the command line reads these (or plain arguments), never the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config_schema import ConfigError
from .config_schema import check as check_schema

__all__ = ["RunSpec", "ModelSpec", "SolverChoice", "GuidanceSpec", "EvalSpec", "SamplingSpec", "resolve", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """model=gmm (the exact mixture), digits (the packaged pipeline) or diffusers (a pipeline)."""

    name: str
    path: str | None = None
    dim: int | None = None
    components: int | None = None
    seed: int | None = None
    scale: float | None = None
    std: tuple[float, ...] = ()
    schedule: str | None = None
    prediction_type: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    class_label: int | None = None
    null_class: int | None = None
    dtype: str | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)  # as composed (for fingerprints)


@dataclass(frozen=True)
class SolverChoice:
    """Which solver runs, with its options (solver=plan: the plan file or name in `path`)."""

    name: str
    options: dict = field(default_factory=dict)
    path: str | None = None  # solver=plan: the plan's YAML file or name
    config: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class GuidanceSpec:
    """guidance=none, cfg (scale, rescale, interval: noise levels), minority (classifier, scale,
    target, interval: fractions of the time range) or svdd (reward, target, num_candidates, alpha)."""

    name: str
    scale: float = 1.0
    rescale: float = 0.0
    classifier: str | None = None
    target: Any = None  # a class, a digit, or a point (svdd reward=distance)
    interval: tuple[float, ...] | None = None  # None: everywhere
    reward: str = "auto"
    num_candidates: Any = 1
    alpha: Any = 0.0
    config: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class EvalSpec:
    feature: str = "auto"
    weights_path: str | None = None
    sha256: str | None = None
    reference: str | None = None
    cache_dir: str = "~/.cache/diffsampler"
    kid: bool = False
    shard_dtype: str = "auto"  # auto | uint8 | float32 (tools/run_checks.py: shard_dtype)


@dataclass(frozen=True)
class SamplingSpec:
    nfe: int
    spacing: str
    final: str            # resolved: "zero" or "last" (a saved plan's own when the config left it null)
    time_shift: dict | None
    num_samples: int
    seed: int
    batch_size: int
    shard_size: int
    device: str
    progress: bool
    grid_size: int

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_samples))


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    solver: SolverChoice
    guidance: GuidanceSpec
    eval: EvalSpec
    sampling: SamplingSpec
    results_file: str


def resolve(cfg) -> RunSpec:
    """The run spec of a composed config (checked against the schema first); the config is read,
    never written."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    check_schema(cfg)
    plain = {key: _plain(cfg[key]) for key in cfg.keys() if key != "hydra"}
    model, solver, guidance = plain["model"], _plan_in_dir(plain["solver"]), plain["guidance"]
    sampling = {k: plain[k] for k in SamplingSpec.__dataclass_fields__}
    sampling["final"] = _final(plain["final"], solver)
    sampling["spacing"] = _spacing(plain["spacing"], solver)
    sampling["time_shift"] = plain["time_shift"] or None
    return RunSpec(
        model=model_spec(model),
        solver=SolverChoice(solver["name"], dict(solver.get("options") or {}), solver.get("path"), config=solver),
        guidance=GuidanceSpec(**_tupled(guidance, "interval"), config=guidance),
        eval=EvalSpec(**plain["eval"]),
        sampling=SamplingSpec(**sampling),
        results_file=plain["results_file"],
    )


def _plan_in_dir(solver: dict) -> dict:
    """solver=plan with solver.plan_dir: a plan given by name is <plan_dir>/<name>.yaml (the
    directory's plans come before the package's); the name must be there."""
    from pathlib import Path

    if solver.get("name") != "plan" or not solver.get("plan_dir"):
        return solver
    d = Path(str(solver["plan_dir"])).expanduser()
    if not d.is_dir():
        raise ConfigError(f"solver.plan_dir {str(d)!r} is not a directory")
    path = solver.get("path")
    if not path:
        raise ConfigError(f"solver.plan_dir needs solver.path=<plan name>; plans there: "
                          f"{sorted(p.stem for p in d.glob('*.yaml'))}")
    f = d / f"{path}.yaml"
    if Path(str(path)).expanduser().is_file() or not f.is_file():
        raise ConfigError(f"solver.path={path!r} is not a plan name in solver.plan_dir {str(d)!r} (plans there: "
                          f"{sorted(p.stem for p in d.glob('*.yaml'))})")
    return {**solver, "path": str(f), "options": {**(solver.get("options") or {}), "path": str(f)}}


def model_spec(model: dict) -> ModelSpec:
    """The ModelSpec of a model group as plain values (e.g. configs/model/gmm.yaml)."""
    return ModelSpec(**{**model, "std": tuple(model.get("std") or ())}, config=model)


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _tupled(d: dict, key: str) -> dict:
    return {**d, key: tuple(d[key])} if d.get(key) is not None else {k: v for k, v in d.items() if k != key}


def _spacing(spacing: str | None, solver: dict) -> str:
    """spacing: null means the solver's own: the one an A1111 name fixes ("DPM++ 2M Karras"), else
    the default (time_uniform).  A different one given with such a name is refused by make_plan."""
    if spacing is not None:
        return spacing
    from ..samplers.aliases import alias_of
    from ..samplers.loop import DEFAULT_SPACING

    alias = alias_of(solver.get("name"))
    return alias.spacing if alias is not None and alias.spacing else DEFAULT_SPACING


def _final(final: str | None, solver: dict) -> str:
    """final: null means the solver's own end point: a solver plan's `final`, sigma = 0 otherwise."""
    if final is not None:
        return final
    if solver["name"] != "plan" or not solver.get("path"):
        return "zero"
    from ..samplers.usf import load_plan

    try:
        return load_plan(str(solver["path"])).final
    except ValueError as e:
        raise ConfigError(f"solver.path: {e}") from None
