"""`diffsampler search`: the S^3 solver-schedule search (tools/search.py) as a Hydra job over any
`model=` of the CLI (configs/search.yaml), with the metric, budget and seeds under `search.*`.

    diffsampler search model=digits search.nfe=5 search.budget=300
    diffsampler search -m search.nfe=4,5,6,8,10 search.plan_dir=plans/   # one plan per NFE
    torchrun --nproc_per_node 2 -m diffsampler search hydra.run.dir=out/s ...   # a generation over 2 ranks

One job: validate every key before the model is built (`validate_search`); build the model (and
CFG); make the calibration / verification batches from disjoint seed ranges, scored against
reference endpoints that are generated once per model (seeded shards in the cache, keyed by the
model's fingerprint; reused by every search on it) or by an FID / FID-proxy / user metric; decide
whether the analytic first step (zero data mean) may be searched; search (resumable JSONL log in
the run dir); then write next to the plan a convergence plot and a table of the plan against every
registered deterministic solver (best spacing) and diffusers' schedulers (their parity mappings) on
held-out seeds.

Seeds, by construction disjoint: held-out evaluation 0 .. holdout-1 (< 10^6); calibration
CALIBRATION_SEED_BASE + 0 .. calib-1; verification CALIBRATION_SEED_BASE + calib .. + calib+verify-1.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from .config_schema import BOOL, GROUPS, INT, STR, ConfigError, Type, _check_node, one_of, optional
from .run_spec import EvalSpec, GuidanceSpec, ModelSpec, model_spec
from .search import CALIBRATION_SEED_BASE, Batch, Calibration, S3Settings, rmse, run_search

logger = logging.getLogger(__name__)

__all__ = ["SearchSpec", "validate_search", "run_search_job", "search_seeds", "SEARCH_KEYS", "METRICS"]

METRICS = ("rmse", "fid", "fid_proxy")
COMPARE_SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras", "leading")  # leading: DiscreteVP models
#: diffusers scheduler classes in the table (deterministic ones with a parity mapping), with the
#: sigma options tried on each
DIFFUSERS_ROWS = (
    ("DDIMScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("DPMSolverMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"solver_order": 2, "use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("DEISMultistepScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
)
REFERENCE_SHARD = 64    # reference endpoints per shard file
MEAN_TOLERANCE = 0.05  # "zero data mean": rms of the mean <= this x the data's rms spread
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _bool_or_auto(v) -> bool:
    return isinstance(v, bool) or v == "auto"


SEARCH_KEYS: dict[str, Type] = {
    "nfe": INT, "budget": INT, "refine": INT, "calib": INT, "verify": INT,
    "metric": STR, "base": optional(STR), "seed": INT, "name": optional(STR), "final": optional(one_of("zero", "last")),
    "reference_solver": STR, "reference_nfe": INT,
    "analytic": Type("true, false or auto", _bool_or_auto), "time_shift": Type("true, false or auto", _bool_or_auto),
    "late_start": Type("true, false or auto", _bool_or_auto),
    "holdout": INT, "top_k": INT, "batch": INT, "batch_size": optional(INT), "log": optional(STR), "plan_dir": optional(STR), "cache_dir": STR,
}
TOP_KEYS: dict[str, Type] = {"model": Type("a config group", lambda v: isinstance(v, dict)),
                             "guidance": Type("a config group", lambda v: isinstance(v, dict)),
                             "eval": Type("a config group", lambda v: isinstance(v, dict)),
                             "search": Type("a config group", lambda v: isinstance(v, dict)),
                             "device": STR, "progress": BOOL}


@dataclass(frozen=True)
class SearchSpec:
    model: ModelSpec
    guidance: GuidanceSpec
    eval: EvalSpec
    device: str
    progress: bool
    nfe: int
    budget: int
    refine: int
    calib: int
    verify: int
    metric: str
    base: str | None
    seed: int
    name: str
    final: str | None
    reference_solver: str
    reference_nfe: int
    analytic: Any
    time_shift: bool
    late_start: Any
    holdout: int
    top_k: int
    batch: int
    batch_size: int | None
    log: str | None
    plan_dir: str | None
    cache_dir: str
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_reference(self) -> bool:
        """Reference endpoints from a converged solver (rmse on a network model)."""
        return self.metric == "rmse" and self.model.name != "gmm"


def search_seeds(calib: int, verify: int, holdout: int) -> dict[str, list[int]]:
    """The three seed ranges of a search job; disjoint by construction (holdout < CALIBRATION_SEED_BASE)."""
    if holdout > CALIBRATION_SEED_BASE:
        raise ConfigError(f"search.holdout must be <= {CALIBRATION_SEED_BASE} (held-out seeds 0..holdout-1 stay below "
                          f"the calibration seeds), got {holdout}")
    b = CALIBRATION_SEED_BASE
    return {"holdout": list(range(holdout)), "calib": list(range(b, b + calib)),
            "verify": list(range(b + calib, b + calib + verify))}


# ---------------------------------------------------------------------------------------------
# validation: every key, before any model call
# ---------------------------------------------------------------------------------------------

def validate_search(cfg) -> SearchSpec:
    """The checked SearchSpec of a composed search config; ConfigError naming the key otherwise."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    _check_node(cfg, "", TOP_KEYS, "top-level keys of diffsampler search", skip=("hydra",))
    for group in ("model", "guidance", "eval"):
        node = cfg[group]
        option = node.get("name") if OmegaConf.is_dict(node) else None
        _check_node(node, f"{group}.", GROUPS[group](option), f"keys of {group} ({group}={option})")
    _check_node(cfg.search, "search.", SEARCH_KEYS, "keys of search")
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
             for k in cfg.keys() if k != "hydra"}
    s, m, g = plain["search"], plain["model"], plain["guidance"]
    gspec = GuidanceSpec(**({**g, "interval": tuple(g["interval"])} if g.get("interval") is not None else
                            {k: v for k, v in g.items() if k != "interval"}), config=g)
    spec = SearchSpec(model=model_spec(m), guidance=gspec, eval=EvalSpec(**plain["eval"]), device=plain["device"],
                      progress=plain["progress"], **{k: s[k] for k in SEARCH_KEYS if k not in ("name", "time_shift")},
                      name=s["name"] or f"{m['name']}_nfe{s['nfe']}", time_shift=_time_shift_on(s["time_shift"], m),
                      config=plain)
    _check_search(spec)
    return spec


def _time_shift_on(v, m: dict) -> bool:
    """auto: searched on trained networks (exposure bias), not on the exact mixture."""
    return (m["name"] != "gmm") if v == "auto" else bool(v)


def _check_search(spec: SearchSpec) -> None:
    from ..samplers import available, info, is_solver_name
    from ..samplers.usf import spec_solvers
    from . import run_checks

    for key, lo in (("nfe", 1), ("budget", 1), ("refine", 0), ("calib", 1), ("verify", 0), ("seed", 0), ("reference_nfe", 1),
                    ("holdout", 0), ("top_k", 1), ("batch", 1), ("batch_size", 1)):
        v = getattr(spec, key)
        if v is not None and v < lo:
            raise ConfigError(f"search.{key} must be an integer >= {lo}, got {v!r}")
    search_seeds(spec.calib, spec.verify, spec.holdout)
    if not _NAME.match(spec.name):
        raise ConfigError(f"search.name must be a plan name of letters, digits, '_', '.', '-' (it names the file "
                          f"<name>.yaml and solver=\"plan:<name>\"), got {spec.name!r}")
    _check_metric(spec)
    if spec.base is not None and spec.base not in spec_solvers():
        raise ConfigError(f"search.base={spec.base!r} has no solver spec to search the time grid of; allowed: "
                          f"{spec_solvers()}")
    if not is_solver_name(spec.reference_solver) or info(spec.reference_solver)["stochastic"]:
        raise ConfigError(f"search.reference_solver must be a deterministic registered solver, got "
                          f"{spec.reference_solver!r}; allowed: {[n for n in available() if not info(n)['stochastic']]}")
    if spec.reference_nfe < spec.nfe:
        raise ConfigError(f"search.reference_nfe={spec.reference_nfe} is below search.nfe={spec.nfe}: the reference "
                          "must be the converged solution (e.g. 200)")
    if (spec.reference_nfe != 200 or spec.reference_solver != "dpmpp_3m") and not spec.needs_reference:
        raise ConfigError(f"search.reference_solver / search.reference_nfe take effect only with search.metric=rmse on a "
                          f"network model (model=gmm has the exact solution; metric={spec.metric} needs no reference); "
                          f"got {spec.reference_solver} at {spec.reference_nfe}")
    if spec.guidance.name not in ("none", "cfg"):
        raise ConfigError(f"guidance={spec.guidance.name} cannot be searched over (allowed: none, cfg): the search scores "
                          "deterministic plans of one denoiser")
    if spec.time_shift and spec.base is not None:
        raise ConfigError("search.time_shift=true with search.base: a time-grid-only search keeps the base solver's "
                          "steps and no time shift; set search.time_shift=false")
    if spec.plan_dir is not None and Path(spec.plan_dir).expanduser().is_file():
        raise ConfigError(f"search.plan_dir {spec.plan_dir!r} is a file; give a directory")
    ns = SimpleNamespace(model=spec.model, guidance=spec.guidance, eval=spec.eval)
    run_checks._check_device(spec.device)
    run_checks._check_model(ns)
    run_checks._check_guidance(ns)
    _check_eval(spec, ns)
    schedule, _ = run_checks.model_schedule(spec.model)
    if schedule is not None:
        _check_schedule(spec, schedule)


def _check_metric(spec: SearchSpec) -> None:
    m, name = spec.model.name, spec.metric
    if name in METRICS:
        if name == "fid_proxy" and m != "digits":
            raise ConfigError(f"search.metric=fid_proxy (the digits classifier's features) needs model=digits, got "
                              f"model={m}; use rmse, fid (with eval.reference) or package.module:callable")
        if name == "fid" and m == "gmm":
            raise ConfigError("search.metric=fid is for image models; model=gmm is searched on rmse (exact solution) or "
                              "a package.module:callable")
        if name == "fid" and m == "diffusers" and not spec.eval.reference:
            raise ConfigError("search.metric=fid on model=diffusers needs eval.reference=DIR (the reference images)")
        return
    if ":" not in name:
        raise ConfigError(f"search.metric must be one of {METRICS} or package.module:callable, got {name!r}")
    load_metric(name)


def load_metric(name: str) -> Callable:
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"search.metric {name!r} cannot be loaded: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"search.metric {name!r} is not callable (expected fn(samples, x_T) -> float, lower is better)")
    return fn


def _check_eval(spec: SearchSpec, ns) -> None:
    """eval.* takes effect only for metric=fid (features, reference, weights); eval.kid never here."""
    e = spec.eval
    if e.kid:
        raise ConfigError("eval.kid does not apply to diffsampler search (the metric is search.metric)")
    if spec.metric != "fid":
        for key in ("reference", "weights_path", "sha256"):
            if getattr(e, key):
                raise ConfigError(f"eval.{key} takes effect only with search.metric=fid, got {getattr(e, key)!r} "
                                  f"with search.metric={spec.metric}")
        if e.feature != "auto":
            raise ConfigError(f"eval.feature takes effect only with search.metric=fid, got {e.feature!r}")
        return
    from .run_checks import _check_feature, _check_reference_and_kid

    _check_feature(e.feature)
    _check_reference_and_kid(ns)


def _check_schedule(spec: SearchSpec, schedule) -> None:
    """The base solver and the reference solver build on the model's schedule at their NFE."""
    from ..samplers import make_plan

    checks = [("search.reference_solver", spec.reference_solver, spec.reference_nfe, "logsnr")]
    if spec.base:
        checks.append(("search.base", spec.base, spec.nfe, "logsnr"))
    for key, solver, nfe, spacing in checks:
        try:
            make_plan(solver, schedule, nfe, spacing, spec.final or "zero")
        except ValueError as e:
            raise ConfigError(f"{key}={solver} at nfe={nfe}: {e}") from None


# ---------------------------------------------------------------------------------------------
# the model, its fingerprint and its reference endpoints
# ---------------------------------------------------------------------------------------------

def model_fingerprint(spec: SearchSpec) -> dict:
    """What determines the denoiser: the model group, the guidance, and for a local pipeline the
    content of its files (sha256 of files under 256 MB, size and mtime of larger ones)."""
    from .run_checks import local_pipeline

    content = None
    d = local_pipeline(spec.model) if spec.model.name != "gmm" else None
    if d is not None and d.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(str(f.relative_to(d)).encode())
            if st.st_size < 256 * 2**20:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            else:
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        content = h.hexdigest()
    return {"model": {k: v for k, v in spec.model.config.items() if k != "path"} | (
        {"path": str(spec.model.path)} if spec.model.path else {}), "content": content,
        "guidance": spec.guidance.config, "dtype": spec.model.dtype or "float32"}


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_model(spec: SearchSpec, device):
    """(denoiser, one sample's shape, dtype, gmm or None)."""
    from .runner import _pipeline_denoiser, build_gmm

    if spec.model.name == "gmm":
        gmm, den = build_gmm(spec.model)
        return den, (gmm.dim,), torch.float64, gmm
    den = _pipeline_denoiser(spec.model, spec.guidance, device)
    shape = tuple(den.sample_shape(1, spec.model.height, spec.model.width)[1:])
    return den, shape, torch.float32, None


def reference_endpoints(spec: SearchSpec, den, shape, seeds: list[int], device, gmm=None, rank=0, world=1,
                        fingerprint: dict | None = None) -> tuple[torch.Tensor, str | None]:
    """The converged solution from the noise of `seeds`: exact for model=gmm; otherwise
    `reference_solver` at `reference_nfe` calls, generated like samples (seeded shards, atomic,
    resumable, spread over ranks) in <cache_dir>/search_references/<model fingerprint hash>/ and read
    back from there by every later search on this model.  Returns (endpoints, cache dir or None)."""
    from ..samplers.loop import initial_noise, sample

    if gmm is not None:
        sch = den.schedule
        x = initial_noise((len(seeds), *shape), sch, seeds=seeds).double()
        return gmm.ode_endpoint(x, float(sch.alpha(sch.t_max)), float(sch.sigma(sch.t_max)), 1.0, 0.0), None
    from ..eval.generate import MissingSeedsError, barrier, check_shards, generate_shards, load_shards

    fp = {**(fingerprint or model_fingerprint(spec)), "solver": spec.reference_solver, "nfe": spec.reference_nfe,
          "spacing": "logsnr", "final": "zero"}
    out = Path(spec.cache_dir).expanduser() / "search_references" / _hash(fp)

    def sample_fn(batch_seeds):
        x = sample(den, shape=(len(batch_seeds), *shape), seeds=list(batch_seeds), solver=spec.reference_solver,
                   nfe=spec.reference_nfe, spacing="logsnr", device=device)
        return x.float().cpu()

    check_shards(out, fp)  # a cache dir of another model: refused, naming the differences
    try:  # every seed already there (an earlier search on this model): nothing to generate
        have = load_shards(out, seeds)[1]
    except (MissingSeedsError, FileNotFoundError):
        have = None
    if _all_ranks(have is not None, world):  # decided together: every rank takes the same collectives
        return have, str(out)
    with torch.no_grad():  # each contiguous range from its start: aligned shards, reusable by later searches
        for part in _ranges(seeds):
            generate_shards(sample_fn, part, out, REFERENCE_SHARD, rank, world, progress=spec.progress and rank == 0,
                            desc=f"reference {spec.reference_solver} nfe={spec.reference_nfe}", fingerprint=fp)
    barrier()
    return load_shards(out, seeds)[1], str(out)


def _all_ranks(flag: bool, world: int) -> bool:
    """True when `flag` holds on every rank (after a barrier, so no rank is still writing)."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    dist.barrier()
    flags: list = [None] * world
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


def _ranges(seeds: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in seeds:
        if out and s == out[-1][-1] + 1:
            out[-1].append(s)
        else:
            out.append([s])
    return out


class MetricScorer:
    """Scores samples (model space) of a batch: rmse against reference endpoints, the FID proxy
    (digits), FID against eval.reference (statistics cached by eval.fid.reference_stats), or a
    user's fn(samples, x_T) -> float."""

    def __init__(self, spec: SearchSpec, den, device):
        self.spec, self.den, self.device = spec, den, device
        self.fn = load_metric(spec.metric) if spec.metric not in METRICS else None
        self._fid = None

    def images(self, x):
        return x.float() if self.spec.model.name == "gmm" else self.den.decode(x.to(self.device)).float().cpu()

    def _fid_setup(self):
        if self._fid is not None:
            return self._fid
        from ..eval.fid import FIDEvaluator, features_frechet_distance, reference_stats
        from .runner import _feature_extractor, _reference

        if self.spec.metric == "fid_proxy":
            from ..eval.digits import classifier_features, digits_dataset, load_digits_classifier

            clf = load_digits_classifier().to(self.device)
            ref_f = classifier_features(clf, digits_dataset("test")[0].to(self.device))
            self._fid = lambda imgs: features_frechet_distance(classifier_features(clf, (imgs * 2 - 1).to(self.device)),
                                                                ref_f)
            return self._fid
        e = self.spec.eval
        dataset, images_fn, content = _reference(self.spec.model.name, e)
        extractor = _feature_extractor(self.spec.model.name, e, self.device)  # kept for a sweep's next job
        stats = reference_stats(dataset, images_fn, extractor, Path(str(e.cache_dir)).expanduser(), content=content)

        def fid(imgs):
            ev = FIDEvaluator(extractor, device=self.device, sync=False)
            ev.set_reference(stats)
            for i in range(0, len(imgs), 256):
                ev.update_fake(imgs[i:i + 256].to(self.device))
            return float(ev.compute())

        self._fid = fid
        return fid

    def batch(self, x_T: torch.Tensor, reference: torch.Tensor | None) -> Batch:
        chunk = self.spec.batch_size
        if self.spec.metric == "rmse":
            ref = reference.to(x_T.device, torch.float64)
            return Batch(x_T, lambda x: rmse(x, ref), chunk)
        if self.fn is not None:
            fn = self.fn
            return Batch(x_T, lambda x: float(fn(x, x_T)), chunk)
        fid = self._fid_setup()
        return Batch(x_T, lambda x: fid(self.images(x)), chunk)


def late_start_rule(spec: SearchSpec, schedule) -> bool:
    """Whether plans may start after t_max (x_T taken as the sample there): auto = wherever the prior
    has unit variance (not on variance-exploding schedules); true there is refused."""
    ve = schedule.is_variance_exploding
    if spec.late_start is True and ve:
        raise ConfigError(f"search.late_start=true needs a unit-variance prior (x_T is taken as the sample at the later "
                          f"start), but model={spec.model.name} has the variance-exploding {type(schedule).__name__}; "
                          "use search.late_start=auto or false")
    return (not ve) if spec.late_start == "auto" else bool(spec.late_start)


def data_mean_rule(spec: SearchSpec, gmm, reference: torch.Tensor | None) -> tuple[bool, str]:
    """Whether plans may start with the analytic first step (it predicts x0 = 0 at t_max: a zero data
    mean), and the note recorded in the plan."""
    if gmm is not None:
        mean, spread = gmm.mean.double(), gmm.covariance.double().diagonal().mean().sqrt()
        source = "the exact mixture"
    elif reference is not None:
        x = reference.double().flatten(1)
        mean, spread = x.mean(0), x.std(0).pow(2).mean().sqrt()
        source = f"{x.shape[0]} reference endpoints"
    else:
        mean = spread = None
    if mean is None:
        measured, zero = "data mean not measured (no reference endpoints for this metric)", False
    else:
        m_rms = float(mean.pow(2).mean().sqrt())
        zero = m_rms <= MEAN_TOLERANCE * float(spread)
        measured = f"data mean rms {m_rms:.3g} vs spread {float(spread):.3g} from {source}"
    if spec.analytic == "auto":
        return zero, f"{'searched' if zero else 'excluded'} (auto: {measured}; the analytic step assumes a zero mean)"
    return bool(spec.analytic), f"{'searched' if spec.analytic else 'excluded'} (search.analytic={spec.analytic}; {measured})"


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------

def run_search_job(spec: SearchSpec, run_dir: Path) -> dict:
    """Run a checked search job; writes plan.yaml (and <plan_dir>/<name>.yaml), search.jsonl,
    convergence.csv/png, comparison.csv/md and summary.json in run_dir.  Returns the summary."""
    from ..eval.generate import barrier, dist_env
    from ..samplers.loop import initial_noise
    from ..samplers.time_shift import training_steps
    from .runner import _check_writable, _device

    rank, world = dist_env()
    run_dir = Path(run_dir)
    _check_writable(run_dir, run_dir / "summary.json")
    if spec.plan_dir is not None:
        _check_writable(Path(spec.plan_dir).expanduser(), Path(spec.plan_dir).expanduser() / f"{spec.name}.yaml")
    device = _device(spec.device)
    t0 = time.perf_counter()
    den, shape, dtype, gmm = build_model(spec, device)
    late_start = late_start_rule(spec, den.schedule)  # refused before any model call
    logger.info("model=%s ready on %s in %.1f s; searching a %d-call plan for %s (budget %d evaluations)",
                spec.model.name, device, time.perf_counter() - t0, spec.nfe, spec.metric, spec.budget)
    seeds = search_seeds(spec.calib, spec.verify, spec.holdout)
    fingerprint = model_fingerprint(spec)
    ref_seeds = seeds["calib"] + seeds["verify"] + (seeds["holdout"] if spec.holdout else [])
    reference, cache = None, None
    if spec.metric == "rmse":
        reference, cache = reference_endpoints(spec, den, shape, ref_seeds, device, gmm, rank, world, fingerprint)
        logger.info("reference endpoints of %d seeds ready (%s)", len(ref_seeds), cache or "exact")
    analytic, analytic_note = data_mean_rule(spec, gmm, reference)
    scorer = MetricScorer(spec, den, device)
    sch = den.schedule
    refs = {}
    if reference is not None:
        n_c, n_v = spec.calib, spec.verify
        refs = {"calib": reference[:n_c], "verify": reference[n_c:n_c + n_v], "holdout": reference[n_c + n_v:]}

    def noise(which):
        return initial_noise((len(seeds[which]), *shape), sch, seeds=seeds[which]).to(device, dtype)

    batches = {"calib": scorer.batch(noise("calib"), refs.get("calib"))}
    if spec.verify:
        batches["verify"] = scorer.batch(noise("verify"), refs.get("verify"))
    settings = S3Settings(budget=spec.budget, n_calib=spec.calib, n_verify_samples=spec.verify, top_k=spec.top_k,
                          seed=spec.seed, seeds=tuple(seeds["calib"] + seeds["verify"]),
                          holdout_seeds=tuple(seeds["holdout"]), batch=spec.batch, final=spec.final,
                          analytic=analytic, time_shift=spec.time_shift, late_start=late_start,
                          refine=spec.refine)
    provenance = {
        "model": spec.model.name, "model_path": str(spec.model.path) if spec.model.path else None,
        "model_hash": _hash(fingerprint), "guidance": spec.guidance.config, "schedule": repr(sch),
        "calib_seeds": _range(seeds["calib"]), "verify_seeds": _range(seeds["verify"]),
        "holdout_seeds": _range(seeds["holdout"]), "analytic_first_step": analytic_note,
        "reference": (f"exact PF-ODE endpoint" if gmm is not None else
                      f"{spec.reference_solver} at {spec.reference_nfe} calls (logsnr)") if spec.metric == "rmse" else None,
        "device": device.type, "world_size": world,
    }
    log = Path(spec.log).expanduser() if spec.log else run_dir / "search.jsonl"
    r = run_search(den, spec.nfe, shape, settings, metric=spec.metric if spec.metric == "rmse" else _named_fn(spec.metric),
                   base=spec.base, log=log, out=None, name=spec.name, dtype=dtype, progress=spec.progress,
                   batches=Calibration(batches), metric_name=spec.metric, provenance=provenance,
                   log_extra={"model_hash": provenance["model_hash"], "reference": provenance["reference"]})
    search_s = time.perf_counter() - t0
    logger.info("search done in %.1f s: %d evaluations, calibration %s %.6g, verification %s; log %s", search_s,
                r.evaluations, spec.metric, r.calib_score, r.verify_score, log)
    plan = r.plan
    plan.info["search"]["training_steps"] = training_steps(sch)
    conv = convergence(r, den, batches, spec, log, rank, world)
    table = compare(spec, den, shape, dtype, plan, scorer, seeds["holdout"], refs.get("holdout"), device, gmm) \
        if spec.holdout and rank == 0 else []
    summary = {"name": spec.name, "nfe": spec.nfe, "metric": spec.metric, "calib_score": r.calib_score,
               "verify_score": r.verify_score, "evaluations": r.evaluations, "refine": spec.refine, "model_calls": r.model_calls,
               "search_seconds": round(search_s, 2), "world_size": world, "reference_cache": cache,
               "analytic_first_step": analytic_note, "time_shift_searched": spec.time_shift,
               "late_start_searched": late_start, "plan_start": plan.times[0],
               "plan_time_shift": plan.time_shift, "log": str(log)}
    if rank == 0:
        plan.save(run_dir / "plan.yaml")
        if spec.plan_dir is not None:
            plan.save(Path(spec.plan_dir).expanduser() / f"{spec.name}.yaml")
        _write_convergence(run_dir, conv, spec.metric)
        if table:
            _write_table(run_dir, table, spec, len(seeds["holdout"]))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        logger.info("wrote plan.yaml, convergence.csv, %ssummary.json in %s%s", "comparison.csv / .md, " if table else "",
                    run_dir, f" and {spec.plan_dir}/{spec.name}.yaml" if spec.plan_dir is not None else "")
    barrier()
    return summary


def _range(seeds: list[int]) -> str | None:
    return f"{seeds[0]}..{seeds[-1]}" if seeds else None


def _named_fn(name: str):
    def metric(x, x_T):  # never called: the job's batches score; named for the log's config line
        raise AssertionError
    metric.__name__ = name
    return metric


def convergence(r, den, batches, spec: SearchSpec, log, rank, world) -> list[dict]:
    """Best calibration score vs evaluations, and the verification score of each best-so-far plan
    (at most 25 of them, evaluated on the verification batch, logged like every evaluation)."""
    from .search import Objective
    from .search_log import SearchLog

    rows, best, best_key = [], math.inf, None
    for j, h in enumerate(r.history, 1):
        if h["score"] < best:
            best, best_key = h["score"], h["key"]
            rows.append({"evaluations": j, "best_calib": best, "key": best_key})
    if rows and rows[-1]["evaluations"] != len(r.history):
        rows.append({"evaluations": len(r.history), "best_calib": best, "key": best_key})
    if "verify" not in batches or not rows:
        return rows
    keep = rows if len(rows) <= 25 else [rows[int(round(i))] for i in torch.linspace(0, len(rows) - 1, 25).tolist()]
    plans = {}
    for line in Path(log).read_text().splitlines() if Path(log).exists() else []:
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "eval" and rec.get("key") in {q["key"] for q in keep}:
            plans[rec["key"]] = rec["plan"]
    from ..eval.generate import barrier
    from ..samplers.usf import SolverSpec

    barrier()
    obj = Objective(den, batches, SearchLog(log, _config_of(log), readonly=rank != 0), rank, world)
    specs = [SolverSpec.from_dict(plans[q["key"]]) for q in keep if q["key"] in plans]
    scores = dict(zip([p.key() for p in specs], obj.many(specs, "verify")))
    for q in rows:
        q["verify"] = scores.get(q["key"])
    return rows


def _config_of(log) -> dict:
    first = Path(log).read_text().split("\n", 1)[0]
    return json.loads(first)["config"]


def _write_convergence(run_dir: Path, rows: list[dict], metric: str) -> None:
    import csv

    with open(run_dir / "convergence.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["evaluations", "best_calib", "verify", "key"])
        w.writeheader()
        w.writerows({k: q.get(k) for k in w.fieldnames} for q in rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.step([q["evaluations"] for q in rows], [q["best_calib"] for q in rows], where="post", label="best calibration")
    v = [(q["evaluations"], q["verify"]) for q in rows if q.get("verify") is not None and math.isfinite(q["verify"])]
    if v:
        ax.plot(*zip(*v), "o-", ms=3, label="its verification score")
    ax.set_xlabel("true evaluations")
    ax.set_ylabel(metric)
    if all(q["best_calib"] > 0 and math.isfinite(q["best_calib"]) for q in rows):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "convergence.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the table on held-out seeds
# ---------------------------------------------------------------------------------------------

def compare(spec: SearchSpec, den, shape, dtype, plan, scorer: MetricScorer, holdout: list[int], reference,
            device, gmm=None) -> list[dict]:
    """The found plan, every registered deterministic solver at its best of COMPARE_SPACINGS, and
    diffusers' schedulers (their parity mappings: the same samples as the class, tested in
    tests/test_parity*.py) on the held-out seeds, scored by the search metric."""
    from ..samplers import available, info, make_plan
    from ..samplers.loop import initial_noise, sample

    x_T = initial_noise((len(holdout), *shape), den.schedule, seeds=holdout).to(device, dtype)
    batch = scorer.batch(x_T, reference)

    def score(solver, denoiser=den) -> float:
        step = spec.batch_size or len(x_T)
        try:
            x = torch.cat([sample(denoiser, x_T[i:i + step].clone(), solver=solver) for i in range(0, len(x_T), step)])
        except (FloatingPointError, RuntimeError):  # e.g. a plan that runs out of its budget: no score
            return math.inf
        s = batch.score(x)
        return s if math.isfinite(s) else math.inf

    rows = [{"method": f"searched plan {spec.name}", "spacing": "plan", "score": score(plan.compile(den.schedule)),
             "kind": "searched"}]
    for name in available():
        if info(name)["stochastic"] or info(name).get("adaptive"):  # adaptive: the NFE is not the plan's
            continue
        best = None
        for sp in COMPARE_SPACINGS:
            try:
                p = make_plan(name, den.schedule, spec.nfe, sp, "zero")
            except ValueError:
                continue
            s = score(p)
            if best is None or s < best[1]:
                best = (sp, s)
        if best is not None:
            rows.append({"method": name, "spacing": best[0], "score": best[1], "kind": "registered"})
    rows += _diffusers_rows(spec, den, score, gmm)
    return rows


def _diffusers_rows(spec: SearchSpec, den, score, gmm=None) -> list[dict]:
    """Each class of DIFFUSERS_ROWS on the model's scheduler config, as the adapter reproduces it by
    default (parity: the class's grid, conventions and options; equal to diffusers in tests/test_parity*.py)."""
    from ..pipelines.scheduler import DiffSamplerScheduler

    config = _scheduler_config(spec)
    if config is None:
        return []
    rows = []
    for cls, extra in DIFFUSERS_ROWS:
        label = cls + "".join(f" {k}={v}" for k, v in extra.items())
        try:
            import diffusers

            full = {**dict(getattr(diffusers, cls).from_config(config, **extra).config), "_class_name": cls}
            sched = DiffSamplerScheduler.from_config(full)
            sched.set_timesteps(spec.nfe)
            plan = sched.plan
            target = den
            if gmm is not None:  # the exact mixture on the class's own (float32) noise table, as diffusers runs it
                from ..eval.gmm import gmm_denoiser

                target = gmm_denoiser(gmm, sched.schedule, spec.model.prediction_type)
            s = score(plan, target)
        except (ValueError, TypeError, AttributeError) as e:
            rows.append({"method": f"diffusers {label}", "spacing": "-", "score": math.nan, "kind": "diffusers",
                         "note": f"not reproduced: {str(e).splitlines()[0][:120]}"})
            continue
        rows.append({"method": f"diffusers {label}", "spacing": "class grid", "score": s, "kind": "diffusers",
                     "note": f"= {sched.config.solver}"})
    return rows


def _scheduler_config(spec: SearchSpec) -> dict | None:
    """The diffusers scheduler config of the model: its pipeline's, or diffusers' DDPM default for the
    mixture on discrete_vp (the same 1000 linear betas); None where diffusers has no such schedule."""
    from .run_checks import local_pipeline

    if spec.model.name == "gmm":
        if spec.model.schedule != "discrete_vp":
            return None
        from diffusers import DDPMScheduler

        return dict(DDPMScheduler().config)
    d = local_pipeline(spec.model)
    f = d / "scheduler" / "scheduler_config.json" if d is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def _write_table(run_dir: Path, rows: list[dict], spec: SearchSpec, n: int) -> None:
    import csv

    cols = ["method", "spacing", "score", "ratio", "kind", "note"]
    plan_score = rows[0]["score"]
    for q in rows:
        q["ratio"] = plan_score / q["score"] if q["score"] and math.isfinite(q["score"]) else None
    with open(run_dir / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({k: q.get(k) for k in cols} for q in rows)
    lines = [f"# {spec.name}: search.metric={spec.metric} on {n} held-out seeds (0..{n - 1}), NFE {spec.nfe}", "",
             "| method | spacing | score | plan / this |", "|---|---|---|---|"]
    for q in sorted(rows, key=lambda q: (q["score"] if math.isfinite(q["score"] or math.nan) else math.inf)):
        ratio = f"{q['ratio']:.3f}" if q["ratio"] is not None else "-"
        note = f" ({q['note']})" if q.get("note") else ""
        lines.append(f"| {q['method']}{note} | {q['spacing']} | {q['score']:.5g} | {ratio} |")
    (run_dir / "comparison.md").write_text("\n".join(lines) + "\n")


def search_job_row(summary: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if k in ("name", "nfe", "metric", "calib_score",
                                                                      "verify_score", "evaluations", "model_calls"))

