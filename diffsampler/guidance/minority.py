"""Minority guidance (Um, Lee & Ye 2024, "Don't Play Favorites: Minority Guidance for Diffusion
Models", ICLR): steer sampling toward the low-density (rare) features of the data.

1. Minority score of a clean sample (eq. 6): how badly the Tweedie denoiser reconstructs it,

       l(x0) = E_eps d(x0, D(alpha_t x0 + sigma_t eps, t)),

   with d a squared L2 distance in pixel space or in the space of a feature network (LPIPS in the
   paper, which needs downloaded weights; any `features(x) -> (B, F)` callable plugs in here).
2. Labels: L quantile bins of l over the data set; class 0 the most common, L-1 the rarest.
3. A time-conditioned classifier p_psi(c | x_t, lambda_t), cross entropy on noised data (eq. 8).
4. Guidance (eq. 9): eps~ = eps - sigma_t w grad_x log p_psi(c~ | x_t), i.e. on the data
   prediction D~ = D + (sigma_t^2 / alpha_t) w grad_x log p_psi(c~ | x_t).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._pretrained import SafetensorsModule
from ..denoisers import Denoiser, DenoiserTransform
from ..samplers.loop import per_sample_generators, per_sample_noise

__all__ = ["minority_score", "minority_labels", "MinorityClassifier", "train_minority_classifier",
           "fit_minority_classifier", "MinorityGuidance", "load_minority_classifier"]


# ---------------------------------------------------------------------------------------------
# 1-2. Minority score and its quantile classes
# ---------------------------------------------------------------------------------------------

def _time(schedule, t_frac: float) -> float:
    if not 0.0 < t_frac < 1.0:
        raise ValueError(f"t_frac must be in (0, 1) (fraction of the schedule's time range), got {t_frac}")
    return schedule.t_min + t_frac * (schedule.t_max - schedule.t_min)


@torch.no_grad()
def minority_score(
    denoiser: Denoiser,
    x0: torch.Tensor,
    t_frac: float = 0.6,
    num_draws: int = 4,
    feature: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Minority score l(x0), shape (N,): mean over `num_draws` noise draws of the squared L2 distance
    (mean over dimensions) between x0 and its Tweedie reconstruction D(x_t, t) from time
    t = t_min + t_frac (t_max - t_min) (the paper: 60 of 100 respaced steps), in pixel space or in the
    space of `feature`.  Row i's noise comes from seed `seed + i`, so scores do not depend on batching."""
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    schedule = denoiser.schedule
    t = _time(schedule, t_frac)
    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    out = []
    for start in range(0, len(x0), batch_size):
        xb = x0[start:start + batch_size]
        gens = per_sample_generators(range(seed + start, seed + start + len(xb)))
        ref = xb if feature is None else feature(xb)
        acc = torch.zeros(len(xb), dtype=torch.float64)
        for _ in range(num_draws):
            eps = per_sample_noise(xb.shape, gens, xb.device).to(xb.dtype)
            rec = denoiser.data_pred(alpha * xb + sigma * eps, t)
            rec = rec if feature is None else feature(rec)
            acc += (rec - ref).double().pow(2).flatten(1).mean(1).cpu()
        out.append(acc / num_draws)
    return torch.cat(out)


def minority_labels(scores: torch.Tensor, num_classes: int, thresholds: Sequence[float] | None = None):
    """Quantile classes of minority scores: (labels (N,) int64, thresholds (L-1,)).  Class 0 holds
    the lowest (most common) scores, class L-1 the highest (rarest); given `thresholds` (from the
    data set) new scores are binned the same way."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if thresholds is None:
        q = torch.linspace(0, 1, num_classes + 1, dtype=torch.float64)[1:-1]
        thresholds = torch.quantile(s, q)
    th = torch.as_tensor(thresholds, dtype=torch.float64)
    if th.numel() != num_classes - 1:
        raise ValueError(f"{num_classes} classes need {num_classes - 1} thresholds, got {th.numel()}")
    return torch.bucketize(s, th, right=True), th


# ---------------------------------------------------------------------------------------------
# 3. The time-conditioned classifier
# ---------------------------------------------------------------------------------------------

class MinorityClassifier(SafetensorsModule, nn.Module):
    """p_psi(c | x_t, lambda_t), conditioned on the log-SNR lambda = log(alpha/sigma) (so it does not
    depend on how a schedule numbers its times).  Vectors (shape (d,)): an MLP on [x, emb(lambda)];
    images (C, H, W): two conv stages whose features are shifted by a projection of emb(lambda)."""

    NUM_FREQ = 8
    _MISSING_HINT = " (write one with MinorityClassifier.save_pretrained or `diffsampler minority-classifier`)"

    def __init__(self, sample_shape: Sequence[int], num_classes: int, hidden: int = 128,
                 thresholds: Sequence[float] | None = None, meta: dict | None = None):
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if len(self.sample_shape) not in (1, 3):
            raise ValueError(f"sample_shape must be (d,) or (C, H, W), got {self.sample_shape}")
        self.num_classes = int(num_classes)
        self.config = {"sample_shape": list(self.sample_shape), "num_classes": self.num_classes,
                       "hidden": hidden, "thresholds": None if thresholds is None else [float(v) for v in thresholds],
                       "meta": meta or {}}
        emb = 2 * self.NUM_FREQ
        if len(self.sample_shape) == 1:
            d = self.sample_shape[0]
            self.net = nn.Sequential(nn.Linear(d + emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, self.num_classes))
        else:
            c = self.sample_shape[0]
            self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
            self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
            self.temb1, self.temb2 = nn.Linear(emb, 32), nn.Linear(emb, 64)
            self.head = nn.Sequential(nn.Linear(64 * 16, hidden), nn.SiLU(), nn.Linear(hidden, self.num_classes))

    def embed(self, lam: torch.Tensor) -> torch.Tensor:
        f = 2.0 ** torch.arange(self.NUM_FREQ, device=lam.device, dtype=torch.float32) * (math.pi / 32)
        a = lam.float()[:, None] * f
        return torch.cat([a.sin(), a.cos()], dim=1)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"minority classifier was trained on samples of shape {self.sample_shape}, "
                             f"got {tuple(x.shape[1:])} (a classifier for another resolution?)")
        lam = torch.as_tensor(lam, device=x.device).flatten()
        if lam.numel() == 1:
            lam = lam.expand(x.shape[0])
        e = self.embed(lam.clamp(-20.0, 20.0))
        x = x.float()
        if len(self.sample_shape) == 1:
            return self.net(torch.cat([x, e], dim=1))
        h = F.max_pool2d(F.silu(self.conv1(x) + self.temb1(e)[:, :, None, None]), 2)
        h = F.max_pool2d(F.silu(self.conv2(h) + self.temb2(e)[:, :, None, None]), 2)
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1))

    @property
    def thresholds(self) -> torch.Tensor | None:
        th = self.config.get("thresholds")
        return None if th is None else torch.tensor(th, dtype=torch.float64)

    @classmethod
    def _from_config(cls, cfg: dict) -> "MinorityClassifier":
        return cls(cfg["sample_shape"], cfg["num_classes"], cfg.get("hidden", 128), cfg.get("thresholds"),
                   cfg.get("meta"))


load_minority_classifier = MinorityClassifier.from_pretrained


def _log_snr(schedule, t: torch.Tensor) -> torch.Tensor:
    return torch.log(schedule.alpha(t) / schedule.sigma(t))


def train_minority_classifier(
    x0: torch.Tensor,
    labels: torch.Tensor,
    schedule,
    num_classes: int,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    hidden: int = 128,
    seed: int = 0,
    thresholds: Sequence[float] | None = None,
    meta: dict | None = None,
    log_every: int = 0,
) -> MinorityClassifier:
    """Cross entropy of p_psi(c | x_t, lambda_t) on x_t = alpha_t x0 + sigma_t eps, t uniform on the
    schedule's time range (Um et al. 2024, eq. 8).  Deterministic given `seed`."""
    if len(x0) != len(labels):
        raise ValueError(f"{len(x0)} samples but {len(labels)} labels")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = MinorityClassifier(x0.shape[1:], num_classes, hidden, thresholds, meta)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x0 = x0.float()
    lo, hi = schedule.t_min, schedule.t_max
    view = (-1,) + (1,) * (x0.ndim - 1)
    clf.train()
    for it in range(steps):
        idx = torch.randint(len(x0), (batch_size,), generator=g)
        t = lo + (hi - lo) * torch.rand(batch_size, generator=g, dtype=torch.float64)
        a, s = schedule.alpha(t).float().view(view), schedule.sigma(t).float().view(view)
        xt = a * x0[idx] + s * torch.randn(x0[idx].shape, generator=g)
        loss = F.cross_entropy(clf(xt, _log_snr(schedule, t)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (it + 1) % log_every == 0:
            print(f"step {it + 1}/{steps}  loss {loss.item():.4f}")
    return clf.eval()


def fit_minority_classifier(
    denoiser: Denoiser,
    x0: torch.Tensor,
    num_classes: int = 10,
    t_frac: float = 0.6,
    num_draws: int = 4,
    feature: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **train_kwargs,
) -> tuple[MinorityClassifier, torch.Tensor]:
    """The whole tool: score the data set, bin the scores into `num_classes` quantile classes, train
    the classifier (thresholds stored in its config).  Returns (classifier, scores)."""
    scores = minority_score(denoiser, x0, t_frac, num_draws, feature)
    labels, th = minority_labels(scores, num_classes)
    meta = {"t_frac": t_frac, "num_draws": num_draws, "feature": None if feature is None else getattr(
        feature, "__qualname__", type(feature).__name__)}
    clf = train_minority_classifier(x0, labels, denoiser.schedule, num_classes, thresholds=th.tolist(),
                                    meta=meta, **train_kwargs)
    return clf, scores


# ---------------------------------------------------------------------------------------------
# 4. Guided sampling
# ---------------------------------------------------------------------------------------------

class MinorityGuidance:
    """`sample(..., guidance=MinorityGuidance(classifier, scale=w))`: classifier guidance toward
    minority class `target` (default the rarest, L-1) with any solver.  The classifier's gradient
    costs one classifier forward+backward per model call; `nfe` counts network calls only, and
    `classifier_calls` counts these.

    interval: (lo, hi) fractions of the schedule's time range where guidance acts (default: all
    of it).  Stopping it at low noise (e.g. (0.3, 1)), as in limited-interval guidance (Kynkaanniemi
    et al. 2024), lets the rare structure be chosen at high noise while the unguided model finishes
    the fine detail on the data manifold."""

    def __init__(self, classifier: MinorityClassifier | str | Path, scale: float = 3.5, target: int | None = None,
                 interval: tuple[float, float] = (0.0, 1.0)):
        if isinstance(classifier, (str, Path)):
            classifier = MinorityClassifier.from_pretrained(classifier)
        if not isinstance(classifier, MinorityClassifier):
            raise ValueError(f"classifier must be a MinorityClassifier or a directory, got {type(classifier).__name__}")
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"minority guidance scale must be finite and >= 0, got {scale}")
        L = classifier.num_classes
        target = L - 1 if target is None else int(target)
        if not 0 <= target < L:
            raise ValueError(f"target class {target} is not one of the classifier's classes 0..{L - 1}")
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"interval must be (lo, hi) with 0 <= lo < hi <= 1 (fractions of the time range), got {interval}")
        self.classifier, self.scale, self.target, self.interval = classifier.eval(), float(scale), target, (lo, hi)
        self.classifier_calls = 0

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        return _MinorityGuided(denoiser, self)

    def grad_log_prob(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """grad_x log p_psi(target | x, lambda), computed with autograd even inside no_grad sampling."""
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logp = F.log_softmax(self.classifier(xg, lam), dim=1)[:, self.target]
            (g,) = torch.autograd.grad(logp.sum(), xg)
        self.classifier_calls += 1
        return g.to(x.dtype)


class _MinorityGuided(DenoiserTransform):
    def __init__(self, inner: Denoiser, guidance: MinorityGuidance):
        super().__init__(inner)
        self.guidance = guidance
        self._shape = guidance.classifier.sample_shape
        sch = inner.schedule
        lo, hi = guidance.interval
        t_lo = torch.tensor(sch.t_min + lo * (sch.t_max - sch.t_min), dtype=torch.float64)
        t_hi = torch.tensor(sch.t_min + hi * (sch.t_max - sch.t_min), dtype=torch.float64)
        # guidance acts where lambda_t lies in [lambda(t_hi), lambda(t_lo)] (lambda decreases in t)
        self._lam_range = (float(_log_snr(sch, t_hi)) - 1e-9 if hi < 1.0 else -math.inf,
                           float(_log_snr(sch, t_lo)) + 1e-9 if lo > 0.0 else math.inf)

    def transform(self, x, d, t_model, alpha, sigma):
        if tuple(x.shape[1:]) != self._shape:
            raise ValueError(f"minority classifier was trained on samples of shape {self._shape}, the sampler "
                             f"draws {tuple(x.shape[1:])} (a classifier for another resolution?)")
        a = torch.as_tensor(alpha, dtype=torch.float64).flatten()
        s = torch.as_tensor(sigma, dtype=torch.float64).flatten()
        if self.guidance.scale == 0.0 or bool((s == 0).all()):
            return d
        lam = torch.log(a / s).expand(x.shape[0])  # one (alpha, sigma) for the batch, or one per sample
        on = (lam >= self._lam_range[0]) & (lam <= self._lam_range[1])
        if not bool(on.any()):
            return d
        g = self.guidance.grad_log_prob(x, lam.to(x.device))
        if not bool(on.all()):
            g = g * on.to(g.device, g.dtype).view((-1,) + (1,) * (g.ndim - 1))
        return d + (sigma * sigma / alpha) * self.guidance.scale * g  # Um et al. eq. 9 on D
