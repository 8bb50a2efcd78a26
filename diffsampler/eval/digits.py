"""A real, small image model to evaluate samplers on, offline: scikit-learn's bundled digits.

* :func:`digits_dataset` -- the 1797 8x8 digits of ``sklearn.datasets.load_digits`` upsampled to
  ``size x size`` (bilinear), scaled to [-1, 1], with a fixed stratified 80/20 train/test split.
* :class:`DigitsClassifier` -- a small CNN; its 64-d penultimate ``features`` are the feature
  extractor of an FID-proxy (:func:`diffsampler.eval.fid.fid_proxy`), its logits a "is this a
  recognisable digit" check.
* :func:`load_digits_pipeline` / :func:`load_digits_classifier` -- the packaged, pre-trained
  ``DDPMPipeline`` (an epsilon-prediction ``UNet2DModel`` with diffusers' linear 1000-step
  ``DDPMScheduler``) and classifier, from ``diffsampler/assets/digits/``, built by
  ``python scripts/train_digits.py``.

Typical use::

    from diffsampler.eval.digits import load_digits_pipeline, load_digits_classifier, digits_dataset
    from diffsampler.eval.fid import fid_proxy
    from diffsampler.pipelines.loaders import denoiser_from_pipeline
    den = denoiser_from_pipeline(load_digits_pipeline())
    x = ds.sample(den, shape=den.sample_shape(1000), seeds=range(1000), solver="dpmpp_2m", nfe=10)
    ref, _ = digits_dataset("test")
    fid_proxy(x, ref, load_digits_classifier())
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._pretrained import SafetensorsModule

__all__ = ["ASSET_DIR", "TRAIN_COMMAND", "digits_dataset", "DigitsClassifier", "load_digits_pipeline",
           "load_digits_classifier", "classifier_features"]

#: Where the packaged pre-trained models live (``ddpm/`` and ``classifier/``).
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"
#: The command that (re)builds the packaged assets.
TRAIN_COMMAND = "python scripts/train_digits.py"

_TEST_FRACTION, _SPLIT_SEED = 0.2, 0


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of the 1797 digits: 20% held out, seed 0 (never changes)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=labels)
    return np.sort(train), np.sort(test)


def digits_dataset(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, size, size)`` float32 in [-1, 1] and labels ``(N,)`` int64.

    ``split``: ``"train"`` (1437 images), ``"test"`` (360, held out from all training) or ``"all"``
    (1797).  The 8x8 originals (values 0..16) are upsampled with ``F.interpolate`` (bilinear,
    ``align_corners=False``), which keeps values inside [0, 16], then mapped to [-1, 1].
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    images, labels = d.images.astype(np.float32), d.target.astype(np.int64)
    if split != "all":
        train, test = _split_indices(labels)
        keep = train if split == "train" else test
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images / 16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1).contiguous()
    return x, torch.from_numpy(labels)


class DigitsClassifier(SafetensorsModule, nn.Module):
    """Small CNN on (B, 1, size, size) images in [-1, 1]: two 3x3 conv + ReLU + 2x2 max-pool stages
    (1 -> c1 -> c2 channels), adaptive average pooling to 4x4, a linear layer to ``feature_dim``
    (+ ReLU) -- the penultimate features -- and a linear layer to ``num_classes`` logits."""

    def __init__(self, channels: tuple[int, int] = (16, 32), feature_dim: int = 64, num_classes: int = 10,
                 size: int = 16):
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": [c1, c2], "feature_dim": feature_dim, "num_classes": num_classes,
                       "size": size}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``feature_dim``-d penultimate activations (after ReLU)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return F.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @classmethod
    def _from_config(cls, cfg: dict) -> "DigitsClassifier":
        return cls(channels=tuple(cfg["channels"]), feature_dim=cfg["feature_dim"],
                   num_classes=cfg["num_classes"], size=cfg.get("size", 16))


def _asset(path: str | Path | None, sub: str, marker: str) -> Path:
    p = Path(path) if path is not None else ASSET_DIR / sub
    if not (p / marker).is_file():
        raise FileNotFoundError(
            f"digits {sub} model not found at {p} (missing {marker}); "
            f"build the packaged assets with `{TRAIN_COMMAND}` (writes {ASSET_DIR}), "
            f"or pass the path of a directory written by it")
    return p


def load_digits_pipeline(path: str | Path | None = None, **kwargs):
    """The pre-trained digits ``DDPMPipeline`` (1-channel 16x16 epsilon UNet, linear 1000-step
    DDPM schedule) from ``path`` or the packaged ``assets/digits/ddpm``."""
    from diffusers import DDPMPipeline

    return DDPMPipeline.from_pretrained(str(_asset(path, "ddpm", "model_index.json")), **kwargs)


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The pre-trained :class:`DigitsClassifier` (eval mode) from ``path`` or ``assets/digits/classifier``."""
    return DigitsClassifier.from_pretrained(_asset(path, "classifier", DigitsClassifier.CONFIG_NAME))


@torch.no_grad()
def classifier_features(classifier: DigitsClassifier, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Penultimate features (float64 numpy, (N, feature_dim)) of images in [-1, 1]."""
    classifier.eval()
    x = x.float().clamp(-1, 1)
    return torch.cat([classifier.features(x[i:i + batch]) for i in range(0, len(x), batch)]).double().numpy()
