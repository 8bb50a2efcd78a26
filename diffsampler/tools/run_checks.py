"""Every value of a run spec that can be checked without loading the model, checked before any work
and named by its config key.  Each rule is asked of the thing it guards: the solver of its options
and NFE, the model's own schedule of the spacing and the time shift, `eval.fid` of the reference
folder, the minority classifier's config of its classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..guidance.cfg import check_interval
from .config_schema import SCHEDULES, ConfigError
from ..samplers import available, get, is_solver_name, make_plan
from ..samplers.time_shift import TimeShift
from .run_spec import GuidanceSpec, ModelSpec, RunSpec, resolve

__all__ = ["validate", "check", "reward_name", "local_pipeline", "model_schedule", "DEVICE_TYPES"]

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def validate(cfg) -> RunSpec:
    """Fail before any work, naming the bad key: the schema (known keys, value types), then every
    value that can be checked without loading the model.  Returns the run spec."""
    spec = resolve(cfg)
    check(spec)
    return spec


def check(spec: RunSpec) -> None:
    _check_counts(spec)
    _check_solver_name(spec)
    _check_device(spec.sampling.device)
    _check_model(spec)
    _check_guidance(spec)
    _check_eval(spec)
    _check_time_shift(spec.sampling.time_shift)
    _check_plan(spec)


def _check_counts(spec: RunSpec) -> None:
    s = spec.sampling
    for key in ("nfe", "num_samples", "batch_size", "shard_size", "grid_size"):
        v = getattr(s, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
    if not isinstance(s.seed, int) or isinstance(s.seed, bool) or s.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {s.seed!r}")


def _check_solver_name(spec: RunSpec) -> None:
    if not is_solver_name(spec.solver.name):
        raise ConfigError(f"solver.name {spec.solver.name!r} is not a registered solver; available: {available()} "
                          "and solver=plan solver.path=<plan YAML or name>")
    if spec.sampling.final not in ("zero", "last"):
        raise ConfigError(f"final must be 'zero' or 'last', got {spec.sampling.final!r}")


def _device_count(kind: str) -> int:
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, kind, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


def _check_device(name: str) -> None:
    """device: auto, or a device type of this machine (with an index below its device count)."""
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

def _check_model(spec: RunSpec) -> None:
    m = spec.model
    if m.name == "gmm":
        _check_gmm(m)
        return
    if m.path:
        p = str(m.path)
        looks_like_hub_id = p.count("/") == 1 and not p.startswith((".", "/", "~"))
        if not Path(p).expanduser().exists() and not looks_like_hub_id:
            raise ConfigError(f"model.path {p!r} does not exist (give a local directory or a hub id like owner/name)")
    if m.name == "diffusers":
        _check_image_size(m)
        _check_conditioning(m, spec.guidance)


def _check_gmm(m: ModelSpec) -> None:
    if m.schedule not in SCHEDULES:
        raise ConfigError(f"model.schedule must be one of {SCHEDULES}, got {m.schedule!r}")
    for key in ("dim", "components"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be an integer >= 1, got {getattr(m, key)!r}")
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


def _check_image_size(m: ModelSpec) -> None:
    for key in ("height", "width"):
        v = getattr(m, key)
        if v is not None and v < 1:
            raise ConfigError(f"model.{key} must be an integer >= 1, got {v!r}")
    if m.width is not None and m.height is None:
        raise ConfigError(f"model.width={m.width} needs model.height (give both, or model.height alone for a "
                          "square image)")
    factor = _vae_factor(m)
    for key in ("height", "width"):
        v = getattr(m, key)
        if v is not None and factor and v % factor:
            raise ConfigError(f"model.{key}={v} must be a multiple of {factor} (the VAE downsampling of "
                              f"{local_pipeline(m)}), or the image would be {v // factor * factor} pixels")


def _vae_factor(m: ModelSpec) -> int | None:
    """Pixels per latent of a local pipeline's VAE (None: no VAE, or not known without a download)."""
    d = local_pipeline(m)
    f = d / "vae" / "config.json" if d is not None else None
    if f is None or not f.is_file():
        return None
    return 2 ** (len(json.loads(f.read_text()).get("block_out_channels", [0])) - 1)


def local_pipeline(m: ModelSpec) -> Path | None:
    """The local directory of the model's pipeline (None for a hub id)."""
    if m.name == "digits" and not m.path:
        from ..eval.digits import ASSET_DIR

        return ASSET_DIR / "ddpm"
    p = Path(str(m.path)).expanduser()
    return p if p.is_dir() else None


def _model_index(m: ModelSpec) -> dict | None:
    d = local_pipeline(m)
    f = d / "model_index.json" if d is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def _check_conditioning(m: ModelSpec, g: GuidanceSpec) -> None:
    """prompt, negative_prompt, class_label and null_class each take effect, or are refused."""
    cfg_on = g.name == "cfg"
    if m.prompt:
        _check_text_pipeline(m)
    if m.negative_prompt and not (m.prompt and cfg_on):
        raise ConfigError("model.negative_prompt takes effect only with model.prompt and guidance=cfg")
    if m.null_class is not None and not cfg_on:
        raise ConfigError("model.null_class takes effect only with guidance=cfg (the unconditional class label)")
    if m.prompt and m.class_label is not None:
        raise ConfigError("give model.prompt or model.class_label, not both")
    if not cfg_on or g.scale == 1.0:
        return
    if not m.prompt and m.class_label is None:
        raise ConfigError(f"guidance=cfg with guidance.scale={g.scale} needs a condition: model.prompt or "
                          "model.class_label")
    if m.class_label is not None and m.null_class is None:
        raise ConfigError("model.class_label with guidance=cfg needs model.null_class (the unconditional label)")


def _check_text_pipeline(m: ModelSpec) -> None:
    index = _model_index(m)
    if index is None:  # a hub id: checked when it is loaded
        return
    cls = index.get("_class_name", "the pipeline")
    if "transformer" in index:
        raise ConfigError(f"model.prompt is not supported for {cls} (a transformer pipeline) from the command "
                          "line; encode the prompt and use denoiser_from_pipeline(prompt_embeds=...)")
    if not (index.get("text_encoder") or [None])[0]:
        raise ConfigError(f"model.prompt needs a text-to-image pipeline; {cls} at {local_pipeline(m)} has no "
                          "text encoder (use model.class_label for class-conditional models)")


# ---------------------------------------------------------------------------------------------
# Guidance and evaluation settings
# ---------------------------------------------------------------------------------------------

def _check_guidance(spec: RunSpec) -> None:
    m, g = spec.model, spec.guidance
    if g.name == "cfg" and m.name != "diffusers":
        raise ConfigError(f"guidance=cfg needs a conditional model (model=diffusers with a prompt or class), got model={m.name}")
    if g.name == "cfg":
        try:
            check_interval(None if g.interval is None else list(g.interval), g.scale)
        except ValueError as e:
            raise ConfigError(f"guidance.interval: {e} (e.g. guidance.interval=[0.28,5.42])") from None
    if g.name == "minority":
        _check_minority(m, g)
    if g.name == "svdd":
        _check_svdd(spec)


def _check_minority(m: ModelSpec, g: GuidanceSpec) -> None:
    if m.name == "gmm":
        raise ConfigError("guidance=minority needs an image model with a minority classifier (model=digits, or "
                          "model=diffusers with guidance.classifier=DIR from `diffsampler minority-classifier`)")
    if m.name != "digits" and not g.classifier:
        raise ConfigError("guidance=minority on model=diffusers needs guidance.classifier=DIR "
                          "(write one with `diffsampler minority-classifier --pipeline ... --out DIR`)")
    if not (isinstance(g.scale, (int, float)) and g.scale >= 0):
        raise ConfigError(f"guidance.scale must be a number >= 0, got {g.scale!r}")
    interval = list(g.interval or (0.0, 1.0))
    if len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1:
        raise ConfigError(f"guidance.interval must be [lo, hi] with 0 <= lo < hi <= 1, got {interval} "
                          "(fractions of the time range)")
    config = _minority_classifier_config(minority_classifier_dir(g))
    n = config.get("num_classes")
    if g.target is not None and isinstance(n, int) and not 0 <= g.target < n:
        raise ConfigError(f"guidance.target must be a class of the minority classifier (0..{n - 1}), got {g.target}")


def minority_classifier_dir(g: GuidanceSpec) -> Path:
    """guidance.classifier, or the packaged digits minority classifier."""
    if g.classifier:
        return Path(str(g.classifier)).expanduser()
    from ..eval.digits import ASSET_DIR

    return ASSET_DIR / "minority"


def _minority_classifier_config(directory: Path) -> dict:
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise ConfigError(f"guidance.classifier: no {name} in {directory} (write one with "
                              "`diffsampler minority-classifier`)")
    return json.loads((directory / "config.json").read_text())


def reward_name(model: str, g: GuidanceSpec) -> str:
    """guidance.reward with auto resolved for the model (digits: classifier, gmm: distance)."""
    if g.reward == "auto":
        return {"digits": "classifier", "gmm": "distance"}.get(model, "auto")
    return g.reward


def _check_svdd(spec: RunSpec) -> None:
    m, g = spec.model, spec.guidance
    rewards = ("classifier", "jpeg") if m.name == "digits" else ("distance",) if m.name == "gmm" else ()
    reward = reward_name(m.name, g)
    if reward not in rewards:
        raise ConfigError(f"guidance.reward={g.reward!r} is not available for model={m.name}; allowed: "
                          f"{('auto',) + rewards}")
    for key, lo in (("num_candidates", 1), ("alpha", 0)):
        v = getattr(g, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (key == "num_candidates" and v != int(v)):
            raise ConfigError(f"guidance.{key} must be {'an integer >= 1' if lo else 'a number >= 0'}, got {v!r}")
    _check_svdd_target(m, g, reward)
    schedule, _ = model_schedule(m)  # digits and gmm: known without loading the model
    try:
        stochastic = _plan(spec, schedule).stochastic
    except ValueError:
        stochastic = True  # the solver check names the problem
    if not stochastic:
        from ..guidance.svdd import stochastic_solvers

        raise ConfigError(f"guidance=svdd draws candidates from a stochastic solver; solver={spec.solver.name} "
                          f"has no noise. Use one of: {', '.join(stochastic_solvers())}")


def _check_svdd_target(m: ModelSpec, g: GuidanceSpec, reward: str) -> None:
    t = g.target
    if t is None:
        return
    if reward == "jpeg":
        raise ConfigError(f"guidance.target does not apply to guidance.reward=jpeg, got {t!r}")
    if reward == "classifier" and not (isinstance(t, int) and 0 <= t <= 9):
        raise ConfigError(f"guidance.target must be a digit 0..9 for guidance.reward=classifier, got {t!r}")
    if reward == "distance" and (isinstance(t, int) or len(t) != m.dim):
        raise ConfigError(f"guidance.target must be a point of model.dim={m.dim} numbers for "
                          f"guidance.reward=distance, got {list(t) if not isinstance(t, int) else t}")


def _check_eval(spec: RunSpec) -> None:
    """eval.* keys apply to image models: each one given either takes effect or is refused."""
    e, model = spec.eval, spec.model.name
    shard_dtype(spec)
    _check_feature(e.feature)
    _check_reference_and_kid(spec)
    unused = {"gmm": ("feature", "weights_path", "sha256")}.get(model, ())
    for key in unused:
        if getattr(e, key) not in (None, "auto"):
            raise ConfigError(f"eval.{key} does not apply to model={model} (scored by rmse and fd against the exact "
                              f"mixture); got {getattr(e, key)!r}")
    if model == "diffusers" and not e.reference:
        for key in ("feature", "weights_path"):
            if getattr(e, key) not in (None, "auto"):
                raise ConfigError(f"eval.{key} takes effect only with eval.reference (model=diffusers is scored by "
                                  f"FID against a reference folder); got {getattr(e, key)!r}")
    if e.sha256 and not e.weights_path:
        raise ConfigError("eval.sha256 takes effect only with eval.weights_path (the checksum of that file)")
    if e.weights_path and not Path(str(e.weights_path)).expanduser().is_file():
        raise ConfigError(f"eval.weights_path {str(e.weights_path)!r} is not a file (the Inception weights, "
                          "pt_inception-2015-12-05)")


SHARD_DTYPES = ("auto", "uint8", "float32")


def shard_dtype(spec: RunSpec) -> str:
    """How the run's samples are stored: eval.shard_dtype, with auto = uint8 for image models
    (decoded images in [0, 1] -> 0..255, what image files and FID tools hold) and float32 for gmm."""
    d, model = spec.eval.shard_dtype, spec.model.name
    if d not in SHARD_DTYPES:
        raise ConfigError(f"eval.shard_dtype must be one of {', '.join(SHARD_DTYPES)}, got {d!r}")
    if d == "uint8" and model == "gmm":
        raise ConfigError("eval.shard_dtype=uint8 stores images (values in [0, 1] as 0..255); model=gmm samples "
                          "are vectors of any range: use float32 (or auto)")
    return d if d != "auto" else "float32" if model == "gmm" else "uint8"


def _check_feature(name: str) -> None:
    import importlib

    from ..eval.fid import FEATURE_EXTRACTORS

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


def _check_reference_and_kid(spec: RunSpec) -> None:
    """eval.reference: an image folder, checked without decoding; eval.kid: a bool, for image models
    with reference images."""
    kid, ref, model = spec.eval.kid, spec.eval.reference, spec.model.name
    if not isinstance(kid, bool):
        raise ConfigError(f"eval.kid must be true or false, got {kid!r}")
    if model == "gmm":
        if ref:
            raise ConfigError(f"eval.reference is for image models (model=digits or diffusers), got {ref!r} with "
                              "model=gmm, which is scored against the exact mixture (rmse, fd)")
        if kid:
            raise ConfigError("eval.kid=true needs an image model (model=digits or diffusers), not model=gmm: its "
                              "samples are scored against the exact mixture (rmse, fd), and KID's polynomial kernel "
                              "is made for network features of images")
    elif kid and not ref and model != "digits":
        raise ConfigError(f"eval.kid=true needs reference images on model={model}: set eval.reference=DIR")
    if ref:
        from ..eval.fid import ReferenceDataError, list_reference_images

        try:
            list_reference_images(Path(str(ref)).expanduser(), check_sizes=True)
        except ReferenceDataError as ex:
            raise ConfigError(f"eval.reference: {ex}") from None


def _check_time_shift(time_shift: dict | None) -> None:
    if time_shift:
        try:
            TimeShift.from_spec(dict(time_shift))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"time_shift: {e}") from None


# ---------------------------------------------------------------------------------------------
# Solver, NFE and time grid on the model's own schedule
# ---------------------------------------------------------------------------------------------

def _check_plan(spec: RunSpec) -> None:
    """The solver options and the NFE budget (checked by the solver itself), then the plan on the
    model's real schedule when it is known without loading the model: its spacing and time shift."""
    s, name = spec.sampling, spec.solver.name
    try:
        get(name, **spec.solver.options).steps_for_nfe(s.nfe, final_zero=s.final == "zero")
    except ValueError as e:
        raise ConfigError(f"solver={name} nfe={s.nfe}: {e}") from None
    schedule, where = model_schedule(spec.model)
    if schedule is None:  # a hub id: spacing was checked by name
        return
    try:
        plan = _plan(spec, schedule)
    except ValueError as e:
        raise ConfigError(f"spacing={s.spacing!r} does not apply to {where} (solver={name}, nfe={s.nfe}): {e}") from None
    if s.time_shift:  # a setting that shifts no step of this plan is refused here, not at sampling
        try:
            TimeShift.from_spec(dict(s.time_shift)).check(plan, schedule)
        except ValueError as e:
            raise ConfigError(f"time_shift on {where} (solver={name}, nfe={s.nfe}): {e}") from None


def _plan(spec: RunSpec, schedule):
    s = spec.sampling
    return make_plan(spec.solver.name, schedule, s.nfe, s.spacing, s.final, **spec.solver.options)


def gmm_schedule(name: str):
    """The noise schedule of model.schedule (model=gmm)."""
    from .. import schedules as S

    return {"discrete_vp": lambda: S.DiscreteVP.linear(), "linear_vp": S.LinearVP, "cosine_vp": S.CosineVP,
            "edm": S.EDM, "flow": S.RectifiedFlow}[name]()


def model_schedule(m: ModelSpec):
    """The model's noise schedule and a description of it, from the spec alone (gmm) or from the
    pipeline's scheduler config (local pipelines); (None, None) when it needs a download."""
    if m.name == "gmm":
        return gmm_schedule(m.schedule), f"model.schedule={m.schedule}"
    d = local_pipeline(m)
    f = d / "scheduler" / "scheduler_config.json" if d is not None else None
    if f is None or not f.is_file():
        return None, None
    from ..pipelines.scheduler import DiffSamplerScheduler

    try:
        schedule = DiffSamplerScheduler.from_config(json.loads(f.read_text()), solver="dpmpp_2m").schedule  # schedule only
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.path: the scheduler config {f} is not supported: {e}") from None
    return schedule, f"the {type(schedule).__name__} schedule of {d}"
