"""`diffsampler minority-classifier`: score a data set with a diffusion model's denoiser, bin the
scores into quantile classes and train the minority classifier of `guidance.minority` on them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..guidance.minority import minority_labels, minority_score, train_minority_classifier

__all__ = ["build_from_args", "feature_fn", "load_data", "DATA_SUFFIXES"]


def feature_fn(spec: str | None, device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The distance space of a minority score: None (pixels), the digit classifier's features, or
    a module:callable."""
    if spec in (None, "", "none", "pixel"):
        return None
    if spec == "digits":
        from ..eval.digits import load_digits_classifier

        net = load_digits_classifier().to(device)
        return lambda x: net.features(x.float().clamp(-1, 1))
    if ":" in spec:
        import importlib

        mod, name = spec.split(":", 1)
        return getattr(importlib.import_module(mod), name)
    raise ValueError(f"feature must be 'none', 'digits' or 'module:callable', got {spec!r}")


DATA_SUFFIXES = (".pt", ".npy")


def load_data(spec: str) -> torch.Tensor:
    """The training data: 'digits' or a tensor file, read without executing any pickled object."""
    if spec == "digits":
        from ..eval.digits import digits_dataset

        return digits_dataset("train")[0]
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"data {spec!r} is neither 'digits' nor a .pt/.npy file")
    if p.suffix not in DATA_SUFFIXES:
        raise ValueError(f"data {spec!r}: expected a .pt or .npy file holding a tensor (N, ...), got suffix {p.suffix!r}")
    x = _load_pt(p) if p.suffix == ".pt" else _load_npy(p)
    return x.float()


def _load_pt(p: Path) -> torch.Tensor:
    import pickle

    try:
        x = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error: ")[-1].split(" Please use")[0].strip().splitlines()[0]
        raise ValueError(f"data {str(p)!r} refused by torch.load(weights_only=True): it holds Python objects other "
                         f"than tensors ({detail}), and loading them could run code from the file; save a plain "
                         "tensor (torch.save(x, path)) or a .npy array") from None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"data {str(p)!r}: expected a tensor (N, ...), got a {type(x).__name__}")
    return x


def _load_npy(p: Path) -> torch.Tensor:
    try:
        x = np.load(p, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"data {str(p)!r}: {e} (object arrays are pickles and are never loaded); save a numeric "
                         "array") from None
    if not isinstance(x, np.ndarray):
        raise ValueError(f"data {str(p)!r}: expected a .npy array (N, ...), got a {type(x).__name__}")
    return torch.from_numpy(x)


def build_from_args(argv: Sequence[str]) -> Path:
    """`diffsampler minority-classifier`: score a data set with a diffusers pipeline's denoiser, train
    the minority classifier, save it (safetensors + config.json with the class thresholds)."""
    import argparse

    p = argparse.ArgumentParser(prog="diffsampler minority-classifier", description=build_from_args.__doc__)
    p.add_argument("--pipeline", default=None, help="diffusers pipeline directory (default: the packaged digits model)")
    p.add_argument("--data", default="digits", help="'digits' (train split) or a .pt/.npy tensor (N, ...) in the model's range")
    p.add_argument("--feature", default="digits", help="distance space: none (pixels), digits, or module:callable")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--t-frac", type=float, default=0.4)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(list(argv))
    x0 = load_data(a.data)  # before any model is loaded: bad data fails first
    from ..pipelines import denoiser_from_pipeline

    if a.pipeline is None:
        from ..eval.digits import load_digits_pipeline

        pipe = load_digits_pipeline()
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(a.pipeline)
    pipe.to(a.device)
    den = denoiser_from_pipeline(pipe)
    x0 = x0.to(a.device)
    feature = feature_fn(a.feature, a.device)
    print(f"scoring {len(x0)} samples ({a.draws} draws, t_frac={a.t_frac}, feature={a.feature})")
    scores = minority_score(den, x0, a.t_frac, a.draws, feature, seed=a.seed)
    labels, th = minority_labels(scores, a.classes)
    print(f"training the classifier: {a.steps} steps")
    clf = train_minority_classifier(x0.cpu(), labels, den.schedule, a.classes, steps=a.steps, batch_size=a.batch_size,
                                    seed=a.seed, thresholds=th.tolist(), log_every=max(a.steps // 10, 1),
                                    meta={"t_frac": a.t_frac, "num_draws": a.draws, "feature": a.feature,
                                          "data": a.data, "pipeline": a.pipeline or "digits"})
    out = clf.save_pretrained(a.out)
    from safetensors.torch import save_file

    save_file({"scores": scores.float().contiguous()}, str(out / "scores.safetensors"))
    print(f"saved {out}")
    return out
