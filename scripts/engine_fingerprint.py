"""Record the samples of every registered solver and shipped plan on the exact mixture, through
`sample()` and through the diffusers adapter, so that refactors can prove behaviour unchanged.

    python scripts/engine_fingerprint.py            # writes tests/data/engine_fingerprint.npz

tests/test_engine_fingerprint.py recomputes the same samples and compares them (<= 1e-10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import diffsampler as ds
from diffsampler.eval.gmm import GaussianMixture, GMMModel, gmm_denoiser
from diffsampler.pipelines import DiffSamplerScheduler
from diffsampler.samplers import per_sample_generators
from diffsampler.samplers.usf import available_plans

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "engine_fingerprint.npz"
SEEDS = list(range(8))
SPACINGS = ("time_uniform", "logsnr")
NFES = (5, 10)


def _x_T(schedule) -> torch.Tensor:
    return ds.samplers.initial_noise((len(SEEDS), 16), schedule, seeds=SEEDS, dtype=torch.float64)


def _adapter(gmm, name: str, nfe: int, spacing: str, stochastic: bool) -> torch.Tensor:
    sched = DiffSamplerScheduler(solver=name, spacing=spacing)
    model = GMMModel(gmm, sched.schedule)
    sched.set_timesteps(nfe)
    gens = per_sample_generators([s + 100 for s in SEEDS]) if stochastic else None
    x = _x_T(sched.schedule)
    for t in sched.timesteps:
        kw = {"generator": gens} if stochastic else {}
        x = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
    return x


def fingerprint() -> dict[str, np.ndarray]:
    gmm = GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))
    schedule = ds.DiscreteVP.linear()
    den = gmm_denoiser(gmm, schedule, "epsilon")
    out: dict[str, np.ndarray] = {}
    for name in ds.available():
        stochastic = ds.samplers.info(name)["stochastic"]
        if ds.samplers.info(name)["adaptive"]:  # its own steps (no spacing, nfe a budget); the adapter refuses it
            out[f"sample/{name}/adaptive"] = ds.sample(den, _x_T(schedule), solver=name, nfe=None).numpy()
            continue
        for spacing in SPACINGS:
            for nfe in NFES:
                kw = {"seeds": [s + 100 for s in SEEDS]} if stochastic else {}
                x = ds.sample(den, _x_T(schedule), solver=name, nfe=nfe, spacing=spacing, **kw)
                out[f"sample/{name}/{spacing}/{nfe}"] = x.numpy()
                out[f"adapter/{name}/{spacing}/{nfe}"] = _adapter(gmm, name, nfe, spacing, stochastic).numpy()
    for plan in available_plans():
        x = ds.sample(den, _x_T(schedule), solver=f"plan:{plan}", nfe=None)
        out[f"plan/{plan}"] = x.numpy()
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fp = fingerprint()
    np.savez_compressed(OUT, **fp)
    print(f"{len(fp)} sample sets written to {OUT}")
