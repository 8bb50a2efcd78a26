"""FID with torchmetrics and pluggable feature extractors.

* :func:`get_feature_extractor` -- a registry of feature extractors by name (each a
  :class:`FeatureExtractor`: images float in [0, 1] -> float64 features, with ``name`` and
  ``num_features``):

  - ``"inception"``: the standard FID network (TF InceptionV3 pool3, 2048-d; torch-fidelity's
    ``FeatureExtractorInceptionV3`` through torchmetrics' ``NoTrainInceptionV3``).  Images are
    turned into uint8 values and resized to 299x299 with ``antialias=False`` (TF1-compatible
    bilinear, the setting published FIDs use; torchmetrics >= 1.8 defaults to antialiasing).
    Weights from ``weights_path`` (optionally sha256-checked) or the default download.
  - ``"digits"``: the 64-d penultimate features of the digits classifier
    (:mod:`diffsampler.eval.digits`), for 1x16x16 images; an offline FID proxy.
  - ``"identity"``: flattened inputs (low-dimensional data, tests).
  - ``"package.module:callable"``: any callable returning an ``nn.Module``; or pass a module.

* :class:`FIDEvaluator` -- ``update_fake`` / ``update_real`` or ``set_reference(stats)``, then
  ``compute()``.  Statistics are accumulated and synchronised by
  ``torchmetrics.image.fid.FrechetInceptionDistance`` (float64 states, ``reset_real_features=False``);
  the evaluator computes features itself (in batches, no grad) and feeds them to the metric
  through an identity feature module.  Under ``torch.distributed`` each rank updates with its own
  images and ``compute()`` returns the same value on every rank.
* :func:`reference_stats` / :func:`reference_features` -- dataset statistics (``mu``, ``sigma``,
  ``n``) or features computed once and cached in ``cache_dir``, keyed and tagged by the data's
  content, the extractor's name, weights and resize mode; the tags are verified on load.
* :func:`list_reference_images` / :func:`reference_images` -- a reference folder's png/jpg/jpeg/webp
  images and .npz image arrays (``arr_0``, ADM's format), recursive: the cheap check (no decoding)
  and the streamed float batches (memory flat in the number of images).
* :func:`frechet_distance` -- float64 FID from statistics (scipy ``sqrtm``), the usual
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``; :func:`features_frechet_distance` of two
  feature sets, and :func:`fid_proxy` on the digits classifier's features.
* :func:`fid_from_shards` -- score samples saved by :func:`diffsampler.eval.generate.generate_shards`.

Environment note: a torch-fidelity whose package ``__init__`` cannot be imported (it imports
torchvision unconditionally, and a CPU/GPU-mismatched or missing torchvision breaks it) also
breaks ``import torchmetrics``.  :func:`torchmetrics_fid` works around that by registering the
torch-fidelity package without running its ``__init__`` (the InceptionV3 module itself needs no
torchvision); ``torch_fidelity.<anything else>`` then raises ImportError with the original reason.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import importlib.util
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "FeatureExtractor", "FeatureExtractorUnavailable", "WeightsChecksumError", "FEATURE_EXTRACTORS",
    "register_feature_extractor", "get_feature_extractor", "FIDEvaluator", "reference_stats", "frechet_distance",
    "features_frechet_distance", "fid_proxy",
    "fid_from_shards", "stats_from_features", "torchmetrics_fid", "INCEPTION_URL", "INCEPTION_FILENAME",
    "IMAGE_SUFFIXES", "ARRAY_SUFFIXES", "REFERENCE_SUFFIXES", "ReferenceDataError", "ReferenceStatsCacheError",
    "list_reference_images", "reference_images",
    "folder_fingerprint", "reference_features",
]

#: torch-fidelity's InceptionV3 weights (converted from TF's pt_inception-2015-12-05).
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
_DOWNLOAD_TIMEOUT_S = 60.0


class FeatureExtractorUnavailable(RuntimeError):
    """A feature extractor cannot be built here (missing package, weights or asset)."""


class WeightsChecksumError(ValueError):
    """A weights file does not have the expected sha256."""


# ---------------------------------------------------------------------------------------------
# torchmetrics import (robust to a broken torch-fidelity install)
# ---------------------------------------------------------------------------------------------

_TORCH_FIDELITY_ERROR: str | None = None  # why `import torch_fidelity` failed, if it did


def _install_torch_fidelity_stub(reason: str) -> bool:
    """Register the torch_fidelity package without executing its __init__ so that its
    InceptionV3 module (no torchvision needed) can be imported.  True if that module imports."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or spec.submodule_search_locations is None:
        return False
    stub = importlib.util.module_from_spec(spec)

    def __getattr__(name):  # PEP 562: everything the stub does not hold is an import problem
        raise ImportError(f"torch_fidelity.{name} is unavailable: the torch_fidelity package cannot be "
                          f"imported here ({reason}); only its InceptionV3 feature extractor was loaded")

    stub.__getattr__ = __getattr__
    stub.__diffsampler_stub__ = True
    sys.modules["torch_fidelity"] = stub
    try:
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        importlib.import_module("torch_fidelity.helpers")
        importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
        return True
    except Exception:  # noqa: BLE001
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        return False


def _torch_fidelity_ok() -> bool:
    """Make `torch_fidelity.feature_extractor_inceptionv3` importable if at all possible."""
    global _TORCH_FIDELITY_ERROR
    if "torch_fidelity.feature_extractor_inceptionv3" in sys.modules:
        return True
    try:
        import torch_fidelity  # noqa: F401

        return True
    except ImportError as e:
        _TORCH_FIDELITY_ERROR = f"{type(e).__name__}: {e}"
        if importlib.util.find_spec("torch_fidelity") is None:
            return False
        return _install_torch_fidelity_stub(_TORCH_FIDELITY_ERROR)


# Cheap (no torchmetrics import): lets a later plain `import torchmetrics` work here too.
try:
    _torch_fidelity_ok()
except Exception:  # noqa: BLE001 - never break importing this module
    pass


def torchmetrics_fid():
    """The ``torchmetrics.image.fid`` module (importing it even where torch-fidelity is broken)."""
    if "torchmetrics.image.fid" in sys.modules:
        return sys.modules["torchmetrics.image.fid"]
    _torch_fidelity_ok()
    if "torchmetrics" not in sys.modules:  # leftovers of an earlier failed `import torchmetrics`
        for k in [k for k in sys.modules if k.startswith("torchmetrics.")]:
            del sys.modules[k]
    try:
        return importlib.import_module("torchmetrics.image.fid")
    except ImportError as e:
        raise ImportError(f"cannot import torchmetrics' FID ({type(e).__name__}: {e}); torchmetrics >= 1.0 is "
                          "required (pip install torchmetrics)") from e


# ---------------------------------------------------------------------------------------------
# feature extractors
# ---------------------------------------------------------------------------------------------

def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-") or "features"


class FeatureExtractor(nn.Module):
    """Images float in [0, 1], shape (B, ...) -> features float64 (B, D).

    ``name`` identifies the features; ``num_features`` is D when known up front (None: found from
    the first batch); ``resize`` describes how images are brought to the network's input size (part
    of the features' identity, with the name and the weights: see :meth:`identity`)."""

    def __init__(self, net: nn.Module, name: str, num_features: int | None = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, resize: str = ""):
        super().__init__()
        self.net = net
        self.name = str(name)
        self.num_features = None if num_features is None else int(num_features)
        self.preprocess = preprocess
        self.resize = str(resize)

    def weights_sha256(self) -> str:
        """sha256 of the state dict (names, dtypes, shapes and values of all parameters and buffers)."""
        h = hashlib.sha256()
        for key, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def identity(self) -> dict:
        """What the features depend on: ``{"extractor", "weights", "resize"}`` (cache tags)."""
        return {"extractor": self.name, "weights": self.weights_sha256(), "resize": self.resize}

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        if self.preprocess is not None:
            x = self.preprocess(x)
        f = self.net(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        return f.reshape(images.shape[0], -1).double()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_weights(path, sha256: str | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"feature extractor weights file {p} does not exist")
    if sha256:
        actual = _sha256(p)
        if actual.lower() != sha256.strip().lower():
            raise WeightsChecksumError(f"sha256 mismatch for weights file {p}: expected {sha256.strip().lower()}, "
                                       f"got {actual} (wrong or corrupted file)")
    return p


def _inception_help(reason: str) -> str:
    return (
        f"The 'inception' FID feature extractor (InceptionV3 pool3, 2048-d) is unavailable: {reason}.\n"
        "Options:\n"
        "  1. install torch-fidelity (`pip install torchmetrics[image]`, with a torchvision matching your torch) "
        "and run once with network access so the weights are downloaded "
        f"({INCEPTION_URL}, cached in the torch hub checkpoints directory);\n"
        "  2. pass the weights file yourself: feature_extractor_weights_path=<path to "
        f"pt_inception-2015-12-05 weights, e.g. {INCEPTION_FILENAME}> "
        "(get_feature_extractor('inception', weights_path=...));\n"
        "  3. choose another feature extractor, e.g. 'digits' (offline FID proxy for the digits model), "
        "'identity', a 'package.module:callable' or an nn.Module.")


def _download_inception() -> Path:
    """The cached torch-fidelity InceptionV3 weights, downloading them if needed (short timeout;
    any failure becomes FeatureExtractorUnavailable without a deep traceback)."""
    dst = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    if dst.is_file():
        return dst
    err = None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(dst), progress=False)
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    finally:
        socket.setdefaulttimeout(old)
    if err is not None:
        raise FeatureExtractorUnavailable(_inception_help(f"the weights are not cached ({dst}) and downloading "
                                                          f"them failed ({err})"))
    return dst


def _to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 (round to nearest), grey -> RGB."""
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def _make_inception(weights_path=None, sha256=None, device="cpu", antialias: bool = False) -> FeatureExtractor:
    if weights_path is not None:
        weights_path = _check_weights(weights_path, sha256)
    if not _torch_fidelity_ok():
        raise FeatureExtractorUnavailable(_inception_help(
            f"torch-fidelity cannot be imported ({_TORCH_FIDELITY_ERROR or 'not installed'})"))
    tm = torchmetrics_fid()
    if weights_path is None:
        weights_path = _download_inception()
        if sha256:
            _check_weights(weights_path, sha256)
    try:
        net = tm.NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=str(weights_path), antialias=antialias)
    except Exception as e:  # noqa: BLE001
        raise FeatureExtractorUnavailable(_inception_help(
            f"loading the weights {weights_path} failed ({type(e).__name__}: {e})")) from None
    return FeatureExtractor(net, "inception" if not antialias else "inception-antialias", 2048,
                            preprocess=_to_uint8_range, resize=f"uint8, bilinear to 299x299, antialias={antialias}")


def _make_digits(weights_path=None, sha256=None, device="cpu") -> FeatureExtractor:
    try:
        from . import digits
    except ImportError as e:
        raise FeatureExtractorUnavailable(f"the 'digits' feature extractor needs diffsampler.eval.digits: {e}") from None
    if weights_path is not None and sha256:
        p = Path(weights_path)
        _check_weights(p / digits.DigitsClassifier.WEIGHTS_NAME if p.is_dir() else p, sha256)
    try:
        clf = digits.load_digits_classifier(weights_path)
    except FileNotFoundError as e:
        raise FeatureExtractorUnavailable(f"the 'digits' feature extractor is unavailable: {e}") from None

    class _DigitsFeatures(nn.Module):
        def __init__(self, clf):
            super().__init__()
            self.clf = clf

        def forward(self, x):
            size = self.clf.config.get("size", 16)
            if x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            if tuple(x.shape[-2:]) != (size, size):
                x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear",
                                                    align_corners=False, antialias=True)
            return self.clf.features((x.float() * 2 - 1).clamp(-1, 1))

    size = clf.config.get("size", 16)
    return FeatureExtractor(_DigitsFeatures(clf), "digits", clf.config.get("feature_dim", 64),
                            resize=f"grey, bilinear to {size}x{size}, antialias=True")


def _make_identity(weights_path=None, sha256=None, device="cpu") -> FeatureExtractor:
    return FeatureExtractor(nn.Flatten(), "identity", resize="none")


#: name -> factory(weights_path=None, sha256=None, device="cpu") -> FeatureExtractor | nn.Module
FEATURE_EXTRACTORS: dict[str, Callable[..., nn.Module]] = {
    "inception": _make_inception,
    "digits": _make_digits,
    "identity": _make_identity,
}


def register_feature_extractor(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``get_feature_extractor(name)`` call ``factory(weights_path=, sha256=, device=)``."""
    FEATURE_EXTRACTORS[name] = factory


def _wrap(module: nn.Module, default_name: str) -> FeatureExtractor:
    if isinstance(module, FeatureExtractor):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"a feature extractor must be an nn.Module, got {type(module).__name__}")
    name = getattr(module, "name", None) or default_name
    nf = getattr(module, "num_features", None)
    return FeatureExtractor(module, _sanitize(str(name)), nf if isinstance(nf, int) else None,
                            resize=str(getattr(module, "resize", "")))


def get_feature_extractor(name: str | nn.Module = "inception", weights_path=None, sha256: str | None = None,
                          device="cpu", **kwargs) -> FeatureExtractor:
    """A :class:`FeatureExtractor` (eval mode, on ``device``) by registry name, ``"pkg.mod:callable"``
    (called as ``callable()`` or ``callable(weights_path=...)``; must return an ``nn.Module``), or an
    ``nn.Module`` (wrapped; its ``name`` attribute, else its class name, names it).

    ``weights_path`` / ``sha256``: weights file and its expected sha256 (checked before loading;
    mismatch raises :class:`WeightsChecksumError`).  An extractor that cannot be built here raises
    :class:`FeatureExtractorUnavailable` with what to do about it.
    """
    if isinstance(name, nn.Module):
        fx = _wrap(name, type(name).__name__.lower())
    elif not isinstance(name, str):
        raise TypeError(f"feature extractor must be a name or an nn.Module, got {type(name).__name__}")
    elif name in FEATURE_EXTRACTORS:
        fx = _wrap(FEATURE_EXTRACTORS[name](weights_path=weights_path, sha256=sha256, device=device, **kwargs), name)
    elif ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise FeatureExtractorUnavailable(f"cannot load feature extractor {name!r}: {type(e).__name__}: {e}") from None
        if weights_path is not None:
            _check_weights(weights_path, sha256)
            module = fn(weights_path=weights_path, **kwargs)
        else:
            module = fn(**kwargs)
        fx = _wrap(module, name)
    else:
        raise ValueError(f"unknown feature extractor {name!r}; available: {sorted(FEATURE_EXTRACTORS)}, "
                         "a 'package.module:callable' returning an nn.Module, or an nn.Module")
    return fx.to(device).eval()


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------

def _as_np(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64 with ``scipy.linalg.sqrtm``
    (the reference FID code: a singular product is regularised with ``eps * I``, a negligible
    imaginary part of the square root is dropped)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(_as_np(mu1)), np.atleast_1d(_as_np(mu2))
    s1, s2 = np.atleast_2d(_as_np(sigma1)), np.atleast_2d(_as_np(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2

    def sqrtm(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # singular-matrix warnings: handled below
            r = linalg.sqrtm(a)
        return r[0] if isinstance(r, tuple) else r

    covmean = sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def stats_from_features(features) -> dict:
    """``{"mu", "sigma", "n"}`` (float64 numpy; unbiased covariance) of features (N, D)."""
    f = _as_np(features).reshape(len(features), -1)
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), "n": int(f.shape[0])}


def features_frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, d) and b (M, d)."""
    sa, sb = stats_from_features(a), stats_from_features(b)
    return frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])


def fid_proxy(samples: torch.Tensor, reference: torch.Tensor, classifier=None) -> float:
    """Frechet distance between digits-classifier features of ``samples`` and ``reference`` (both
    images in [-1, 1]; samples are clamped), e.g. generated digits vs ``digits_dataset("test")[0]``."""
    from .digits import classifier_features, load_digits_classifier

    classifier = classifier if classifier is not None else load_digits_classifier()
    return features_frechet_distance(classifier_features(classifier, samples), classifier_features(classifier, reference))


class _Accumulator:
    """Float64 sum and sum of outer products (the same statistics torchmetrics keeps)."""

    def __init__(self):
        self.s = self.ss = None
        self.n = 0

    def add(self, f: torch.Tensor):
        f = f.double().cpu()
        if self.s is None:
            self.s = torch.zeros(f.shape[1], dtype=torch.float64)
            self.ss = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.s += f.sum(0)
        self.ss += f.t().mm(f)
        self.n += f.shape[0]

    def stats(self) -> dict:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for statistics, got {self.n}")
        mu = self.s / self.n
        sigma = (self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return {"mu": mu.numpy(), "sigma": sigma.numpy(), "n": int(self.n)}


def _load_stats(stats) -> dict:
    if isinstance(stats, (str, os.PathLike)):
        path = Path(stats)
        try:
            return _load_stats(_read_npz(path, ("mu", "sigma"), optional=("n",))[0])
        except ReferenceStatsCacheError:
            raise
        except ValueError as e:
            raise ReferenceStatsCacheError(f"reference statistics file {path}: {e}") from None
    if isinstance(stats, (tuple, list)):
        stats = dict(zip(("mu", "sigma", "n"), stats))
    if not isinstance(stats, Mapping) or "mu" not in stats or "sigma" not in stats:
        raise ValueError("reference statistics must be a dict with 'mu' and 'sigma' (and 'n'), a (mu, sigma[, n]) "
                         "tuple, or the path of an .npz file holding them")
    mu = np.atleast_1d(_as_np(stats["mu"]))
    sigma = np.atleast_2d(_as_np(stats["sigma"]))
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"sigma must be ({mu.size}, {mu.size}) for mu of size {mu.size}, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("reference statistics hold non-finite values")
    n = int(stats["n"]) if stats.get("n") is not None else 2
    return {"mu": mu, "sigma": sigma, "n": max(n, 2)}


def _dist_info() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


class _Passthrough(nn.Module):
    """torchmetrics' `feature` module: the evaluator hands it features already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, f):
        return f


class FIDEvaluator:
    """FID (and optionally KID) of generated images against real images or reference statistics.

    ``extractor``: a name / spec / module for :func:`get_feature_extractor`.  Images are float in
    [0, 1] with the shape the extractor expects (``(B, C, H, W)`` for image extractors).  Features are
    computed in batches of ``batch_size`` on ``device``; the statistics live in a torchmetrics
    ``FrechetInceptionDistance`` (float64 states, ``reset_real_features=False``), available as
    ``.metric`` once the feature dimension is known.

    Distributed (``torch.distributed`` initialised, ``sync=True``): every rank calls the same
    methods; each rank may ``update_fake`` with its own share of images; ``compute()`` /
    ``fake_stats()`` gather the states of all ranks (collectives: every rank must call them) and
    return identical results everywhere.  ``set_reference`` must be called on every rank with the
    same statistics (they are counted once).  To score on one rank only (e.g. rank 0 after loading
    all shards) pass ``sync=False``: no collectives, the evaluator sees only this process's images.
    """

    def __init__(self, extractor: str | nn.Module = "inception", device="cpu", *, weights_path=None,
                 sha256: str | None = None, batch_size: int = 250, kid: bool = False, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, kid_seed: int = 0, sync: bool = True):
        self.device = torch.device(device)
        self.sync = bool(sync)
        self.extractor = get_feature_extractor(extractor, weights_path=weights_path, sha256=sha256, device=self.device)
        self.batch_size = int(batch_size)
        self.metric = None
        self.kid_metric = None
        self._kid = (bool(kid), int(kid_subsets), int(kid_subset_size), int(kid_seed))
        self._kid_keys: dict[str, list[int]] = {"real": [], "fake": []}  # order of each KID feature block
        self._kid_reference: torch.Tensor | None = None
        if self.extractor.num_features is not None:
            self._ensure(self.extractor.num_features)

    @property
    def name(self) -> str:
        return self.extractor.name

    def _ensure(self, dim: int):
        if self.metric is not None:
            if self.metric.inception.num_features != dim:
                raise ValueError(f"feature dimension {dim} does not match the evaluator's {self.metric.inception.num_features}")
            return
        tm = torchmetrics_fid()
        self.metric = tm.FrechetInceptionDistance(feature=_Passthrough(dim), reset_real_features=False,
                                                  normalize=False, sync_on_compute=self.sync).to(self.device)
        self.metric.orig_dtype = torch.float64  # compute() casts to the feature dtype; a rank may see no update
        if self._kid[0]:
            from torchmetrics.image.kid import KernelInceptionDistance

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")  # it must
                self.kid_metric = KernelInceptionDistance(feature=_Passthrough(dim), subsets=self._kid[1],
                                                          subset_size=self._kid[2], reset_real_features=False,
                                                          normalize=False, sync_on_compute=self.sync).to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Float64 features (B, D) of images in [0, 1], computed in batches."""
        images = torch.as_tensor(images)
        if images.shape[0] == 0:
            raise ValueError("got an empty batch of images")
        out = [self.extractor(images[i:i + self.batch_size]) for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).to(self.device)

    def _update(self, images, real: bool, order=None):
        f = self.features(images)
        self._ensure(f.shape[1])
        self.metric.update(f, real=real)
        if self.kid_metric is not None:
            self.kid_metric.update(f, real=real)
            keys = self._kid_keys["real" if real else "fake"]
            keys.append(len(keys) if order is None else int(order))

    def update_fake(self, images: torch.Tensor, order: int | None = None) -> None:
        """Add generated images (float in [0, 1]).  ``order``: this batch's place among all ranks'
        batches (:func:`fid_from_shards` passes the shard's index; default: the update count), so
        that KID's random subsets, drawn from the features in that order, do not depend on how the
        batches were split over ranks."""
        self._update(images, real=False, order=order)

    def update_real(self, images: torch.Tensor, order: int | None = None) -> None:
        """Add real images (float in [0, 1]); they persist across :meth:`reset_fake`."""
        self._update(images, real=True, order=order)

    def set_reference(self, stats, features=None) -> None:
        """Use precomputed reference statistics (``{"mu", "sigma", "n"}``, a tuple, or an ``.npz``
        path as written by :func:`reference_stats`) instead of real images (replaces them).

        An ``.npz`` tagged by :func:`reference_stats` must have been made with this evaluator's
        extractor (name, weights, resize), else :class:`ReferenceStatsCacheError` names the file.  ``features``: the reference features
        ``(N, D)`` for KID (see :func:`reference_features`; needs ``kid=True``)."""
        if features is not None and not self._kid[0]:
            raise ValueError("features= are KID reference features; create the evaluator with kid=True")
        if isinstance(stats, (str, os.PathLike)):
            tags = _read_npz(Path(stats), ())[1]
            if tags is not None:  # an untagged file (another tool's) is the caller's word
                _check_tags(Path(stats), tags, self.extractor.identity())
        st = _load_stats(stats)
        self._ensure(st["mu"].size)
        if features is not None:
            self._set_kid_reference(features)
        m = self.metric
        is_dist, rank, _ = _dist_info()
        n = st["n"]
        mu = torch.from_numpy(st["mu"]).to(self.device, torch.float64)
        sigma = torch.from_numpy(st["sigma"]).to(self.device, torch.float64)
        # synced states are summed over ranks: hold the reference on rank 0 only
        keep = not (is_dist and self.sync) or rank == 0
        m.real_features_sum = mu * n if keep else torch.zeros_like(mu)
        m.real_features_cov_sum = (sigma * (n - 1) + n * torch.outer(mu, mu)) if keep else torch.zeros_like(sigma)
        m.real_features_num_samples = torch.tensor(n if keep else 0, dtype=torch.long, device=self.device)
        m._computed = None

    def _set_kid_reference(self, features) -> None:
        f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
        f = f.to(self.device, torch.float64)
        if f.ndim != 2 or f.shape[1] != self.metric.inception.num_features:
            raise ValueError(f"KID reference features must be (N, {self.metric.inception.num_features}), "
                             f"got {tuple(f.shape)}")
        self._kid_reference = f  # every rank holds it; compute_kid counts it once
        self.kid_metric.real_features = [] if self._kid_gathers() else [f]
        self._kid_keys["real"] = [] if self._kid_gathers() else [-1]

    def _kid_gathers(self) -> bool:
        """True when KID's features are gathered over ranks by :meth:`compute_kid` itself."""
        is_dist, _, world = _dist_info()
        return is_dist and self.sync and world > 1

    def _gathered_blocks(self, kind: str) -> list[torch.Tensor]:
        """Every rank's KID feature blocks of ``kind``, in (order, rank) order, on every rank."""
        _, rank, world = _dist_info()
        local = [(k, rank, b.detach().cpu()) for k, b in zip(self._kid_keys[kind], getattr(self.kid_metric,
                                                                                         f"{kind}_features"))]
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
        return [b for _, _, b in sorted((x for p in parts for x in p), key=lambda t: (t[0], t[1]))]

    def reset_fake(self) -> None:
        """Forget the generated images (the reference stays)."""
        for met in (self.metric, self.kid_metric):
            if met is not None:
                met.reset()
        self._kid_keys["fake"] = []

    def _stats(self, prefix: str) -> dict:
        m = self.metric
        if m is None:
            raise RuntimeError("no images or reference statistics were given yet")
        with m.sync_context(should_sync=self.sync):
            s = getattr(m, f"{prefix}_features_sum").detach().cpu().double()
            ss = getattr(m, f"{prefix}_features_cov_sum").detach().cpu().double()
            n = int(getattr(m, f"{prefix}_features_num_samples"))
        if n < 2:
            raise RuntimeError(f"need at least 2 {prefix} images for statistics, got {n}")
        mu = s / n
        sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)
        return {"mu": mu.numpy(), "sigma": sigma.numpy(), "n": n}

    def fake_stats(self) -> dict:
        """``{"mu", "sigma", "n"}`` (float64 numpy) of all generated images (all ranks)."""
        return self._stats("fake")

    def real_stats(self) -> dict:
        """``{"mu", "sigma", "n"}`` of the real images / reference (all ranks)."""
        return self._stats("real")

    def compute(self) -> float:
        """FID (torchmetrics, float64) between generated images and the reference."""
        if self.metric is None:
            raise RuntimeError("no images or reference statistics were given yet")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return float(self.metric.compute())

    def compute_kid(self) -> tuple[float, float]:
        """KID mean and std over random subsets: torchmetrics' ``KernelInceptionDistance`` fed this
        evaluator's features (needs ``kid=True`` and real images or ``set_reference(..., features=)``:
        KID cannot use mean/covariance statistics).  Subsets are drawn from a fixed seed: same result
        on all ranks."""
        if self.kid_metric is None:
            raise RuntimeError("create the evaluator with kid=True (and add real images with update_real)")
        metric = self.kid_metric
        if self._kid_gathers():  # the features of all ranks, in the one-process order, on every rank
            from torchmetrics.image.kid import KernelInceptionDistance

            real = ([self._kid_reference.cpu()] if self._kid_reference is not None else []) + \
                self._gathered_blocks("real")
            fake = self._gathered_blocks("fake")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                metric = KernelInceptionDistance(feature=_Passthrough(self.metric.inception.num_features),
                                                 subsets=self._kid[1], subset_size=self._kid[2],
                                                 reset_real_features=False, normalize=False, sync_on_compute=False)
            metric.real_features, metric.fake_features = real, fake
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._kid[3])
            mean, std = metric.compute()
        return float(mean), float(std)


# ---------------------------------------------------------------------------------------------
# reference images
# ---------------------------------------------------------------------------------------------

#: file name endings read as reference images (case-insensitive)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp")
#: ... and as arrays of images: ``arr_0``, uint8 ``(N, H, W, 3)`` (or grey ``(N, H, W, 1)`` / ``(N, H, W)``),
#: the batches ADM's evaluator reads and ``diffsampler export --format npz`` writes
ARRAY_SUFFIXES = (".npz",)
REFERENCE_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES


class ReferenceDataError(ValueError):
    """A reference image folder that cannot be used (missing, empty, unreadable or mixed sizes)."""


def _rel(folder: Path, f: Path) -> str:
    """``f`` as named in messages: relative to the reference folder (its file name for a lone .npz)."""
    return f.name if f == folder else f.relative_to(folder).as_posix()


def _where(folder: Path, f: Path) -> str:
    """``folder: relative/path`` of a file in a reference folder; the path of a lone .npz."""
    return str(f) if f == folder else f"{folder}: {_rel(folder, f)}"


def _npz_open(folder: Path, f: Path):
    """(open zip, open ``arr_0.npy`` member, shape) of an .npz of uint8 images, its data not read; a
    ReferenceDataError naming the file and what it holds otherwise."""
    import zipfile

    from numpy.lib import format as npy

    try:
        zf = zipfile.ZipFile(f)
    except (OSError, zipfile.BadZipFile) as e:
        raise ReferenceDataError(f"{_where(folder, f)} cannot be read as an .npz file "
                                 f"({type(e).__name__}: {e})") from None
    try:
        names = zf.namelist()
        if "arr_0.npy" not in names:
            raise ReferenceDataError(
                f"{_where(folder, f)} holds no arr_0 (it holds {sorted(n.removesuffix('.npy') for n in names)}); "
                "a reference .npz holds its images as arr_0, uint8 (N, H, W, 3), as ADM's evaluator reads")
        fp = zf.open("arr_0.npy")
        try:
            version = npy.read_magic(fp)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read(fp)
        except ValueError as e:
            raise ReferenceDataError(f"{_where(folder, f)}: arr_0 cannot be read ({e})") from None
        ok = (dtype == np.uint8 and not fortran and len(shape) in (3, 4) and shape[0] > 0
              and (len(shape) == 3 or shape[3] in (1, 3)))
        if not ok:
            raise ReferenceDataError(
                f"{_where(folder, f)}: arr_0 is {dtype} {'Fortran-ordered ' if fortran else ''}{tuple(shape)}; "
                "reference arrays must be uint8 images (N, H, W, 3), or grey (N, H, W, 1) / (N, H, W), N >= 1, "
                "as ADM's evaluator reads (convert floats with (x * 255).round().astype(np.uint8))")
        return zf, fp, tuple(int(v) for v in shape)
    except BaseException:
        zf.close()
        raise


def _image_size(folder: Path, f: Path) -> tuple[int, int]:
    """(width, height) of an image file, or of the images of an .npz, from its header."""
    if f.suffix.lower() in ARRAY_SUFFIXES:
        zf, _, shape = _npz_open(folder, f)
        zf.close()
        return shape[2], shape[1]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ReferenceDataError(f"{_where(folder, f)} cannot be read as an image "
                                 f"({type(e).__name__}: {e})") from None


def _check_size(folder: Path, f: Path, size, first: Path, first_size) -> None:
    if tuple(size) != tuple(first_size):
        raise ReferenceDataError(
            f"{_where(folder, f)} is {size[0]}x{size[1]} but "
            f"{_rel(folder, first)} is {first_size[0]}x{first_size[1]}; all reference images "
            "must have one size (resize them first)")


def list_reference_images(folder: str | os.PathLike, check_sizes: bool = False) -> list[Path]:
    """The image files (``*.png``, ``*.jpg``, ``*.jpeg``, ``*.webp``) and image arrays (``*.npz``
    holding ``arr_0``, see :data:`ARRAY_SUFFIXES`), any case, under ``folder`` and its subfolders,
    sorted by relative path; ``folder`` may also be one ``.npz`` file (e.g. an ADM reference batch).
    A missing folder or one without images raises :class:`ReferenceDataError`; so does, with
    ``check_sizes``, a file that is not an image (array) or whose size differs from the first one's
    (read from the file headers: nothing is decoded)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ReferenceDataError(f"{folder} does not exist")
    if folder.is_file() and folder.suffix.lower() in ARRAY_SUFFIXES:
        files = [folder]
    elif not folder.is_dir():
        raise ReferenceDataError(f"{folder} is neither a directory of images nor an .npz file of images (arr_0)")
    else:
        files = sorted((f for f in folder.rglob("*") if f.suffix.lower() in REFERENCE_SUFFIXES and f.is_file()),
                       key=lambda f: f.relative_to(folder).as_posix())
    if not files:
        raise ReferenceDataError(f"{folder} has no images ({', '.join(REFERENCE_SUFFIXES)}) in it or its subfolders")
    if check_sizes:
        first_size = _image_size(folder, files[0])
        for f in files[1:]:
            _check_size(folder, f, _image_size(folder, f), files[0], first_size)
    return files


def _npz_images(folder: Path, f: Path, rows: int) -> Iterable[np.ndarray]:
    """The images of an .npz's arr_0 as uint8 RGB (b, H, W, 3) chunks of at most ``rows``, read
    sequentially from the archive (never the whole array)."""
    zf, fp, shape = _npz_open(folder, f)
    with zf, fp:
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], rows):
            b = min(rows, shape[0] - start)
            buf = fp.read(b * per_image)
            if len(buf) != b * per_image:
                raise ReferenceDataError(f"{_where(folder, f)}: arr_0 ends after {start + len(buf) // per_image} "
                                         f"of its {shape[0]} images (truncated file)")
            x = np.frombuffer(buf, np.uint8).reshape(b, shape[1], shape[2], -1)
            yield np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def reference_images(folder: str | os.PathLike, batch_size: int = 250) -> Iterable[torch.Tensor]:
    """The images of :func:`list_reference_images` (files and .npz arrays, in that order) as float32
    RGB batches ``(B, 3, H, W)`` in [0, 1], grey expanded to RGB as PIL's ``convert("RGB")`` does
    (streamed: one batch, and one chunk of an .npz, in memory); an image of another size than the
    first raises :class:`ReferenceDataError` naming it."""
    from PIL import Image

    folder = Path(folder).expanduser()
    files = list_reference_images(folder)
    first_size = None
    batch: list[np.ndarray] = []

    def images():
        nonlocal first_size
        for f in files:
            size = _image_size(folder, f)
            first_size = first_size or size
            _check_size(folder, f, size, files[0], first_size)
            if f.suffix.lower() in ARRAY_SUFFIXES:
                for chunk in _npz_images(folder, f, batch_size):
                    yield from chunk
            else:
                with Image.open(f) as im:
                    yield np.asarray(im.convert("RGB"))

    for im in images():
        batch.append(im)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of the reference image list: relative path, size in bytes and mtime of every file (image
    or .npz)."""
    folder = Path(folder).expanduser()
    h = hashlib.sha256()
    for f in list_reference_images(folder):
        st = f.stat()
        h.update(f"{_rel(folder, f)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# reference statistics cache, scoring shards
# ---------------------------------------------------------------------------------------------

_CACHE_FORMAT = 2


class ReferenceStatsCacheError(ValueError):
    """A reference cache file that is unreadable or was made for other data or features."""


def _iter_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        images = torch.as_tensor(images)
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
    else:
        for b in images:
            if isinstance(b, (tuple, list)):  # (images, labels) from a DataLoader
                b = b[0]
            yield torch.as_tensor(b)


def _features_of(fx: FeatureExtractor, images, batch_size: int) -> Iterable[torch.Tensor]:
    with torch.no_grad():
        for batch in _iter_batches(images, batch_size):
            for i in range(0, batch.shape[0], batch_size):
                yield fx(batch[i:i + batch_size])


def _compute_stats(fx, images, batch_size) -> dict:
    acc = _Accumulator()
    for f in _features_of(fx, images, batch_size):
        acc.add(f)
    st = acc.stats()
    return {"mu": st["mu"], "sigma": st["sigma"], "n": np.int64(st["n"])}


def _compute_features(fx, images, batch_size) -> dict:
    # float32 on disk: the networks' own precision; returned as float64
    return {"features": torch.cat([f.float().cpu() for f in _features_of(fx, images, batch_size)]).numpy()}


_KINDS = {"stats": (_compute_stats, ("mu", "sigma", "n")), "features": (_compute_features, ("features",))}


def _read_npz(path: Path, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple[dict, dict | None]:
    """Arrays ``keys`` (and ``optional`` ones present) and the tags (None when the file has none) of an
    .npz file, or an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in keys if k not in d.files]
            arrays = {k: d[k] for k in keys + optional if k in d.files}
            tags = json.loads(str(d["tags"])) if "tags" in d.files else None
    except Exception as e:  # noqa: BLE001 - any damage: name the file
        raise ReferenceStatsCacheError(f"reference cache file {path} cannot be read ({type(e).__name__}: {e}); "
                                       "delete it to recompute it") from None
    if missing:
        raise ReferenceStatsCacheError(f"reference cache file {path} lacks {missing} (has {sorted(arrays)}); "
                                       "delete it to recompute it")
    return arrays, tags


def _check_tags(path: Path, tags: dict | None, expected: Mapping) -> None:
    """Refuse a file whose tags differ from ``expected`` (only the keys of ``expected`` are compared)."""
    if tags is None:
        raise ReferenceStatsCacheError(f"reference cache file {path} has no tags (written by another tool or an "
                                       "older diffsampler), so what it was computed from is unknown; delete it "
                                       "to recompute it")
    bad = [f"{k} is {tags.get(k)!r}, expected {v!r}" for k, v in expected.items() if tags.get(k) != v]
    if bad:
        raise ReferenceStatsCacheError(f"reference cache file {path} was made for other data or features: "
                                       f"{'; '.join(bad)}. Delete it to recompute it")


def _write_npz(path: Path, arrays: dict, tags: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    from .generate import tmp_path  # host + process id: ranks on several nodes share the cache dir

    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, tags=np.array(json.dumps(tags, sort_keys=True)))
    os.replace(tmp, path)


def _source(dataset, images_fn, content, batch_size):
    """(name, content identity, images_fn) of a folder (images_fn None) or of named data."""
    if images_fn is None:
        if content is not None:
            raise ValueError("content= identifies data given by images_fn; a folder's content is its file list")
        folder = Path(dataset).expanduser()
        return folder.name, folder_fingerprint(folder), lambda: reference_images(folder, batch_size)
    if not isinstance(dataset, str):
        raise TypeError(f"with images_fn, dataset is the data's name (str), got {type(dataset).__name__}; "
                        "pass images_fn=None to read a folder")
    return dataset, None if content is None else str(content), images_fn


def _cached_reference(kind, dataset, images_fn, extractor, cache_dir, *, content, device, batch_size,
                      weights_path, sha256, wait_timeout_s) -> dict:
    fx = extractor if isinstance(extractor, FeatureExtractor) else get_feature_extractor(
        extractor, weights_path=weights_path, sha256=sha256, device=device)
    name, content, images_fn = _source(dataset, images_fn, content, batch_size)
    tags = {"format": _CACHE_FORMAT, "kind": kind, "dataset": name, "content": content, **fx.identity()}
    key = hashlib.sha256(json.dumps(tags, sort_keys=True).encode()).hexdigest()[:16]
    suffix = "" if kind == "stats" else f"__{kind}"
    path = Path(cache_dir).expanduser() / f"{_sanitize(name)}__{_sanitize(fx.name)}{suffix}__{key}.npz"
    compute, keys = _KINDS[kind]
    _, rank, _ = _dist_info()
    if not path.is_file() and rank == 0:
        _write_npz(path, compute(fx, images_fn(), batch_size), tags)
    deadline = time.monotonic() + wait_timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: waited {wait_timeout_s:.0f} s for rank 0 to write {path}")
        time.sleep(0.5)
    arrays, found = _read_npz(path, keys)
    _check_tags(path, found, tags)
    return arrays


def reference_stats(dataset: str | os.PathLike, images_fn: Callable[[], Iterable[torch.Tensor] | torch.Tensor] | None = None,
                    extractor: str | nn.Module = "inception", cache_dir: str | os.PathLike = "fid_stats", *,
                    content: str | None = None, device="cpu", batch_size: int = 250, weights_path=None,
                    sha256: str | None = None, wait_timeout_s: float = 7200.0) -> dict:
    """Reference statistics ``{"mu", "sigma", "n"}`` (float64) of a dataset, cached.

    The data: a folder of images (``images_fn=None``; read by :func:`reference_images`), or a name
    and ``images_fn()`` returning images (float in [0, 1]) as a tensor or an iterable of batches
    (streamed: only one batch is in memory), with ``content`` a string identifying the data (a
    version or hash; None: the name alone identifies them).

    The cache file ``{cache_dir}/{name}__{extractor}__{key}.npz`` is keyed, and tagged, by the data
    (a folder: its file list with relative paths, sizes and mtimes), the extractor's name, its
    weights (sha256 of the state dict) and its resize mode; the tags are verified on load, and an
    unreadable or foreign file raises :class:`ReferenceStatsCacheError` naming it.  ``images_fn`` is
    called only when the file does not exist; it is then written atomically.  Distributed: rank 0
    computes and writes; other ranks that call this wait for the file (polling, no collective).
    """
    st = _cached_reference("stats", dataset, images_fn, extractor, cache_dir, content=content, device=device,
                           batch_size=batch_size, weights_path=weights_path, sha256=sha256,
                           wait_timeout_s=wait_timeout_s)
    return _load_stats(st)


def reference_features(dataset: str | os.PathLike, images_fn=None, extractor: str | nn.Module = "inception",
                       cache_dir: str | os.PathLike = "fid_stats", *, content: str | None = None, device="cpu",
                       batch_size: int = 250, weights_path=None, sha256: str | None = None,
                       wait_timeout_s: float = 7200.0) -> np.ndarray:
    """The reference features ``(N, D)`` (float64, stored as float32) themselves, cached like
    :func:`reference_stats` (same arguments): KID needs them, statistics do not suffice."""
    return _cached_reference("features", dataset, images_fn, extractor, cache_dir, content=content, device=device,
                             batch_size=batch_size, weights_path=weights_path, sha256=sha256,
                             wait_timeout_s=wait_timeout_s)["features"].astype(np.float64)


def _declared_range(shard_dir: Path, value_range) -> tuple[float, float] | None:
    """The range to read the shards in: the one they recorded (an explicit ``value_range`` must agree;
    None agrees with (0, 1), which it passes through), else the argument ("recorded": (-1, 1))."""
    from .generate import checked_value_range, shard_record

    recorded = shard_record(shard_dir).value_range
    if isinstance(value_range, str):
        if value_range != "recorded":
            raise ValueError(f"value_range must be 'recorded', None or (lo, hi), got {value_range!r}")
        return recorded or (-1.0, 1.0)
    given = checked_value_range(value_range)
    if recorded is None or given == recorded or (given is None and recorded == (0.0, 1.0)):
        return given if recorded is None else recorded
    raise ValueError(f"value_range={value_range!r} contradicts the range {recorded} recorded in the shards of "
                     f"{shard_dir}; omit value_range to read them in the recorded range")


def _out_of_range(x: torch.Tensor, value_range, where) -> str | None:
    """Why ``x`` is not in ``value_range`` (up to float rounding), or None."""
    lo, hi = value_range
    tol = 1e-5 * (hi - lo)
    mn, mx = float(x.min()), float(x.max())
    if mn >= lo - tol and mx <= hi + tol:
        return None
    return (f"{where} has values in [{mn:.4g}, {mx:.4g}], outside the declared value_range ({lo}, {hi}); "
            "declare the range the samples are in (value_range=(lo, hi)) or clamp them before saving")


def fid_from_shards(shard_dir: str | os.PathLike, reference, extractor: str | nn.Module | FIDEvaluator = "inception", *,
                    seeds=None, value_range: tuple[float, float] | None | str = "recorded", device="cpu",
                    batch_size: int = 250, weights_path=None, sha256: str | None = None, sync: bool = True) -> float:
    """FID of samples saved by :func:`~diffsampler.eval.generate.generate_shards` against ``reference``
    (statistics dict / ``.npz`` path, see :meth:`FIDEvaluator.set_reference`).

    ``value_range``: the samples' range, mapped to [0, 1].  ``"recorded"`` (default): the range the
    shards recorded (``generate_shards(value_range=...)``), or (-1, 1), the usual diffusion output,
    for shards without one.  An explicit range must agree with a recorded one; None passes the
    samples through unchanged (for feature vectors, or images already in [0, 1]).  Samples outside
    the range are refused (``ValueError`` naming the range and the observed min/max), never clamped
    into it.  Shards are read one at a time; distributed, each rank scores every ``world_size``-th
    shard file and the result is identical on all ranks (every rank must call it; with
    ``sync=False``, or an evaluator made with it, this process scores all shards alone).
    """
    from .generate import shard_index

    shard_dir = Path(shard_dir)
    value_range = _declared_range(shard_dir, value_range)
    ev = extractor if isinstance(extractor, FIDEvaluator) else FIDEvaluator(
        extractor, device, weights_path=weights_path, sha256=sha256, batch_size=batch_size, sync=sync)
    ev.set_reference(reference)
    is_dist, rank, world = _dist_info()
    if not ev.sync:
        is_dist, rank, world = False, 0, 1
    index = shard_index(shard_dir, seeds)
    error = None
    for i, (f, rows, _) in enumerate(index):
        if i % world != rank or error:
            continue
        x = torch.load(f, map_location="cpu", weights_only=True)["samples"][rows]
        if x.dtype == torch.uint8:  # images quantised from their value range: 0..255 is [0, 1]
            ev.update_fake(x.float() / 255, order=i)
            continue
        if value_range is not None:
            error = _out_of_range(x, value_range, f)
            lo, hi = value_range
            x = ((x.float() - lo) / (hi - lo)).clamp(0, 1)
        if not error:
            ev.update_fake(x, order=i)
    if is_dist and world > 1:  # every rank raises together, or none does
        errors = [None] * world
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise ValueError(error)
    return ev.compute()
