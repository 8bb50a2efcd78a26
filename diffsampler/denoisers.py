"""Denoisers: any network f(x, t, **cond) seen through its prediction type.

A solver asks a Denoiser for one of two things at (x, t): the data prediction
D = E[x0 | x_t] ("data") or the noise prediction eps = (x - alpha D) / sigma ("noise").  The
network's own parametrisation (epsilon, v_prediction, sample, flow) is converted here, once, so no
solver ever branches on it.  The protocol is one method, `Denoiser.predict_at(x, t_model, alpha,
sigma, kind)`, what the sampling engine calls (`predict(x, t, kind)` is the same from a schedule
time).  Transforms (thresholding, guidance) are Denoisers wrapping Denoisers.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .schedules import NoiseSchedule, RectifiedFlow

__all__ = ["Denoiser", "DenoiserTransform", "Thresholded", "NonFiniteModelOutput", "PREDICTION_TYPES",
           "model_output_tensor", "DATA_RAW_NOISE"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
KINDS = ("data", "noise")
#: the engine's two-output kind: (the data prediction after the transforms -- thresholding, clipping --,
#: the noise prediction of the network's own output before them), as diffusers' DDIM / DDPM schedulers
#: clip x0 but keep the model's epsilon for the direction term
DATA_RAW_NOISE = "data|raw_noise"


class NonFiniteModelOutput(FloatingPointError):
    """The network returned NaN or Inf."""


#: what a network may return; the message of every refused output lists it
ACCEPTED_OUTPUTS = ("a floating-point torch.Tensor, an object with such a tensor as `.sample` (diffusers' "
                    "BaseOutput, a dataclass), a dict with key 'sample', or a tuple whose first element is "
                    "the tensor (return_dict=False)")


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor"
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))}"
    if isinstance(obj, tuple) and not obj:
        return "an empty tuple"
    t = type(obj)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _checked_tensor(out, source: str = "model") -> torch.Tensor:
    """`out` itself if it is a floating-point tensor; otherwise a TypeError naming what came back."""
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return out
    raise TypeError(f"{source} returned {_describe(out)}; accepted: {ACCEPTED_OUTPUTS}")


def model_output_tensor(out) -> torch.Tensor:
    """The prediction tensor in what a network returned (the forms diffusers models return)."""
    if isinstance(out, torch.Tensor):
        return _checked_tensor(out)
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict with a `sample` field
        if "sample" not in out:
            raise TypeError(f"model returned {_describe(out)} (no 'sample'); accepted: {ACCEPTED_OUTPUTS}")
        return _checked_tensor(out["sample"], "model (its 'sample')")
    if isinstance(out, tuple):
        if not out:
            return _checked_tensor(out)
        if not isinstance(out[0], torch.Tensor):
            raise TypeError(f"model returned a tuple whose first element is {_describe(out[0])}; "
                            f"accepted: {ACCEPTED_OUTPUTS}")
        return _checked_tensor(out[0], "model (its first tuple element)")
    if hasattr(out, "sample"):
        if not isinstance(out.sample, torch.Tensor):
            raise TypeError(f"model returned {_describe(out)} with .sample of type {_describe(out.sample)}; "
                            f"accepted: {ACCEPTED_OUTPUTS}")
        return _checked_tensor(out.sample, "model (its .sample)")
    return _checked_tensor(out)


def _bcast(c, x: torch.Tensor):
    """A per-sample coefficient (shape (B,)) broadcast against x; Python floats pass through."""
    if isinstance(c, torch.Tensor) and c.ndim == 1:
        return c.view(-1, *([1] * (x.ndim - 1)))
    return c


def _axpby(x: torch.Tensor, y: torch.Tensor, a, b, div=None) -> torch.Tensor:
    """(a x + b y) / div with as few temporaries as the coefficient types allow (hot path)."""
    if isinstance(b, float):
        r = torch.add(x if a == 1.0 else x * a, y, alpha=b)
        return r if div is None else r.div_(div)
    r = a * x + b * y  # per-sample float64 coefficients: computed in float64, returned in x's dtype
    return (r if div is None else r / div).to(x.dtype)


class Denoiser:
    """Wraps `model(x, t_model, **cond)` returning a prediction of type `prediction_type`.

    Args:
        model: callable returning a floating-point tensor, an object with it as `.sample`
            (diffusers outputs), a dict with key 'sample' or a tuple whose first element is it
            (return_dict=False); anything else, and int/bool/complex tensors, are refused by type.
            `output_fn`, if given, extracts the tensor instead (its result is checked the same way).
        schedule: the noise schedule the network was trained with.
        prediction_type: "epsilon", "v_prediction" (v = alpha eps - sigma x0, Salimans & Ho 2022),
            "sample" (x0) or "flow" (velocity u = eps - x0 of a rectified flow).
        cond: keyword arguments passed to every call (class labels, text embeddings...).
        check_finite: "step" raises at the call that returned NaN/Inf (a host sync per call);
            "end" records a per-element test on the device and lets the sampling loop raise after
            the loop, naming the run's first bad call (each run starts with no flags, so calls
            outside a run or of an aborted run never fail a later one); "auto" (default) is "step" for CPU tensors and "end" on accelerators,
            so the step loop never waits on the device; "off" trusts the network.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        *,
        cond: dict | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        check_finite: str = "auto",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {PREDICTION_TYPES}")
        if prediction_type == "flow" and not isinstance(schedule, RectifiedFlow):
            raise ValueError(f"prediction_type 'flow' needs a RectifiedFlow schedule, got {type(schedule).__name__}")
        if check_finite not in ("auto", "step", "end", "off"):
            raise ValueError(f"check_finite must be 'auto', 'step', 'end' or 'off', got {check_finite!r}")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.cond = dict(cond or {})
        self.output_fn = output_fn
        self.check_finite = check_finite
        self.nfe = 0
        self._flags: list[torch.Tensor] = []  # device flag per call when check_finite == "end"

    # -- the public surface -----------------------------------------------------------------
    def data_pred(self, x: torch.Tensor, t) -> torch.Tensor:
        """D(x, t) = E[x0 | x_t = x]; t a float or a per-sample tensor of schedule times."""
        return self.predict(x, t, "data")

    def noise_pred(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x, t, "noise")

    def predict(self, x: torch.Tensor, t, kind: str = "data", alpha=None, sigma=None) -> torch.Tensor:
        """Prediction `kind` ("data" | "noise") at (x, t).  Solvers pass alpha_t, sigma_t they have
        precomputed (floats, or per-sample tensors of shape (B,)) so nothing is recomputed per step."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        t = torch.as_tensor(t, dtype=torch.float64)
        if alpha is None:
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
            if alpha.ndim == 0:
                alpha, sigma = float(alpha), float(sigma)
            else:
                alpha, sigma = alpha.to(x.device), sigma.to(x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t_model = self.schedule.model_time(t).to(x.device, torch.float32)
        return self.predict_at(x, t_model, _bcast(alpha, x), _bcast(sigma, x), kind)

    def reset_nfe(self) -> None:
        self.nfe = 0

    # -- the engine's call ------------------------------------------------------------------
    def predict_at(self, x: torch.Tensor, t_model: torch.Tensor, alpha, sigma, kind: str) -> torch.Tensor:
        """The data ("data") or noise ("noise") prediction at x, from one network call at model
        time `t_model` (shape (B,)), with the schedule's alpha_t, sigma_t given (floats, or tensors
        broadcasting against x).  The one method the sampling engine calls; a transform overrides it.
        kind `DATA_RAW_NOISE` gives the pair (data prediction, noise prediction) of the one call."""
        out = self.raw(x, t_model)
        if kind == DATA_RAW_NOISE:
            return self.convert(x, out, alpha, sigma, "data"), self.convert(x, out, alpha, sigma, "noise")
        return self.convert(x, out, alpha, sigma, kind)

    def predict_with_data(self, x, t_model, alpha, sigma, kind) -> tuple:
        """`predict_at`, and the data prediction of the same network call (equal to it for "data")."""
        if kind == DATA_RAW_NOISE:
            pair = self.predict_at(x, t_model, alpha, sigma, kind)
            return pair, pair[0]
        out = self.raw(x, t_model)
        pred = self.convert(x, out, alpha, sigma, kind)
        return pred, pred if kind == "data" else self.convert(x, out, alpha, sigma, "data")

    def convert(self, x: torch.Tensor, out: torch.Tensor, alpha, sigma, kind: str) -> torch.Tensor:
        """The network output `out` at x, in its own parametrisation, as prediction `kind`."""
        p = self.prediction_type
        if p == "epsilon":
            return out if kind == "noise" else _axpby(x, out, 1.0, -sigma, alpha)
        if p == "sample":
            return out if kind == "data" else _axpby(x, out, 1.0, -alpha, sigma)
        if p == "v_prediction":  # x0 = alpha x - sigma v,  eps = sigma x + alpha v
            return _axpby(x, out, alpha, -sigma) if kind == "data" else _axpby(x, out, sigma, alpha)
        # flow: u = eps - x0 with x = (1-t) x0 + t eps  =>  x0 = x - sigma u,  eps = x + alpha u
        return _axpby(x, out, 1.0, -sigma) if kind == "data" else _axpby(x, out, 1.0, alpha)

    def raw(self, x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        """One network call in its own parametrisation, cast back to x's dtype and checked."""
        return self.call(x, t_model, self.cond)

    def call(self, x: torch.Tensor, t_model: torch.Tensor, cond: dict) -> torch.Tensor:
        """One counted, checked network call with conditioning `cond` (guidance passes its own)."""
        dtype = self._model_dtype(x)
        out = self.model(x if x.dtype == dtype else x.to(dtype), t_model, **cond)
        if self.output_fn is not None:
            out = _checked_tensor(self.output_fn(out), "output_fn")
        else:
            out = model_output_tensor(out)
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match input shape {tuple(x.shape)}")
        self.nfe += 1
        if out.dtype != x.dtype:  # (`.to` costs ~1 us per call even when it has nothing to do)
            out = out.to(x.dtype)
        self._check(out)
        return out

    def _model_dtype(self, x: torch.Tensor) -> torch.dtype:
        params = getattr(self.model, "parameters", None)
        if callable(params):
            for p in params():
                return p.dtype if p.is_floating_point() else x.dtype
        return x.dtype

    def _check(self, out: torch.Tensor) -> None:
        mode = self.check_finite
        if mode == "auto":
            mode = "step" if out.device.type == "cpu" else "end"
        if mode == "step":  # fast path: a finite sum proves every element finite; else test elements
            if not bool(out.sum().isfinite()) and not bool(torch.isfinite(out).all()):
                raise NonFiniteModelOutput(
                    f"model returned NaN/Inf at model call {self.nfe} (prediction_type={self.prediction_type!r})")
        elif mode == "end":  # per-element test kept on the device, read once after the loop
            self._flags.append(~torch.isfinite(out).all())

    def start_run(self) -> None:
        """Begin a sampling run: deferred finite flags from earlier calls (an aborted run, direct
        `data_pred` calls) are dropped, so a run reports only its own model calls."""
        self._flags = []

    def raise_if_nonfinite(self) -> None:
        """For check_finite='end': one host sync after the loop, naming the first bad model call
        of the run."""
        if self._flags:
            bad = torch.nonzero(torch.stack(self._flags).cpu()).flatten()
            self._flags = []
            if len(bad):
                raise NonFiniteModelOutput(f"model returned NaN/Inf first at model call {int(bad[0]) + 1} of the run")


class DenoiserTransform(Denoiser):
    """A Denoiser that post-processes the data prediction of an inner Denoiser: a subclass defines
    `transform(x, d, t_model, alpha, sigma) -> d'`; `predict_at` converts d' to the kind asked for."""

    def __init__(self, inner: Denoiser):
        self.inner = inner

    def __getattr__(self, name):  # schedule, nfe, cond... come from the wrapped denoiser
        if "inner" not in self.__dict__:  # during construction or copying
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def with_inner(self, inner: Denoiser) -> "DenoiserTransform":
        """This transform, with the same settings, over another inner Denoiser."""
        new = copy.copy(self)
        new.inner = inner
        return new

    @property
    def nfe(self) -> int:
        return self.inner.nfe

    def reset_nfe(self) -> None:
        self.inner.reset_nfe()

    def start_run(self) -> None:
        self.inner.start_run()

    def raise_if_nonfinite(self) -> None:
        self.inner.raise_if_nonfinite()

    def transform(self, x, d, t_model, alpha, sigma) -> torch.Tensor:
        raise NotImplementedError

    def predict_at(self, x, t_model, alpha, sigma, kind):
        return self.predict_with_data(x, t_model, alpha, sigma, kind)[0]

    def predict_with_data(self, x, t_model, alpha, sigma, kind):
        if kind == DATA_RAW_NOISE:  # the noise prediction passes through untransformed
            d, e = self.inner.predict_at(x, t_model, alpha, sigma, kind)
            d = self.transform(x, d, t_model, alpha, sigma)
            return (d, e), d
        d = self.transform(x, self.inner.predict_at(x, t_model, alpha, sigma, "data"), t_model, alpha, sigma)
        return (d if kind == "data" else (x - alpha * d) / sigma), d


class Thresholded(DenoiserTransform):
    """Dynamic thresholding of the data prediction (Saharia et al. 2022, Imagen; DPM-Solver++ Sec. 5).

    Per sample s = clip(quantile_ratio(|D|), 1, max_value); D <- clip(D, -s, s) / s.
    `dynamic=False` gives static clipping to [-max_value, max_value] (diffusers' clip_sample).
    """

    def __init__(self, inner: Denoiser, ratio: float = 0.995, max_value: float = 1.0, dynamic: bool = True):
        super().__init__(inner)
        if not 0 < ratio <= 1:
            raise ValueError(f"thresholding ratio must be in (0, 1], got {ratio}")
        if max_value <= 0:
            raise ValueError(f"thresholding max_value must be > 0, got {max_value}")
        self.ratio, self.max_value, self.dynamic = ratio, max_value, dynamic

    def transform(self, x, d, t_model, alpha, sigma):
        if not self.dynamic:
            return d.clamp(-self.max_value, self.max_value)
        flat = d.flatten(1).abs().float()
        s = torch.quantile(flat, self.ratio, dim=1).clamp(1.0, self.max_value).to(d.dtype)
        s = s.view(-1, *([1] * (d.ndim - 1)))
        return d.clamp(-s, s) / s
