"""Classifier-free guidance (Ho & Salimans 2022) as a transform of the network.

    out = out_u + w (out_c - out_u),   optionally rescaled (Lin et al. 2024, eq. 15-16):
    out <- phi * out * std(out_c) / std(out) + (1 - phi) * out

The conditional and unconditional inputs go through the network in one batched forward pass.
Combining raw outputs equals combining data predictions, because at fixed (x, t) every
prediction type is affine in the output with the same coefficients.  `ClassifierFreeGuidance`
guides the network call of the innermost Denoiser, so transforms around it (thresholding, minority
guidance) act on the guided prediction and model calls count on the user's denoiser; `CFGModel`
is the same combination as a plain network (used by the pipeline loaders).

Guidance in a limited interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality"): with `interval=(sigma_lo, sigma_hi)` guidance applies
only where sigma_lo < sigma <= sigma_hi, sigma the noise level sigma_t / alpha_t (EDM's sigma, as
in the paper); elsewhere the output is the conditional branch alone, one network pass of the batch
instead of two when no sample of the batch is inside.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch

from ..denoisers import Denoiser, DenoiserTransform, model_output_tensor

__all__ = ["CFGModel", "ClassifierFreeGuidance", "expand_cond", "check_interval"]


def expand_cond(cond: dict, batch: int) -> dict:
    """Broadcast batch-1 tensors in `cond` (e.g. one prompt embedding) to `batch` rows."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1 and batch != 1:
            v = v.expand(batch, *v.shape[1:])
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] != batch:
            raise ValueError(f"conditioning {k!r} has batch {v.shape[0]}, samples have {batch}")
        out[k] = v
    return out


def _validate(scale: float, rescale: float, uncond: dict | None) -> None:
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if scale != 1.0 and uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional input (uncond / negative prompt)")


def check_interval(interval, scale: float | None = None) -> tuple[float, float] | None:
    """`interval` as (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi (sigma_hi may be inf), or None;
    with `scale`, refused where it has no effect (scale 1: no guidance anywhere)."""
    if interval is None:
        return None
    if scale is not None and float(scale) == 1.0:
        raise ValueError(f"guidance interval {interval} has no effect at guidance scale 1 (no guidance anywhere); "
                         "drop it, or give a scale != 1")
    ok = (isinstance(interval, (tuple, list)) and len(interval) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in interval))
    if ok:
        lo, hi = float(interval[0]), float(interval[1])
        ok = math.isfinite(lo) and not math.isnan(hi) and 0 <= lo < hi
    if not ok:
        raise ValueError(f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, noise levels "
                         f"sigma_t / alpha_t (sigma_hi may be inf), got {interval!r}")
    return lo, hi


def _inside(interval: tuple[float, float], level, batch: int):
    """Where guidance applies: True / False for the whole batch, or a per-sample bool tensor (B,)
    (only when the levels differ between samples; on an accelerator always a tensor, so that the
    step loop never waits on the device)."""
    lo, hi = interval
    if not isinstance(level, torch.Tensor):
        return lo < float(level) <= hi
    lvl = level.reshape(level.shape[0], -1)[:, 0] if level.ndim and level.shape[0] == batch else level.reshape(-1)[:1]
    mask = (lvl > lo) & (lvl <= hi)
    if mask.device.type != "cpu":
        return mask.expand(batch) if mask.numel() == 1 else mask
    if bool(mask.all()):
        return True
    return False if not bool(mask.any()) else mask.expand(batch)


def _merge(inside, guided: torch.Tensor, out_c: torch.Tensor) -> torch.Tensor:
    """The guided output where `inside`, the conditional one elsewhere (a per-sample mask)."""
    return torch.where(inside.to(guided.device).view(-1, *([1] * (guided.ndim - 1))), guided, out_c)


def _check_keys(cond: dict, uncond: dict | None) -> None:
    if uncond is not None and set(uncond) != set(cond):
        raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ")


def _both(cond: dict, uncond: dict, batch: int) -> dict:
    """Conditioning of the batched pass [unconditional rows; conditional rows]."""
    c, u = expand_cond(cond, batch), expand_cond(uncond, batch)
    return {k: torch.cat([u[k], c[k]]) if isinstance(c[k], torch.Tensor) else c[k] for k in c}


def _guided(out_u: torch.Tensor, out_c: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    """out_u + w (out_c - out_u), rescaled toward the std of out_c by `rescale`."""
    out = out_u + scale * (out_c - out_u)
    if rescale > 0:
        dims = tuple(range(1, out.ndim))
        ratio = out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
        out = rescale * out * ratio + (1 - rescale) * out
    return out


class CFGModel(torch.nn.Module):
    """Wraps `model(x, t, **cond)` into the guided network `x, t -> out_u + w (out_c - out_u)`.

    cond / uncond: keyword arguments of the conditional and unconditional branch (same keys; tensors
    with batch 1 are broadcast).  With scale == 1 only the conditional branch runs.
    """

    def __init__(self, model: Callable[..., Any], cond: dict, uncond: dict | None, scale: float,
                 rescale: float = 0.0, output_fn: Callable[[Any], torch.Tensor] | None = None,
                 param_source: Any = None, interval: tuple[float, float] | None = None, schedule=None):
        super().__init__()
        self.param_source = param_source if param_source is not None else model
        _validate(scale, rescale, uncond)
        _check_keys(cond, uncond)
        self.model, self.cond, self.uncond = model, cond, uncond
        self.scale, self.rescale = float(scale), float(rescale)
        self.output_fn = output_fn or model_output_tensor
        self.interval = check_interval(interval, self.scale)
        self._t_interval = None
        if self.interval is not None:  # the noise-level interval in the network's time input
            if schedule is None:
                raise ValueError("a guidance interval needs the noise schedule (schedule=) to read noise levels "
                                 "from the network's time input")
            self._t_interval = _model_time_interval(schedule, self.interval)

    def parameters(self, recurse: bool = True):  # the wrapped network's dtype decides model I/O
        params = getattr(self.param_source, "parameters", None)
        return params(recurse) if callable(params) else iter(())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # noise level inside (sigma_lo, sigma_hi] <=> model time inside (t_lo, t_hi] (sigma grows with t)
        inside = True if self._t_interval is None else _inside(self._t_interval, t, b)
        if self.scale == 1.0 or inside is False:
            return self.output_fn(self.model(x, t, **expand_cond(self.cond, b)))
        both = _both(self.cond, self.uncond, b)
        out_u, out_c = self.output_fn(self.model(torch.cat([x, x]), torch.cat([t, t]), **both)).chunk(2)
        out = _guided(out_u, out_c, self.scale, self.rescale)
        return out if inside is True else _merge(inside, out, out_c)


class _Guided(DenoiserTransform):
    """The innermost Denoiser with its network call guided: both branches in one counted, checked
    call of that Denoiser, combined before its prediction-type conversion (at fixed (x, t) every
    prediction type is affine in the output, so this equals guiding the data prediction)."""

    def __init__(self, inner: Denoiser, cfg: "ClassifierFreeGuidance"):
        super().__init__(inner)
        _check_keys(inner.cond, cfg.uncond)
        self.cfg = cfg

    # the inner network's parametrisation, converted once
    predict_at, predict_with_data = Denoiser.predict_at, Denoiser.predict_with_data

    def predict_at(self, x, t_model, alpha, sigma, kind):
        return self.convert(x, self._out(x, t_model, alpha, sigma), alpha, sigma, kind)

    def predict_with_data(self, x, t_model, alpha, sigma, kind):
        out = self._out(x, t_model, alpha, sigma)
        pred = self.convert(x, out, alpha, sigma, kind)
        return pred, pred if kind == "data" else self.convert(x, out, alpha, sigma, "data")

    def raw(self, x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        if self.cfg.interval is not None:
            raise ValueError("guidance with an interval needs the noise level: call predict_at(x, t_model, alpha, "
                             "sigma, kind)")
        return self._out(x, t_model, None, None)

    def _out(self, x: torch.Tensor, t_model: torch.Tensor, alpha, sigma) -> torch.Tensor:
        inner, g, b = self.inner, self.cfg, x.shape[0]
        inside = True if g.interval is None else _inside(g.interval, sigma / alpha, b)
        if g.scale == 1.0 or inside is False:  # outside the interval: the conditional branch alone
            return inner.call(x, t_model, expand_cond(inner.cond, b))
        out = inner.call(torch.cat([x, x]), torch.cat([t_model, t_model]), _both(inner.cond, g.uncond, b))
        out_u, out_c = out.chunk(2)
        guided = _guided(out_u, out_c, g.scale, g.rescale)
        return guided if inside is True else _merge(inside, guided, out_c)


def _chain(denoiser: Denoiser) -> list[Denoiser]:
    """[outermost transform, ..., innermost Denoiser]."""
    chain = [denoiser]
    while isinstance(chain[-1], DenoiserTransform):
        chain.append(chain[-1].inner)
    return chain


class ClassifierFreeGuidance:
    """Guidance strategy for `sample(..., guidance=ClassifierFreeGuidance(...))`: guides the network
    call of the innermost Denoiser and rebuilds the transforms around it (thresholding then acts on
    the guided prediction).  Model calls count on the user's denoiser, one per batched pass of both
    branches."""

    def __init__(self, scale: float, uncond: dict | None, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None):
        _validate(scale, rescale, uncond)
        if uncond is not None and not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of model keyword arguments, got {type(uncond).__name__}")
        self.scale, self.uncond, self.rescale = float(scale), uncond, float(rescale)
        #: (sigma_lo, sigma_hi): guidance only where sigma_lo < sigma_t / alpha_t <= sigma_hi
        #: (Kynkaanniemi et al. 2024); None: at every noise level
        self.interval = check_interval(interval, self.scale)

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        if not isinstance(denoiser, Denoiser):
            raise ValueError(f"classifier-free guidance wraps a Denoiser, got {type(denoiser).__name__}")
        chain = _chain(denoiser)
        if any(isinstance(d, _Guided) for d in chain):
            raise ValueError("the denoiser already has classifier-free guidance; wrap the unguided denoiser")
        out: Denoiser = _Guided(chain[-1], self)
        for transform in reversed(chain[:-1]):  # the same transforms, now over the guided call
            out = transform.with_inner(out)
        return out


def _model_time_interval(schedule, interval: tuple[float, float]) -> tuple[float, float]:
    """(t_lo, t_hi) in the network's time input with sigma_lo < sigma <= sigma_hi <=> t_lo < t <= t_hi
    on `schedule` (sigma = sigma_t / alpha_t grows with t; a bound beyond the schedule's range is
    moved just outside it)."""
    bounds = []
    for level in interval:
        if level <= 0:
            bounds.append(-math.inf)
        elif math.isinf(level):
            bounds.append(math.inf)
        else:
            t = float(schedule.t_from_lambda(torch.tensor(-math.log(level), dtype=torch.float64)))
            bounds.append(float(schedule.model_time(t)))
    return bounds[0], bounds[1]
