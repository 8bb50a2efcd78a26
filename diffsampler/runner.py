"""One evaluation run: build the model, sample (sharded, resumable, over torchrun ranks), score, and
append one row to the results table.  The Hydra app in cli.py is a thin shell around `run`."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .samplers import available, is_solver_name, make_plan
from .samplers.loop import sample
from .samplers.time_shift import TimeShift
from .schedules import LinearVP

__all__ = ["validate", "run", "append_row", "read_rows", "ConfigError"]

SCHEDULES = ("discrete_vp", "linear_vp", "cosine_vp", "edm", "flow")


class ConfigError(ValueError):
    """A bad configuration value, raised before any work."""


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg) -> None:
    """Fail before any work, naming the bad key."""
    for key in ("nfe", "num_samples", "batch_size", "shard_size"):
        v = _get(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
    if not is_solver_name(cfg.solver.name):
        raise ConfigError(f"solver.name {cfg.solver.name!r} is not a registered solver; available: {available()} "
                          "and solver=plan solver.path=<plan YAML or name>")
    if cfg.final not in ("zero", "last"):
        raise ConfigError(f"final must be 'zero' or 'last', got {cfg.final!r}")
    m = cfg.model
    if m.name == "gmm" and m.schedule not in SCHEDULES:
        raise ConfigError(f"model.schedule must be one of {SCHEDULES}, got {m.schedule!r}")
    if m.name in ("digits", "diffusers") and m.get("path"):
        p = str(m.path)
        looks_like_hub_id = p.count("/") == 1 and not p.startswith((".", "/", "~"))
        if not Path(p).expanduser().exists() and not looks_like_hub_id:
            raise ConfigError(f"model.path {p!r} does not exist (give a local directory or a hub id like owner/name)")
    if cfg.guidance.name == "cfg" and m.name != "diffusers":
        raise ConfigError(f"guidance=cfg needs a conditional model (model=diffusers with a prompt or class), got model={m.name}")
    if cfg.get("time_shift"):
        try:
            TimeShift.from_spec(dict(cfg.time_shift))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"time_shift: {e}") from None
    try:  # the solver options and the NFE budget, checked by the solver itself
        make_plan(cfg.solver.name, LinearVP(), cfg.nfe, "time_uniform", cfg.final,
                  **dict(cfg.solver.get("options") or {}))
    except ValueError as e:
        raise ConfigError(f"solver={cfg.solver.name} nfe={cfg.nfe}: {e}") from None


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
    from . import schedules as S
    from .eval.gmm import GaussianMixture, gmm_denoiser

    m = cfg.model
    gmm = GaussianMixture.random(m.dim, m.components, seed=m.seed, scale=m.scale, std=tuple(m.std))
    schedule = {"discrete_vp": lambda: S.DiscreteVP.linear(), "linear_vp": S.LinearVP, "cosine_vp": S.CosineVP,
                "edm": S.EDM, "flow": S.RectifiedFlow}[m.schedule]()
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

def run(cfg, run_dir: Path, table: Path) -> dict:
    """Sample, score, append a row to `table`; returns the row (on every rank)."""
    from .eval.generate import barrier, dist_env, generate_shards, load_shards, save_image_grid

    validate(cfg)
    rank, world = dist_env()
    device = _device(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    plan = make_plan(cfg.solver.name, den.schedule, cfg.nfe, cfg.spacing, cfg.final, **options)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    ts = dict(cfg.time_shift) if cfg.get("time_shift") else None

    def sample_fn(batch_seeds):
        out = []
        for i in range(0, len(batch_seeds), cfg.batch_size):
            chunk = batch_seeds[i:i + cfg.batch_size]
            x = sample(den, shape=(len(chunk), *shape), seeds=chunk, solver=plan, device=device, time_shift=ts)
            if gmm is None:
                x = den.decode(x)
            out.append(x.float().cpu())
        return torch.cat(out)

    with torch.no_grad():
        generate_shards(sample_fn, seeds, run_dir / "samples", cfg.shard_size, rank, world,
                        progress=cfg.progress and rank == 0, desc=f"{cfg.solver.name} nfe={cfg.nfe}")
    gen_time = time.perf_counter() - t0
    barrier()
    row: dict[str, Any] = {}
    if rank == 0:
        _, samples = load_shards(run_dir / "samples", seeds)
        metrics = _metrics(cfg, gmm, den, samples, device)
        if gmm is None:
            save_image_grid(samples[: cfg.grid_size], run_dir / "grid.png")
        row = {
            "model": cfg.model.name, "solver": cfg.solver.name,
            "solver_options": json.dumps(options, sort_keys=True), "nfe": cfg.nfe, "nfe_counted": plan.nfe,
            "spacing": "plan" if plan.info.get("spacing") == "plan" else cfg.spacing, "final": cfg.final, "guidance": _guidance_str(cfg),
            "time_shift": json.dumps(ts, sort_keys=True) if ts else "",
            "num_samples": cfg.num_samples, "seeds": f"{seeds[0]}-{seeds[-1]}", "rng_device": "cpu",
            **metrics, "wall_time_s": round(time.perf_counter() - t0, 3), "gen_time_s": round(gen_time, 3),
            "world_size": world, "run_dir": str(run_dir),
        }
        append_row(table, row)
        (run_dir / "metrics.json").write_text(json.dumps(row, indent=2))
    barrier()
    return row


def _guidance_str(cfg) -> str:
    g = dict(cfg.guidance)
    name = g.pop("name")
    return name if not g else name + json.dumps(g, sort_keys=True)


def _metrics(cfg, gmm, den, samples: torch.Tensor, device) -> dict:
    if gmm is not None:
        return _gmm_metrics(cfg, gmm, den, samples)
    from .eval.fid import FIDEvaluator, get_feature_extractor, reference_stats

    e = cfg.eval
    if cfg.model.name == "digits":
        from .eval.digits import digits_dataset

        feature = "digits" if e.feature == "auto" else e.feature
        extractor = get_feature_extractor(feature, e.weights_path, e.sha256, device=device)
        ref = reference_stats("digits_test", lambda: (digits_dataset("test")[0] + 1) / 2, extractor,
                              Path(str(e.cache_dir)).expanduser())
        name = "fid_proxy" if feature == "digits" else "fid"
    elif e.reference:
        feature = "inception" if e.feature == "auto" else e.feature
        extractor = get_feature_extractor(feature, e.weights_path, e.sha256, device=device)
        ref = reference_stats(Path(str(e.reference)).name, lambda: _load_images(e.reference), extractor,
                              Path(str(e.cache_dir)).expanduser())
        name = "fid"
    else:
        return {}
    ev = FIDEvaluator(extractor, device=device, sync=False)  # scored on rank 0 alone
    ev.set_reference(ref)
    for i in range(0, len(samples), 256):
        ev.update_fake(samples[i:i + 256].to(device))
    return {name: float(ev.compute())}


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


def _load_images(folder) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(Path(str(folder)).expanduser().glob("*.png"))
    if not files:
        raise ConfigError(f"eval.reference {folder!r} has no .png images")
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


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
