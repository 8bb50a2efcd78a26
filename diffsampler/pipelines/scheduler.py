"""`DiffSamplerScheduler`: any registered diffsampler solver behind diffusers' scheduler interface.

It is an adapter, not a second solver implementation: `set_timesteps` compiles the solver's Plan
(`diffsampler.samplers.make_plan`) and `step` feeds the network output, converted from its
prediction type, to the plan engine's `Stepper`, one model evaluation per call.  Every model call of the plan is
one entry of `timesteps`, so a two-call solver (Heun, DPM-Solver++ 2S) exposes two timesteps per
solver step and `len(scheduler.timesteps) == plan.nfe == num_inference_steps`.

The state handed to the model is x itself (`scale_model_input` is the identity, except at the
first call of a plan that moves x_T before its first model call, e.g. an analytic first step;
`init_noise_sigma` is the schedule's prior std) -- or, under `convention=<sigma-space class>`
(diffusers' Euler / Heun / LMS / KDPM2 families), that class's x / alpha with its scalings.  `step` returns as `prev_sample` the input of the
next model evaluation, which is x_{i+1} at the end of a solver step and the intermediate point
(a linear combination of x_i and earlier outputs) inside a multi-call step.

Configs of diffusers schedulers are accepted: `DiffSamplerScheduler.from_config(other.config,
solver=...)`.  Keys of diffusers scheduler configs this class does not use are kept in its config
(so `save_pretrained` keeps them) but are otherwise ignored; a top-level keyword that is an option
of the named solver joins `solver_options`; any other keyword is a TypeError; note that diffusers resolves `_compatibles` by *name inside the
diffusers package only*, so pipelines' `scheduler.compatibles` never lists this class -- build it
with `from_config` yourself and assign `pipe.scheduler = ...`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..denoisers import PREDICTION_TYPES, Denoiser, Thresholded
from ..grids import canonical_spacing
from ..samplers import get, make_plan
from ..samplers.loop import predrawn_noise
from ..samplers.plan import Plan, Stepper
from ..schedules import (DIFFUSERS_SIGMA_SPACINGS, DIFFUSERS_TIMESTEP_SPACINGS, K_CLASSES, SPACINGS, DiscreteVP,
                         RectifiedFlow, TimeGrid, TrigVP, EDMPrecond, diffusers_k_grid, diffusers_last_timestep, edm_sigmas,
                         ipndm_times, flowmatch_sigmas, diffusers_sigma_to_t, diffusers_sigmas, time_grid)

from .parity import parity_arguments as _parity

__all__ = ["DiffSamplerScheduler", "DiffSamplerSchedulerOutput"]

_FINAL_SIGMAS = {"zero": "zero", "sigma_min": "last"}
FLOWMATCH_CLASS = "FlowMatchEulerDiscreteScheduler"
#: FlowMatchHeunDiscreteScheduler: the same grid (its shift), Heun in the flow's coordinates (heun, coordinates="flow"),
#: num_inference_steps counting its grid points (2n - 1 model calls) and diffusers' order 2
FLOWMATCH_HEUN = "FlowMatchHeunDiscreteScheduler"
#: IPNDMScheduler: its own schedule (`schedules.TrigVP`, the network given t in [0, 1]), its grid
#: (`schedules.ipndm_times`, first call at t = 1 where alpha = 0), a v-prediction network
IPNDM_CLASS = "IPNDMScheduler"
#: DPMSolverSDEScheduler: dpmpp_sde on its sigma-space grid (a K_CLASSES convention) with its Brownian noise: one
#: torchsde tree for the batch seeded by noise_sampler_seed, queried at the class's float32 noise levels
SDE_CLASS = "DPMSolverSDEScheduler"
#: EDMEulerScheduler: euler on its EDM grid (schedules.edm_sigmas), the network preconditioned as EDM
#: (schedules.EDMPrecond: c_in, c_noise; c_skip / c_out read as a v-prediction of x0 / sigma_data)
EDM_CLASS = "EDMEulerScheduler"
#: the EDM classes (EDMDPMSolverMultistepScheduler: the DPM-Solver++ mapping on the same preconditioning, its grid
#: ramp laid in float32)
EDM_DPM_CLASS = "EDMDPMSolverMultistepScheduler"
EDM_CLASSES = (EDM_CLASS, EDM_DPM_CLASS)
IPNDM_SPACING = "ipndm"
FLOWMATCH_SPACING = "flowmatch"  # the adapter's name for that class's grid (schedules.flowmatch_sigmas)
_PRED_ALIASES = {"flow_prediction": "flow"}
_DIFFUSERS_SPACINGS = DIFFUSERS_TIMESTEP_SPACINGS
#: what set_timesteps' num_inference_steps counts: model calls, or solver steps (diffusers' PNDM: n + 1 calls)
_BUDGETS = ("nfe", "steps")


def _diffusers_config_keys() -> frozenset:
    """The union of the config keys of diffusers' scheduler classes (their __init__ arguments)."""
    import diffusers.schedulers as schedulers

    names = [n for group in getattr(schedulers, "_import_structure", {}).values() for n in group
             if n.endswith("Scheduler")] or [n for n in dir(schedulers) if n.endswith("Scheduler")]
    keys: set = set()
    for n in names:
        try:
            cls = getattr(schedulers, n)
        except Exception:  # a class whose optional backend (flax, ...) is missing
            continue
        if isinstance(cls, type) and issubclass(cls, ConfigMixin):
            keys |= {k for k, p in inspect.signature(cls.__init__).parameters.items()
                     if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(keys)


_DIFFUSERS_KEYS = _diffusers_config_keys()


def _refuse_unknown_keywords(cls, kw: dict, solver, names) -> None:
    """TypeError naming the keywords that are neither `cls`'s, a solver option (`names`) nor a diffusers
    scheduler config key, with the nearest of `cls`'s own arguments."""
    unknown = sorted(k for k in kw if k not in _DIFFUSERS_KEYS and not (names and k in names))
    if not unknown:
        return
    import difflib

    ours = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs")]
    hints = "".join(f" ({k!r}: did you mean {m[0]!r}?)" for k in unknown
                    for m in [difflib.get_close_matches(k, ours, 1)] if m)
    opts = f"; options of solver {solver!r}: {sorted(names)}" if names else ""
    raise TypeError(f"{cls.__name__} got unexpected keyword argument(s) {unknown}: neither "
                    f"this class's nor a diffusers scheduler config key{opts}{hints}. Solver options "
                    f"go in solver_options={{...}}")


class _NoCalls:
    """The denoiser of a Stepper that only runs a plan's steps before its first model call."""

    def __init__(self, schedule):
        self.schedule = schedule

    def raise_if_nonfinite(self) -> None:
        pass


def _solver_option_names(solver) -> set | None:
    """The options a solver name takes (its factory's arguments); None if they cannot be listed."""
    from ..samplers import registry

    if not isinstance(solver, str):
        return None
    alias = registry.alias_of(solver)
    if alias is not None and alias.refused:  # refused naming it by get()
        return None
    if alias is not None:  # an A1111 / ComfyUI name takes its solver's options
        solver = alias.solver
    scheme = solver.split(":", 1)[0]
    if solver in registry._REGISTRY:
        factory, defaults = registry._REGISTRY[solver]
    elif scheme in registry._SCHEMES:
        factory, defaults = registry._SCHEMES[scheme][0], {}
    else:
        return None
    params = inspect.signature(factory).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return {k for k, p in params.items() if p.kind != p.VAR_POSITIONAL}


@dataclass
class DiffSamplerSchedulerOutput(BaseOutput):
    """prev_sample: the next model evaluation's input (x_{i+1} at the end of a solver step).
    pred_original_sample: the data prediction E[x0 | x_t] at this evaluation."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class DiffSamplerScheduler(SchedulerMixin, ConfigMixin):
    """A diffsampler solver (`solver`, one of `diffsampler.available()`) as a diffusers scheduler.

    Args:
        solver: registered solver name, or a solver plan as "plan:<name or YAML path>" (it brings its
            own time points and NFE; `spacing` is then unused); `solver_options` are passed to it
            (e.g. {"eta": 1.0}).  None (the default): `from_config` of a diffusers scheduler's config
            reproduces that scheduler (`pipelines.parity.solver_for_config`) or refuses by name what it
            cannot; a bare `DiffSamplerScheduler()` uses "dpmpp_2m".
        spacing: time spacing of the grid (`diffsampler.schedules.SPACINGS`); default: the source
            config's `timestep_spacing` if it has one, else "linspace".
        final: "zero" (end at sigma = 0) or "last" (end at the last grid time); default: from
            `final_sigmas_type` ("zero" -> "zero", "sigma_min" -> "last"), else "last" when
            `set_alpha_to_one` is False (DDIM/PNDM configs), else "zero".
        prediction_type: the network's parametrisation, "epsilon", "v_prediction", "sample" or
            "flow" (diffusers' "flow_prediction" is accepted); default "flow" for flow-matching
            configs, else "epsilon".
        num_train_timesteps, beta_*, trained_betas, rescale_betas_zero_snr: the discrete VP
            schedule (`DiscreteVP.from_diffusers_config`).  A flow-matching config (`shift`,
            `use_flow_sigmas`, or a FlowMatch* source class) gives
            `RectifiedFlow(time_scale=num_train_timesteps)` instead; `shift` / `flow_shift` then
            shift the grid as diffusers does (t -> s t / (1 + (s - 1) t)).
        convention: None, or one of diffusers' sigma-space classes (`schedules.K_CLASSES`: Euler,
            EulerAncestral, Heun, LMS, KDPM2, KDPM2Ancestral; set by `from_config` of such a class's
            config): follow that class's conventions -- the sample is x / alpha, `init_noise_sigma`,
            `scale_model_input`, `sigmas`, `order`, float32 `timesteps` and `add_noise` are the class's,
            `num_inference_steps` counts its steps, and the grid is its own (`schedules.diffusers_k_grid`
            from the config's keys; `spacing` is then refused).
        budget: what `num_inference_steps` in `set_timesteps` counts: "nfe" (default: model calls) or
            "steps" (grid steps, the model calls being what the solver spends on them: diffusers'
            PNDMScheduler makes n + 1 calls for n, and `from_config` of its config sets "steps").
        **kwargs: an option of `solver` (e.g. `eta=1.0` for "ddim", `order=1.5` for "ghvb"): applied
            and recorded in `solver_options`; any other key of a diffusers scheduler config: kept in
            the config, not used; anything else: TypeError naming it.

    `num_inference_steps` in `set_timesteps` is the budget of model calls (NFE), not of steps
    (unless budget="steps").
    """

    config_name = "scheduler_config.json"
    #: solvers whose first step can start at t = 1 (alpha = 0) of a flow: the data-form first-order step
    _T1_SOLVERS = ("ddim", "euler")
    _source_keys: dict | None = None
    _compatibles: list = []  # diffusers resolves compatibles by class name inside diffusers only
    _FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                     "FlowMatchLCMScheduler")

    @register_to_config
    def __init__(
        self,
        solver: str | None = None,
        spacing: str | None = None,
        final: str | None = None,
        solver_options: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str | None = None,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str | None = None,
        set_alpha_to_one: bool | None = None,
        shift: float | None = None,
        use_flow_sigmas: bool = False,
        flow_shift: float | None = None,
        use_dynamic_shifting: bool = False,
        schedule_type: str | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        convention: str | None = None,
        budget: str = "nfe",
        **kwargs,
    ):
        source_keys = DiffSamplerScheduler._source_keys or {}  # from_config: the source config's other keys
        DiffSamplerScheduler._source_keys = None
        solver_options = self._route_keywords(solver, solver_options, kwargs)
        if source_keys:
            self.register_to_config(**{k: v for k, v in source_keys.items() if k not in self.config})
        if budget not in _BUDGETS:
            raise ValueError(f"budget must be one of {_BUDGETS}, got {budget!r}")
        # -- schedule -------------------------------------------------------------------------
        if schedule_type not in (None, "vp", "flow"):
            raise ValueError(f"schedule_type must be None, 'vp' or 'flow', got {schedule_type!r}")
        pred = _PRED_ALIASES.get(prediction_type, prediction_type)
        self.is_flow = schedule_type == "flow" or bool(use_flow_sigmas) or shift is not None or (
            schedule_type is None and pred == "flow")
        # FlowMatchEulerDiscreteScheduler's grid (`flowmatch_sigmas`): its conventions and its first time t = 1
        self.flowmatch = convention in (FLOWMATCH_CLASS, FLOWMATCH_HEUN)
        self.flow_class = convention if self.flowmatch else None
        if self.flowmatch and schedule_type not in (None, "flow"):
            raise ValueError(f"convention={convention!r} needs the flow schedule, got schedule_type={schedule_type!r}")
        if self.flowmatch:
            self.is_flow = True
        if self.is_flow:
            # t = 1 (alpha = 0) is reachable by the data-form first-order step only (flow Euler = DDIM)
            t1 = solver in self._T1_SOLVERS or (solver == "heun" and (solver_options or {}).get("coordinates") == "flow")
            t_max = 1.0 if self.flowmatch and t1 else 0.999
            # the class's grid may end below 1e-3 (time_shift_type='linear' with mu, shift_terminal): its range is (0, 1]
            t_min = 1e-6 if self.flowmatch else 1e-3
            self.schedule = RectifiedFlow(t_min=t_min, t_max=t_max, time_scale=float(num_train_timesteps))
            pred = pred or "flow"
        elif convention in EDM_CLASSES:
            if schedule_type not in (None, "vp") or trained_betas is not None:
                raise ValueError(f"convention={convention!r} is EDM's preconditioned network (sigma_min, sigma_max, "
                                 "sigma_data); schedule_type / trained_betas cannot apply")
            if pred not in (None, "epsilon", "v_prediction"):
                raise ValueError(f"{convention}: prediction_type={prediction_type!r} cannot be reproduced (supported: "
                                 "'epsilon', 'v_prediction', the class's c_out signs)")
            c = self.config
            self.schedule = EDMPrecond(c.get("sigma_data", 0.5), c.get("sigma_min", 0.002), c.get("sigma_max", 80.0))
            # D = c_skip x + c_out F: F is the v-prediction of x0 / sigma_data ("v_prediction"), or minus it ("epsilon")
            self._edm_sign = -1.0 if pred in (None, "epsilon") else 1.0
            pred = "v_prediction"
        elif convention == IPNDM_CLASS:
            if schedule_type not in (None, "vp") or trained_betas is not None:
                raise ValueError(f"convention={convention!r} is that class's own trigonometric schedule (alpha = "
                                 "cos(pi t / 2)); schedule_type / trained_betas cannot apply")
            self.schedule = TrigVP()
            pred = pred or "v_prediction"  # the class converts the output as a v-prediction: eps = sigma x + alpha v
        else:
            self.schedule = DiscreteVP.from_diffusers_config(dict(
                num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                beta_schedule=beta_schedule, trained_betas=trained_betas,
                rescale_betas_zero_snr=rescale_betas_zero_snr))
            pred = pred or "epsilon"
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; allowed: "
                             f"{PREDICTION_TYPES + tuple(_PRED_ALIASES)}")
        # validates the flow/schedule pairing with the same rules the samplers use
        self._denoiser = self.transform_denoiser(Denoiser(self._emit, self.schedule, pred))
        self.prediction_kind = pred
        # -- solver, grid ---------------------------------------------------------------------
        if solver is None:  # from_config of a diffusers config names the solver that reproduces it
            solver = "dpmpp_2m"
            self.register_to_config(solver=solver)
        self.solver = get(solver, **dict(solver_options or {}))  # ValueError for unknown names/options
        if getattr(self.solver, "adaptive", False):
            raise ValueError(f"solver {solver!r} chooses its step sizes while it samples (error control: each step's "
                             "size follows the last step's error, and rejected steps are redone); diffusers' "
                             "set_timesteps fixes the timesteps before the first model call, so a pipeline's loop "
                             "cannot drive it: use diffsampler.sample() with denoiser_from_pipeline(pipe)")
        fixed = self.solver.alias_spacing  # an A1111 name with its schedule ("DPM++ 2M Karras")
        spacing = canonical_spacing(spacing)  # A1111's schedule-type labels ("Karras", ...)
        if fixed is not None and spacing not in (None, fixed):
            raise ValueError(f"solver {solver!r} fixes spacing={fixed!r}; spacing={spacing!r} cannot apply (drop "
                             f"it, or name the sampler without its schedule: solver={self.solver.name!r})")
        if self.flowmatch and spacing is None and fixed is None:
            spacing = FLOWMATCH_SPACING  # the class's own grid, with its shift / grid keys
        elif convention == IPNDM_CLASS and spacing is None and fixed is None:
            spacing = IPNDM_SPACING
        elif spacing is None and fixed is None and convention is None:
            spacing = self._sigma_grid_key()  # a source's use_karras_sigmas etc.: the same grid
        spacing = spacing or fixed or timestep_spacing or "linspace"
        if self.is_flow and spacing in _DIFFUSERS_SPACINGS:
            spacing = "time_uniform"  # integer-timestep spacings exist for discrete VP schedules only
        if spacing == IPNDM_SPACING and convention != IPNDM_CLASS:
            raise ValueError(f"spacing {IPNDM_SPACING!r} is {IPNDM_CLASS}'s grid on its schedule: convention={IPNDM_CLASS!r}")
        if spacing not in SPACINGS and spacing not in (FLOWMATCH_SPACING, IPNDM_SPACING):
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
        self.spacing = spacing
        if final is None:
            if final_sigmas_type is not None:
                if final_sigmas_type not in _FINAL_SIGMAS:
                    raise ValueError(f"unsupported final_sigmas_type {final_sigmas_type!r}; allowed: {tuple(_FINAL_SIGMAS)}")
                final = _FINAL_SIGMAS[final_sigmas_type]
            else:
                final = "last" if set_alpha_to_one is False else "zero"
        if final not in ("zero", "last"):
            raise ValueError(f"final must be 'zero' or 'last', got {final!r}")
        self.final = final
        self.grid_shift = shift if shift is not None else (flow_shift if use_flow_sigmas else None)
        self._prior_std = float(self.schedule.prior_std)
        self.convention = self._check_convention(convention, self.config.spacing)
        if convention == IPNDM_CLASS and self.spacing == IPNDM_SPACING:
            self._check_starts_at_pure_noise()
        # pipelines read `order` as model calls per entry of `timesteps` (warm-up counts, img2img's
        # set_begin_index(t_start * order)); ours has one entry per model call, except under a
        # two-call class's convention (Heun, KDPM2: diffusers' order 2, num_inference_steps = steps)
        self.order = int(self.solver.nfe_per_step) if self.convention or convention == FLOWMATCH_HEUN else 1
        self.solver_order = int(self.solver.order)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.plan: Plan | None = None
        self._begin_index: int | None = None
        self._offset = 0
        self._reset_state()

    def _route_keywords(self, solver, solver_options: dict | None, kwargs: dict) -> dict | None:
        """Keywords beyond the named arguments: a solver option of `solver` given at top level joins
        `solver_options` (the config records it there); a diffusers scheduler config key is kept in
        the config (save/load round trip) and otherwise unused; anything else is a TypeError."""
        kw = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        names = _solver_option_names(solver)
        moved = {k: kw.pop(k) for k in list(kw) if names is not None and k in names}
        _refuse_unknown_keywords(type(self), kw, solver, names)
        if kw:
            self.register_to_config(**kw)
        if not moved:
            return solver_options
        given = dict(solver_options or {})
        clash = sorted(k for k in moved if k in given and given[k] != moved[k])
        if clash:
            raise ValueError(f"solver option(s) {clash} given both at top level and in solver_options with "
                             "different values")
        merged = {**given, **moved}
        from diffusers.configuration_utils import FrozenDict

        # recorded where they belong: a saved config reloads with the same solver options
        self._internal_dict = FrozenDict({**{k: v for k, v in self._internal_dict.items() if k not in moved},
                                          "solver_options": merged})
        return merged

    #: the config keys of a sigma-space class's grid (diffusers_k_grid) and the classes that have each
    _K_KEYS = {"interpolation_type": ("EulerDiscreteScheduler",), "sigma_min": ("EulerDiscreteScheduler",),
               "sigma_max": ("EulerDiscreteScheduler",), "timestep_type": ("EulerDiscreteScheduler",),
               "use_karras_sigmas": K_CLASSES[:1] + K_CLASSES[2:], "use_exponential_sigmas": K_CLASSES[:1] + K_CLASSES[2:],
               "use_beta_sigmas": K_CLASSES[:1] + K_CLASSES[2:]}
    _K_DEFAULTS = {"interpolation_type": "linear", "sigma_min": None, "sigma_max": None, "timestep_type": "discrete",
                   "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

    def _check_convention(self, convention, spacing):
        """`convention`: None, or a diffusers sigma-space class (schedules.K_CLASSES) whose conventions the
        adapter follows: the sample is x / alpha (k-diffusion's x = x0 + sigma eps, sigma = sigma_t /
        alpha_t), `init_noise_sigma` and `scale_model_input` (divide by sqrt(sigma^2 + 1)) as that class,
        `num_inference_steps` counts its steps (Heun, KDPM2: 2n - 1 model calls), `timesteps` float32,
        `add_noise` = x0 + sigma eps at the class's sigma of the timestep, and the grid is the class's
        (`schedules.diffusers_k_grid`, from the config's timestep_spacing, steps_offset, final_sigmas_type,
        interpolation_type, use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, sigma_min,
        sigma_max, timestep_type)."""
        if convention is None:
            return None
        if convention == FLOWMATCH_HEUN and (self.config.budget != "steps" or getattr(self.solver, "coordinates", None)
                                             != "flow"):
            raise ValueError(f"convention={convention!r} is the class's Heun step on its grid: solver='heun' with "
                             "solver_options={'coordinates': 'flow'} and budget='steps' (num_inference_steps counts "
                             "its grid points, 2n - 1 model calls), as from_config of its config sets")
        if convention in EDM_CLASSES:
            if spacing is not None:
                raise ValueError(f"spacing={spacing!r} cannot apply with convention={convention!r}: the grid is the "
                                 "class's own (sigma_schedule, sigma_min, sigma_max, rho)")
            self._edm_class = convention
            self._edm_levels(2)  # the grid's keys are checked now
            return convention
        if convention == IPNDM_CLASS:
            if self.final != "zero":
                raise ValueError(f"final={self.final!r} cannot apply with convention={convention!r}: its grid ends "
                                 "at sigma = 0")
            return None  # the schedule and grid are the class's; its sample, timesteps and sigmas are ours
        if convention in (FLOWMATCH_CLASS, FLOWMATCH_HEUN):
            self._check_flowmatch()
            return None  # self.flowmatch: the sample, timesteps and sigmas are already the flow class's
        if convention not in K_CLASSES:
            raise ValueError(f"convention must be None or one of {K_CLASSES + (FLOWMATCH_CLASS, FLOWMATCH_HEUN, IPNDM_CLASS) + EDM_CLASSES}, "
                             f"got {convention!r}")
        if self.is_flow:
            raise ValueError(f"convention={convention!r} needs a discrete VP schedule; this config is a flow schedule")
        if spacing is not None:
            raise ValueError(f"spacing={spacing!r} cannot apply with convention={convention!r}: the grid is "
                             f"{convention}'s own (timestep_spacing and the use_*_sigmas keys choose it)")
        c = self.config
        for key, classes in self._K_KEYS.items():
            v = c.get(key, self._K_DEFAULTS[key])
            if v != self._K_DEFAULTS[key] and convention not in classes:
                raise ValueError(f"{key}={v!r} cannot apply with convention={convention!r}: it is a key of "
                                 f"{', '.join(classes)} only")
        if self.final != "zero" and convention != "EulerDiscreteScheduler":
            raise ValueError(f"final={self.final!r} (final_sigmas_type='sigma_min') cannot apply with "
                             f"convention={convention!r}: its grid always ends at sigma = 0")
        if sum(bool(c.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be True")
        if c.get("timestep_type", "discrete") not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type must be 'discrete' or 'continuous', got {c.get('timestep_type')!r}")
        self._k_grid_kwargs(convention, 2)  # the grid's keys are checked now, not at set_timesteps
        return convention

    #: diffusers' use_*_sigmas keys (in its order of precedence) and the spacings of the same grids
    _SIGMA_KEYS = (("use_karras_sigmas", "diffusers_karras"), ("use_lu_lambdas", "diffusers_lu"),
                   ("use_exponential_sigmas", "diffusers_exponential"), ("use_beta_sigmas", "diffusers_beta"))

    def _sigma_grid_key(self) -> str | None:
        """The spacing a config's use_karras_sigmas / use_lu_lambdas / use_exponential_sigmas / use_beta_sigmas
        names (the grid diffusers lays with it); None when none is set.  On a flow schedule (other than
        FlowMatchEuler's own grid) they are refused by name."""
        c = self.config
        on = [k for k, _ in self._SIGMA_KEYS if c.get(k)]
        if not on:
            return None
        if self.is_flow:
            raise ValueError(f"{on[0]}=True cannot be honoured on this flow schedule (diffsampler lays these grids on "
                             "discrete VP schedules, and on FlowMatchEulerDiscreteScheduler's own grid); pass "
                             "spacing= to choose the grid")
        return dict(self._SIGMA_KEYS)[on[0]]

    def _check_starts_at_pure_noise(self) -> None:
        """IPNDMScheduler's grid starts at alpha = 0: a solver whose coefficients divide by alpha there (the eps-form
        Heun, DEIS, LMS, DPM-2, ancestral steps) is refused by name now, not at set_timesteps."""
        try:
            plan = make_plan(self.solver, self.schedule, grid=self._grid(4, None))
            ok = all(math.isfinite(c) for st in plan.steps for cb in (st.update, *(ev.x for ev in st.evals))
                     for c in (cb.cx, *(w for _, w in cb.terms), *(w for _, w in cb.noise))) and all(
                     math.isfinite(st.noise) for st in plan.steps)
        except (ZeroDivisionError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"solver {self.config.solver!r} cannot start at {IPNDM_CLASS}'s first time t = 1, where "
                             "alpha = 0 (pure noise): its coefficients divide by alpha there; solvers that can: "
                             "pndm (the class's own method), ipndm, ddim, euler, plms, dpmpp_2m, dpmpp_3m, unipc, ...")

    def _check_flowmatch(self) -> None:
        """The FlowMatchEulerDiscreteScheduler keys its grid cannot honour are refused by name."""
        c = self.config
        if self.final != "zero":
            raise ValueError(f"final={self.final!r} cannot apply with convention={FLOWMATCH_CLASS!r}: its grid "
                             "always ends at sigma = 0")
        if c.get("invert_sigmas"):
            raise ValueError(f"invert_sigmas=True cannot be reproduced by diffsampler ({FLOWMATCH_CLASS}, Mochi): the "
                             "network is then given 1 - t and its output integrated with the opposite sign, a time "
                             "convention the adapter does not implement (supported: invert_sigmas=False)")
        if self.spacing == FLOWMATCH_SPACING:
            flowmatch_sigmas(dict(c), 2, mu=0.0)  # the grid's keys are checked now, not at set_timesteps

    def _k_grid_kwargs(self, convention: str, steps: int) -> tuple:
        c = self.config
        which = [k for k in ("karras", "exponential", "beta") if c.get(f"use_{k}_sigmas")]
        return diffusers_k_grid(
            self.schedule, steps, convention, timestep_spacing=c.timestep_spacing or "linspace",
            steps_offset=int(c.steps_offset or 0), interpolation_type=c.get("interpolation_type", "linear"),
            sigmas=which[0] if which else None, sigma_min=c.get("sigma_min"), sigma_max=c.get("sigma_max"),
            final_sigmas_type="zero" if self.final == "zero" else "sigma_min")

    @property
    def init_noise_sigma(self):
        """Std of x_T: the schedule's prior std; under a sigma-space class's convention that class's
        (its largest sigma for timestep_spacing linspace / trailing, sqrt(sigma_max^2 + 1) otherwise)."""
        if not self.__dict__.get("convention"):
            return self._prior_std
        if self.convention in EDM_CLASSES:  # the class's own value (not sigma_max's data-scaled std)
            return (float(self.config.get("sigma_max", 80.0)) ** 2 + 1) ** 0.5
        top = self.__dict__.get("_k_sigma_max")
        if top is None:  # before set_timesteps: the training table's largest sigma, as the classes' __init__
            acp = self.schedule.alphas_cumprod.to(torch.float32)
            top = (((1 - acp) / acp) ** 0.5).max()
        return top if (self.config.timestep_spacing or "linspace") in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def transform_denoiser(self, den: Denoiser) -> Denoiser:
        """The config's data-prediction transforms: dynamic thresholding (`thresholding`) or static
        clipping (`clip_sample`, DDPM/DDIM configs), as diffusers applies them."""
        c = self.config
        if c.thresholding:
            return Thresholded(den, c.dynamic_thresholding_ratio, c.sample_max_value)
        if c.clip_sample:
            return Thresholded(den, max_value=c.clip_sample_range, dynamic=False)
        return den

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As ConfigMixin.from_config, for this class's own configs and any diffusers scheduler's.

        A foreign config is read with its class's defaults made explicit (its `timestep_spacing`,
        `final_sigmas_type`... count even where they were defaults there); a FlowMatch* class or a
        `shift` key selects the flow schedule; keys this class does not use are kept in its
        config (no "not expected" warning) but do nothing."""
        source = type(config).__name__ if isinstance(config, SchedulerMixin) else None
        if config is not None and not isinstance(config, dict):  # e.g. a scheduler instance
            config = getattr(config, "config", config)
        if not isinstance(config, dict):
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        name = config.get("_class_name")
        # a foreign class's defaults count as its values; our own config keeps its default markers
        cfg = dict(config) if name == cls.__name__ else {k: v for k, v in config.items() if k != "_use_default_values"}
        if (isinstance(name, str) and name.startswith("FlowMatch")) or cfg.get("shift") is not None:
            kwargs.setdefault("schedule_type", "flow")
        from .parity import source_class

        src = name or source or source_class(cfg)
        named = kwargs.get("solver") is not None or cfg.get("solver") is not None
        if (src == FLOWMATCH_CLASS or (src == FLOWMATCH_HEUN and named)) and kwargs.get("spacing") is None:
            kwargs.setdefault("convention", FLOWMATCH_CLASS)  # a named solver keeps the class's grid too
        if src in (IPNDM_CLASS, *EDM_CLASSES):
            kwargs.setdefault("convention", src)  # its schedule (EDM: its preconditioning), whatever the solver
        if name != cls.__name__ and kwargs.get("solver") is None and cfg.get("solver") is None:
            # a misspelt keyword is named before the source scheduler is mapped
            _refuse_unknown_keywords(cls, {k: v for k, v in kwargs.items() if k not in known and not k.startswith("_")},
                                     None, None)
            for k, v in _parity(cfg, kwargs, source).items():  # parity by default: the source's own method
                if k == "solver_options" and isinstance(kwargs.get(k), dict):
                    kwargs[k] = {**v, **kwargs[k]}  # the caller's options on top of the mapped ones
                else:
                    kwargs.setdefault(k, v)
        if name == "DEISMultistepScheduler" and "final" not in cfg:
            kwargs.setdefault("final", "last")  # DEIS always ends at sigma_min
        foreign = {k: v for k, v in cfg.items() if k not in known and not k.startswith("_")}
        # the caller's own keywords beyond ours are routed by __init__: solver options, diffusers keys, or refused
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in known and not k.startswith("_")}
        cfg = {k: v for k, v in cfg.items() if k in known or k.startswith("_")}
        out = super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)
        model = out[0] if return_unused_kwargs else out
        if extra or foreign:
            # built again with the source's other keys in its config from the start, so that __init__ reads
            # them (use_karras_sigmas, FlowMatch's invert_sigmas...); they are not routed as solver options
            # (handed over beside the call: diffusers' register_to_config drops "_" keywords)
            DiffSamplerScheduler._source_keys = {k: v for k, v in foreign.items() if k not in extra}
            hidden = {k: v for k, v in model.config.items() if k.startswith("_")}  # _class_name, _use_default_values
            try:
                model = cls(**{k: v for k, v in model.config.items() if k in known}, **extra)
            finally:
                DiffSamplerScheduler._source_keys = None
            if hidden:
                # as after ConfigMixin.from_config: _class_name, and the keys left at their defaults marked so
                # (a diffusers class built from this config later takes its own defaults for them)
                from diffusers.configuration_utils import FrozenDict

                model._internal_dict = FrozenDict({**model._internal_dict, **hidden})
            out = (model, *out[1:]) if return_unused_kwargs else model
        model.register_to_config(**{k: v for k, v in foreign.items() if k not in model.config})
        return out

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """Index of the next model evaluation into `timesteps` (None before the first step)."""
        return None if self._stepper is None else self._offset + self._stepper.n

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at model call `begin_index` of `timesteps` (img2img), after `set_timesteps`.

        At the first call of a solver step the plan is rebuilt on the remaining grid points
        (multistep solvers warm up again there, as diffusers' do).  Inside a multi-call step
        (heun, dpmpp_2s) the remaining `len(timesteps) - begin_index` calls are re-gridded from
        that call's time, and `timesteps[begin_index:]` is rewritten in place, so the pipeline's
        slice of it follows."""
        self._begin_index = int(begin_index)
        if self.__dict__.get("convention") == "LMSDiscreteScheduler" and self._begin_index > 0:
            warnings.warn(f"LMSDiscreteScheduler started at step {self._begin_index} steps with its order-"
                          f"{min(self._begin_index + 1, 4)} coefficients on the one derivative it has (a truncated "
                          "sum); lms warms up again from order 1 there, so an img2img run differs from diffusers'",
                          stacklevel=2)
        if self.plan is not None:
            self._apply_begin_index()

    def _reset_state(self) -> None:
        self._stepper: Stepper | None = None  # the run of the plan, from the first `step`
        self._next: tuple | None = None       # the stepper's next model call: (y, t_model, alpha, sigma, kind)
        self._generator = None
        self._pending: torch.Tensor | None = None
        self._moved_first = False             # scale_model_input gave the first call's moved input

    # ------------------------------------------------------------------------------------------
    def _shift(self, t: torch.Tensor, mu: float | None) -> torch.Tensor:
        if not self.is_flow:
            return t
        if self.config.use_dynamic_shifting and mu is not None:  # exponential time shift (Flux, SD3)
            return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
        s = self.grid_shift
        if s is None or s == 1.0:
            return t
        return s * t / (1.0 + (s - 1.0) * t)

    def _grid(self, steps: int, mu: float | None) -> TimeGrid:
        spacing: Any = self.spacing
        if spacing in _DIFFUSERS_SPACINGS and self.config.steps_offset:
            spacing = {"name": spacing, "steps_offset": int(self.config.steps_offset)}
        kw = spacing if isinstance(spacing, dict) else {"name": spacing}
        kw = dict(kw)
        clip = self.config.get("lambda_min_clipped")
        if clip is not None and clip > -math.inf and kw["name"] in ("linspace", "leading", "trailing"):
            # a DPMSolverMultistep config's clipped log-SNR: its grid stops short of the timesteps past the clip
            kw["last_timestep"] = diffusers_last_timestep(self.schedule, clip)
        if kw["name"] == FLOWMATCH_SPACING:
            return self._flowmatch_grid(steps, mu=mu)
        if kw["name"] == IPNDM_SPACING:  # IPNDMScheduler's float32 times, then sigma = 0
            return TimeGrid.from_times(self.schedule, torch.from_numpy(ipndm_times(steps)), final_zero=True)
        if kw["name"] in DIFFUSERS_SIGMA_SPACINGS:
            return self._sigma_space_grid(steps, kw["name"])
        grid = time_grid(self.schedule, steps, kw.pop("name"), final=self.final, **kw)
        if self.is_flow and (self.grid_shift not in (None, 1.0) or (self.config.use_dynamic_shifting and mu is not None)):
            n = grid.steps if self.final == "zero" else grid.steps + 1
            t = self._shift(grid.t[:n], mu).clamp(self.schedule.t_min, self.schedule.t_max)
            grid = TimeGrid.from_times(self.schedule, t, self.final == "zero")
        return grid

    def _flowmatch_grid(self, steps: int | None, sigmas=None, timesteps=None, mu=None) -> TimeGrid:
        """FlowMatchEulerDiscreteScheduler's grid (`schedules.flowmatch_sigmas` of this config): its `steps`
        flow times, then t = 0.  The network is given diffusers' timesteps (sigma * T, or `timesteps` as
        given).  A solver that cannot start at t = 1 starts at the schedule's t_max (0.999) instead."""
        c = dict(self.config)
        s, t_model = flowmatch_sigmas(c, steps, sigmas=sigmas, timesteps=timesteps, mu=mu)
        sch = self.schedule
        t = torch.as_tensor(s).clamp(max=sch.t_max)
        if bool((t < sch.t_min * (1 - 1e-6)).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{FLOWMATCH_CLASS}'s grid {s.tolist()} leaves the flow schedule's range "
                             f"[{sch.t_min}, {sch.t_max}]")
        t = t.clamp(min=sch.t_min)
        grid = TimeGrid.from_times(sch, t, final_zero=True)
        if timesteps is not None:
            self.__dict__["_grid_model_t"] = torch.as_tensor(t_model)
        return grid

    def _sigma_space_grid(self, steps: int, name: str) -> TimeGrid:
        """diffusers' `steps` model calls of a use_*_sigmas grid: at its float32 sigmas, the network
        given diffusers' integer timesteps (rounded for karras / lu except with squaredcos_cap_v2,
        else truncated).  With final "last" diffusers' last call, at sigma_min, steps from sigma_min
        to sigma_min (no change of x): the grid ends at sigma_min and that call is not made."""
        last = self.final == "last"
        # a solver that calls the model at the grid's last point (sa_solver's final_corrector) makes that
        # zero-length call: `steps` grid steps, then diffusers' last timestep
        at_end = last and bool(getattr(self.solver, "final_corrector", False))
        if at_end:
            steps += 1
        if last and steps < 2:
            raise ValueError(f"spacing {name!r} with final='last' needs at least 2 model calls, got {steps}")
        grid = time_grid(self.schedule, steps - 1 if last else steps, name, final=self.final)
        _, t = diffusers_sigmas(self.schedule, steps, name)
        rounded = name in ("diffusers_karras", "diffusers_lu") and self.config.beta_schedule != "squaredcos_cap_v2"
        t = np.round(t) if rounded else np.trunc(t)
        self.__dict__["_grid_model_t"] = torch.tensor(t[:grid.steps + at_end], dtype=torch.float64)
        return grid

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Compile the plan.  `num_inference_steps` is the NFE budget (model calls).  `timesteps`
        (model times, decreasing) or `sigmas` (diffusers' sigmas: sigma/alpha for VP, t for flow;
        a trailing 0 means "end at sigma = 0") give an explicit grid instead; `mu` is the dynamic
        shift of flow models (with `use_dynamic_shifting`)."""
        if sum(a is not None for a in (num_inference_steps, timesteps, sigmas)) == 0:
            raise ValueError("give num_inference_steps (the NFE budget), timesteps or sigmas")
        if timesteps is not None and sigmas is not None:
            raise ValueError("give only one of timesteps and sigmas")
        grid = None
        final = self.final
        self.__dict__["_grid_model_t"] = None
        if self.__dict__.get("convention") in EDM_CLASSES and (timesteps is not None or sigmas is not None):
            raise ValueError(f"{self.convention}.set_timesteps(sigmas=...) takes a ramp in [0, 1] of its sigma_schedule, "
                             "which the adapter does not reproduce; give num_inference_steps")
        if self.flow_class == FLOWMATCH_HEUN and (timesteps is not None or sigmas is not None or mu is not None):
            raise ValueError(f"{FLOWMATCH_HEUN}.set_timesteps takes num_inference_steps only (no timesteps=, sigmas= "
                             "or mu=); its grid is the shifted linspace of its config")
        if (timesteps is not None or sigmas is not None) and self.spacing == FLOWMATCH_SPACING:
            # as FlowMatchEulerDiscreteScheduler: the given sigmas (or timesteps / T) go through its shift,
            # shift_terminal and use_*_sigmas; the timesteps given are the network's as they are
            if sigmas is not None:
                s = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
                sigmas = s[:-1] if len(s) > 1 and s[-1] == 0.0 else s  # diffusers appends the 0 itself
                if timesteps is not None:
                    raise ValueError("give only one of timesteps and sigmas")
            elif isinstance(timesteps, torch.Tensor):
                timesteps = timesteps.detach().cpu().numpy()
            grid = self._flowmatch_grid(None, sigmas=sigmas, timesteps=timesteps, mu=mu)
            plan = make_plan(self.solver, self.schedule, grid=grid)
            if timesteps is not None and plan.nfe != len(timesteps):
                raise ValueError(f"solver {self.config.solver!r} makes {plan.nfe} model calls on the {len(timesteps)} "
                                 "timesteps given (one per call is needed): pass sigmas= instead")
            if num_inference_steps is not None and plan.nfe != num_inference_steps:
                raise ValueError(f"the explicit grid costs {plan.nfe} model calls, num_inference_steps={num_inference_steps}")
        elif timesteps is not None or sigmas is not None:
            if sigmas is not None:
                s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64) if not isinstance(sigmas, torch.Tensor)
                                    else sigmas.detach().cpu().double()).flatten()
                if len(s) and float(s[-1]) == 0.0:
                    s, final = s[:-1], "zero"
                elif len(s) > 2 and float(s[-1]) == float(s[-2]):
                    # diffusers' final_sigmas_type="sigma_min" list: its last step, sigma_min to sigma_min,
                    # leaves x as it is; the grid ends at sigma_min without it
                    s, final = s[:-1], "last"
                if self.is_flow:
                    t = self._shift(s, mu).clamp(self.schedule.t_min, self.schedule.t_max)
                else:
                    t = self._within_range(self.schedule.t_from_lambda(-s.log()), "sigmas", s)
            else:
                t = (timesteps.detach().cpu().double() if isinstance(timesteps, torch.Tensor)
                     else torch.as_tensor(np.asarray(timesteps, dtype=np.float64))).flatten() / self.schedule.time_scale
                t = self._within_range(t, "timesteps", t * self.schedule.time_scale)
            steps = len(t) if final == "zero" else len(t) - 1
            grid = time_grid(self.schedule, steps, t, final=final)
            plan = make_plan(self.solver, self.schedule, grid=grid)
            if num_inference_steps is not None and plan.nfe != num_inference_steps:
                raise ValueError(f"the explicit grid costs {plan.nfe} model calls, num_inference_steps={num_inference_steps}")
        elif self.convention:
            plan = self._k_plan(num_inference_steps)
        else:
            own_grid = getattr(self.solver, "own_grid", None)  # a solver plan brings its own time points and end
            if own_grid is not None:
                final = self.solver.plan.final
            by_steps = self.config.budget == "steps" and own_grid is None
            if by_steps:
                if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
                    raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
                steps = int(num_inference_steps)
            else:
                steps = self.solver.steps_for_nfe(num_inference_steps, final_zero=(final == "zero"))
            grid = own_grid(self.schedule) if own_grid is not None else self._grid(steps, mu)
            fewer = by_steps or (self.__dict__.get("_grid_model_t") is not None and final == "last")
            plan = make_plan(self.solver, self.schedule, None if fewer else num_inference_steps, grid=grid)
        self._full_plan = plan
        self.__dict__["_call_grid"] = grid  # the grid given to the solver (set_begin_index: `build_from`)
        if self.convention:
            self.num_inference_steps = num_inference_steps or len(plan.steps)
        elif self.config.budget == "steps" and timesteps is None and sigmas is None:
            self.num_inference_steps = num_inference_steps  # diffusers' count of steps (PNDM: n + 1 calls)
        else:
            self.num_inference_steps = plan.nfe
        self._set_plan(plan)
        self._denoiser.start_run()  # finite flags of an earlier (aborted) trajectory are not this one's
        # diffusers' dtype: int64 where a discrete schedule's model times are all integers and each step
        # makes one model call (as DDIM, DPM-Solver, UniPC); float32 otherwise (as Heun, flow schedules)
        one_call = getattr(self.solver, "timesteps_int64", False) or (all(len(st.evals) == 1 for st in plan.steps) and (
            getattr(self.solver, "own_grid", None) is not None or self.solver.steps_for_nfe(4, final_zero=True) == 4))
        integral = (isinstance(self.schedule, DiscreteVP) and one_call
                    and bool((self._t_model64 == self._t_model64.round()).all()))
        if self.convention:  # the sigma-space classes' timesteps are float32
            integral = False
        self.timesteps = (self._t_model64.round().long() if integral else self._t_model).to(device, copy=True)
        self._sigmas = self._sigmas_of(plan).to(device)
        if self.convention:
            self.__dict__["_k_sigma_max"] = self._sigmas.max().cpu()
        self._offset = 0
        self._begin_index = None  # as diffusers: a new schedule starts at its first call

    def _k_plan(self, steps: int) -> Plan:
        """The plan on the convention class's grid of `steps` steps: its grid points at the class's
        float32 sigmas, each model call given the class's timestep (midpoints: `diffusers_sigma_to_t` of
        the midpoint's sigma; timestep_type="continuous": 0.25 log sigma).  A last step of zero length
        (final_sigmas_type="sigma_min" ending at the last sigma, where diffusers' call changes nothing)
        is not made."""
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer (the number of {self.convention} "
                             f"steps), got {steps!r}")
        if self.convention in EDM_CLASSES:
            return self._edm_plan(int(steps))
        sig, ts, end = self._k_grid_kwargs(self.convention, int(steps))
        self.__dict__["_k_levels"] = np.append(sig, end)  # the class's float32 noise levels (DPMSolverSDE's tree)
        if end > 0 and np.float32(end) == np.float32(sig[-1]):
            if len(sig) < 2:
                raise ValueError("one step from sigma_min to sigma_min: nothing to sample")
            sig, ts = sig[:-1], ts[:-1]
        sch = self.schedule
        s = torch.as_tensor(np.append(sig, end) if end > 0 else sig)
        t = self._within_range(sch.t_from_lambda(-s.log()), "sigmas", s)
        grid = TimeGrid.from_times(sch, t, final_zero=end == 0)
        plan = make_plan(self.solver, sch, grid=grid)
        acp = sch.alphas_cumprod.to(torch.float32)
        log_table = np.log(np.array(((1 - acp) / acp) ** 0.5))
        continuous = self.config.get("timestep_type", "discrete") == "continuous" and self.prediction_kind == "v_prediction"
        midpoints = self.convention.startswith(("KDPM2", SDE_CLASS))  # second calls at midpoints, even where
        model_t = []                                     # one coincides with the next point (eta = 1)
        for i, st in enumerate(plan.steps):
            for k, ev in enumerate(st.evals):
                rho32 = np.float32(ev.sigma / ev.alpha)
                if continuous:
                    model_t.append(float(0.25 * torch.tensor(rho32).log()))
                elif k == 0:
                    model_t.append(float(ts[i]))
                elif not midpoints and ev.t == float(grid.t[i + 1]) and i + 1 < len(ts):  # Heun's second call
                    model_t.append(float(ts[i + 1]))
                else:  # an intermediate point (DPM-2's midpoint): diffusers' _sigma_to_t of its sigma
                    model_t.append(float(diffusers_sigma_to_t(np.array([rho32]), log_table)[0]))
        self.__dict__["_grid_model_t"] = torch.tensor(model_t, dtype=torch.float64)
        return plan

    def _edm_levels(self, steps: int) -> tuple[np.ndarray, float]:
        """EDMEulerScheduler's float32 noise levels for `steps` steps and its end (0, or sigma_min's level)."""
        c = self.config
        dpm = self.__dict__.get("convention", None) == EDM_DPM_CLASS or getattr(self, "_edm_class", None) == EDM_DPM_CLASS
        sig = edm_sigmas(steps, float(c.get("sigma_min", 0.002)), float(c.get("sigma_max", 80.0)),
                         float(c.get("rho", 7.0)), c.get("sigma_schedule", "karras"),
                         ramp_dtype=torch.float32 if dpm else torch.float64)
        if self.final == "zero":
            return sig, 0.0
        # EDMDPMSolverMultistep ends at the config's sigma_min itself, EDMEuler at its last level
        return sig, float(np.float32(c.get("sigma_min", 0.002))) if dpm else float(sig[-1])

    def _edm_plan(self, steps: int) -> Plan:
        """The plan on EDMEulerScheduler's grid: the solver at its levels (t = sigma of `EDMPrecond`), the network
        given c_noise = log(sigma) / 4 of the float32 level; a last step sigma_min -> sigma_min is not made."""
        sig, end = self._edm_levels(steps)
        self.__dict__["_k_levels"] = np.append(sig, end)
        if end > 0 and np.float32(end) != np.float32(sig[-1]):
            sig = np.append(sig, end)  # a last step to the config's sigma_min (EDMDPMSolverMultistep, exponential)
        elif end > 0 and len(sig) < 2:
            raise ValueError("one step from sigma_min to sigma_min: nothing to sample")
        t = torch.as_tensor(sig)
        grid = TimeGrid.from_times(self.schedule, t, final_zero=end == 0)
        plan = make_plan(self.solver, self.schedule, grid=grid)
        # every call (a named two-call solver's intermediate ones too) at c_noise of its float32 level
        levels = torch.tensor([ev.t for ev in self._evals_of(plan)], dtype=torch.float64).to(torch.float32)
        self.__dict__["_grid_model_t"] = (0.25 * torch.log(levels)).double()
        return plan

    def _k_scale(self, n: int | None) -> torch.Tensor:
        """sqrt(sigma^2 + 1) (float32, as the classes compute it) at model call n of the current plan,
        at its grid point 0 for None (x_T), or at its end for n = nfe (1 at sigma = 0)."""
        p = self.plan
        if n is None:
            r = float(p.grid.sigma[0] / p.grid.alpha[0])
        elif n >= p.nfe:
            r = 0.0 if p.grid.final_zero else float(p.grid.sigma[-1] / p.grid.alpha[-1])
        else:
            ev = self._evals_of(p)[n]
            r = ev.sigma / ev.alpha
        if self.convention in EDM_CLASSES:  # 1 / c_in = sqrt(sigma^2 + sigma_data^2), sigma = rho sigma_data
            sd = self.schedule.sigma_data
            s = torch.tensor(r * sd, dtype=torch.float32)
            return (s**2 + sd**2) ** 0.5
        s = torch.tensor(r, dtype=torch.float32)
        return (s**2 + 1) ** 0.5

    def _k_alpha(self, n: int | None) -> float:
        """alpha (float64) at model call n of the current plan, at grid point 0 for None, at the end for
        n = nfe: the class's sample is x / alpha there.  (`_k_scale` is the float32 1 / alpha the classes'
        scale_model_input divides by.)"""
        p = self.plan
        unit = self.schedule.sigma_data if self.convention in EDM_CLASSES else 1.0  # EDM: x = sigma_data v
        if n is None:
            return float(p.grid.alpha[0]) / unit
        if n >= p.nfe:
            return float(p.grid.alpha[-1]) / unit
        return float(self._evals_of(p)[n].alpha) / unit

    def _within_range(self, t: torch.Tensor, what: str, given: torch.Tensor) -> torch.Tensor:
        """Explicit grid times clamped into the schedule's [t_min, t_max] when they lie within float32
        round-off of it (diffusers' own float32 sigma lists, k-diffusion's karras sigmas built from the
        schedule's sigma_max / sigma_min); further out they are refused, naming the value."""
        sch = self.schedule
        lo, hi = sch.t_min, sch.t_max
        tol = 1e-6 * (hi - lo)
        bad = (t < lo - tol) | (t > hi + tol) | ~torch.isfinite(t)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            rng = (f"sigma in [{float(self._sigma_of(hi)):.6g}, {float(self._sigma_of(lo)):.6g}]" if what == "sigmas"
                   else f"[{lo * sch.time_scale}, {hi * sch.time_scale}]")
            raise ValueError(f"set_timesteps({what}=...): {what}[{j}] = {float(given[j])} is outside the schedule's "
                             f"range {rng}")
        return t.clamp(lo, hi)

    def _sigma_of(self, t: float) -> torch.Tensor:
        tt = torch.tensor([t], dtype=torch.float64)
        return (self.schedule.sigma(tt) / self.schedule.alpha(tt))[0]

    def _set_plan(self, plan: Plan, offset: int | None = 0) -> None:
        if plan.info.get("time_shift") is not None:
            raise ValueError(f"solver {self.config.solver!r} carries time_shift {plan.info['time_shift']}, which the "
                             "adapter cannot drive: a pipeline calls the network at scheduler.timesteps, while the "
                             "Time-Shift sampler moves each sample's call time. Run it with sample() on "
                             "denoiser_from_pipeline(pipe), or use a plan without time_shift (search.time_shift=false)")
        self.plan = plan
        t = torch.tensor([ev.t for ev in self._evals_of(plan)], dtype=torch.float64)
        given = self.__dict__.get("_grid_model_t")
        if given is not None and offset is not None and len(given) - offset == len(t):
            self._t_model64 = given[offset:].clone()  # the model times diffusers gives this grid
        else:
            self._t_model64 = self.schedule.model_time(t)
        self._t_model = self._t_model64.to(torch.float32)
        self._reset_state()

    def _apply_begin_index(self) -> None:
        full, k = self._full_plan, self._begin_index
        if not 0 <= k < full.nfe:
            raise ValueError(f"begin_index {k} is outside the plan's {full.nfe} model calls")
        starts = np.cumsum([0] + [len(s.evals) for s in full.steps])[:-1].tolist()
        g = full.grid
        build_from, call_grid = getattr(self.solver, "build_from", None), self.__dict__.get("_call_grid")
        if build_from is not None and call_grid is not None and getattr(self.solver, "intermediate", None) == "grid":
            # a solver whose calls sit on the grid's points restarts there as its source scheduler does
            plan = build_from(call_grid, k)
            self._set_plan(plan, offset=k)
        elif k in starts:  # a step boundary: the same model times, multistep warm-up restarts here
            i = starts.index(k)
            sub = TimeGrid(t=g.t[i:], alpha=g.alpha[i:], sigma=g.sigma[i:], lam=g.lam[i:],
                           final_zero=g.final_zero, schedule=g.schedule)
            plan = self.solver.build(sub, full.nfe - k)
            self._set_plan(plan, offset=k)
        else:  # inside a multi-call step (img2img with heun, dpmpp_2s): re-grid from that call's time
            plan = self._plan_from(full, k)
            self._set_plan(plan, offset=None)
        self._offset = k
        if self.timesteps is not None:
            # pipelines slice `timesteps[k:]` (a view) before calling set_begin_index: writing the
            # new model times in place is what makes them evaluate the network at the re-gridded times
            self.timesteps[k:] = (self._t_model64.round() if not self.timesteps.is_floating_point()
                                  else self._t_model).to(self.timesteps.device, self.timesteps.dtype)
            self._sigmas[k:] = self._sigmas_of(plan).to(self._sigmas.device)

    def _plan_from(self, full: Plan, k: int) -> Plan:
        """A plan of exactly `full.nfe - k` model calls that starts at the time of call `k` (where
        img2img adds its noise) and keeps the full grid's spacing: the new points sit uniformly in the
        grid-index coordinate, between call k's position and the end."""
        g, m = full.grid, full.nfe - k
        t_k = float(self._evals_of(full)[k].t)
        t = g.t.numpy()
        u = np.arange(len(t), dtype=np.float64)
        u_k = float(np.interp(t_k, t[::-1], u[::-1]))
        steps = self.solver.steps_for_nfe(m, final_zero=g.final_zero)
        ts = np.interp(np.linspace(u_k, len(t) - 1, steps + 1), u, t)
        ts[0] = t_k
        if self.timesteps is not None and not self.timesteps.is_floating_point():
            # integer model times (int64 `timesteps`): the re-gridded points are integers too
            ts[1:] = np.round(ts[1:] * self.schedule.time_scale) / self.schedule.time_scale
            if not bool((np.diff(ts) < 0).all()):
                raise ValueError(f"solver {self.config.solver!r} cannot restart inside a step at model call {k}: "
                                 "too few integer timesteps remain")
        sub = TimeGrid.from_times(g.schedule, ts[:-1] if g.final_zero else ts, g.final_zero)
        plan = self.solver.build(sub, m)
        if plan.nfe != m or not plan.steps[0].evals[0].x.is_identity:
            raise ValueError(f"solver {self.config.solver!r} cannot restart inside a step at model call {k}")
        return plan

    @staticmethod
    def _evals_of(plan: Plan) -> list:
        return [ev for s in plan.steps for ev in s.evals]

    def _sigmas_of(self, plan: Plan) -> torch.Tensor:
        """diffusers' `sigmas` of a plan: one per model call and the end point (0 at sigma = 0);
        sigma/alpha for VP schedules, the flow time t for flow schedules; float32."""
        ev = self._evals_of(plan)
        g = plan.grid
        if self.__dict__.get("convention"):  # the class's `sigmas`: a step's later calls carry its end's sigma
            unit = self.schedule.sigma_data if self.convention in EDM_CLASSES else 1.0  # EDM: its sigma = rho sigma_data
            rho = (g.sigma / g.alpha * unit).tolist()
            s = [rho[i] if k == 0 else rho[i + 1] for i, st in enumerate(plan.steps) for k in range(len(st.evals))]
            s.append(0.0 if g.final_zero else rho[-1])
            if self.convention.startswith("KDPM2"):  # their list repeats the final 0 twice more
                s += [0.0, 0.0]
            elif self.config.get("interpolation_type") == "log_linear":  # Euler's: steps + 1 levels, then 0
                s.append(0.0)
            return torch.tensor(s, dtype=torch.float64).to(torch.float32)
        if self.is_flow:
            s = [e.t for e in ev] + [float(g.t[-1]) if not g.final_zero else 0.0]
        else:
            # (inf at alpha = 0: IPNDMScheduler's first call, at pure noise)
            s = [e.sigma / e.alpha if e.alpha else math.inf for e in ev] + [
                float(g.sigma[-1] / g.alpha[-1]) if not g.final_zero else 0.0]
        return torch.tensor(s, dtype=torch.float64).to(torch.float32)

    _NOT_DEFINED = {
        "sigmas": "is set by set_timesteps; call it first",
        "alphas_cumprod": "exists for discrete VP schedules only; this scheduler's schedule is not one (a flow, or IPNDM's)",
        "alphas": "exists for discrete VP schedules only; this scheduler's schedule is not one (a flow, or IPNDM's)",
        "betas": "exists for discrete VP schedules only; this scheduler's schedule is not one (a flow, or IPNDM's)",
    }

    def __getattr__(self, name: str):
        if name in DiffSamplerScheduler._NOT_DEFINED:
            raise AttributeError(f"{type(self).__name__}.{name} {DiffSamplerScheduler._NOT_DEFINED[name]}")
        return super().__getattr__(name)

    @property
    def sigmas(self) -> torch.Tensor:
        """diffusers' sigmas: per entry of `timesteps` sigma/alpha (VP) or the flow time t (flow),
        then the end point (0 when the plan ends at sigma = 0); float32, as EulerDiscreteScheduler's."""
        s = self.__dict__.get("_sigmas")
        if s is None:
            raise AttributeError(f"{type(self).__name__}.sigmas {self._NOT_DEFINED['sigmas']}")
        return s

    def _discrete_ref(self):
        """diffusers' own betas / alphas / alphas_cumprod of this config (DDPMScheduler's, float32)."""
        if not isinstance(self.schedule, DiscreteVP):
            return None
        ref = self.__dict__.get("_vp_ref")
        if ref is None:
            from diffusers import DDPMScheduler

            c = self.config
            ref = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start,
                                beta_end=c.beta_end, beta_schedule=c.beta_schedule, trained_betas=c.trained_betas,
                                rescale_betas_zero_snr=c.rescale_betas_zero_snr)
            self.__dict__["_vp_ref"] = ref
        return ref

    def _vp_table(self, name: str) -> torch.Tensor:
        """`alphas_cumprod` / `alphas` / `betas` of the discrete VP schedule, as DDPMScheduler's."""
        ref = self._discrete_ref()
        if ref is None:
            raise AttributeError(f"{type(self).__name__}.{name} {self._NOT_DEFINED[name]}")
        return getattr(ref, name)

    alphas_cumprod = property(lambda self: self._vp_table("alphas_cumprod"))
    alphas = property(lambda self: self._vp_table("alphas"))
    betas = property(lambda self: self._vp_table("betas"))

    def _model_times(self, timesteps, what: str) -> torch.Tensor:
        """`timesteps` (model times, a scalar or one per sample) as schedule times t in float64;
        values within float32 round-off of the schedule's range are clamped, others refused."""
        t = torch.as_tensor(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                            dtype=torch.float64).flatten()
        sch = self.schedule
        lo, hi = (0.0, 1.0) if self.is_flow else (sch.t_min, sch.t_max)
        scale = sch.time_scale
        tol = 1e-6 * (hi - lo)
        u = t / scale
        bad = (u < lo - tol) | (u > hi + tol) | ~torch.isfinite(u)
        if bool(bad.any()):
            v = float(t[bad][0])
            raise ValueError(f"{what}: timestep {v} is outside the schedule's range [{lo * scale}, {hi * scale}]")
        return u.clamp(lo, hi)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = alpha_t eps - sigma_t x0 (`sample` is x0), as DDPMScheduler's."""
        t = self._model_times(timesteps, "get_velocity")
        shape = (-1,) + (1,) * (sample.ndim - 1)
        a = self.schedule.alpha(t).to(sample.device, sample.dtype).view(shape)
        s = self.schedule.sigma(t).to(sample.device, sample.dtype).view(shape)
        return a * noise - s * sample

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow schedules: x_t = t eps + (1 - t) x0 at model time `timestep` (as
        FlowMatchEulerDiscreteScheduler.scale_noise); VP schedules use `add_noise`."""
        if not self.is_flow:
            raise ValueError("scale_noise is the flow schedules' forward process; this scheduler's schedule is "
                             "discrete VP: use add_noise")
        if self.flowmatch and self.timesteps is not None:
            t = self._flowmatch_noise_level(timestep, len(sample))
        else:
            t = self._model_times(timestep, "scale_noise")
        shape = (-1,) + (1,) * (sample.ndim - 1)
        s = t.to(sample.device, sample.dtype).view(shape)
        return s * noise + (1.0 - s) * sample

    def _flowmatch_noise_level(self, timestep, n: int) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler.scale_noise's sigma: `sigmas` at the begin index (img2img, before
        the first step), at the step index (after it), else at `timestep`'s entry of `timesteps` (its second
        one if repeated) -- the shifted flow time even where `timesteps=` gave the network other times."""
        ts = self.timesteps.detach().cpu().double()
        if self._begin_index is not None:
            idx = [self.step_index if self._stepper is not None else self._begin_index] * n
        else:
            idx = []
            for v in torch.as_tensor(timestep.detach().cpu() if isinstance(timestep, torch.Tensor) else timestep,
                                     dtype=torch.float64).flatten().tolist():
                hits = (ts == v).nonzero().flatten()
                if not len(hits):
                    raise ValueError(f"scale_noise: timestep {v} is not in this schedule's timesteps")
                idx.append(int(hits[1 if len(hits) > 1 else 0]))
        return self._sigmas.detach().cpu().double()[idx]

    def previous_timestep(self, timestep):
        """The model time of the call after `timestep` in `timesteps`: the next entry, or at the last
        call the plan's end (-1 when it ends at sigma = 0, as DDPMScheduler; else its last grid time)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before previous_timestep")
        ts = self.timesteps
        i = self.step_index
        v = float(timestep)
        if i is None or i >= len(ts) or float(ts[i]) != v:
            hits = (ts.double() == v).nonzero().flatten()
            if not len(hits):
                raise ValueError(f"timestep {v} is not in this schedule's timesteps")
            i = int(hits[0])
        if i + 1 < len(ts):
            return ts[i + 1]
        g = self.plan.grid
        end = -1.0 if g.final_zero else float(self.schedule.model_time(g.t[-1:])[0])
        return torch.tensor(end, dtype=ts.dtype, device=ts.device)

    # ------------------------------------------------------------------------------------------
    @property
    def moves_x_T(self) -> bool:
        """Whether the plan's first model call is not at x_T itself (an analytic first step, or a first
        call on a combination of x_T): `scale_model_input` then gives that call's input."""
        p = self.plan
        return bool(p is not None and p.steps and not (p.steps[0].evals and p.steps[0].evals[0].x.is_identity))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input for this call: `sample` itself, except at the first call of a plan whose
        first model call is not at x_T (an analytic first step): there the plan's steps before that call
        are run on `sample` (= x_T; any batch, e.g. a classifier-free-guidance doubled one) and their
        result is the input."""
        k = self.__dict__.get("convention")
        if self._stepper is not None or not self.moves_x_T:
            if not k:
                return sample
            if self.plan is None:
                raise ValueError("call set_timesteps before scale_model_input")
            return sample / self._k_scale(0 if self._stepper is None else self._stepper.n).to(sample.device)
        if timestep is not None:
            self._check_timestep(timestep, 0)
        self._moved_first = True
        if k:  # x_T / alpha_0 -> x_T
            sample = sample / self._k_scale(None).to(sample.device)
        return Stepper(self.plan, _NoCalls(self.schedule), sample, self._no_noise).next_input()[0]

    @staticmethod
    def _no_noise(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("the plan adds noise before its first model call; a scheduler cannot draw it in "
                         "scale_model_input (no generator): drive this plan with diffsampler.sample")

    def _emit(self, x, t_model):  # the "network" of the internal Denoiser: the output given to step()
        return self._pending

    def _check_timestep(self, timestep, n: int) -> None:
        """`timestep` must be the model time of call n (the entry `timesteps[step_index]`)."""
        want = float(self._t_model64[n])
        given = torch.as_tensor(timestep.detach().cpu() if isinstance(timestep, torch.Tensor) else timestep,
                                dtype=torch.float64).flatten()
        tol = 2.0**-11 * abs(want) + 1e-6 * self.schedule.time_scale * (self.schedule.t_max - self.schedule.t_min)
        if not len(given) or not bool(((given - want).abs() <= tol).all()):
            got = given.tolist() if len(given) != 1 else float(given[0])
            raise ValueError(f"step() was given timestep {got}, but the next model call is at timestep "
                             f"{float(self.timesteps[self._offset + n])} (timesteps[{self._offset + n}])")

    def _check_variance_noise(self, z: torch.Tensor, sample: torch.Tensor, n: int) -> None:
        """variance_noise is used as the noise of the step that call n completes; refused where the
        call completes no step or the plan adds no noise at all."""
        steps, ends = self.plan.steps, np.cumsum([len(st.evals) for st in self.plan.steps])
        i = int(np.searchsorted(ends, n + 1))
        if self.plan.info.get("noise") == "brownian":
            raise ValueError(f"variance_noise cannot take effect: solver {self.config.solver!r} draws Brownian-tree "
                             "noise (noise='brownian'), seeded from the generator; pass generator=, or use "
                             "solver_options={'noise': 'gaussian'}")
        # a stochastic plan's step with noise coefficient 0 (DDIM's last step onto alpha_bar = 1) takes it
        # times 0, as diffusers' does
        if i >= len(steps) or ends[i] != n + 1 or not self.plan.stochastic:
            raise ValueError(f"variance_noise cannot take effect: model call {self._offset + n} of solver "
                             f"{self.config.solver!r} completes no stochastic step (no noise is added there)")
        if tuple(z.shape) != tuple(sample.shape):
            raise ValueError(f"variance_noise has shape {tuple(z.shape)}, the sample {tuple(sample.shape)}")

    def _sde_class_noise(self, x_T: torch.Tensor, generator):
        """DPMSolverSDEScheduler's draws, as the class makes them: one torchsde Brownian tree for the whole batch
        on [smallest positive, largest] of its float32 noise levels, seeded by the config's noise_sampler_seed
        (else from the generator; with neither, from torch's global generator as the class does), queried per
        two-call step at (sigma, sigma_mid) then (sigma, sigma_next) with the class's float32 arithmetic
        (sigma_mid = exp(-(t + (t_next - t) / 2)), t = -log sigma); the increments depend on those exact query
        times, so they are computed as the class computes them.  Returns the stepper's noise source."""
        from ..samplers.brownian import BrownianTrees, tree_seeds

        if self._offset:
            raise ValueError(f"{SDE_CLASS} started at call {self._offset} (set_begin_index): its Brownian draws are "
                             "not reproduced there; start at 0, or name a solver (solver='dpmpp_sde')")
        lv = torch.tensor(self.__dict__["_k_levels"], dtype=torch.float32)
        seed = self.config.get("noise_sampler_seed")
        if seed is not None:
            if generator is not None and not self.__dict__.get("_warned_seed"):
                self._warned_seed = True
                warnings.warn(f"noise_sampler_seed={seed} seeds the Brownian tree (as {SDE_CLASS}, whose step() takes "
                              "no generator); the generator passed to step() is not used", stacklevel=3)
            seeds, batched = [int(seed)], False
        else:
            seeds, batched = tree_seeds(generator)
        pos = lv[lv > 0]
        trees = BrownianTrees(x_T.shape, pos.min().item(), lv.max().item(), seeds, x_T.dtype, batched)
        draws = []
        for st, s, n in zip(self.plan.steps, lv[:-1], lv[1:]):
            if not st.n_draws:
                continue
            t, t_n = -s.log(), -n.log()
            t_p = t + (t_n - t) * 0.5
            pts = ((t, t_p), (t, t_n)) if len(st.evals) == 2 else ((t, t_n),)
            if len(pts) != st.n_draws:
                raise ValueError(f"{SDE_CLASS}: step with {st.n_draws} draws, the class makes {len(pts)}")
            draws += [trees.draw(float((-a).exp()), float((-b).exp())) for a, b in pts]
        it = iter(torch.stack(draws).to(x_T.device).unbind(0) if draws else ())
        return lambda x: next(it)

    def _noise_fn(self, x: torch.Tensor) -> torch.Tensor:  # the stepper's noise source
        """The noise of the stochastic step being completed: the caller's `variance_noise`, else one
        draw of the sample's shape from the step call's generator(s), exactly as diffusers' schedulers
        draw theirs (`randn_tensor`: one generator for the batch, or one per sample), so the same
        generator gives the same noise as the scheduler being replaced."""
        from diffusers.utils.torch_utils import randn_tensor

        brownian = self.__dict__.get("_brownian")
        if brownian is not None:  # all draws made when the trajectory started (samplers/brownian.py)
            return brownian(x)
        z = self.__dict__.get("_variance_noise")
        if z is not None:
            return z.to(x.device, x.dtype)
        return randn_tensor(x.shape, generator=self._generator, device=x.device, dtype=x.dtype)

    #: step() arguments of diffusers' Euler / FlowMatchHeun / EDMEuler: accepted at s_churn = 0 (no effect there)
    _CHURN_KEYS = ("s_churn", "s_tmin", "s_tmax", "s_noise")

    def step(
        self,
        model_output: torch.Tensor,
        timestep=None,
        sample: torch.Tensor = None,
        generator=None,
        return_dict: bool = True,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        variance_noise: torch.Tensor | None = None,
        **kwargs,
    ):
        """Consume the model output of the current evaluation (its input was `sample`) and return
        the next evaluation's input.  `timestep` is not used to find the position (an internal
        counter is; repeated timesteps are fine) but must be that call's entry of `timesteps`.
        `variance_noise`: the noise of the stochastic step this call completes, used instead of the
        generator's draw (refused where the call adds no noise).  `eta` must be the solver's own
        (or 0, a pipeline's default); with clip_sample / thresholding `use_clipped_model_output` must
        agree with the solver (ddim's `raw_noise` option: False, the network's own epsilon in the
        direction term as diffusers' default; other solvers: True, the clipped data prediction's).  `generator`: one torch.Generator or a list of
        per-sample generators for stochastic solvers; each stochastic step draws its noise from it as
        diffusers' schedulers do (so the same generator reproduces their noise)."""
        churn = {k: kwargs.pop(k) for k in self._CHURN_KEYS if k in kwargs}
        if kwargs:
            raise TypeError(f"step() got unexpected keyword argument(s) {sorted(kwargs)}")
        if self.__dict__.get("convention") == SDE_CLASS and churn.get("s_noise", 1.0) != getattr(self.solver, "s_noise", 1.0):
            raise ValueError(f"step(s_noise={churn['s_noise']}) cannot take effect: {SDE_CLASS}'s noise scale is compiled "
                             f"into the plan (s_noise={getattr(self.solver, 's_noise', 1.0)}); build it with "
                             f"solver_options={{'s_noise': {churn['s_noise']}}}")
        if churn.get("s_churn", 0.0):
            raise ValueError(f"step(s_churn={churn['s_churn']}) cannot be reproduced by diffsampler (supported: s_churn=0, "
                             "where s_tmin / s_tmax / s_noise do nothing): diffusers' Euler / FlowMatchHeun churn raises "
                             "the noise level of a sample the network has already been evaluated on (the output at "
                             "sigma is used at sigma_hat), a step the plan is not compiled with; for EDM's churn "
                             "(the network evaluated after it) use solver='edm_stochastic' with solver_options "
                             "{'s_churn': ..., 's_tmin': ..., 's_tmax': ..., 's_noise': ...}")
        if eta and eta != getattr(self.solver, "eta", 0.0):
            raise ValueError(f"eta={eta} passed to step; set it on the solver: "
                             f"DiffSamplerScheduler(solver='ddim', solver_options={{'eta': {eta}}})")
        raw = getattr(self.solver, "raw_noise", None)  # ddim's option; other solvers use the clipped D's noise
        if use_clipped_model_output is not None and (self.config.thresholding or self.config.clip_sample) \
                and bool(use_clipped_model_output) == bool(raw):
            fix = ("" if raw is None else
                   f"; build it with solver_options={{'raw_noise': {not use_clipped_model_output}}}")
            have = "the network's own noise prediction (raw_noise=True)" if raw else "the clipped data prediction's noise"
            raise ValueError(f"use_clipped_model_output={use_clipped_model_output} cannot take effect: with clip_sample / "
                             f"thresholding solver {self.config.solver!r} steps with {have}{fix}")
        if self.plan is None:
            raise ValueError("call set_timesteps before step")
        if sample is None:
            raise ValueError("step needs the sample the model was evaluated on")
        run = self._stepper
        if run is not None and run.done:
            raise ValueError(f"step called {run.n + 1} times, the plan has {run.n} model calls; "
                             "call set_timesteps again to start a new trajectory")
        n = 0 if run is None else run.n
        if timestep is not None:
            self._check_timestep(timestep, n)
        k_conv = self.__dict__.get("convention")
        if k_conv:  # the class's sample x / alpha at this call's point (x_T's grid point at the first call)
            sample = sample * self._k_alpha(None if run is None else n)
        if variance_noise is not None:
            self._check_variance_noise(variance_noise, sample, n)
        if run is None:
            if self.moves_x_T and not self.__dict__.get("_moved_first"):
                raise ValueError(f"solver {self.config.solver!r}: the plan's first model call is not at x_T "
                                 "(an analytic first step); pass the model the input "
                                 "scale_model_input(sample, t) gives (as StableDiffusion-style pipelines do)")
            self._brownian = None
            if self.plan.stochastic and self.plan.info.get("noise") == "brownian" and k_conv == SDE_CLASS:
                self._brownian = self._sde_class_noise(sample, generator)
            elif self.plan.stochastic and self.plan.info.get("noise") == "brownian":
                from ..samplers.brownian import brownian_noise  # trees seeded from this call's generator(s)

                self._brownian = brownian_noise(self.plan, sample, generator)
            run = self._stepper = Stepper(self.plan, self._denoiser, sample, self._noise_fn)
            self._next = run.next_input()
        elif run.k == 0 and run.eval.x.is_identity:
            run.x = sample  # the step's state follows edits made between steps (inpainting)
        self._generator = generator
        y, t_model, alpha, sigma, kind = self._next
        if run.n == 0 and self.moves_x_T:
            sample = y  # the network ran on scale_model_input's moved x_T, not on `sample` (x_T)
        edm = k_conv in EDM_CLASSES
        self._pending = model_output * self._edm_sign if edm and self._edm_sign != 1.0 else model_output
        out, x0 = self._denoiser.predict_with_data(sample, t_model, alpha, sigma, kind)
        if edm:  # the class's x0, not x0 / sigma_data
            x0 = x0 * self.schedule.sigma_data
        self._pending = None
        self._variance_noise = variance_noise
        try:
            run.feed(out)
        finally:
            self._variance_noise = None
        if run.done:
            prev = run.x
        else:
            self._next = run.next_input()
            prev = self._next[0]
        if k_conv:
            prev = prev / self._k_alpha(run.n)
        if not return_dict:
            return (prev, x0)
        return DiffSamplerSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # ------------------------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps at model times `timesteps` (a scalar or one per sample);
        times outside the schedule's range are refused (not extrapolated).  Under a sigma-space class's
        `convention`: x0 + sigma eps (the class's sample x / alpha) with the class's sigma of that entry of
        `timesteps` (the second of repeated entries; the begin index's once `set_begin_index` was called),
        or before `set_timesteps` of that integer training timestep."""
        if self.__dict__.get("convention"):
            return self._k_add_noise(original_samples, noise, timesteps)
        t = self._model_times(timesteps, "add_noise")
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alpha(t).to(original_samples.device, original_samples.dtype).view(shape)
        s = self.schedule.sigma(t).to(original_samples.device, original_samples.dtype).view(shape)
        return a * original_samples + s * noise


    def _k_add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                            dtype=torch.float64).flatten()
        if self.timesteps is None and self.convention in EDM_CLASSES:
            raise ValueError(f"{self.convention}: call set_timesteps before add_noise")
        if self.timesteps is None:  # the classes' __init__: every training timestep, sigma from the table
            acp = self.schedule.alphas_cumprod.to(torch.float32)
            table = ((1 - acp) / acp) ** 0.5
            bad = (t != t.round()) | (t < 0) | (t > len(table) - 1)
            if bool(bad.any()):
                raise ValueError(f"add_noise: timestep {float(t[bad][0])} is no training timestep (integers 0.."
                                 f"{len(table) - 1}); call set_timesteps for the inference timesteps")
            sig = table[t.long()]
        else:
            if self._begin_index is not None:
                idx = [self.step_index if self._stepper is not None else self._begin_index] * len(t)
            else:
                sched_t = self.timesteps.detach().cpu().double()
                idx = []
                for v in t.tolist():
                    hits = (sched_t == v).nonzero().flatten()
                    if not len(hits):
                        hits = ((sched_t - v).abs() <= 2.0**-11 * max(abs(v), 1.0)).nonzero().flatten()
                    if not len(hits):
                        raise ValueError(f"add_noise: timestep {v} is not in this schedule's timesteps")
                    idx.append(int(hits[1 if len(hits) > 1 else 0]))
            sig = self._sigmas.detach().cpu()[idx]
        shape = (-1,) + (1,) * (x0.ndim - 1)
        sig = sig.to(x0.device, x0.dtype).view(shape)
        if sig.shape[0] == 1 and x0.shape[0] != 1:
            sig = sig.expand(x0.shape[0], *sig.shape[1:])
        return x0 + noise * sig


# diffusers' convention for a scheduler with **kwargs: the config keys it takes there (other diffusers
# schedulers' keys, kept in the config and unused; solver options are routed by `_route_keywords`)
DiffSamplerScheduler._deprecated_kwargs = sorted(
    _DIFFUSERS_KEYS - set(inspect.signature(DiffSamplerScheduler.__init__).parameters))
