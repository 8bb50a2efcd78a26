"""k-diffusion's samplers as the tests' reference, on the exact mixture.

The `k-diffusion` package (0.1.1.post1, installed with --no-deps plus torchsde, torchdiffeq and
trampoline: its declared dependencies would replace the pinned torch) is not imported: its
`__init__` pulls in its training stack.  Its `k_diffusion/sampling.py` is loaded on its own, under a
private package name, with the one helper it takes from `k_diffusion.utils` (`append_dims`).

k-diffusion samples v = x / alpha at noise level rho = sigma / alpha (EDM's sigma) with a denoiser
D(v, rho); `run` gives it our grid's rho values and our x_T / alpha_0, and maps its output back to
x = alpha v, so its samples compare with ours on any schedule.  Its noise comes from the draws our
engine made (`recording_noise` records them, `replay` hands them back in order).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

_PKG = "_kdiffusion_ref"


def _load():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1 torchsde "
                    "trampoline torchdiffeq)", allow_module_level=True)
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = []
    utils = types.ModuleType(f"{_PKG}.utils")

    def append_dims(x, target_dims):  # k_diffusion.utils.append_dims
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules[_PKG], sys.modules[f"{_PKG}.utils"] = pkg, utils
    mod_spec = importlib.util.spec_from_file_location(f"{_PKG}.sampling", path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = mod
    mod_spec.loader.exec_module(mod)
    return mod


sampling = sys.modules.get(f"{_PKG}.sampling") or _load()


def kdiff_model(gmm, schedule):
    """The exact mixture as k-diffusion's denoiser D(v, rho): v = x / alpha at the time of noise level
    rho, the mixture evaluated at that time as a network sees it (a float32 model time, as the engine
    and diffusers give it: `GMMModel`), the state's alpha and sigma at the exact time."""

    def model(v, rho):
        r = rho.double().flatten()[0]
        t = schedule.t_from_lambda(-r.log())
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        t32 = schedule.model_time(t).float().double() / schedule.time_scale
        a32, s32 = float(schedule.alpha(t32)), float(schedule.sigma(t32))
        return gmm.posterior_mean(v * a, a32, s32).to(v.dtype)

    return model


def recording_noise(seed: int = 1234):
    """An engine noise source (N(0, I) like its argument, from one seeded generator) and the list of
    what it drew, in order."""
    gen, draws = torch.Generator().manual_seed(seed), []

    def noise_fn(x):
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        draws.append(z)
        return z

    return noise_fn, draws


def replay(draws):
    """k-diffusion's noise_sampler(sigma, sigma_next) handing back `draws` in order; no draws (a
    deterministic plan, e.g. eta = 0, where k-diffusion still asks for noise it multiplies by 0): 0."""
    if not draws:
        return lambda sigma, sigma_next: 0.0
    it = iter(list(draws))
    return lambda sigma, sigma_next: next(it)


def run(name: str, gmm, grid, x_T: torch.Tensor, **kwargs) -> torch.Tensor:
    """k-diffusion's `sample_<name>` on our grid's noise levels from our x_T, as x = alpha v."""
    rho = (grid.sigma / grid.alpha).to(x_T.dtype)
    v = x_T / float(grid.alpha[0])
    out = getattr(sampling, f"sample_{name}")(kdiff_model(gmm, grid.schedule), v, rho, disable=True, **kwargs)
    return out * float(grid.alpha[-1])


class replay_randn_like:
    """Context: k-diffusion's `torch.randn_like` (the noise of sample_euler / sample_heun's churn,
    drawn every step) hands back `per_step[i]` at step i (zeros where None: a step with no churn)."""

    def __init__(self, per_step):
        self.it = iter(per_step)

    def __enter__(self):
        real, it = torch, self.it

        class _Torch:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def randn_like(x, *args, **kwargs):
                z = next(it)
                return real.zeros_like(x) if z is None else z

        sampling.torch = _Torch()
        return self

    def __exit__(self, *exc):
        sampling.torch = torch
