"""The one sampling loop: sample(denoiser, x_T, solver=..., nfe=..., spacing=..., seeds=...)."""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import numpy as np
import torch

from ..grids import canonical_spacing
from ..schedules import FINALS, SPACINGS, TimeGrid, schedule_differences, time_grid
from .plan import Plan, run_plan
from .registry import Solver, get
from .time_shift import TimeShift

#: the spacing of `sample` / `make_plan` when none is given
DEFAULT_SPACING = "time_uniform"
#: the number of model calls of `sample` when neither nfe, a grid nor a plan fixes it
DEFAULT_NFE = 10

__all__ = ["sample", "make_plan", "check_seeds", "check_schedule", "per_sample_generators", "per_sample_noise",
           "initial_noise", "predrawn_noise", "ondemand_noise", "DEFAULT_SPACING", "DEFAULT_NFE"]


def per_sample_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample (as edm's StackedRandomGenerator): sample k depends only on seed k."""
    return [torch.Generator(device).manual_seed(int(s)) for s in check_seeds(seeds)]


def check_seeds(seeds) -> list:
    """`seeds` as a list of integers, one per sample; anything else is refused, naming it."""
    if isinstance(seeds, torch.Tensor):
        if seeds.ndim != 1 or seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise ValueError(f"seeds must be integers, one per sample (e.g. range(16)); got a {seeds.dtype} "
                             f"tensor of shape {tuple(seeds.shape)}")
        return seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or not hasattr(seeds, "__iter__"):
        raise ValueError(f"seeds must be a sequence of integers, one per sample (e.g. range(16)); "
                         f"got {type(seeds).__name__} {seeds!r}")
    seeds = list(seeds)
    for i, s in enumerate(seeds):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds must be integers, one per sample (e.g. range(16)); "
                             f"seeds[{i}] = {s!r} is a {type(s).__name__}")
    return seeds


def per_sample_noise(shape: Sequence[int], generators, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` (batch first) drawn row by row from per-sample generators
    (a list), or from one shared generator / the global RNG.  Noise is drawn on each generator's
    device (CPU generators give the same numbers on any hardware) and moved to `device`."""
    if isinstance(generators, (list, tuple)):
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                            for g in generators]).to(device)
    gdev = generators.device if generators is not None else device
    return torch.randn(tuple(shape), generator=generators, device=gdev, dtype=dtype).to(device)


def initial_noise(shape, schedule, seeds=None, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, prior_std^2 I) for `schedule`, per-sample seeded."""
    _check_randomness(seeds, generator)
    gens = per_sample_generators(seeds) if seeds is not None else generator
    return per_sample_noise(shape, gens, device, dtype) * schedule.prior_std


def make_plan(
    solver: str | Solver,
    schedule,
    nfe: int | None = None,
    spacing=None,
    final: str | None = None,
    grid: TimeGrid | None = None,
    **options,
) -> Plan:
    """Resolve solver name + NFE budget + spacing into a Plan (nothing runs).

    spacing: None means DEFAULT_SPACING.  final: "zero" or "last"; None means "zero" (a solver
    plan: its own final point).
    grid: explicit time points (built for `schedule`); they fix the spacing and the final point, so
    `spacing` is refused and `final` / `nfe` must agree with the grid (singlestep solvers: `nfe`
    chooses between the budgets a grid allows).
    A solver plan (`"plan:<name or path>"`, samplers/usf.py) brings its own time points, NFE and
    final point: `nfe` may be None or must equal the plan's, `spacing` must stay at its default."""
    s = get(solver, **options)
    if getattr(s, "adaptive", False):
        return _adaptive_plan(s, schedule, nfe, spacing, final, grid)
    if grid is not None:
        if isinstance(solver, str):  # a built Solver (the adapter's) lays its own alias grid
            _check_alias_spacing(s, None, grid)
        return _plan_on_grid(s, schedule, grid, nfe, spacing, final)
    own_grid = getattr(s, "own_grid", None)  # a solver plan carries its own time points and NFE
    if own_grid is not None:
        if spacing not in (None, "plan", DEFAULT_SPACING):
            raise ValueError(f"solver {s.name!r} carries its own time points; spacing={spacing!r} cannot apply "
                             "(leave spacing at its default, or pass grid= to run the plan's steps on other times)")
        final = s.plan.final if final is None else final
        s.steps_for_nfe(s.min_nfe if nfe is None else nfe, final_zero=(final == "zero"))
        return _built(s, own_grid(schedule), nfe, "plan")
    if nfe is None:
        raise ValueError("give nfe (number of model calls) or an explicit grid")
    final = "zero" if final is None else final
    _check_alias_spacing(s, spacing)
    spacing = (s.alias_spacing or DEFAULT_SPACING) if spacing is None else spacing
    spacing_kw = {}
    if isinstance(spacing, dict):
        if "name" not in spacing:
            raise ValueError(f"a spacing given as a dict needs its 'name' (one of {SPACINGS}), "
                             f"got keys {sorted(spacing)}")
        spacing_kw = dict(spacing)
        spacing = spacing_kw.pop("name")
    steps = s.steps_for_nfe(nfe, final_zero=(final == "zero"))
    grid = time_grid(schedule, steps, spacing, final=final, **spacing_kw)
    return _built(s, grid, nfe, spacing if isinstance(spacing, str) else "explicit")


def _adaptive_plan(s: Solver, schedule, nfe, spacing, final, grid) -> Plan:
    """An adaptive solver's plan (dpm_adaptive): nfe is a budget (None: none), it lays its own steps."""
    if grid is not None:
        raise ValueError(f"solver {s.name!r} chooses its steps while it samples (error control); grid= cannot "
                         "apply (drop it; nfe is its budget of model calls)")
    if spacing not in (None, DEFAULT_SPACING, "adaptive"):
        raise ValueError(f"solver {s.name!r} chooses its steps while it samples (error control); spacing="
                         f"{spacing!r} cannot apply (leave spacing at its default)")
    final = "zero" if final is None else final
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}, got {final!r}")
    return s.plan_for(schedule, nfe, final == "zero")


def _check_alias_spacing(s: Solver, spacing, grid=None) -> None:
    """A sampler name that fixes its grid ("DPM++ 2M Karras") takes no other spacing or grid."""
    fixed = s.alias_spacing
    if fixed is None or (grid is None and spacing is None):
        return
    name = spacing.get("name") if isinstance(spacing, dict) else spacing
    if grid is None and canonical_spacing(name) == fixed:
        return
    what = "grid=" if grid is not None else f"spacing={spacing!r}"
    raise ValueError(f"solver {s.alias!r} fixes spacing={fixed!r}; {what} cannot apply (drop it, or name the "
                     f"sampler without its schedule: solver={s.name!r})")


def _built(s: Solver, grid: TimeGrid, nfe: int | None, spacing: str) -> Plan:
    plan = s.build(grid, nfe)
    plan.info.setdefault("spacing", spacing)
    return plan


def _plan_on_grid(s: Solver, schedule, grid: TimeGrid, nfe, spacing, final) -> Plan:
    """A plan on explicit times: every argument the grid already fixes must agree with it."""
    if not isinstance(grid, TimeGrid):
        raise ValueError(f"grid must be a TimeGrid (time_grid(schedule, steps, ...)), got {type(grid).__name__}")
    check_schedule(grid, schedule, "grid", "the schedule given")
    if spacing is not None:
        raise ValueError(f"spacing={spacing!r} cannot apply with grid=: the grid fixes the time points "
                         "(drop spacing, or drop grid)")
    _check_final(final, grid, "grid")
    if nfe is None:
        return _built(s, grid, None, "explicit")
    s.check_nfe(nfe)
    try:
        plan = _built(s, grid, nfe, "explicit")
    except ValueError:
        own = s.build(grid).nfe
        if own == nfe:  # not about the budget: the solver's own error stands
            raise
        raise _nfe_on_grid(s, grid, nfe, own) from None
    if plan.nfe != nfe:
        raise _nfe_on_grid(s, grid, nfe, plan.nfe)
    return plan


def _nfe_on_grid(s: Solver, grid: TimeGrid, nfe: int, own: int) -> ValueError:
    return ValueError(f"nfe={nfe} cannot apply with grid=: solver {s.name!r} spends {own} model calls on this "
                      f"grid ({grid.steps} steps); drop nfe (the grid decides it), or drop grid")


def _check_final(final, grid: TimeGrid, what: str) -> None:
    if final is None:
        return
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}, got {final!r}")
    own = "zero" if grid.final_zero else "last"
    if final != own:
        raise ValueError(f"final={final!r} cannot apply with the {what}: it ends with final={own!r} "
                         f"({'at sigma = 0' if grid.final_zero else 'at its last time'}); drop final")


def check_schedule(grid: TimeGrid, schedule, what: str, against: str = "the denoiser's schedule") -> None:
    """Refuse a grid (or a plan's grid) built for another noise schedule than `schedule`."""
    if grid.schedule is None:
        raise ValueError(f"the {what} records no noise schedule; build it with time_grid(schedule, ...) or "
                         "TimeGrid.from_times(schedule, ...)")
    diff = schedule_differences(grid.schedule, schedule)
    if diff:
        raise ValueError(f"the {what} was built for another schedule, {grid.schedule!r}, than {against}, "
                         f"{schedule!r} ({'; '.join(diff)}); build it for {against}")


def _check_compiled(plan: Plan, nfe, spacing, final, grid, options: dict) -> None:
    """A compiled Plan fixes its solver, options, times and NFE: only agreeing values pass."""
    if options:
        raise ValueError(f"solver options {sorted(options)} cannot apply to a compiled Plan (its coefficients are "
                         f"fixed); build it with make_plan(solver, schedule, nfe, ..., {next(iter(options))}=...)")
    if nfe is not None and nfe != plan.nfe:
        raise ValueError(f"nfe={nfe!r} cannot apply to a compiled Plan: the plan spends {plan.nfe} model calls; "
                         "drop nfe, or build another plan with make_plan")
    if spacing is not None:
        raise ValueError(f"spacing={spacing!r} cannot apply to a compiled Plan (its time points are fixed); "
                         "build it with make_plan(..., spacing=...)")
    if grid is not None and grid is not plan.grid:
        raise ValueError("grid= cannot apply to a compiled Plan (its time points are fixed); "
                         "build it with make_plan(solver, schedule, grid=grid)")
    _check_final(final, plan.grid, "compiled Plan")


def _check_randomness(seeds, generator) -> None:
    if seeds is not None and generator is not None:
        raise ValueError("seeds= and generator= both given: pass one of them (seeds: one integer per sample; "
                         "generator: a torch.Generator, or a list of one per sample)")
    if seeds is not None:
        check_seeds(seeds)
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    bad = [g for g in gens if g is not None and not isinstance(g, torch.Generator)]
    if bad:
        raise ValueError(f"generator must be a torch.Generator or a list of one per sample, got "
                         f"{type(bad[0]).__name__} {bad[0]!r}")


def _check_guidance(guidance) -> None:
    if guidance is None or callable(getattr(guidance, "wrap", None)) or callable(getattr(guidance, "run", None)):
        return
    raise ValueError(f"guidance= got {type(guidance).__name__} {guidance!r}; accepted: None, an object with "
                     "wrap(denoiser) -> denoiser (e.g. ClassifierFreeGuidance(scale, uncond=...), "
                     "MinorityGuidance) or one with run(plan, denoiser, x, ...) (e.g. SVDD)")


def _check_x_T(x_T, shape) -> None:
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        what = f"a {x_T.dtype} tensor" if isinstance(x_T, torch.Tensor) else type(x_T).__name__
        raise ValueError(f"x_T must be a floating-point torch.Tensor, got {what}")
    if shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape={tuple(shape)} disagrees with x_T of shape {tuple(x_T.shape)}; "
                         "give x_T, or shape (with seeds or generator), not both")


def _resolve_plan(schedule, solver, nfe, spacing, final, grid, options: dict) -> Plan:
    if isinstance(solver, Plan):
        _check_compiled(solver, nfe, spacing, final, grid, options)
        check_schedule(solver.grid, schedule, "plan")
        return solver
    s = get(solver, **options)
    if nfe is None and grid is None and getattr(s, "own_grid", None) is None and not getattr(s, "adaptive", False):
        nfe = DEFAULT_NFE
    if grid is not None:
        _check_alias_spacing(s, None, grid)
    if grid is not None and isinstance(grid, TimeGrid):
        check_schedule(grid, schedule, "grid")
    return make_plan(s, schedule, nfe, spacing, final, grid)


@torch.no_grad()  # sampling never needs the autograd graph (guidance that does enables it locally)
def sample(
    denoiser,
    x_T: torch.Tensor | None = None,
    solver: str | Solver | Plan = "dpmpp_2m",
    nfe: int | None = None,
    spacing=None,
    final: str | None = None,
    grid: TimeGrid | None = None,
    *,
    shape: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    generator=None,
    device: str | torch.device | None = None,
    progress: bool = False,
    callback: Callable | None = None,
    guidance=None,
    time_shift=None,
    **solver_options,
) -> torch.Tensor:
    """Sample with `solver` spending exactly `nfe` model calls.

    Every argument takes effect or is refused (ValueError naming it) before any model call.
    nfe: None means DEFAULT_NFE (10), unless `grid`, a compiled Plan or a solver plan fixes it
    (then a given nfe must agree).  spacing: None means DEFAULT_SPACING; refused with `grid` or a
    Plan.  final: "zero" | "last"; with `grid` or a Plan it must agree with their last point.
    solver: a name, a Solver, or a Plan from make_plan (built for the denoiser's schedule; solver
    options then belong to make_plan).
    x_T: initial noise; if None it is drawn for `shape` from `seeds` (integers, one per sample, on
    the CPU so every device gets the same numbers) or `generator` (not both), then moved to `device`.
    Stochastic solvers draw their step noise from the same per-sample generators, so with `seeds`
    sample k depends only on seed k whatever the batch size.
    time_shift: dict(window=..., cutoff=...) turns on the Time-Shift sampler for any solver.
    guidance: an object with `wrap(denoiser) -> denoiser` (e.g. CFG) or a `run(plan, denoiser, x,
    noise_fn, ...)` strategy (e.g. SVDD); samplers never import guidance.
    """
    _check_guidance(guidance)
    _check_randomness(seeds, generator)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable (i, x, model_output), got {type(callback).__name__}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be a bool, got {type(progress).__name__} {progress!r}")
    if x_T is not None:
        _check_x_T(x_T, shape)
    plan = _resolve_plan(denoiser.schedule, solver, nfe, spacing, final, grid, solver_options)
    strategy = guidance is not None and callable(getattr(guidance, "run", None))
    if plan.info.get("time_shift") is not None:  # a solver plan that carries its Time-Shift setting
        if time_shift is not None:
            raise ValueError(f"time_shift={time_shift!r} cannot apply: the solver plan {plan.solver!r} carries its own "
                             f"time_shift {plan.info['time_shift']}; drop time_shift (or edit the plan)")
        time_shift = dict(plan.info["time_shift"])
    if strategy and getattr(plan, "adaptive", False):
        raise ValueError(f"solver {plan.solver!r} chooses its steps while it samples; the sampling strategy "
                         f"{type(guidance).__name__} runs a fixed plan's steps: use another solver")
    if strategy and time_shift is not None:
        raise ValueError(f"time_shift cannot be combined with the sampling strategy {type(guidance).__name__} "
                         "(it runs its own loop); drop one of them")
    shift = TimeShift.from_spec(time_shift)
    gens = per_sample_generators(seeds) if seeds is not None else generator
    if x_T is None:
        if shape is None:
            raise ValueError("give x_T or shape (with seeds or generator)")
        x_T = per_sample_noise(shape, gens, device or "cpu").mul_(denoiser.schedule.prior_std)
    else:
        if seeds is not None and len(seeds) != x_T.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x_T.shape[0]}")
        if device is not None:
            x_T = x_T.to(device)
    noise_fn = None
    if plan.stochastic:
        if gens is None:
            raise ValueError(f"solver {plan.solver!r} is stochastic: pass seeds= or generator= for reproducible noise")
        if plan.info.get("noise") == "brownian":  # one Brownian tree per sample, seeded by its seed
            if strategy:
                raise ValueError(f"solver {plan.solver!r} with noise='brownian' cannot be combined with the sampling "
                                 f"strategy {type(guidance).__name__} (it draws its own noise); use noise='gaussian'")
            from .brownian import brownian_noise

            noise_fn = brownian_noise(plan, x_T, gens)
        else:
            # a strategy (SVDD) draws a data-dependent amount of noise: drawn per call, still per sample
            # (an adaptive plan draws once per accepted step: as many as it accepts, not known before)
            noise_fn = (ondemand_noise(gens, x_T) if strategy or getattr(plan, "adaptive", False)
                        else predrawn_noise(plan, gens, x_T))
    if guidance is not None and callable(getattr(guidance, "wrap", None)):
        denoiser = guidance.wrap(denoiser)
    if strategy:
        return guidance.run(plan, denoiser, x_T, noise_fn=noise_fn, callback=callback, progress=progress)
    return run_plan(plan, denoiser, x_T, noise_fn=noise_fn, callback=callback, progress=progress,
                    time_shift=shift)


def predrawn_noise(plan: Plan, gens, x_T: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """All step noise drawn before the loop (on the generators' device) and moved to the state's
    device in one copy, so the step loop never waits on a host-to-device transfer.  The draws are
    the calls diffusers' schedulers make step by step (`randn_tensor` of the sample's shape from one
    shared generator, or of one row from each per-sample generator), in the same order, so the same
    generator gives the same noise here, in the adapter and in the scheduler it replaces."""
    n = plan.n_draws
    it = iter([per_sample_noise(tuple(x_T.shape), gens, x_T.device, x_T.dtype) for _ in range(n)])
    return lambda x: next(it)


def ondemand_noise(gens, x_T: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Noise drawn when asked: each call returns N(0, I) shaped like its argument, row k drawn from
    generator k (a list) or from one shared generator.  For sampling strategies that draw as many
    tensors as they need (SVDD: M candidates per step): with per-sample generators sample k's
    draws depend only on seed k, whatever the batch size."""
    device, dtype = x_T.device, x_T.dtype
    return lambda x: per_sample_noise(tuple(x.shape), gens, device, dtype)
