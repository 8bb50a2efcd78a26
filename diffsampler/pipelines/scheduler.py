"""`DiffSamplerScheduler`: any registered diffsampler solver behind diffusers' scheduler interface.

It is an adapter, not a second solver implementation: `set_timesteps` compiles the solver's Plan
(`diffsampler.samplers.make_plan`) and `step` feeds the network output, converted from its
prediction type, to the plan engine's `Stepper`, one model evaluation per call.  Every model call of the plan is
one entry of `timesteps`, so a two-call solver (Heun, DPM-Solver++ 2S) exposes two timesteps per
solver step and `len(scheduler.timesteps) == plan.nfe == num_inference_steps`.

The state handed to the model is x itself (`scale_model_input` is the identity and
`init_noise_sigma` is the schedule's prior std).  `step` returns as `prev_sample` the input of the
next model evaluation, which is x_{i+1} at the end of a solver step and the intermediate point
(a linear combination of x_i and earlier outputs) inside a multi-call step.

Configs of diffusers schedulers are accepted: `DiffSamplerScheduler.from_config(other.config,
solver=...)`.  Keys this class does not use are kept in its config (so `save_pretrained` keeps
them) but are otherwise ignored; note that diffusers resolves `_compatibles` by *name inside the
diffusers package only*, so pipelines' `scheduler.compatibles` never lists this class -- build it
with `from_config` yourself and assign `pipe.scheduler = ...`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..denoisers import PREDICTION_TYPES, Denoiser, Thresholded
from ..samplers import get, make_plan
from ..samplers.loop import predrawn_noise
from ..samplers.plan import Plan, Stepper
from ..schedules import SPACINGS, DiscreteVP, RectifiedFlow, TimeGrid, time_grid

from .parity import parity_arguments as _parity

__all__ = ["DiffSamplerScheduler", "DiffSamplerSchedulerOutput"]

_FINAL_SIGMAS = {"zero": "zero", "sigma_min": "last"}
_PRED_ALIASES = {"flow_prediction": "flow"}
_DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")


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
            (e.g. {"eta": 1.0}).
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
        **kwargs: any other key of a diffusers scheduler config: accepted silently, not used.

    `num_inference_steps` in `set_timesteps` is the budget of model calls (NFE), not of steps.
    """

    config_name = "scheduler_config.json"
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
        **kwargs,
    ):
        if kwargs:  # keep foreign keys in the config (save/load round trip), use none of them
            self.register_to_config(**{k: v for k, v in kwargs.items() if not k.startswith("_")})
        # -- schedule -------------------------------------------------------------------------
        if schedule_type not in (None, "vp", "flow"):
            raise ValueError(f"schedule_type must be None, 'vp' or 'flow', got {schedule_type!r}")
        pred = _PRED_ALIASES.get(prediction_type, prediction_type)
        self.is_flow = schedule_type == "flow" or bool(use_flow_sigmas) or shift is not None or (
            schedule_type is None and pred == "flow")
        if self.is_flow:
            self.schedule = RectifiedFlow(time_scale=float(num_train_timesteps))
            pred = pred or "flow"
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
        spacing = spacing or timestep_spacing or "linspace"
        if self.is_flow and spacing in _DIFFUSERS_SPACINGS:
            spacing = "time_uniform"  # integer-timestep spacings exist for discrete VP schedules only
        if spacing not in SPACINGS:
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
        self.init_noise_sigma = float(self.schedule.prior_std)
        # pipelines read `order` as model calls per entry of `timesteps` (warm-up counts, img2img's
        # set_begin_index(t_start * order)); ours has one entry per model call
        self.order = 1
        self.solver_order = int(self.solver.order)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.plan: Plan | None = None
        self._begin_index: int | None = None
        self._offset = 0
        self._reset_state()

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
        if name != cls.__name__ and kwargs.get("solver") is None and cfg.get("solver") is None:
            for k, v in _parity(cfg, kwargs, source).items():  # parity by default: the source's own method
                kwargs.setdefault(k, v)
        if name == "DEISMultistepScheduler" and "final" not in cfg:
            kwargs.setdefault("final", "last")  # DEIS always ends at sigma_min
        foreign = {k: v for k, v in cfg.items() if k not in known and not k.startswith("_")}
        foreign.update({k: kwargs.pop(k) for k in list(kwargs) if k not in known})
        cfg = {k: v for k, v in cfg.items() if k in known or k.startswith("_")}
        out = super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)
        model = out[0] if return_unused_kwargs else out
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
        if self.plan is not None:
            self._apply_begin_index()

    def _reset_state(self) -> None:
        self._stepper: Stepper | None = None  # the run of the plan, from the first `step`
        self._next: tuple | None = None       # the stepper's next model call: (y, t_model, alpha, sigma, kind)
        self._noise = None                    # the plan's noise, drawn at its first noisy step
        self._generator = None
        self._pending: torch.Tensor | None = None

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
        grid = time_grid(self.schedule, steps, kw.pop("name"), final=self.final, **kw)
        if self.is_flow and (self.grid_shift not in (None, 1.0) or (self.config.use_dynamic_shifting and mu is not None)):
            n = grid.steps if self.final == "zero" else grid.steps + 1
            t = self._shift(grid.t[:n], mu).clamp(self.schedule.t_min, self.schedule.t_max)
            grid = TimeGrid.from_times(self.schedule, t, self.final == "zero")
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
        if timesteps is not None or sigmas is not None:
            if sigmas is not None:
                s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64) if not isinstance(sigmas, torch.Tensor)
                                    else sigmas.detach().cpu().double()).flatten()
                if len(s) and float(s[-1]) == 0.0:
                    s, final = s[:-1], "zero"
                if self.is_flow:
                    t = self._shift(s, mu).clamp(self.schedule.t_min, self.schedule.t_max)
                else:
                    t = self.schedule.t_from_lambda(-s.log())
            else:
                t = (timesteps.detach().cpu().double() if isinstance(timesteps, torch.Tensor)
                     else torch.as_tensor(np.asarray(timesteps, dtype=np.float64))).flatten() / self.schedule.time_scale
            steps = len(t) if final == "zero" else len(t) - 1
            grid = time_grid(self.schedule, steps, t, final=final)
            plan = make_plan(self.solver, self.schedule, grid=grid)
            if num_inference_steps is not None and plan.nfe != num_inference_steps:
                raise ValueError(f"the explicit grid costs {plan.nfe} model calls, num_inference_steps={num_inference_steps}")
        else:
            own_grid = getattr(self.solver, "own_grid", None)  # a solver plan brings its own time points and end
            if own_grid is not None:
                final = self.solver.plan.final
            steps = self.solver.steps_for_nfe(num_inference_steps, final_zero=(final == "zero"))
            grid = own_grid(self.schedule) if own_grid is not None else self._grid(steps, mu)
            plan = make_plan(self.solver, self.schedule, num_inference_steps, grid=grid)
        if plan.steps and (not plan.steps[0].evals or not plan.steps[0].evals[0].x.is_identity):
            raise ValueError(f"solver {self.config.solver!r}: the first model call is not at x_T; "
                             "it cannot be driven one model call at a time")
        self._full_plan = plan
        self.num_inference_steps = plan.nfe
        self._set_plan(plan)
        self._denoiser.start_run()  # finite flags of an earlier (aborted) trajectory are not this one's
        self.timesteps = self._t_model.to(device, copy=True)
        self._offset = 0
        self._begin_index = None  # as diffusers: a new schedule starts at its first call

    def _set_plan(self, plan: Plan) -> None:
        self.plan = plan
        t = torch.tensor([ev.t for ev in self._evals_of(plan)], dtype=torch.float64)
        self._t_model = self.schedule.model_time(t).to(torch.float32)
        self._reset_state()

    def _apply_begin_index(self) -> None:
        full, k = self._full_plan, self._begin_index
        if not 0 <= k < full.nfe:
            raise ValueError(f"begin_index {k} is outside the plan's {full.nfe} model calls")
        starts = np.cumsum([0] + [len(s.evals) for s in full.steps])[:-1].tolist()
        g = full.grid
        if k in starts:  # a step boundary: the same model times, multistep warm-up restarts here
            i = starts.index(k)
            sub = TimeGrid(t=g.t[i:], alpha=g.alpha[i:], sigma=g.sigma[i:], lam=g.lam[i:],
                           final_zero=g.final_zero, schedule=g.schedule)
            plan = self.solver.build(sub, full.nfe - k)
        else:  # inside a multi-call step (img2img with heun, dpmpp_2s): re-grid from that call's time
            plan = self._plan_from(full, k)
        self._set_plan(plan)
        self._offset = k
        if self.timesteps is not None:
            # pipelines slice `timesteps[k:]` (a view) before calling set_begin_index: writing the
            # new model times in place is what makes them evaluate the network at the re-gridded times
            self.timesteps[k:] = self._t_model.to(self.timesteps.device, self.timesteps.dtype)

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
        sub = TimeGrid.from_times(g.schedule, ts[:-1] if g.final_zero else ts, g.final_zero)
        plan = self.solver.build(sub, m)
        if plan.nfe != m or not plan.steps[0].evals[0].x.is_identity:
            raise ValueError(f"solver {self.config.solver!r} cannot restart inside a step at model call {k}")
        return plan

    @staticmethod
    def _evals_of(plan: Plan) -> list:
        return [ev for s in plan.steps for ev in s.evals]

    # ------------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _emit(self, x, t_model):  # the "network" of the internal Denoiser: the output given to step()
        return self._pending

    def _noise_fn(self, x: torch.Tensor) -> torch.Tensor:  # the stepper's noise source
        if self._noise is None:  # all the plan's noise, from the generator(s) of this step call
            self._noise = predrawn_noise(self.plan, self._generator, x)
        return self._noise(x)

    def step(
        self,
        model_output: torch.Tensor,
        timestep=None,
        sample: torch.Tensor = None,
        generator=None,
        return_dict: bool = True,
        **kwargs,
    ):
        """Consume the model output of the current evaluation (its input was `sample`) and return
        the next evaluation's input.  `timestep` is not used to find the position: an internal
        counter is (repeated timesteps are fine).  `generator`: one torch.Generator or a list of
        per-sample generators for stochastic solvers (all the plan's noise is drawn from them at
        the first noisy step, exactly as `diffsampler.sample` does)."""
        eta = kwargs.get("eta")  # DDIMPipeline passes eta, use_clipped_model_output, variance_noise
        if eta and eta != getattr(self.solver, "eta", 0.0):
            raise ValueError(f"eta={eta} passed to step; set it on the solver: "
                             f"DiffSamplerScheduler(solver='ddim', solver_options={{'eta': {eta}}})")
        if self.plan is None:
            raise ValueError("call set_timesteps before step")
        if sample is None:
            raise ValueError("step needs the sample the model was evaluated on")
        run = self._stepper
        if run is not None and run.done:
            raise ValueError(f"step called {run.n + 1} times, the plan has {run.n} model calls; "
                             "call set_timesteps again to start a new trajectory")
        if run is None:
            run = self._stepper = Stepper(self.plan, self._denoiser, sample, self._noise_fn)
            self._next = run.next_input()
        elif run.k == 0 and run.eval.x.is_identity:
            run.x = sample  # the step's state follows edits made between steps (inpainting)
        self._generator = generator
        _, t_model, alpha, sigma, kind = self._next
        self._pending = model_output
        out, x0 = self._denoiser.predict_with_data(sample, t_model, alpha, sigma, kind)
        self._pending = None
        run.feed(out)
        if run.done:
            prev = run.x
        else:
            self._next = run.next_input()
            prev = self._next[0]
        if not return_dict:
            return (prev, x0)
        return DiffSamplerSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # ------------------------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps at model times `timesteps` (a scalar or one per sample)."""
        t = torch.as_tensor(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                            dtype=torch.float64).flatten() / self.schedule.time_scale
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alpha(t).to(original_samples.device, original_samples.dtype).view(shape)
        s = self.schedule.sigma(t).to(original_samples.device, original_samples.dtype).view(shape)
        return a * original_samples + s * noise
