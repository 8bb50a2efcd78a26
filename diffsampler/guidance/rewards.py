"""Rewards for SVDD: callables on a batch of clean samples x0 (n, *shape) returning (n,) float rewards.

* :class:`ClassifierLogProb` -- log p(y = target | x0) of a classifier (differentiable).
* :class:`NegativeDistance` -- -||x0 - target||_2 (differentiable).
* :class:`JPEGCompressibility` -- minus the JPEG file size in kB (non-differentiable; the
  compressibility reward of Black et al. 2023 (DDPO) used by SVDD's image experiments).
"""

from __future__ import annotations

import io
from typing import Sequence

import torch

__all__ = ["ClassifierLogProb", "NegativeDistance", "JPEGCompressibility"]


def _batch(x, what: str, min_dim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < min_dim:
        raise ValueError(f"{what} expects a tensor batch with at least {min_dim} dims (n, ...), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    return x


class ClassifierLogProb:
    """r(x0) = log softmax(classifier(x0))[target].

    classifier: a module mapping images (n, C, H, W) to logits (n, classes), e.g. the packaged
        :class:`~diffsampler.eval.digits.DigitsClassifier` (inputs in [-1, 1]).
    target: one class index for all samples, or one per sample (sequence / tensor of length n).
    resolution: (H, W) or an int the classifier was trained on; by default read from its
        ``config["size"]`` / ``size`` / ``image_size`` / ``sample_size`` if it has one.  Inputs of another
        resolution raise a ValueError (a classifier silently evaluated off its resolution scores noise).
    clamp: optional (lo, hi) the inputs are clamped to first (e.g. (-1, 1)).
    """

    def __init__(self, classifier, target: int | Sequence[int] | torch.Tensor,
                 resolution: int | tuple[int, int] | None = None, clamp: tuple[float, float] | None = None):
        if not callable(classifier):
            raise ValueError(f"classifier must be callable (a torch module), got {type(classifier).__name__}")
        self.classifier = classifier
        self.target = torch.as_tensor(target, dtype=torch.int64)
        if self.target.ndim > 1 or (self.target < 0).any():
            raise ValueError(f"target must be a class index >= 0 or a 1-d sequence of them, got {target!r}")
        res = resolution if resolution is not None else _classifier_resolution(classifier)
        self.resolution = (res, res) if isinstance(res, int) else (tuple(res) if res is not None else None)
        self.clamp = clamp

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = _batch(x0, "ClassifierLogProb", 3)
        if self.resolution is not None and tuple(x0.shape[-2:]) != self.resolution:
            h, w = self.resolution
            raise ValueError(f"the classifier expects {h}x{w} images, got x0 of shape {tuple(x0.shape)} "
                             f"({x0.shape[-2]}x{x0.shape[-1]}); use a classifier for this resolution")
        if self.clamp is not None:
            x0 = x0.clamp(*self.clamp)
        params = getattr(self.classifier, "parameters", None)
        p = next(params(), None) if callable(params) else None
        if p is not None and p.is_floating_point():  # model I/O in the classifier's dtype and device
            x0 = x0.to(p.device, p.dtype)
        logp = torch.log_softmax(self.classifier(x0).float(), dim=1)
        target = self.target.to(logp.device)
        if target.ndim == 1 and target.shape[0] != x0.shape[0]:
            raise ValueError(f"got {target.shape[0]} targets for a batch of {x0.shape[0]}")
        if int(target.max()) >= logp.shape[1]:
            raise ValueError(f"target class {int(target.max())} out of range for a classifier with {logp.shape[1]} classes")
        return logp.gather(1, target.expand(x0.shape[0]).unsqueeze(1)).squeeze(1)


def _classifier_resolution(classifier):
    cfg = getattr(classifier, "config", None)
    for key in ("size", "image_size", "sample_size"):
        if isinstance(cfg, dict) and key in cfg:
            return cfg[key]
        if hasattr(cfg, key):
            return getattr(cfg, key)
        if isinstance(getattr(classifier, key, None), (int, tuple)):
            return getattr(classifier, key)
    return None


class NegativeDistance:
    """r(x0) = -||x0 - target||_2 (or its square with ``squared=True``); target broadcasts against one sample."""

    def __init__(self, target: torch.Tensor, squared: bool = False):
        self.target = torch.as_tensor(target)
        if not self.target.is_floating_point():
            self.target = self.target.double()
        if not bool(torch.isfinite(self.target).all()):
            raise ValueError("target must be finite")
        self.squared = bool(squared)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = _batch(x0, "NegativeDistance", 1)
        try:
            diff = (x0 - self.target.to(x0.device, x0.dtype)).flatten(1)
        except RuntimeError:
            raise ValueError(f"target of shape {tuple(self.target.shape)} does not broadcast against samples of "
                             f"shape {tuple(x0.shape[1:])}") from None
        if diff.shape[1] != x0[0].numel():
            raise ValueError(f"target of shape {tuple(self.target.shape)} changes the sample shape {tuple(x0.shape[1:])}")
        d2 = diff.square().sum(1)
        return -d2 if self.squared else -d2.sqrt()


class JPEGCompressibility:
    """r(x0) = -(JPEG size of x0 in kB) at the given quality, via PIL (non-differentiable).

    Images (n, C, H, W) with C = 1 (grey) or 3 (RGB), values in ``value_range``: (-1, 1) (default, the
    diffusion state of pixel models) or (0, 1) (e.g. ``PipelineDenoiser.decode`` output); clamped, then
    quantised to uint8.  Smooth images compress better, so they score higher.
    """

    def __init__(self, quality: int = 75, value_range: tuple[float, float] = (-1.0, 1.0)):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"quality must be an integer in 1..95 (PIL's useful range), got {quality!r}")
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, e.g. (-1, 1) or (0, 1), got {value_range!r}")
        self.quality, self.value_range = quality, (float(lo), float(hi))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        x0 = _batch(x0, "JPEGCompressibility", 4)
        if x0.ndim != 4 or x0.shape[1] not in (1, 3):
            raise ValueError(f"JPEGCompressibility expects images (n, C, H, W) with C in (1, 3), got {tuple(x0.shape)}")
        lo, hi = self.value_range
        u8 = ((x0.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
        sizes = []
        for img in u8.permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float64, device=x0.device)
