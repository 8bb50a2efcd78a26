"""Parity by default: the diffsampler solver, options and grid that reproduce a diffusers scheduler.

`solver_for_config(config)` reads a diffusers scheduler config (a dict with `_class_name`, e.g.
`pipe.scheduler.config`) and returns the `DiffSamplerScheduler` arguments -- `solver`, `solver_options`,
`spacing`, `final` -- that build the same method on the same grid.  The noise schedule, prediction
type and thresholding / clip_sample keys are read by `DiffSamplerScheduler` itself.  An option the
mapping cannot honour raises a ValueError naming the key and what is supported; a class not mapped
yet is refused by name."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

__all__ = ["solver_for_config", "parity_arguments", "source_class", "SUPPORTED_CLASSES"]

#: diffusers scheduler classes reproduced, and the solvers they map to
SUPPORTED_CLASSES = {
    "DDIMScheduler": "ddim (diffusers_stride=True; timestep_spacing linspace / leading / trailing with steps_offset, "
                     "set_alpha_to_one, eta in step(), clip_sample / thresholding with the raw epsilon "
                     "(raw_noise=True), prediction types epsilon / sample / v_prediction)",
    "DDPMScheduler": "ddpm (variance_type fixed_small / fixed_small_log / fixed_large; timestep_spacing linspace / "
                     "leading / trailing with steps_offset; clip_sample / thresholding; prediction types epsilon / "
                     "sample / v_prediction)",
    "PNDMScheduler": "plms (skip_prk_steps True / False as its prk option, set_alpha_to_one, timestep_spacing "
                     "linspace / leading / trailing with steps_offset; num_inference_steps counts steps as "
                     "diffusers' does: budget='steps'; prediction_type epsilon)",
    "DPMSolverMultistepScheduler": "ddim / dpmpp_2m / dpmpp_3m (dpmsolver++), dpmpp_2m_sde / dpmpp_3m_sde "
                                   "(sde-dpmsolver++, diffusers' third-order D2 weight), dpm_solver_2m / dpm_solver_3m "
                                   "(dpmsolver; sde-dpmsolver with sde=True): solver_type midpoint / heun, "
                                   "solver_order 1-3, lower_order_final, euler_at_final, final_sigmas_type, "
                                   "thresholding, use_karras_sigmas / use_exponential_sigmas / use_lu_lambdas / "
                                   "use_beta_sigmas as the spacings diffusers_karras / _exponential / _lu / _beta, "
                                   "the same generator's noise",
    "DPMSolverSinglestepScheduler": "dpmpp (dpmsolver++; sde-dpmsolver++ with eta=1, diffusers' third-order D2 "
                                    "weight) / dpm_solver (dpmsolver) with intermediate='grid' (a step of order k "
                                    "spans k grid intervals, its intermediate calls at diffusers' timesteps): "
                                    "solver_order 1-3, solver_type midpoint / heun, lower_order_final, "
                                    "final_sigmas_type, thresholding, use_karras_sigmas / use_exponential_sigmas / "
                                    "use_beta_sigmas as the spacings diffusers_karras / _exponential / _beta, "
                                    "lambda_min_clipped, prediction types epsilon / sample / v_prediction, the same "
                                    "generator's noise",
    "DEISMultistepScheduler": "deis_logrho_1 / deis_logrho_2 / deis_logrho_3",
    "UniPCMultistepScheduler": "unipc (predict_x0=True; False as its prediction='noise'): solver_order 1-3, solver_type bh1 / bh2, disable_corrector, "
                               "lower_order_final, final_sigmas_type, thresholding, timestep_spacing, "
                               "use_karras / exponential / beta_sigmas as the spacings diffusers_karras / "
                               "_exponential / _beta",
    "EulerDiscreteScheduler": "euler on the class's sigma grid (convention='EulerDiscreteScheduler': timestep_spacing, "
                              "steps_offset, interpolation_type, use_karras / exponential / beta_sigmas, sigma_min / "
                              "sigma_max, final_sigmas_type, timestep_type; s_churn in step() is refused)",
    "EulerAncestralDiscreteScheduler": "euler_ancestral (eta=1) on the class's grid, the same generator's noise",
    "HeunDiscreteScheduler": "heun on the class's grid (n steps, 2n - 1 model calls; clip_sample)",
    "LMSDiscreteScheduler": "lms (order 4; step()'s order argument is refused) on the class's grid",
    "KDPM2DiscreteScheduler": "dpm2 on the class's grid (n steps, 2n - 1 model calls)",
    "KDPM2AncestralDiscreteScheduler": "dpm2_ancestral (eta=1) on the class's grid, the same generator's noise",
    "FlowMatchHeunDiscreteScheduler": "heun (coordinates='flow': Heun on dx/dt = (x - D) / t in the flow's x and t, "
                                      "an Euler step onto t = 0) on the class's grid (shift, num_train_timesteps); "
                                      "num_inference_steps counts its grid points (2n - 1 model calls); step()'s "
                                      "s_churn > 0 is refused",
    "IPNDMScheduler": "pndm (Adams-Bashforth 1-4 on eps with the warm-up, full order onto sigma = 0) on the class's "
                      "schedule alpha = cos(pi t / 2), sigma = sin(pi t / 2) (schedules.TrigVP, the network given t) "
                      "and grid (schedules.ipndm_times: first call at t = 1, alpha = 0, where the x0 estimate is "
                      "taken as 0 as the class does), v-prediction; trained_betas refused",
    "SASolverScheduler": "sa_solver: predictor_order / corrector_order 1-4, algorithm_type data_prediction / "
                         "noise_prediction, tau_func (None: 1 on timesteps 200..800; any function of the timestep "
                         "that is constant, or one value on one range of timesteps and 0 elsewhere, read at every "
                         "training timestep) as tau / tau_interval, lower_order_final, thresholding (data_prediction), "
                         "timestep_spacing linspace / leading / trailing with steps_offset, use_karras / exponential / "
                         "beta_sigmas (the zero-length last step's call corrects the result: final_corrector), "
                         "prediction types epsilon / sample / v_prediction, the same generator's noise (one draw per step)",
    "DPMSolverSDEScheduler": "dpmpp_sde (eta=1, r=0.5) on the class's grid (timestep_spacing, steps_offset, "
                             "use_karras / exponential / beta_sigmas; n steps, 2n - 1 calls) with its Brownian noise: "
                             "one torchsde tree for the batch seeded by noise_sampler_seed (else the generator, else "
                             "torch's global one as the class), queried at the class's float32 noise levels; "
                             "step()'s s_noise must be the solver's",
    "EDMEulerScheduler": "euler on the class's EDM grid (sigma_schedule karras / exponential, sigma_min, sigma_max, "
                         "rho, final_sigmas_type) with its preconditioning (c_in, c_noise = log(sigma) / 4, "
                         "c_skip / c_out with sigma_data: schedules.EDMPrecond, the output a v-prediction of "
                         "x0 / sigma_data, negated for prediction_type epsilon), init_noise_sigma, scale_model_input; "
                         "step()'s s_churn > 0 refused",
    "EDMDPMSolverMultistepScheduler": "DPMSolverMultistep's mapping (ddim / dpmpp_2m / dpmpp_3m, dpmpp_2m_sde; "
                                      "solver_order 1-3, solver_type, lower_order_final, euler_at_final) on the "
                                      "EDMEuler convention (its preconditioning, its grid with a float32 ramp); "
                                      "thresholding, final_sigmas_type='sigma_min' and third-order sde refused",
    "FlowMatchEulerDiscreteScheduler": "ddim (= the flow Euler step) on the class's grid (convention='FlowMatchEuler"
                                       "DiscreteScheduler': shift, use_dynamic_shifting with set_timesteps' mu, "
                                       "time_shift_type, shift_terminal, use_karras / exponential / beta_sigmas, "
                                       "sigmas= / timesteps= lists; invert_sigmas and stochastic_sampling refused)",
}


#: diffusers classes recognised by their config keys when a config has no `_class_name`
#: (`SchedulerMixin.config` of an instance built in memory has none)
_KNOWN_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "LCMScheduler",
    "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "IPNDMScheduler", "SASolverScheduler",
)


@functools.lru_cache(maxsize=None)
def _class_keys(name: str) -> frozenset | None:
    import diffusers

    import diffusers.schedulers

    try:
        cls = getattr(diffusers, name, None) or getattr(diffusers.schedulers, name, None)
    except Exception:  # a class whose optional backend is missing
        return None
    if cls is None or not isinstance(cls, type):
        return None
    return frozenset(k for k, p in inspect.signature(cls.__init__).parameters.items()
                     if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


def source_class(config: dict) -> str | list[str] | None:
    """The diffusers class of `config`: its `_class_name`; else, matching the config's diffusers keys (its
    keys but `_*` and DiffSamplerScheduler's own `solver`, `spacing`...) against each class's `__init__`
    arguments:

    1. the known class whose keys are exactly the config's (a full config saved without `_class_name`);
    2. else the supported class (`SUPPORTED_CLASSES`) whose keys include the config's (a partial config: a
       dict a user builds, a config saved by an older diffusers with fewer keys);
    3. else any other diffusers class whose keys include them (then refused by name, not reproduced).

    One name, or the list of candidates when several fit at the first step that finds any (the mapping
    refuses those, asking for `_class_name`), or None when no class has all the keys."""
    name = config.get("_class_name")
    if name is not None:
        return name
    keys = _diffusers_keys_of(config)
    exact = [n for n in _KNOWN_CLASSES if _class_keys(n) == keys]
    if exact:
        return exact[0] if len(exact) == 1 else exact
    for pool in (tuple(SUPPORTED_CLASSES), _KNOWN_CLASSES, _all_classes()):
        hits = sorted({n for n in pool if (k := _class_keys(n)) is not None and keys <= k})
        if hits:
            return hits[0] if len(hits) == 1 else hits
    return None


def _diffusers_keys_of(config: dict) -> frozenset:
    """The config's keys but `_*` ones and DiffSamplerScheduler's own that no diffusers class has."""
    return frozenset(k for k in config if not k.startswith("_") and k not in _own_only_keys())


@functools.lru_cache(maxsize=None)
def _generic_keys() -> frozenset:
    """The keys that name no method: the discrete noise schedule, prediction_type and the timestep grid's
    timestep_spacing / steps_offset (DiffSamplerScheduler's own arguments, and keys of nearly every diffusers
    class): a config of these alone names no class."""
    return frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "timestep_spacing", "steps_offset"})


@functools.lru_cache(maxsize=None)
def _own_only_keys() -> frozenset:
    from .scheduler import _DIFFUSERS_KEYS, DiffSamplerScheduler

    return frozenset(inspect.signature(DiffSamplerScheduler.__init__).parameters) - _DIFFUSERS_KEYS - {"self"}


@functools.lru_cache(maxsize=None)
def _all_classes() -> tuple:
    import diffusers.schedulers as schedulers

    return tuple(sorted({n for group in getattr(schedulers, "_import_structure", {}).values() for n in group
                   if n.endswith("Scheduler")}))


def _class_defaults(name: str) -> dict:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        return {}
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty}


class _Reader:
    """The source config with its class's defaults filled in; `require` refuses a value by key."""

    def __init__(self, name: str, config: dict):
        self.name, self.c = name, {**_class_defaults(name), **config}

    def __getitem__(self, key):
        return self.c.get(key)

    def require(self, key: str, allowed: tuple, why: str = "") -> Any:
        v = self.c.get(key)
        if v not in allowed:
            raise ValueError(f"{self.name}: {key}={v!r} cannot be reproduced by diffsampler "
                             f"(supported: {', '.join(repr(a) for a in allowed)}){why}; "
                             f"name a solver explicitly to sample with it anyway")
        return v

    def off(self, *keys: str) -> None:
        for k in keys:
            self.require(k, (False, None), " -- not reproduced yet")


#: the use_*_sigmas keys reproduced by `_grid`, in diffusers' order of precedence, and their spacings
_SIGMA_GRIDS = (("use_karras_sigmas", "diffusers_karras"), ("use_lu_lambdas", "diffusers_lu"),
                ("use_exponential_sigmas", "diffusers_exponential"), ("use_beta_sigmas", "diffusers_beta"))


_SIGMA_SPACINGS = tuple(v for _, v in _SIGMA_GRIDS)


def _grid(r: _Reader, sigma_grids: tuple = ()) -> str:
    """spacing from timestep_spacing, or the use_*_sigmas key in `sigma_grids` that is set (these
    grids ignore timestep_spacing); the other use_*_sigmas keys are refused by name."""
    keys = dict(_SIGMA_GRIDS)
    r.off(*(k for k in (*keys, "use_flow_sigmas") if k not in sigma_grids))
    for key, spacing in _SIGMA_GRIDS:
        if key in sigma_grids and r[key]:
            return spacing
    return r.require("timestep_spacing", ("linspace", "leading", "trailing"))


def _final(r: _Reader) -> str:
    return {"zero": "zero", "sigma_min": "last"}[r.require("final_sigmas_type", ("zero", "sigma_min"))]


#: diffusers' DDIM / DDPM / PNDM timestep_spacing -> our spacing of the same timesteps
_DDIM_SPACINGS = {"linspace": "ddim_linspace", "leading": "ddim_leading", "trailing": "trailing"}


def _ddim(r):
    # diffusers' DDIM evaluates at its timesteps and steps from t to t - num_train_timesteps // n (not always
    # the next timestep), down to final_alpha_cumprod; it clips / thresholds x0 but keeps the network's epsilon
    # (use_clipped_model_output=False, the pipelines' default) in the direction term
    spacing = _DDIM_SPACINGS[r.require("timestep_spacing", tuple(_DDIM_SPACINGS))]
    _check_zero_snr(r)
    return dict(solver="ddim", spacing=spacing, final="zero",
                solver_options={"diffusers_stride": True, "set_alpha_to_one": bool(r["set_alpha_to_one"]),
                                "raw_noise": bool(r["clip_sample"] or r["thresholding"])})


def _ddpm(r):
    # DDPMScheduler (0.42) steps from each timestep to the next one (previous_timestep), the last onto
    # alpha_bar = 1, with the posterior mean of the clipped / thresholded x0 and noise where t > 0
    spacing = _DDIM_SPACINGS[r.require("timestep_spacing", tuple(_DDIM_SPACINGS))]
    _check_zero_snr(r)
    variance = r.require("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"),
                         " -- learned / learned_range need the network's variance output; fixed_large_log "
                         "gives diffusers NaN noise (the square root of a log variance)")
    # fixed_small_log draws sqrt(beta~) z from exp(0.5 log beta~): the same noise as fixed_small
    return dict(solver="ddpm", spacing=spacing, final="zero",
                solver_options={"variance": "fixed_large" if variance == "fixed_large" else "fixed_small"})


def _pndm(r):
    # PNDMScheduler: set_timesteps(n) lays n timesteps and makes n + 1 model calls (PLMS, its Heun warm-up)
    # or n + 9 (three Runge-Kutta steps first); PLMS steps go from t to t - num_train_timesteps // n
    spacing = _DDIM_SPACINGS[r.require("timestep_spacing", tuple(_DDIM_SPACINGS))]
    r.require("prediction_type", ("epsilon",),
              " -- diffusers' PNDM combines raw v_prediction outputs of several times and converts the "
              "combination at one time, which the engine's per-call conversion does not reproduce (measured: "
              "up to 4.7 max abs apart on the mixture at 5 steps, 0.16 at 25)")
    # clip_sample / thresholding are no PNDMScheduler arguments: inherited from a DDPM config they do nothing
    return dict(solver="plms", spacing=spacing, final="zero", budget="steps", clip_sample=False, thresholding=False,
                solver_options={"prk": not r["skip_prk_steps"], "diffusers_stride": True,
                                "set_alpha_to_one": bool(r["set_alpha_to_one"])})


def _check_zero_snr(r):
    """diffusers' DDIM / DDPM keep alpha_bar_T = 0 with rescale_betas_zero_snr; our schedule floors it at 2^-24."""
    if r["rescale_betas_zero_snr"]:
        raise ValueError(f"{r.name}: rescale_betas_zero_snr=True cannot be reproduced by diffsampler (supported: "
                         "False): diffusers evaluates the network at alpha_bar_T = 0 exactly, our schedule floors it "
                         "at 2^-24 (lambda finite), which moves the samples by up to 9e-4 (max abs on the mixture, "
                         "DDIM, v_prediction, trailing, 5 steps; 3e-4 at 10); name a solver to sample with the floored "
                         "schedule anyway")


def _check_zero_snr_floor(r):
    """rescale_betas_zero_snr (Lin et al. 2024: the betas rescaled so that alpha_bar_T = 0): diffusers' DPM-Solver,
    UniPC and Euler-family classes then set the last alpha_bar to 2^-24, as `DiscreteVP` does where that keeps
    the table decreasing (scaled_linear: the one before is 8e-8); where the one before it is smaller (linear:
    4e-9) diffusers' table is not monotone, which no noise schedule represents: refused by name."""
    if not r["rescale_betas_zero_snr"]:
        return
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    acp = DDPMScheduler(rescale_betas_zero_snr=True, **{k: r[k] for k in keys if r[k] is not None}).alphas_cumprod
    if float(acp[-2]) <= 2.0**-24:
        raise ValueError(f"{r.name}: rescale_betas_zero_snr=True with beta_schedule={r['beta_schedule']!r} cannot be "
                         f"reproduced by diffsampler: diffusers sets the last alpha_bar to 2^-24, above the one before "
                         f"it ({float(acp[-2]):.3g}), a noise table that is not monotone, which a noise schedule cannot "
                         "represent (supported: rescale_betas_zero_snr=False, or a schedule whose alpha_bar before the "
                         "last is above 2^-24, e.g. 'scaled_linear'); name a solver to sample with the floored "
                         "schedule anyway")


#: DPMSolverMultistep's algorithm_type -> (solver of order 2, of order 3, options)
_DPM_ALGORITHMS = {
    "dpmsolver++": ("dpmpp_2m", "dpmpp_3m", {}),
    "sde-dpmsolver++": ("dpmpp_2m_sde", "dpmpp_3m_sde", {"third_order": "diffusers"}),
    "dpmsolver": ("dpm_solver_2m", "dpm_solver_3m", {}),
    "sde-dpmsolver": ("dpm_solver_2m", "dpm_solver_3m", {"sde": True}),
}


def _dpmsolver_multistep(r):
    algo = r.require("algorithm_type", tuple(_DPM_ALGORITHMS))
    order = r.require("solver_order", (1, 2, 3))
    solver_type = r.require("solver_type", ("midpoint", "heun"))
    if algo == "sde-dpmsolver" and order == 3:
        r.require("solver_order", (1, 2), " with algorithm_type='sde-dpmsolver' (diffusers' third-order update "
                                          "has no sde-dpmsolver form)")
    if r["variance_type"] in ("learned", "learned_range"):  # other values are ignored by diffusers here
        raise ValueError(f"{r.name}: variance_type={r['variance_type']!r} cannot be reproduced by diffsampler "
                         "(supported: None or a fixed variance type, which DPMSolverMultistep ignores)")
    _check_zero_snr_floor(r)
    r.off("use_dynamic_shifting")
    spacing, final = _grid(r, tuple(k for k, _ in _SIGMA_GRIDS)), _final(r)
    if final == "zero" and algo in ("dpmsolver", "sde-dpmsolver"):
        r.require("final_sigmas_type", ("sigma_min",), f" with algorithm_type={algo!r} (diffusers' own class raises)")
    lower = bool(r["lower_order_final"])
    euler_at_final = bool(r["euler_at_final"])
    if spacing in _SIGMA_SPACINGS and final == "last" and order > 1:
        # diffusers' last call steps from sigma_min to sigma_min (x unchanged); the grid ends at
        # sigma_min without it, so the order lowered there is no real step's
        key = next(k for k, v in _SIGMA_GRIDS if v == spacing)
        if order == 3:
            raise ValueError(f"{r.name}: solver_order=3 with {key}=True and final_sigmas_type='sigma_min' "
                             "cannot be reproduced by diffsampler (diffusers lowers the order of the step "
                             "before its zero-length last step, and its 3rd-order zero-length step is NaN "
                             "from 15 steps on); supported: solver_order 1 or 2, or final_sigmas_type='zero'")
        lower = False
        if euler_at_final:
            raise ValueError(f"{r.name}: euler_at_final=True with {key}=True and final_sigmas_type='sigma_min' "
                             "cannot be reproduced by diffsampler (its first-order step is diffusers' zero-length "
                             "last step; the step before it keeps its order); supported: euler_at_final=False "
                             "or final_sigmas_type='zero'")
    two, three, opts = _DPM_ALGORITHMS[algo]
    # clip_sample is no DPMSolverMultistep argument: one inherited from a DDPM config does nothing there
    if order == 1 and algo == "dpmsolver++":
        return dict(solver="ddim", spacing=spacing, final=final, clip_sample=False)
    opts = dict(opts, lower_order_final=lower, solver_type=solver_type, euler_at_final=euler_at_final)
    if order == 1:
        opts["order"] = 1
    if order < 3:
        opts.pop("third_order", None)
    return dict(solver=three if order == 3 else two, spacing=spacing, final=final, solver_options=opts,
                clip_sample=False)


#: DPMSolverSinglestep's algorithm_type -> (solver, options); diffusers' init turns "deis" into "dpmsolver++"
_DPM_SINGLESTEP_ALGORITHMS = {
    "dpmsolver++": ("dpmpp", {}),
    "deis": ("dpmpp", {}),
    "sde-dpmsolver++": ("dpmpp", {"eta": 1.0}),
    "dpmsolver": ("dpm_solver", {}),
}


def _dpmsolver_singlestep(r):
    # each call is one grid interval; a step of order k (diffusers' get_order_list: calls 1, 2, .., k) goes from
    # the sample at its first call with the outputs at its k grid points (intermediate="grid")
    algo = r.require("algorithm_type", tuple(_DPM_SINGLESTEP_ALGORITHMS))
    order = r.require("solver_order", (1, 2, 3))
    # diffusers' init turns solver_type logrho / bh1 / bh2 into midpoint
    solver_type = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}.get(r["solver_type"], r["solver_type"])
    if solver_type not in ("midpoint", "heun"):
        r.require("solver_type", ("midpoint", "heun"))
    r.off("use_dynamic_shifting", "use_flow_sigmas", "use_lu_lambdas")
    r.require("prediction_type", ("epsilon", "sample", "v_prediction"),
              " -- flow_prediction goes with use_flow_sigmas, a flow schedule this mapping does not build")
    if r["variance_type"] in ("learned", "learned_range"):
        raise ValueError(f"{r.name}: variance_type={r['variance_type']!r} cannot be reproduced by diffsampler "
                         "(supported: None): diffusers keeps the first 3 channels of the network's output there")
    # lambda_min_clipped: the adapter lays linspace on the clipped range as diffusers does (DPMSolverMultistep's rule)
    # its timesteps are linspace's unless a sigma grid is set (it has no timestep_spacing / steps_offset /
    # rescale_betas_zero_snr: such keys inherited from another class's config do nothing there, nor here)
    spacing = next((v for k, v in _SIGMA_GRIDS if r[k]), "linspace")
    final = _final(r)
    if final == "zero" and algo == "dpmsolver":
        r.require("final_sigmas_type", ("sigma_min",), " with algorithm_type='dpmsolver' (diffusers' own class raises)")
    if algo == "dpmsolver":
        r.require("thresholding", (False,), " with algorithm_type='dpmsolver': diffusers' own class fails there "
                  "(its convert_model_output indexes the alpha / sigma tables with timestep=None)")
    if spacing in _SIGMA_SPACINGS and final == "last" and order > 1:
        key = next(k for k, v in _SIGMA_GRIDS if v == spacing)
        raise ValueError(f"{r.name}: solver_order={order} with {key}=True and final_sigmas_type='sigma_min' "
                         "cannot be reproduced by diffsampler (diffusers' last call is a zero-length step from "
                         "sigma_min to sigma_min, part of a step of order up to 3 whose block the grid without it "
                         "cannot mirror); supported: solver_order 1 or final_sigmas_type='zero'")
    solver, opts = _DPM_SINGLESTEP_ALGORITHMS[algo]
    opts = dict(opts, order=order, intermediate="grid", solver_type=solver_type,
                lower_order_final=bool(r["lower_order_final"]))
    if algo == "sde-dpmsolver++" and order == 3 and solver_type == "heun":
        opts["third_order"] = "diffusers"
    return dict(solver=solver, spacing=spacing, final=final, solver_options=opts, clip_sample=False, steps_offset=0,
                rescale_betas_zero_snr=False)


def _deis(r):
    r.require("algorithm_type", ("deis",))
    r.require("solver_type", ("logrho",))
    order = r.require("solver_order", (1, 2, 3))
    r.off("use_dynamic_shifting")
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        # measured with the zero-length last step left out (as for DPMSolverMultistep's sigma_min grids): order 1
        # agrees to 1e-6, order 2 by up to 1.4e-4 (karras, 10 steps) and 2e-4 (beta, 4 steps) in float64 on both sides
        r.require(key, (False, None), " -- on these grids diffusers' DEIS and deis_logrho differ by up to 2e-4 (max "
                                      "abs on the mixture, in float64 too), which is not explained yet")
    return dict(solver=f"deis_logrho_{order}", spacing=_grid(r), final="last", clip_sample=False,
                solver_options={"lower_order_final": bool(r["lower_order_final"])})


def _unipc(r):
    r.require("solver_p", (None,), " -- an external predictor scheduler is not reproduced")
    order = r.require("solver_order", (1, 2, 3))
    solver_type = r.require("solver_type", ("bh1", "bh2"))
    r.off("use_dynamic_shifting")
    _check_zero_snr_floor(r)
    spacing, final = _grid(r, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")), _final(r)
    if spacing in _SIGMA_SPACINGS:  # UniPC's sigma grids span [sigma_min, sigma_max] where given
        key = next(k for k, v in _SIGMA_GRIDS if v == spacing)
        for bound in ("sigma_min", "sigma_max"):
            if r[bound] is not None:
                raise ValueError(f"{r.name}: {bound}={r[bound]!r} with {key}=True cannot be reproduced by diffsampler "
                                 "(supported: None, the training table's end; the diffusers_* grids span the whole "
                                 "table); name a solver to sample with it anyway")
    dis = r["disable_corrector"] or []
    try:
        dis = sorted({int(k) for k in dis})
    except (TypeError, ValueError):
        raise ValueError(f"{r.name}: disable_corrector={r['disable_corrector']!r} cannot be reproduced by "
                         "diffsampler (supported: a list of step indices)") from None
    lower = bool(r["lower_order_final"])
    if final == "last" and spacing in _SIGMA_SPACINGS and order > 1:
        key = next(k for k, v in _SIGMA_GRIDS if v == spacing)
        raise ValueError(f"{r.name}: solver_order={order} with {key}=True and final_sigmas_type='sigma_min' "
                         "cannot be reproduced by diffsampler (diffusers' last call is a zero-length step from "
                         "sigma_min to sigma_min whose order and corrector the grid without it cannot mirror); "
                         "supported: solver_order 1 or final_sigmas_type='zero'")
    opts = {"order": order, "solver_type": solver_type, "disable_corrector": dis, "lower_order_final": lower}
    if not r["predict_x0"]:  # noise prediction; diffusers thresholds only the data prediction: not here
        return dict(solver="unipc", spacing=spacing, final=final, clip_sample=False, thresholding=False,
                    solver_options={**opts, "prediction": "noise"})
    return dict(solver="unipc", spacing=spacing, final=final, clip_sample=False, solver_options=opts)


def _k_class(solver: str, preds: tuple, sigma_grids: bool = True, clip: bool = False):
    """A sigma-space class (Euler, Heun, LMS, KDPM2 and their ancestral forms): `solver` on the class's own
    grid and conventions (DiffSamplerScheduler(convention=<class>), schedules.diffusers_k_grid)."""
    def mapper(r):
        r.require("prediction_type", preds, " -- diffusers' own class raises for it" if "sample" not in preds else "")
        r.require("timestep_spacing", ("linspace", "leading", "trailing"))
        if not sigma_grids:
            r.off("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        if r["beta_schedule"] == "exp":
            raise ValueError(f"{r.name}: beta_schedule='exp' cannot be reproduced by diffsampler (supported: "
                             "'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas)")
        _check_zero_snr_floor(r)
        out = dict(solver=solver, convention=r.name, thresholding=False,
                   clip_sample=bool(r["clip_sample"]) if clip else False)
        if r.name == "EulerDiscreteScheduler":
            out["final"] = _final(r)
        return out
    return mapper


def _flowmatch_euler(r):
    # diffusers' flow Euler step x + (t_next - t) v is DDIM's data-form step on the flow alpha = 1 - t,
    # sigma = t (x_next = alpha_next D + sigma_next eps); the grid is the class's (schedules.flowmatch_sigmas)
    r.off("invert_sigmas")
    r.require("stochastic_sampling", (False,), " -- its step x_next = (1 - t_next) x0 + t_next z (all noise "
              "drawn afresh) is not in the registry")
    r.require("time_shift_type", ("exponential", "linear"))
    return dict(solver="ddim", convention="FlowMatchEulerDiscreteScheduler", final="zero", schedule_type="flow",
                clip_sample=False, thresholding=False)  # no arguments of the class: inherited ones do nothing


def _flowmatch_heun(r):
    # Heun on dx/dt = (x - D) / t in the flow's own x and t (heun, coordinates="flow": data predictions, so it
    # starts at t = 1), an Euler step onto t = 0; the grid is FlowMatchEuler's with the config's shift and
    # num_train_timesteps (its only keys); set_timesteps(n) lays n points: 2n - 1 calls (budget="steps")
    return dict(solver="heun", solver_options={"coordinates": "flow"}, convention="FlowMatchHeunDiscreteScheduler",
                final="zero", schedule_type="flow", budget="steps", clip_sample=False, thresholding=False)


def _ipndm(r):
    # pndm (AB 1-4 on eps with the lower-order warm-up, full order onto sigma = 0) on the class's schedule
    # (schedules.TrigVP: alpha = cos(pi t / 2), the network given t) and grid (schedules.ipndm_times), v-prediction;
    # its first step, from alpha = 0, takes the x0 estimate as 0 (deis.transfer), as the class does
    if r["trained_betas"] is not None:
        raise ValueError(f"{r.name}: trained_betas cannot be reproduced by diffsampler (supported: None): the class "
                         "then takes them as its per-step sigma table (n + 1 values for n steps, sigma = betas), "
                         "not a noise schedule")
    # num_train_timesteps does nothing in the class (its grid is s = linspace(1, 0, n + 1)): nothing to map
    # clip_sample / thresholding are no IPNDMScheduler arguments: inherited from a DDPM config they do nothing
    return dict(solver="pndm", convention="IPNDMScheduler", final="zero", prediction_type="v_prediction",
                solver_options={"order": 4, "lower_order_final": False}, clip_sample=False, thresholding=False)


def _sa_tau(r, spacing: str) -> dict:
    """SASolverScheduler's tau_func as sa_solver's tau / tau_interval: tau_func is read at every training
    timestep (diffusers calls it with the step's integer timestep); a constant is `tau`, one value c on one
    range of timesteps a..b and 0 elsewhere is tau = c on the noise levels rho = sigma / alpha of the grid
    points whose timestep diffusers gives as a..b (rounded on its own and karras grids: rho(a - 1/2) ..
    rho(b + 1/2); truncated on the exponential / beta grids: rho(a) .. rho(b + 1)).  Any other shape is
    refused by name."""
    import math

    import torch

    from ..schedules import DiscreteVP

    fn = r["tau_func"]
    T = int(r["num_train_timesteps"])
    if fn is None:  # diffusers' default: lambda t: 1 if t >= 200 and t <= 800 else 0
        fn = lambda t: 1 if 200 <= t <= 800 else 0  # noqa: E731
    try:
        vals = [float(fn(t)) for t in range(T)]
    except Exception as e:
        raise ValueError(f"{r.name}: tau_func could not be read at the training timesteps 0..{T - 1} ({e!r}); "
                         "supported: a function of the integer timestep") from None
    if any(not math.isfinite(v) or v < 0 for v in vals):
        bad = next(v for v in vals if not math.isfinite(v) or v < 0)
        raise ValueError(f"{r.name}: tau_func gives {bad} cannot be reproduced by diffsampler (supported: finite "
                         "values >= 0; a negative tau flips the sign of noise_prediction's noise)")
    if len(set(vals)) == 1:
        return {"tau": vals[0]}
    on = [t for t, v in enumerate(vals) if v != 0.0]
    a, b = on[0], on[-1]
    if len({vals[t] for t in on}) != 1 or b - a + 1 != len(on):
        raise ValueError(f"{r.name}: tau_func cannot be reproduced by diffsampler (supported: a constant, or one "
                         "value on one range of timesteps and 0 elsewhere, as its default 1 on 200..800)")
    sch = DiscreteVP.from_diffusers_config(dict(r.c))
    lo, hi = ((a - 0.5, b + 0.5) if spacing not in ("diffusers_exponential", "diffusers_beta") else (a, b + 1))
    rho = lambda t: float(sch.rho(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    return {"tau": vals[a], "tau_interval": [0.0 if lo <= 0 else rho(lo), math.inf if hi >= T - 1 else rho(hi)]}


def _sasolver(r):
    # SASolverScheduler steps from its timesteps to the next, the last one to t = 0 (sigma_last) -- or, on its
    # use_*_sigmas grids, from sigma_min to sigma_min, a call whose output only corrects the result
    # (final_corrector); one randn per step from the step's generator
    p = r.require("predictor_order", (1, 2, 3, 4))
    c = r.require("corrector_order", (1, 2, 3, 4))
    algo = r.require("algorithm_type", ("data_prediction", "noise_prediction"))
    r.require("prediction_type", ("epsilon", "sample", "v_prediction"),
              " -- flow_prediction needs use_flow_sigmas, which is not reproduced")
    if r["variance_type"] in ("learned", "learned_range"):
        raise ValueError(f"{r.name}: variance_type={r['variance_type']!r} cannot be reproduced by diffsampler "
                         "(supported: None; diffusers keeps the first 3 channels of the output)")
    if r["thresholding"] and algo == "noise_prediction":
        raise ValueError(f"{r.name}: thresholding=True with algorithm_type='noise_prediction' cannot be reproduced "
                         "by diffsampler (diffusers' thresholding there indexes its alpha table by a timestep it "
                         "does not have); supported: thresholding with algorithm_type='data_prediction'")
    _check_zero_snr(r)
    spacing = _grid(r, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
    if spacing == "diffusers_karras" and r["beta_schedule"] == "squaredcos_cap_v2":
        raise ValueError(f"{r.name}: use_karras_sigmas=True with beta_schedule='squaredcos_cap_v2' cannot be "
                         "reproduced by diffsampler (SASolverScheduler rounds these timesteps, the karras grid "
                         "of DPMSolverMultistepScheduler that the adapter reproduces does not); supported: another "
                         "beta_schedule or grid")
    opts = {"predictor_order": p, "corrector_order": c, "prediction": algo.split("_")[0],
            "lower_order_final": bool(r["lower_order_final"]), **_sa_tau(r, spacing)}
    if spacing in _SIGMA_SPACINGS:
        opts["final_corrector"] = True
    return dict(solver="sa_solver", spacing=spacing, final="last", clip_sample=False, solver_options=opts)


def _edm_euler(r):
    # euler (Karras' Euler on dv/drho = eps, rho = sigma / sigma_data) on the class's EDM grid, the network read
    # through its preconditioning (schedules.EDMPrecond); keys sigma_min / sigma_max / sigma_data / rho /
    # sigma_schedule / prediction_type / final_sigmas_type are the adapter's convention's; num_train_timesteps
    # lays only the class's training table (unused when sampling)
    r.require("prediction_type", ("epsilon", "v_prediction"), " -- diffusers' own class raises for it")
    r.require("sigma_schedule", ("karras", "exponential"))
    return dict(solver="euler", convention="EDMEulerScheduler", final=_final(r), thresholding=False, clip_sample=False)


def _edm_dpm(r):
    # DPMSolverMultistep's method (the same mapping: `_dpmsolver_multistep`) on the EDM preconditioning and grid:
    # DPM-Solver++ in lambda = -log sigma is the same on the VE x and on EDMPrecond's scaled one (h unchanged)
    r.require("prediction_type", ("epsilon", "v_prediction"), " -- diffusers' own class raises for it")
    r.require("sigma_schedule", ("karras", "exponential"))
    algo = r.require("algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
    order = r.require("solver_order", (1, 2, 3))
    if algo == "sde-dpmsolver++" and order == 3:
        r.require("solver_order", (1, 2), " with algorithm_type='sde-dpmsolver++' (the class's third-order step "
                                          "adds no noise)")
    r.require("thresholding", (False,), " -- the class thresholds x0 in its own units; the adapter's data "
              "prediction is x0 / sigma_data")
    r.require("final_sigmas_type", ("zero",), " -- its last call steps from sigma_min to sigma_min with the order "
              "lowered the step before, which the grid without that call cannot mirror")
    keys = ("algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type")
    out = _dpmsolver_multistep(_Reader("DPMSolverMultistepScheduler", {k: r[k] for k in keys}))
    out.pop("spacing", None)
    return dict(out, convention="EDMDPMSolverMultistepScheduler", thresholding=False, clip_sample=False)


def _not_yet(why: str):
    def refuse(r):
        raise ValueError(f"{r.name} cannot be reproduced by diffsampler yet: {why} (reproduced: "
                         f"{', '.join(sorted(SUPPORTED_CLASSES))}); name a solver (solver=...) to replace it "
                         "with one of diffsampler.available()")
    return refuse


_MAPPERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "PNDMScheduler": _pndm,
    "DPMSolverMultistepScheduler": _dpmsolver_multistep,
    "DPMSolverSinglestepScheduler": _dpmsolver_singlestep,
    "DEISMultistepScheduler": _deis,
    "EulerDiscreteScheduler": _k_class("euler", ("epsilon", "v_prediction", "sample")),
    "EulerAncestralDiscreteScheduler": _k_class("euler_ancestral", ("epsilon", "v_prediction"), sigma_grids=False),
    "HeunDiscreteScheduler": _k_class("heun", ("epsilon", "v_prediction", "sample"), clip=True),
    "LMSDiscreteScheduler": _k_class("lms", ("epsilon", "v_prediction", "sample")),
    "KDPM2DiscreteScheduler": _k_class("dpm2", ("epsilon", "v_prediction")),
    "KDPM2AncestralDiscreteScheduler": _k_class("dpm2_ancestral", ("epsilon", "v_prediction")),
    "FlowMatchEulerDiscreteScheduler": _flowmatch_euler,
    "FlowMatchHeunDiscreteScheduler": _flowmatch_heun,
    "IPNDMScheduler": _ipndm,
    "EDMEulerScheduler": _edm_euler,
    "EDMDPMSolverMultistepScheduler": _edm_dpm,
    "SASolverScheduler": _sasolver,
    "UniPCMultistepScheduler": _unipc,
    "DPMSolverSDEScheduler": _k_class("dpmpp_sde", ("epsilon", "v_prediction")),
}


def solver_for_config(config: dict, class_name: str | list | None = None) -> dict:
    """`DiffSamplerScheduler` arguments (`solver`, `spacing`, `final`, `solver_options`) that
    reproduce the diffusers scheduler of `config` (keyed by `class_name`, else its `_class_name`,
    else the class its keys fit: `source_class`)."""
    name = class_name or source_class(config)
    if name is None:
        raise ValueError("the config has no _class_name and its keys are no diffusers scheduler's: add "
                         "_class_name or name a solver (solver=...)")
    if isinstance(name, list):
        raise ValueError(f"the config has no _class_name and its keys fit several diffusers scheduler classes "
                         f"({', '.join(name)}): add _class_name (e.g. {{'_class_name': {name[0]!r}, ...}}) or name "
                         "a solver (solver=...)")
    fn = _MAPPERS.get(name)
    if fn is None:
        raise ValueError(f"{name} cannot be reproduced by diffsampler: it is not in the registry yet "
                         f"(reproduced: {', '.join(sorted(SUPPORTED_CLASSES))}); name a solver (solver=...) "
                         "to replace it with one of diffsampler.available()")
    out = fn(_Reader(name, {k: v for k, v in config.items() if not k.startswith("_")}))
    out.setdefault("solver_options", {})
    return out


def parity_arguments(config: dict, overrides: dict | None = None, class_name: str | None = None) -> dict:
    """What `DiffSamplerScheduler.from_config(config, **overrides)` with no solver named uses: the
    arguments of `solver_for_config` for a diffusers config (its keys updated by `overrides`); {}
    (the default solver) for a config of DiffSamplerScheduler's own keys only (with no `_class_name`).
    A config without `_class_name` is matched to a class by its keys (`source_class`); one whose keys
    fit several classes is refused naming them; one whose keys fit no diffusers class warns, naming
    the keys and `_class_name`."""
    from .scheduler import DiffSamplerScheduler

    if class_name is None and config.get("_class_name") is None:
        keys = _diffusers_keys_of(config)
        # no key of one class more than another's: DiffSamplerScheduler's own config -- unless they are exactly a
        # known class's full key set (IPNDMScheduler's: num_train_timesteps, trained_betas)
        if keys <= _generic_keys() and not any(_class_keys(n) == keys for n in _KNOWN_CLASSES):
            return {}
        if source_class(config) is None:
            own = set(inspect.signature(DiffSamplerScheduler.__init__).parameters)
            foreign = sorted(k for k in keys if k not in own)
            warnings.warn(f"the config has no _class_name and its keys ({', '.join(foreign[:5])}"
                          f"{'...' if len(foreign) > 5 else ''}) are no single diffusers scheduler's: sampling with "
                          "the default solver 'dpmpp_2m'; add _class_name or name a solver (solver=...)", stacklevel=3)
            return {}
    merged = {**config, **(overrides or {})}
    return solver_for_config(merged, class_name or source_class(config))
