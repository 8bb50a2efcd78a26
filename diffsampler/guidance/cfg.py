"""Classifier-free guidance (Ho & Salimans 2022) as a transform of the network.

    out = out_u + w (out_c - out_u),   optionally rescaled (Lin et al. 2024, eq. 15-16):
    out <- phi * out * std(out_c) / std(out) + (1 - phi) * out

The conditional and unconditional inputs go through the network in one batched forward pass.
Combining raw outputs equals combining data predictions, because at fixed (x, t) every
prediction type is affine in the output with the same coefficients.  `ClassifierFreeGuidance`
guides the network call of the innermost Denoiser, so transforms around it (thresholding, minority
guidance) act on the guided prediction and model calls count on the user's denoiser; `CFGModel`
is the same combination as a plain network (used by the pipeline loaders).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..denoisers import Denoiser, DenoiserTransform, model_output_tensor

__all__ = ["CFGModel", "ClassifierFreeGuidance", "expand_cond"]


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
                 param_source: Any = None):
        super().__init__()
        self.param_source = param_source if param_source is not None else model
        _validate(scale, rescale, uncond)
        _check_keys(cond, uncond)
        self.model, self.cond, self.uncond = model, cond, uncond
        self.scale, self.rescale = float(scale), float(rescale)
        self.output_fn = output_fn or model_output_tensor

    def parameters(self, recurse: bool = True):  # the wrapped network's dtype decides model I/O
        params = getattr(self.param_source, "parameters", None)
        return params(recurse) if callable(params) else iter(())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.scale == 1.0:
            return self.output_fn(self.model(x, t, **expand_cond(self.cond, b)))
        both = _both(self.cond, self.uncond, b)
        out_u, out_c = self.output_fn(self.model(torch.cat([x, x]), torch.cat([t, t]), **both)).chunk(2)
        return _guided(out_u, out_c, self.scale, self.rescale)


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

    def raw(self, x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        inner, g, b = self.inner, self.cfg, x.shape[0]
        if g.scale == 1.0:
            return inner.call(x, t_model, expand_cond(inner.cond, b))
        out = inner.call(torch.cat([x, x]), torch.cat([t_model, t_model]), _both(inner.cond, g.uncond, b))
        out_u, out_c = out.chunk(2)
        return _guided(out_u, out_c, g.scale, g.rescale)


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

    def __init__(self, scale: float, uncond: dict | None, rescale: float = 0.0):
        _validate(scale, rescale, uncond)
        if uncond is not None and not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of model keyword arguments, got {type(uncond).__name__}")
        self.scale, self.uncond, self.rescale = float(scale), uncond, float(rescale)

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
