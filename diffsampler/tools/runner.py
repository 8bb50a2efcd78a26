"""One evaluation run: build the model, sample (sharded, resumable, over torchrun ranks), score, and
append one row to the results table.  The Hydra app in cli.py is a thin shell around `run`."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .config_schema import SCHEDULES, ConfigError
from .config_schema import check as check_schema
from .samplers import available, is_solver_name, make_plan
from .samplers.loop import sample
from .samplers.time_shift import TimeShift
from .schedules import LinearVP

__all__ = ["validate", "run", "append_row", "read_rows", "ConfigError"]


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _resolve_final(cfg) -> None:
    """final: null means the solver's own end point: a solver plan's `final`, sigma = 0 otherwise."""
    if cfg.get("final") is not None:
        return
    final = "zero"
    if cfg.solver.name == "plan" and cfg.solver.get("path"):
        from .samplers.usf import load_plan

        try:
            final = load_plan(str(cfg.solver.path)).final
        except ValueError as e:
            raise ConfigError(f"solver.path: {e}") from None
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.final = final


def validate(cfg) -> None:
    """Fail before any work, naming the bad key: the schema (known keys, value types), then every
    value that can be checked without loading the model."""
    check_schema(cfg)
    _resolve_final(cfg)
    _check_counts(cfg)
    _check_solver_name(cfg)
    _check_device(cfg)
    _check_model(cfg)
    _check_guidance(cfg)
    _check_eval(cfg)
    _check_time_shift(cfg)
    _check_plan(cfg)


def _check_counts(cfg) -> None:
    for key in ("nfe", "num_samples", "batch_size", "shard_size", "grid_size"):
        v = _get(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")


def _check_solver_name(cfg) -> None:
    if not is_solver_name(cfg.solver.name):
        raise ConfigError(f"solver.name {cfg.solver.name!r} is not a registered solver; available: {available()} "
                          "and solver=plan solver.path=<plan YAML or name>")
    if cfg.final not in ("zero", "last"):
        raise ConfigError(f"final must be 'zero' or 'last', got {cfg.final!r}")


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _device_count(kind: str) -> int:
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, kind, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


def _check_device(cfg) -> None:
    """device: auto, or a device type of this machine (with an index below its device count)."""
    name = cfg.device
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:<index>, mps, xpu")
    if dev.type == "cpu":
        return
    count = _device_count(dev.type)
    if count == 0:
        raise ConfigError(f"device {name!r} is not available on this machine (no {dev.type.upper()} device); "
                          "use device=auto or device=cpu")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {name!r} is not available on this machine ({count} {dev.type.upper()} "
                          f"device{'s' if count > 1 else ''}: indices 0..{count - 1})")


# ---------------------------------------------------------------------------------------------
# Model settings, checked without loading the model
# ---------------------------------------------------------------------------------------------

def _check_model(cfg) -> None:
    m = cfg.model
    if m.name == "gmm":
        _check_gmm(m)
        return
    if m.get("path"):
        p = str(m.path)
        looks_like_hub_id = p.count("/") == 1 and not p.startswith((".", "/", "~"))
        if not Path(p).expanduser().exists() and not looks_like_hub_id:
            raise ConfigError(f"model.path {p!r} does not exist (give a local directory or a hub id like owner/name)")
    if m.name == "diffusers":
        _check_image_size(m)
        _check_conditioning(cfg)


def _check_gmm(m) -> None:
    if m.schedule not in SCHEDULES:
        raise ConfigError(f"model.schedule must be one of {SCHEDULES}, got {m.schedule!r}")
    for key in ("dim", "components"):
        if m[key] < 1:
            raise ConfigError(f"model.{key} must be an integer >= 1, got {m[key]!r}")
    std = list(m.std)
    if len(std) != 2 or not 0 < std[0] <= std[1]:
        raise ConfigError(f"model.std must be [low, high] with 0 < low <= high (the range of component "
                          f"standard deviations), got {std}")
    if m.scale < 0:
        raise ConfigError(f"model.scale must be a number >= 0, got {m.scale!r}")
    flow = m.schedule == "flow"
    if flow and m.prediction_type not in ("epsilon", "flow"):  # epsilon: the default, replaced by flow
        raise ConfigError(f"model.schedule=flow predicts the flow velocity; model.prediction_type="
                          f"{m.prediction_type!r} cannot apply (leave it at its default)")
    if not flow and m.prediction_type == "flow":
        raise ConfigError(f"model.prediction_type='flow' needs model.schedule=flow, got {m.schedule!r}")


def _check_image_size(m) -> None:
    for key in ("height", "width"):
        v = m.get(key)
        if v is not None and v < 1:
            raise ConfigError(f"model.{key} must be an integer >= 1, got {v!r}")
    if m.get("width") is not None and m.get("height") is None:
        raise ConfigError(f"model.width={m.width} needs model.height (give both, or model.height alone for a "
                          "square image)")
    factor = _vae_factor(m)
    for key in ("height", "width"):
        v = m.get(key)
        if v is not None and factor and v % factor:
            raise ConfigError(f"model.{key}={v} must be a multiple of {factor} (the VAE downsampling of "
                              f"{_local_pipeline(m)}), or the image would be {v // factor * factor} pixels")


def _vae_factor(m) -> int | None:
    """Pixels per latent of a local pipeline's VAE (None: no VAE, or not known without a download)."""
    d = _local_pipeline(m)
    f = d / "vae" / "config.json" if d is not None else None
    if f is None or not f.is_file():
        return None
    return 2 ** (len(json.loads(f.read_text()).get("block_out_channels", [0])) - 1)


def _local_pipeline(m) -> Path | None:
    """The local directory of the model's pipeline (None for a hub id)."""
    if m.name == "digits" and not m.get("path"):
        from .eval.digits import ASSET_DIR

        return ASSET_DIR / "ddpm"
    p = Path(str(m.path)).expanduser()
    return p if p.is_dir() else None


def _model_index(m) -> dict | None:
    d = _local_pipeline(m)
    f = d / "model_index.json" if d is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def _check_conditioning(cfg) -> None:
    """prompt, negative_prompt, class_label and null_class each take effect, or are refused."""
    m, g = cfg.model, cfg.guidance
    cfg_on = g.name == "cfg"
    if m.get("prompt"):
        _check_text_pipeline(m)
    if m.get("negative_prompt") and not (m.get("prompt") and cfg_on):
        raise ConfigError("model.negative_prompt takes effect only with model.prompt and guidance=cfg")
    if m.get("null_class") is not None and not cfg_on:
        raise ConfigError("model.null_class takes effect only with guidance=cfg (the unconditional class label)")
    if m.get("prompt") and m.get("class_label") is not None:
        raise ConfigError("give model.prompt or model.class_label, not both")
    if not cfg_on or g.scale == 1.0:
        return
    if not m.get("prompt") and m.get("class_label") is None:
        raise ConfigError(f"guidance=cfg with guidance.scale={g.scale} needs a condition: model.prompt or "
                          "model.class_label")
    if m.get("class_label") is not None and m.get("null_class") is None:
        raise ConfigError("model.class_label with guidance=cfg needs model.null_class (the unconditional label)")


def _check_text_pipeline(m) -> None:
    index = _model_index(m)
    if index is None:  # a hub id: checked when it is loaded
        return
    cls = index.get("_class_name", "the pipeline")
    if "transformer" in index:
        raise ConfigError(f"model.prompt is not supported for {cls} (a transformer pipeline) from the command "
                          "line; encode the prompt and use denoiser_from_pipeline(prompt_embeds=...)")
    if not (index.get("text_encoder") or [None])[0]:
        raise ConfigError(f"model.prompt needs a text-to-image pipeline; {cls} at {_local_pipeline(m)} has no "
                          "text encoder (use model.class_label for class-conditional models)")


# ---------------------------------------------------------------------------------------------
# Guidance and evaluation settings
# ---------------------------------------------------------------------------------------------

def _check_guidance(cfg) -> None:
    m, g = cfg.model, cfg.guidance
    if g.name == "cfg" and m.name != "diffusers":
        raise ConfigError(f"guidance=cfg needs a conditional model (model=diffusers with a prompt or class), got model={m.name}")
    if g.name == "minority":
        _check_minority(cfg)
    if g.name == "svdd":
        _check_svdd(cfg)


def _check_minority(cfg) -> None:
    m, g = cfg.model, cfg.guidance
    if m.name == "gmm":
        raise ConfigError("guidance=minority needs an image model with a minority classifier (model=digits, or "
                          "model=diffusers with guidance.classifier=DIR from `diffsampler minority-classifier`)")
    if m.name != "digits" and not g.get("classifier"):
        raise ConfigError("guidance=minority on model=diffusers needs guidance.classifier=DIR "
                          "(write one with `diffsampler minority-classifier --pipeline ... --out DIR`)")
    if not (isinstance(g.scale, (int, float)) and g.scale >= 0):
        raise ConfigError(f"guidance.scale must be a number >= 0, got {g.scale!r}")
    interval = list(g.interval)
    if len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1:
        raise ConfigError(f"guidance.interval must be [lo, hi] with 0 <= lo < hi <= 1, got {interval} "
                          "(fractions of the time range)")
    config = _minority_classifier_config(g)
    n = config.get("num_classes")
    if g.get("target") is not None and isinstance(n, int) and not 0 <= g.target < n:
        raise ConfigError(f"guidance.target must be a class of the minority classifier (0..{n - 1}), got {g.target}")


def _minority_classifier_config(g) -> dict:
    if g.get("classifier"):
        directory = Path(str(g.classifier)).expanduser()
    else:
        from .eval.digits import ASSET_DIR

        directory = ASSET_DIR / "minority"
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise ConfigError(f"guidance.classifier: no {name} in {directory} (write one with "
                              "`diffsampler minority-classifier`)")
    return json.loads((directory / "config.json").read_text())


def _check_svdd(cfg) -> None:
    m, g = cfg.model, cfg.guidance
    rewards = ("classifier", "jpeg") if m.name == "digits" else ("distance",) if m.name == "gmm" else ()
    reward = _reward_name(cfg)
    if reward not in rewards:
        raise ConfigError(f"guidance.reward={g.reward!r} is not available for model={m.name}; allowed: "
                          f"{('auto',) + rewards}")
    for key, lo in (("num_candidates", 1), ("alpha", 0)):
        v = g.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (key == "num_candidates" and v != int(v)):
            raise ConfigError(f"guidance.{key} must be {'an integer >= 1' if lo else 'a number >= 0'}, got {v!r}")
    _check_svdd_target(cfg, reward)
    opts = dict(cfg.solver.get("options") or {})
    try:
        stochastic = make_plan(cfg.solver.name, LinearVP(), cfg.nfe, "time_uniform", cfg.final, **opts).stochastic
    except ValueError:
        stochastic = True  # the solver check names the problem
    if not stochastic:
        from .guidance.svdd import stochastic_solvers

        raise ConfigError(f"guidance=svdd draws candidates from a stochastic solver; solver={cfg.solver.name} "
                          f"has no noise. Use one of: {', '.join(stochastic_solvers())}")


def _check_svdd_target(cfg, reward: str) -> None:
    t = cfg.guidance.get("target")
    if t is None:
        return
    if reward == "jpeg":
        raise ConfigError(f"guidance.target does not apply to guidance.reward=jpeg, got {t!r}")
    if reward == "classifier" and not (isinstance(t, int) and 0 <= t <= 9):
        raise ConfigError(f"guidance.target must be a digit 0..9 for guidance.reward=classifier, got {t!r}")
    if reward == "distance" and (isinstance(t, int) or len(t) != cfg.model.dim):
        raise ConfigError(f"guidance.target must be a point of model.dim={cfg.model.dim} numbers for "
                          f"guidance.reward=distance, got {list(t) if not isinstance(t, int) else t}")


def _check_eval(cfg) -> None:
    """eval.* keys apply to image models: each one given either takes effect or is refused."""
    e, model = cfg.eval, cfg.model.name
    _check_feature(e.feature)
    _check_reference_and_kid(cfg)
    unused = {"gmm": ("feature", "weights_path", "sha256")}.get(model, ())
    for key in unused:
        if e.get(key) not in (None, "auto"):
            raise ConfigError(f"eval.{key} does not apply to model={model} (scored by rmse and fd against the exact "
                              f"mixture); got {e.get(key)!r}")
    if model == "diffusers" and not e.get("reference"):
        for key in ("feature", "weights_path"):
            if e.get(key) not in (None, "auto"):
                raise ConfigError(f"eval.{key} takes effect only with eval.reference (model=diffusers is scored by "
                                  f"FID against a reference folder); got {e.get(key)!r}")
    if e.get("sha256") and not e.get("weights_path"):
        raise ConfigError("eval.sha256 takes effect only with eval.weights_path (the checksum of that file)")
    if e.get("weights_path") and not Path(str(e.weights_path)).expanduser().is_file():
        raise ConfigError(f"eval.weights_path {str(e.weights_path)!r} is not a file (the Inception weights, "
                          "pt_inception-2015-12-05)")


def _check_feature(name: str) -> None:
    import importlib

    from .eval.fid import FEATURE_EXTRACTORS

    names = ("auto", *FEATURE_EXTRACTORS)
    if name in names:
        return
    if ":" not in name:
        raise ConfigError(f"eval.feature must be one of {names} or package.module:callable, got {name!r}")
    module, _, attr = name.partition(":")
    try:
        getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"eval.feature {name!r} cannot be loaded: {type(err).__name__}: {err}") from None


def _check_time_shift(cfg) -> None:
    if cfg.get("time_shift"):
        try:
            TimeShift.from_spec(dict(cfg.time_shift))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"time_shift: {e}") from None


# ---------------------------------------------------------------------------------------------
# Solver, NFE and time grid on the model's own schedule
# ---------------------------------------------------------------------------------------------

def _check_plan(cfg) -> None:
    """The solver options and the NFE budget (checked by the solver itself), then the time grid of
    `spacing` on the model's real schedule when it is known without loading the model."""
    opts = dict(cfg.solver.get("options") or {})
    try:
        make_plan(cfg.solver.name, LinearVP(), cfg.nfe, "time_uniform", cfg.final, **opts)
    except ValueError as e:
        raise ConfigError(f"solver={cfg.solver.name} nfe={cfg.nfe}: {e}") from None
    schedule, where = _validation_schedule(cfg)
    if schedule is None:  # a hub id: spacing was checked by name
        return
    try:
        plan = make_plan(cfg.solver.name, schedule, cfg.nfe, cfg.spacing, cfg.final, **opts)
    except ValueError as e:
        raise ConfigError(f"spacing={cfg.spacing!r} does not apply to {where} (solver={cfg.solver.name}, "
                          f"nfe={cfg.nfe}): {e}") from None
    if cfg.get("time_shift"):  # a setting that shifts no step of this plan is refused here, not at sampling
        try:
            TimeShift.from_spec(dict(cfg.time_shift)).check(plan, schedule)
        except ValueError as e:
            raise ConfigError(f"time_shift on {where} (solver={cfg.solver.name}, nfe={cfg.nfe}): {e}") from None


def _gmm_schedule(m):
    from . import schedules as S

    return {"discrete_vp": lambda: S.DiscreteVP.linear(), "linear_vp": S.LinearVP, "cosine_vp": S.CosineVP,
            "edm": S.EDM, "flow": S.RectifiedFlow}[m.schedule]()


def _validation_schedule(cfg):
    """The model's noise schedule and a description of it, from the config alone (gmm) or from the
    pipeline's scheduler config (local pipelines); (None, None) when it needs a download."""
    m = cfg.model
    if m.name == "gmm":
        return _gmm_schedule(m), f"model.schedule={m.schedule}"
    d = _local_pipeline(m)
    f = d / "scheduler" / "scheduler_config.json" if d is not None else None
    if f is None or not f.is_file():
        return None, None
    from .pipelines.scheduler import DiffSamplerScheduler

    try:
        schedule = DiffSamplerScheduler.from_config(json.loads(f.read_text())).schedule
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.path: the scheduler config {f} is not supported: {e}") from None
    return schedule, f"the {type(schedule).__name__} schedule of {d}"


def _device(cfg) -> torch.device:
    if cfg.device == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def _gmm(cfg):
    from .eval.gmm import GaussianMixture, gmm_denoiser

    m = cfg.model
    gmm = GaussianMixture.random(m.dim, m.components, seed=m.seed, scale=m.scale, std=tuple(m.std))
    schedule = _gmm_schedule(m)
    pred = "flow" if m.schedule == "flow" else m.prediction_type
    return gmm, gmm_denoiser(gmm, schedule, pred)


def _pipeline_denoiser(cfg, device):
    from .pipelines import denoiser_from_pipeline

    m = cfg.model
    if m.name == "digits":
        from .eval.digits import load_digits_pipeline

        pipe = load_digits_pipeline(m.get("path"))
    else:
        from diffusers import DiffusionPipeline

        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[m.dtype]
        try:
            pipe = DiffusionPipeline.from_pretrained(str(m.path), torch_dtype=dtype)
        except OSError as e:
            raise ConfigError(f"model.path {m.path!r} could not be loaded with from_pretrained: {e}") from None
    pipe.to(device)
    kw: dict[str, Any] = {}
    scale = cfg.guidance.scale if cfg.guidance.name == "cfg" else 1.0
    if m.get("prompt"):
        kw.update(prompt=m.prompt, negative_prompt=m.get("negative_prompt"))
    if m.get("class_label") is not None:
        kw.update(class_labels=torch.tensor([m.class_label], device=device), null_class=m.get("null_class"))
    return denoiser_from_pipeline(pipe, scale, cfg.guidance.get("rescale", 0.0), **kw)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _container(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _fingerprint(cfg, device: torch.device) -> dict:
    """Everything that determines a run's samples, as JSON values: the model, the solver and its
    options (a saved plan by its content), NFE, grid, end point, guidance, time shift, dtype and
    device class.  Not the seeds (each shard lists its own) nor their number (more samples, more
    shards), nor batch and shard sizes (per-seed noise: they never change a sample)."""
    plan = None
    if cfg.solver.name == "plan" and cfg.solver.get("path"):
        from .samplers.usf import load_plan

        plan = load_plan(str(cfg.solver.path)).to_dict()
    return {"model": _container(cfg.model), "solver": _container(cfg.solver), "plan": plan, "nfe": cfg.nfe,
            "spacing": cfg.spacing, "final": cfg.final, "guidance": _container(cfg.guidance),
            "time_shift": _container(cfg.time_shift) if cfg.get("time_shift") else None,
            "dtype": str(cfg.model.get("dtype") or "float32"), "device": device.type}


def _value_range(cfg) -> tuple[float, float] | None:
    """Range of the saved samples: decoded images are in [0, 1]; mixture samples are vectors."""
    return None if cfg.model.name == "gmm" else (0.0, 1.0)


def _check_writable(run_dir: Path, table: Path) -> None:
    """The run directory and the results table can be written, probed before any work: metrics are
    never computed only to be lost."""
    for what, d in (("run directory", run_dir), ("results_file", table.parent)):
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, prefix=".write_probe"):
                pass
        except OSError as e:
            target = table if what == "results_file" else d
            raise ConfigError(f"{what} {target} cannot be written ({e.strerror or e}); "
                              "give a path in a writable directory") from None
    if table.is_dir():
        raise ConfigError(f"results_file {table} is a directory; give a file path such as {table / 'results.csv'}")


def _check_resumable(samples_dir: Path, fingerprint: dict, value_range) -> None:
    """Shards already in the run's samples directory were made with this very configuration."""
    from .eval.generate import ShardMismatchError, check_shards

    try:
        check_shards(samples_dir, fingerprint, value_range)
    except ShardMismatchError as e:
        raise ConfigError(f"{samples_dir} holds samples of another configuration ({'; '.join(e.differences)}); "
                          f"resuming would score them under this one. Start fresh with a new hydra.run.dir, "
                          f"or delete {samples_dir} to regenerate here") from None


def run(cfg, run_dir: Path, table: Path) -> dict:
    """Sample, score, write `metrics.json` and append a row to `table`; returns the row (on every rank).

    Before any model is built: the config is validated, the run directory and the table are probed
    for writing, and shards left in `run_dir/samples` must carry this configuration's fingerprint
    (an interrupted run resumes; another configuration is refused)."""
    from .eval.generate import barrier, dist_env, generate_shards, load_shards, save_image_grid

    validate(cfg)
    rank, world = dist_env()
    device = _device(cfg)
    run_dir, table = Path(run_dir), Path(table)
    _check_writable(run_dir, table)
    fingerprint, value_range = _fingerprint(cfg, device), _value_range(cfg)
    _check_resumable(run_dir / "samples", fingerprint, value_range)
    t0 = time.perf_counter()
    gmm = None
    if cfg.model.name == "gmm":
        gmm, den = _gmm(cfg)
        shape = (gmm.dim,)
    else:
        den = _pipeline_denoiser(cfg, device)
        m = cfg.model
        shape = den.sample_shape(1, m.get("height"), m.get("width"))[1:]
    options = dict(cfg.solver.get("options") or {})
    guidance = _guidance(cfg, device)
    plan = make_plan(cfg.solver.name, den.schedule, cfg.nfe, cfg.spacing, cfg.final, **options)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    ts = dict(cfg.time_shift) if cfg.get("time_shift") else None

    calls: list[int] = []  # network calls per trajectory, measured (guidance can add some)

    def sample_fn(batch_seeds):
        out = []
        for i in range(0, len(batch_seeds), cfg.batch_size):
            chunk = batch_seeds[i:i + cfg.batch_size]
            n0 = den.nfe
            x = sample(den, shape=(len(chunk), *shape), seeds=chunk, solver=plan, device=device, time_shift=ts,
                       guidance=guidance)
            calls.append(den.nfe - n0)
            if gmm is None:
                x = den.decode(x)
            out.append(x.float().cpu())
        return torch.cat(out)

    with torch.no_grad():
        generate_shards(sample_fn, seeds, run_dir / "samples", cfg.shard_size, rank, world,
                        progress=cfg.progress and rank == 0, desc=f"{cfg.solver.name} nfe={cfg.nfe}",
                        fingerprint=fingerprint, value_range=value_range)
    gen_time = time.perf_counter() - t0
    barrier()
    row: dict[str, Any] = {}
    if rank == 0:
        _, samples = load_shards(run_dir / "samples", seeds)
        metrics = _metrics(cfg, gmm, den, samples, device)
        if cfg.guidance.name == "svdd":
            metrics.update(_svdd_metrics(cfg, guidance, samples, gmm is None))
        if cfg.guidance.name == "minority":
            metrics.update(_minority_metrics(guidance, den, samples, device, max(len(calls), 1)))
        if gmm is None:
            save_image_grid(samples[: cfg.grid_size], run_dir / "grid.png")
        row = {
            "model": cfg.model.name, "solver": cfg.solver.name,
            "solver_options": json.dumps(options, sort_keys=True), "nfe": cfg.nfe,
            "nfe_counted": max(calls) if calls else _planned_calls(guidance, plan),
            "spacing": "plan" if plan.info.get("spacing") == "plan" else cfg.spacing, "final": cfg.final,
            "guidance": _guidance_str(cfg),
            "time_shift": json.dumps(ts, sort_keys=True) if ts else "",
            "num_samples": cfg.num_samples, "seeds": f"{seeds[0]}-{seeds[-1]}", "rng_device": "cpu",
            **metrics, "wall_time_s": round(time.perf_counter() - t0, 3), "gen_time_s": round(gen_time, 3),
            "world_size": world, "run_dir": str(run_dir),
        }
        (run_dir / "metrics.json").write_text(json.dumps({**row, "fingerprint": fingerprint}, indent=2))
        try:
            append_row(table, row)
        except OSError as e:
            raise OSError(f"the row could not be appended to {table} ({e}); the metrics are saved in "
                          f"{run_dir / 'metrics.json'}") from e
    barrier()
    return row


def _guidance(cfg, device):
    """The guidance object of `cfg.guidance` (None for none/cfg: CFG is built into the denoiser)."""
    g = cfg.guidance
    if g.name == "minority":
        from .guidance.minority import MinorityClassifier, MinorityGuidance

        path = g.get("classifier")
        if not path:
            from .eval.digits import ASSET_DIR

            path = ASSET_DIR / "minority"
        try:
            clf = MinorityClassifier.from_pretrained(Path(str(path)).expanduser()).to(device)
        except FileNotFoundError as e:
            raise ConfigError(f"guidance.classifier: {e}") from None
        return MinorityGuidance(clf, float(g.scale), g.get("target"), tuple(g.get("interval") or (0.0, 1.0)))
    if g.name == "svdd":
        from .guidance.svdd import SVDD

        return SVDD(_reward(cfg, device), int(g.num_candidates), float(g.alpha))
    return None


def _reward_name(cfg) -> str:
    r = cfg.guidance.reward
    if r == "auto":
        return {"digits": "classifier", "gmm": "distance"}.get(cfg.model.name, "auto")
    return r


def _digit(cfg) -> int:
    t = cfg.guidance.get("target")
    return 3 if t is None else int(t)


def _reward(cfg, device):
    """The reward of guidance=svdd, on the sampler's x0 (pixel models: [-1, 1])."""
    from .guidance.rewards import ClassifierLogProb, JPEGCompressibility, NegativeDistance

    g = cfg.guidance
    name = _reward_name(cfg)
    if name == "classifier":
        from .eval.digits import load_digits_classifier

        return ClassifierLogProb(load_digits_classifier().to(device), _digit(cfg), clamp=(-1.0, 1.0))
    if name == "jpeg":
        return JPEGCompressibility()
    gmm, _ = _gmm(cfg)
    return NegativeDistance(gmm.means[0] if g.get("target") is None else torch.tensor(list(g.target)))


def _planned_calls(guidance, plan) -> int:
    cost = getattr(guidance, "nfe", None)  # SVDD: candidates' model calls
    return int(cost(plan)) if callable(cost) else plan.nfe


def _svdd_metrics(cfg, guidance, samples, image: bool) -> dict:
    """Mean reward of the final samples and, for the digit classifier reward, the target digit's share."""
    x = samples * 2 - 1 if image else samples  # decoded images are in [0, 1]; rewards take the model's range
    out = {"reward_mean": float(guidance.reward(x).double().mean())}
    if _reward_name(cfg) == "classifier":
        clf = guidance.reward.classifier
        with torch.no_grad():
            pred = clf(x.to(next(clf.parameters()).device).float()).argmax(1).cpu()
        out["target_share"] = float((pred == _digit(cfg)).float().mean())
    return out


def _minority_metrics(guidance, den, samples, device, batches: int) -> dict:
    """Share of samples whose minority score (measured as the classifier's training data was) lies in
    the real data's top class (the top decile for 10 classes)."""
    from .guidance.minority import _feature_fn, minority_score

    clf = guidance.classifier
    meta, th = clf.config.get("meta", {}), clf.thresholds
    if th is None:
        return {}
    x = samples.to(device) * 2 - 1  # decoded images are in [0, 1]; the model's data range is [-1, 1]
    s = minority_score(den, x, meta.get("t_frac", 0.4), meta.get("num_draws", 4),
                       _feature_fn(meta.get("feature"), device), seed=10**6)
    return {"minority_top_share": float((s >= float(th[-1])).float().mean()),
            "classifier_calls": guidance.classifier_calls // batches}  # per trajectory


def _guidance_str(cfg) -> str:
    from omegaconf import OmegaConf

    g = OmegaConf.to_container(cfg.guidance, resolve=True) if OmegaConf.is_config(cfg.guidance) else dict(cfg.guidance)
    name = g.pop("name")
    return name if not g else name + json.dumps(g, sort_keys=True)


def _check_reference_and_kid(cfg) -> None:
    """eval.reference: an image folder, checked without decoding; eval.kid: a bool, for image models
    with reference images."""
    e = cfg.get("eval") or {}
    kid, ref = e.get("kid", False), e.get("reference")
    if not isinstance(kid, bool):
        raise ConfigError(f"eval.kid must be true or false, got {kid!r}")
    if cfg.model.name == "gmm":
        if ref:
            raise ConfigError(f"eval.reference is for image models (model=digits or diffusers), got {ref!r} with "
                              "model=gmm, which is scored against the exact mixture (rmse, fd)")
        if kid:
            raise ConfigError("eval.kid=true needs an image model (model=digits or diffusers), not model=gmm: its "
                              "samples are scored against the exact mixture (rmse, fd), and KID's polynomial kernel "
                              "is made for network features of images")
    elif kid and not ref and cfg.model.name != "digits":
        raise ConfigError(f"eval.kid=true needs reference images on model={cfg.model.name}: set eval.reference=DIR")
    if ref:
        from .eval.fid import ReferenceDataError, list_reference_images

        try:
            list_reference_images(Path(str(ref)).expanduser(), check_sizes=True)
        except ReferenceDataError as ex:
            raise ConfigError(f"eval.reference: {ex}") from None


def _reference(cfg) -> tuple | None:
    """(dataset, images_fn, content) of the reference data for reference_stats; None: no FID."""
    ref = cfg.eval.reference
    if ref:
        return Path(str(ref)).expanduser(), None, None
    if cfg.model.name != "digits":
        return None
    import hashlib

    from .eval.digits import digits_dataset

    x = (digits_dataset("test")[0] + 1) / 2
    return "digits_test", lambda: x, hashlib.sha256(x.numpy().tobytes()).hexdigest()


def _metrics(cfg, gmm, den, samples: torch.Tensor, device) -> dict:
    if gmm is not None:
        return _gmm_metrics(cfg, gmm, den, samples)
    from .eval.fid import FIDEvaluator, get_feature_extractor, reference_features, reference_stats

    e = cfg.eval
    source = _reference(cfg)
    if source is None:
        return {}
    dataset, images_fn, content = source
    feature = e.feature if e.feature != "auto" else "digits" if cfg.model.name == "digits" else "inception"
    extractor = get_feature_extractor(feature, e.weights_path, e.sha256, device=device)
    cache = Path(str(e.cache_dir)).expanduser()
    stats = reference_stats(dataset, images_fn, extractor, cache, content=content)
    real = reference_features(dataset, images_fn, extractor, cache, content=content) if e.kid else None
    subset = min(1000, len(samples), len(real)) if e.kid else 1000
    ev = FIDEvaluator(extractor, device=device, sync=False, kid=bool(e.kid), kid_subset_size=subset)
    ev.set_reference(stats, features=real)  # scored on rank 0 alone
    for i in range(0, len(samples), 256):
        ev.update_fake(samples[i:i + 256].to(device))
    out = {"fid_proxy" if feature == "digits" else "fid": float(ev.compute())}
    if e.kid:
        out["kid_mean"], out["kid_std"] = ev.compute_kid()
        out["kid_subset_size"] = subset
    return out


def _gmm_metrics(cfg, gmm, den, samples) -> dict:
    """RMSE against the exact PF-ODE endpoint of the same x_T, and the Frechet distance of the
    samples to the exact mixture mean and covariance."""
    from .eval.fid import frechet_distance
    from .samplers.loop import initial_noise

    n = samples.shape[0]
    sch = den.schedule
    x_T = initial_noise((n, gmm.dim), sch, seeds=range(cfg.seed, cfg.seed + n)).double()  # the runs' own x_T
    t0 = float(sch.t_max)
    t1 = float(sch.t_min)
    a1, s1 = (1.0, 0.0) if cfg.final == "zero" else (float(sch.alpha(t1)), float(sch.sigma(t1)))
    ref = gmm.ode_endpoint(x_T, float(sch.alpha(t0)), float(sch.sigma(t0)), a1, s1)
    x = samples.double()
    rmse = float((x - ref).pow(2).mean().sqrt())
    mu, cov = x.mean(0).numpy(), torch.cov(x.T).numpy()
    fd = frechet_distance(mu, cov, gmm.mean.double().numpy(), gmm.covariance.double().numpy())
    return {"rmse": rmse, "fd": float(fd)}


# ---------------------------------------------------------------------------------------------
# The results table: one CSV per sweep, rows appended atomically (lock + write-temp + replace)
# ---------------------------------------------------------------------------------------------

def append_row(table: Path, row: dict) -> None:
    table = Path(table)
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_rows(table) + [{k: ("" if v is None else v) for k, v in row.items()}]
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        tmp = table.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, table)


def read_rows(table: Path) -> list[dict]:
    if not Path(table).exists():
        return []
    with open(table, newline="") as f:
        return list(csv.DictReader(f))
