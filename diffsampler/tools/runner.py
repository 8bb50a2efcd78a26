"""One evaluation run: build the model, sample (sharded, resumable, over torchrun ranks), score, and
append one row to the results table.  The Hydra app in cli.py is a thin shell around `run`: the
config becomes a checked `RunSpec` once (`run_checks.validate`), and everything below reads it."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from .config_schema import ConfigError
from ..samplers import make_plan
from ..samplers.loop import sample
from .run_checks import gmm_schedule, minority_classifier_dir, reward_name, shard_dtype, validate
from .run_spec import EvalSpec, GuidanceSpec, ModelSpec, RunSpec, resolve

__all__ = ["validate", "resolve", "run", "execute", "build_gmm", "append_row", "read_rows", "ConfigError"]

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# What a process keeps between the jobs of a sweep
# ---------------------------------------------------------------------------------------------

#: kind ("pipeline", "feature") -> (key, object): the last one built of each kind, in this process.
_CACHE: dict[str, tuple[str, Any]] = {}
#: Objects actually built (not taken from the cache) per kind, in this process.
LOADS: Counter = Counter()


def cached(kind: str, key: dict, build: Callable[[], Any]) -> tuple[Any, bool]:
    """`(object, built)`: the `kind` object kept from an earlier job of this process if it was built
    under an equal `key` (JSON values: the config that determines it), else `build()` -- after the old
    one is dropped, so two models never sit in memory together.  A Hydra multirun with the basic
    launcher runs every job in one process: the pipeline and the feature network load once."""
    k = json.dumps(key, sort_keys=True, default=str)
    hit = _CACHE.get(kind)
    if hit is not None and hit[0] == k:
        return hit[1], False
    _CACHE.pop(kind, None)
    obj = build()
    LOADS[kind] += 1
    _CACHE[kind] = (k, obj)
    return obj, True


def clear_cache() -> None:
    """Forget every kept object (the next job loads afresh)."""
    _CACHE.clear()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def build_gmm(m: ModelSpec):
    """(the mixture, its exact denoiser) of model=gmm."""
    from ..eval.gmm import GaussianMixture, gmm_denoiser

    gmm = GaussianMixture.random(m.dim, m.components, seed=m.seed, scale=m.scale, std=tuple(m.std))
    schedule = gmm_schedule(m.schedule)
    pred = "flow" if m.schedule == "flow" else m.prediction_type
    return gmm, gmm_denoiser(gmm, schedule, pred)


def _load_pipeline(m: ModelSpec, device):
    """The model's diffusers pipeline on `device`."""
    if m.name == "digits":
        from ..eval.digits import load_digits_pipeline

        pipe = load_digits_pipeline(m.path)
    else:
        from diffusers import DiffusionPipeline

        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[m.dtype]
        try:
            pipe = DiffusionPipeline.from_pretrained(str(m.path), torch_dtype=dtype)
        except OSError as e:
            raise ConfigError(f"model.path {m.path!r} could not be loaded with from_pretrained: {e}") from None
    return pipe.to(device)


def _pipeline_key(m: ModelSpec, device) -> dict:
    """What the loaded pipeline depends on: the model config (prompts and labels too: any change
    reloads) and the device."""
    return {"model": m.config or {"name": m.name, "path": m.path, "dtype": m.dtype}, "device": str(device)}


def _pipeline_denoiser(m: ModelSpec, g: GuidanceSpec, device):
    """The denoiser of model=digits / diffusers: the pipeline comes from the process cache when an
    earlier job loaded the same model config; the denoiser around it (call counter, guidance, prompt
    encoding) is built afresh for every job."""
    from ..pipelines import denoiser_from_pipeline

    pipe, _ = cached("pipeline", _pipeline_key(m, device), lambda: _load_pipeline(m, device))
    kw: dict[str, Any] = {}
    scale = g.scale if g.name == "cfg" else 1.0
    if m.prompt:
        kw.update(prompt=m.prompt, negative_prompt=m.negative_prompt)
    if m.class_label is not None:
        kw.update(class_labels=torch.tensor([m.class_label], device=device), null_class=m.null_class)
    if g.name == "cfg" and g.interval is not None:
        kw["guidance_interval"] = tuple(g.interval)
    return denoiser_from_pipeline(pipe, scale, g.rescale if g.name == "cfg" else 0.0, **kw)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _fingerprint(spec: RunSpec, device: torch.device) -> dict:
    """Everything that determines a run's samples, as JSON values: the model, the solver and its
    options (a saved plan by its content), NFE, grid, end point, guidance, time shift, dtype and
    device class.  Not the seeds (each shard lists its own) nor their number (more samples, more
    shards), nor batch and shard sizes (per-seed noise: they never change a sample)."""
    plan = None
    if spec.solver.name == "plan" and spec.solver.path:
        from ..samplers.usf import load_plan

        plan = load_plan(str(spec.solver.path)).to_dict()
    s = spec.sampling
    return {"model": spec.model.config, "solver": spec.solver.config, "plan": plan, "nfe": s.nfe,
            "spacing": s.spacing, "final": s.final, "guidance": spec.guidance.config,
            "time_shift": s.time_shift or None, "dtype": str(spec.model.dtype or "float32"), "device": device.type}


def _value_range(model: str) -> tuple[float, float] | None:
    """Range of the saved samples: decoded images are in [0, 1]; mixture samples are vectors."""
    return None if model == "gmm" else (0.0, 1.0)


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


def _check_resumable(samples_dir: Path, fingerprint: dict, value_range, dtype: str) -> None:
    """Shards already in the run's samples directory were made with this very configuration (and are
    stored in the same dtype)."""
    from ..eval.generate import ShardMismatchError, check_shards

    try:
        check_shards(samples_dir, fingerprint, value_range, dtype)
    except ShardMismatchError as e:
        hint = (f" (the shards' dtype is set by eval.shard_dtype)" if any("dtype" in d for d in e.differences) else "")
        raise ConfigError(f"{samples_dir} holds samples of another configuration ({'; '.join(e.differences)}){hint}; "
                          f"resuming would score them under this one. Start fresh with a new hydra.run.dir, "
                          f"or delete {samples_dir} to regenerate here") from None


def run(cfg, run_dir: Path, table: Path) -> dict:
    """Sample, score, write `metrics.json` and append a row to `table`; returns the row (on every rank).

    Before any model is built: the config is validated, the run directory and the table are probed
    for writing, and shards left in `run_dir/samples` must carry this configuration's fingerprint
    (an interrupted run resumes; another configuration is refused)."""
    return execute(validate(cfg), run_dir, table)


def execute(spec: RunSpec, run_dir: Path, table: Path, started: float | None = None) -> dict:
    """`run` of a checked run spec.  `started`: the `time.perf_counter()` at which the job began (before
    its config was checked: a process's first job pays the imports there); the load time and wall
    time count from it.

    Times in the row: `load_time_s` (job start to the first sample: config check, model, guidance,
    plan, FID feature network -- near 0 for a sweep's later jobs, which reuse what this process
    loaded), `gen_time_s` (drawing and saving this rank's shards), `score_time_s` (reading the
    shards, metrics, image grid) and `wall_time_s` (all of it)."""
    from ..eval.generate import barrier, dist_env, generate_shards, load_shards, save_image_grid

    rank, world = dist_env()
    device = _device(spec.sampling.device)
    run_dir, table = Path(run_dir), Path(table)
    _check_writable(run_dir, table)
    fingerprint, value_range, dtype = _fingerprint(spec, device), _value_range(spec.model.name), shard_dtype(spec)
    _check_resumable(run_dir / "samples", fingerprint, value_range, dtype)
    t0 = time.perf_counter() if started is None else started
    loads0 = dict(LOADS)
    s, m = spec.sampling, spec.model
    gmm = None
    if m.name == "gmm":
        gmm, den = build_gmm(m)
        shape = (gmm.dim,)
    else:
        den = _pipeline_denoiser(m, spec.guidance, device)
        shape = den.sample_shape(1, m.height, m.width)[1:]
    guidance = _guidance(spec, device)
    plan = make_plan(spec.solver.name, den.schedule, s.nfe, s.spacing, s.final, **spec.solver.options)
    if gmm is None and _scores_features(m.name, spec.eval):  # every rank scores its own shards
        _feature_extractor(m.name, spec.eval, device)  # loaded with the model (or kept from an earlier job)
    how = "built" if gmm is not None else "loaded" if LOADS["pipeline"] > loads0.get("pipeline", 0) else \
        "kept from an earlier job of this process"
    log.info("model=%s ready on %s (%s; %.1f s since the job started); solver %s, %d model calls per sample, spacing %s",
             m.name, device, how, time.perf_counter() - t0, spec.solver.name, plan.nfe,
             plan.info.get("spacing", s.spacing))
    seeds = s.seeds
    calls: list[int] = []  # network calls per trajectory, measured (guidance can add some)

    def sample_fn(batch_seeds):
        out = []
        for i in range(0, len(batch_seeds), s.batch_size):
            chunk = batch_seeds[i:i + s.batch_size]
            n0 = den.nfe
            x = sample(den, shape=(len(chunk), *shape), seeds=chunk, solver=plan, device=device, time_shift=s.time_shift,
                       guidance=guidance)
            calls.append(den.nfe - n0)
            if gmm is None:
                x = den.decode(x)
            out.append(x.float().cpu())
        return torch.cat(out)

    t1 = time.perf_counter()
    with torch.no_grad():
        generate_shards(sample_fn, seeds, run_dir / "samples", s.shard_size, rank, world,
                        progress=s.progress and rank == 0, desc=f"{spec.solver.name} nfe={s.nfe}",
                        fingerprint=fingerprint, value_range=value_range, dtype=dtype)
    t2 = time.perf_counter()
    barrier()
    row: dict[str, Any] = {}
    samples_dir = run_dir / "samples"
    t3 = time.perf_counter()
    log.info("scoring %d samples of %s (rank %d of %d scores the shards it made)", len(seeds), samples_dir, rank, world)
    # image models: every rank scores the shards it made, the feature sums are all-reduced (streamed:
    # one shard in memory); the mixture's low-dimensional vectors are scored on rank 0
    metrics = _image_metrics(m.name, spec.eval, samples_dir, seeds, device) if gmm is None else {}
    if rank == 0:
        if gmm is not None:
            metrics = _gmm_metrics(s.seed, s.final, gmm, den, load_shards(samples_dir, seeds)[1])
        log.info("metrics: %s", json.dumps(metrics))
        if spec.guidance.name == "svdd":
            metrics.update(_svdd_metrics(spec, guidance, samples_dir, seeds, gmm is None))
        if spec.guidance.name == "minority":
            metrics.update(_minority_metrics(guidance, den, samples_dir, seeds, device, max(len(calls), 1)))
        if gmm is None:
            save_image_grid(load_shards(samples_dir, seeds[: s.grid_size])[1], run_dir / "grid.png")
        t4 = time.perf_counter()
        row = {
            "model": m.name, "solver": spec.solver.name,
            "solver_options": json.dumps(spec.solver.options, sort_keys=True), "nfe": s.nfe,
            "nfe_counted": max(calls) if calls else _planned_calls(guidance, plan),
            "spacing": "plan" if plan.info.get("spacing") == "plan" else s.spacing, "final": s.final,
            "guidance": _guidance_str(spec.guidance),
            "time_shift": json.dumps(s.time_shift, sort_keys=True) if s.time_shift else "",
            "num_samples": s.num_samples, "seeds": f"{seeds[0]}-{seeds[-1]}", "rng_device": "cpu",
            **metrics, "load_time_s": round(t1 - t0, 3), "gen_time_s": round(t2 - t1, 3),
            "score_time_s": round(t4 - t3, 3), "wall_time_s": round(t4 - t0, 3),
            "world_size": world, "run_dir": str(run_dir),
        }
        loaded = {k: LOADS[k] - loads0.get(k, 0) for k in ("pipeline", "feature")}
        timing = {"load_s": t1 - t0, "gen_s": t2 - t1, "wait_s": t3 - t2, "score_s": t4 - t3, "wall_s": t4 - t0,
                  "loaded_now": {k: v > 0 for k, v in loaded.items()}}
        (run_dir / "metrics.json").write_text(json.dumps({**row, "timing": timing, "fingerprint": fingerprint},
                                                         indent=2))
        try:
            append_row(table, row)
        except OSError as e:
            raise OSError(f"the row could not be appended to {table} ({e}); the metrics are saved in "
                          f"{run_dir / 'metrics.json'}") from e
    barrier()
    return row


def _guidance(spec: RunSpec, device):
    """The guidance object of the spec (None for none/cfg: CFG is built into the denoiser)."""
    g = spec.guidance
    if g.name == "minority":
        from ..guidance.minority import MinorityClassifier, MinorityGuidance

        try:
            clf = MinorityClassifier.from_pretrained(minority_classifier_dir(g)).to(device)
        except FileNotFoundError as e:
            raise ConfigError(f"guidance.classifier: {e}") from None
        return MinorityGuidance(clf, float(g.scale), g.target, tuple(g.interval or (0.0, 1.0)))
    if g.name == "svdd":
        from ..guidance.svdd import SVDD

        return SVDD(_reward(spec.model, g, device), int(g.num_candidates), float(g.alpha))
    return None


def _digit(g: GuidanceSpec) -> int:
    return 3 if g.target is None else int(g.target)


def _reward(m: ModelSpec, g: GuidanceSpec, device):
    """The reward of guidance=svdd, on the sampler's x0 (pixel models: [-1, 1])."""
    from ..guidance.rewards import ClassifierLogProb, JPEGCompressibility, NegativeDistance

    name = reward_name(m.name, g)
    if name == "classifier":
        from ..eval.digits import load_digits_classifier

        return ClassifierLogProb(load_digits_classifier().to(device), _digit(g), clamp=(-1.0, 1.0))
    if name == "jpeg":
        return JPEGCompressibility()
    gmm, _ = build_gmm(m)
    return NegativeDistance(gmm.means[0] if g.target is None else torch.tensor(list(g.target)))


def _planned_calls(guidance, plan) -> int:
    cost = getattr(guidance, "nfe", None)  # SVDD: candidates' model calls
    return int(cost(plan)) if callable(cost) else plan.nfe


def _svdd_metrics(spec: RunSpec, guidance, samples_dir: Path, seeds, image: bool) -> dict:
    """Mean reward of the final samples and, for the digit classifier reward, the target digit's share
    (streamed shard by shard)."""
    from ..eval.generate import iter_shards

    classifier = reward_name(spec.model.name, spec.guidance) == "classifier"
    total, hits, n = 0.0, 0, 0
    for _, samples in iter_shards(samples_dir, seeds):
        x = samples * 2 - 1 if image else samples  # decoded images are in [0, 1]; rewards take the model's range
        total += float(guidance.reward(x).double().sum())
        n += len(x)
        if classifier:
            clf = guidance.reward.classifier
            with torch.no_grad():
                pred = clf(x.to(next(clf.parameters()).device).float()).argmax(1).cpu()
            hits += int((pred == _digit(spec.guidance)).sum())
    out = {"reward_mean": total / n}
    if classifier:
        out["target_share"] = hits / n
    return out


def _minority_metrics(guidance, den, samples_dir: Path, seeds, device, batches: int) -> dict:
    """Share of samples whose minority score (measured as the classifier's training data was) lies in
    the real data's top class (the top decile for 10 classes); streamed shard by shard (sample i's
    noise comes from seed 10**6 + i, whatever the shards)."""
    from ..eval.generate import iter_shards
    from ..guidance.minority import minority_score
    from .minority_classifier import feature_fn

    clf = guidance.classifier
    meta, th = clf.config.get("meta", {}), clf.thresholds
    if th is None:
        return {}
    top, n = 0, 0
    for _, samples in iter_shards(samples_dir, seeds):
        x = samples.to(device) * 2 - 1  # decoded images are in [0, 1]; the model's data range is [-1, 1]
        s = minority_score(den, x, meta.get("t_frac", 0.4), meta.get("num_draws", 4),
                           feature_fn(meta.get("feature"), device), seed=10**6 + n)
        top += int((s >= float(th[-1])).sum())
        n += len(x)
    return {"minority_top_share": top / n,
            "classifier_calls": guidance.classifier_calls // batches}  # per trajectory


def _guidance_str(g: GuidanceSpec) -> str:
    config = dict(g.config)
    name = config.pop("name")
    return name if not config else name + json.dumps(config, sort_keys=True)


def _reference(model: str, e: EvalSpec) -> tuple | None:
    """(dataset, images_fn, content) of the reference data for reference_stats; None: no FID."""
    if not _scores_features(model, e):
        return None
    if e.reference:
        return Path(str(e.reference)).expanduser(), None, None
    import hashlib

    from ..eval.digits import digits_dataset

    x = (digits_dataset("test")[0] + 1) / 2
    return "digits_test", lambda: x, hashlib.sha256(x.numpy().tobytes()).hexdigest()


def _scores_features(model: str, e: EvalSpec) -> bool:
    """Whether the run computes FID (it has reference data: `_reference` is not None)."""
    return bool(e.reference) or model == "digits"


def _feature_name(model: str, e: EvalSpec) -> str:
    return e.feature if e.feature != "auto" else "digits" if model == "digits" else "inception"


def _feature_extractor(model: str, e: EvalSpec, device):
    """The FID feature network of the run, kept for the next job of this process under the same
    extractor, weights file, checksum and device."""
    from ..eval.fid import get_feature_extractor

    feature = _feature_name(model, e)
    key = {"feature": feature, "weights_path": e.weights_path, "sha256": e.sha256, "device": str(device)}
    extractor, _ = cached("feature", key, lambda: get_feature_extractor(feature, e.weights_path, e.sha256,
                                                                        device=device))
    return extractor


def _image_metrics(model: str, e: EvalSpec, samples_dir: Path, seeds: list[int], device) -> dict:
    """FID (fid_proxy with the digits features) and KID of the shards against the reference, on every
    rank: each scores its share of the shard files (those it generated) and the float64 feature
    sums are all-reduced, so the value is the one-process value on every rank."""
    from ..eval.fid import FIDEvaluator, fid_from_shards, reference_features, reference_stats

    source = _reference(model, e)
    if source is None:
        return {}
    dataset, images_fn, content = source
    feature = _feature_name(model, e)
    extractor = _feature_extractor(model, e, device)
    cache = Path(str(e.cache_dir)).expanduser()
    stats = reference_stats(dataset, images_fn, extractor, cache, content=content)
    real = reference_features(dataset, images_fn, extractor, cache, content=content) if e.kid else None
    subset = min(1000, len(seeds), len(real)) if e.kid else 1000
    ev = FIDEvaluator(extractor, device=device, sync=True, kid=bool(e.kid), kid_subset_size=subset)
    ev.set_reference(stats, features=real)  # KID's reference features (FID's statistics: set again below)
    fid = fid_from_shards(samples_dir, stats, ev, seeds=seeds)  # collectives: every rank calls it
    out = {"fid_proxy" if feature == "digits" else "fid": fid}
    if e.kid:
        out["kid_mean"], out["kid_std"] = ev.compute_kid()
        out["kid_subset_size"] = subset
    return out


def _gmm_metrics(seed: int, final: str, gmm, den, samples) -> dict:
    """RMSE against the exact PF-ODE endpoint of the same x_T, and the Frechet distance of the
    samples to the exact mixture mean and covariance."""
    from ..eval.fid import frechet_distance
    from ..samplers.loop import initial_noise

    n = samples.shape[0]
    sch = den.schedule
    x_T = initial_noise((n, gmm.dim), sch, seeds=range(seed, seed + n)).double()  # the runs' own x_T
    t0 = float(sch.t_max)
    t1 = float(sch.t_min)
    a1, s1 = (1.0, 0.0) if final == "zero" else (float(sch.alpha(t1)), float(sch.sigma(t1)))
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
