"""Classifier-free guidance (Ho & Salimans 2022) as a transform of the network.

    out = out_u + w (out_c - out_u),   optionally rescaled (Lin et al. 2024, eq. 15-16):
    out <- phi * out * std(out_c) / std(out) + (1 - phi) * out

The conditional and unconditional inputs go through the network in one batched forward pass.
Combining raw outputs equals combining data predictions, because at fixed (x, t) every
prediction type is affine in the output with the same coefficients.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

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
        if not scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        if scale != 1.0 and uncond is None:
            raise ValueError(f"guidance scale {scale} needs an unconditional input (uncond / negative prompt)")
        if uncond is not None and set(uncond) != set(cond):
            raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ")
        self.model, self.cond, self.uncond = model, cond, uncond
        self.scale, self.rescale = float(scale), float(rescale)
        self.output_fn = output_fn or _tensor

    def parameters(self, recurse: bool = True):  # the wrapped network's dtype decides model I/O
        params = getattr(self.param_source, "parameters", None)
        return params(recurse) if callable(params) else iter(())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.scale == 1.0:
            return self.output_fn(self.model(x, t, **expand_cond(self.cond, b)))
        c, u = expand_cond(self.cond, b), expand_cond(self.uncond, b)
        both = {k: torch.cat([u[k], c[k]]) if isinstance(c[k], torch.Tensor) else c[k] for k in c}
        out_u, out_c = self.output_fn(self.model(torch.cat([x, x]), torch.cat([t, t]), **both)).chunk(2)
        out = out_u + self.scale * (out_c - out_u)
        if self.rescale > 0:
            dims = tuple(range(1, out.ndim))
            ratio = out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
            out = self.rescale * out * ratio + (1 - self.rescale) * out
        return out


def _tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


class ClassifierFreeGuidance:
    """Guidance strategy for `sample(..., guidance=ClassifierFreeGuidance(...))`: wraps the
    denoiser's network; NFE counts forward passes (each one evaluates both branches)."""

    def __init__(self, scale: float, uncond: dict, rescale: float = 0.0):
        self.scale, self.uncond, self.rescale = scale, uncond, rescale

    def wrap(self, denoiser):
        from ..denoisers import Denoiser

        model = CFGModel(denoiser.model, denoiser.cond, self.uncond, self.scale, self.rescale, denoiser.output_fn)
        return Denoiser(model, denoiser.schedule, denoiser.prediction_type, check_finite=denoiser.check_finite)
