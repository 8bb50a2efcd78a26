"""The one sampling loop: sample(denoiser, x_T, solver=..., nfe=..., spacing=..., seeds=...)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..schedules import TimeGrid, time_grid
from .plan import Plan, run_plan
from .registry import Solver, get
from .time_shift import TimeShift

#: the spacing of `sample` / `make_plan` when none is given
DEFAULT_SPACING = "time_uniform"

__all__ = ["sample", "make_plan", "per_sample_generators", "per_sample_noise", "initial_noise", "predrawn_noise",
           "ondemand_noise"]


def per_sample_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample (as edm's StackedRandomGenerator): sample k depends only on seed k."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


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
    gens = per_sample_generators(seeds) if seeds is not None else generator
    return per_sample_noise(shape, gens, device, dtype) * schedule.prior_std


def make_plan(
    solver: str | Solver,
    schedule,
    nfe: int | None = None,
    spacing=DEFAULT_SPACING,
    final: str | None = None,
    grid: TimeGrid | None = None,
    **options,
) -> Plan:
    """Resolve solver name + NFE budget + spacing into a Plan (nothing runs).

    final: "zero" or "last"; None means "zero" (a solver plan: its own final point).
    A solver plan (`"plan:<name or path>"`, samplers/usf.py) brings its own time points, NFE and
    final point: `nfe` may be None or must equal the plan's, `spacing` must stay at its default."""
    s = get(solver, **options)
    own_grid = getattr(s, "own_grid", None)  # a solver plan carries its own time points and NFE
    if grid is None and own_grid is not None:
        if not (spacing == "plan" or spacing == DEFAULT_SPACING):
            raise ValueError(f"solver {s.name!r} carries its own time points; spacing={spacing!r} cannot apply "
                             "(leave spacing at its default, or pass grid= to run the plan's steps on other times)")
        final = s.plan.final if final is None else final
        s.steps_for_nfe(s.min_nfe if nfe is None else nfe, final_zero=(final == "zero"))
        grid, spacing = own_grid(schedule), "plan"
    final = "zero" if final is None else final
    if grid is None:
        if nfe is None:
            raise ValueError("give nfe (number of model calls) or an explicit grid")
        spacing_kw = {}
        if isinstance(spacing, dict):
            spacing_kw = dict(spacing)
            spacing = spacing_kw.pop("name")
        steps = s.steps_for_nfe(nfe, final_zero=(final == "zero"))
        grid = time_grid(schedule, steps, spacing, final=final, **spacing_kw)
    elif nfe is not None:
        s.check_nfe(nfe)
    plan = s.build(grid, nfe)
    plan.info.setdefault("spacing", spacing if isinstance(spacing, str) else "explicit")
    return plan


@torch.no_grad()  # sampling never needs the autograd graph (guidance that does enables it locally)
def sample(
    denoiser,
    x_T: torch.Tensor | None = None,
    solver: str | Solver | Plan = "dpmpp_2m",
    nfe: int | None = 10,
    spacing="time_uniform",
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

    x_T: initial noise; if None it is drawn for `shape` from `seeds` (one per sample, on the CPU so
    every device gets the same numbers) or `generator`, then moved to `device`.
    Stochastic solvers draw their step noise from the same per-sample generators, so with `seeds`
    sample k depends only on seed k whatever the batch size.
    time_shift: dict(window=..., cutoff=...) turns on the Time-Shift sampler for any solver.
    guidance: an object with `wrap(denoiser) -> denoiser` (e.g. CFG) or a `run(plan, denoiser, x,
    noise_fn, ...)` strategy (e.g. SVDD); samplers never import guidance.
    """
    if isinstance(solver, Plan):
        plan = solver
    else:
        plan = make_plan(solver, denoiser.schedule, nfe if grid is None else None, spacing, final, grid,
                         **solver_options)
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
    strategy = guidance is not None and hasattr(guidance, "run")
    if strategy and time_shift is not None:
        raise ValueError(f"time_shift cannot be combined with the sampling strategy {type(guidance).__name__} "
                         "(it runs its own loop); drop one of them")
    noise_fn = None
    if plan.stochastic:
        if gens is None:
            raise ValueError(f"solver {plan.solver!r} is stochastic: pass seeds= or generator= for reproducible noise")
        # a strategy (SVDD) draws a data-dependent amount of noise: drawn per call, still per sample
        noise_fn = ondemand_noise(gens, x_T) if strategy else predrawn_noise(plan, gens, x_T)
    if guidance is not None and hasattr(guidance, "wrap"):
        denoiser = guidance.wrap(denoiser)
    if strategy:
        return guidance.run(plan, denoiser, x_T, noise_fn=noise_fn, callback=callback, progress=progress)
    return run_plan(plan, denoiser, x_T, noise_fn=noise_fn, callback=callback, progress=progress,
                    time_shift=TimeShift.from_spec(time_shift))


def predrawn_noise(plan: Plan, gens, x_T: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """All step noise drawn before the loop (per sample, on the generators' device) and moved to
    the state's device in one copy, so the step loop never waits on a host-to-device transfer."""
    n = sum(1 for s in plan.steps if s.noise != 0.0)
    z = per_sample_noise((x_T.shape[0], n, *x_T.shape[1:]), gens, x_T.device, x_T.dtype)
    it = iter(z.unbind(1))
    return lambda x: next(it)


def ondemand_noise(gens, x_T: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Noise drawn when asked: each call returns N(0, I) shaped like its argument, row k drawn from
    generator k (a list) or from one shared generator.  For sampling strategies that draw as many
    tensors as they need (SVDD: M candidates per step): with per-sample generators sample k's
    draws depend only on seed k, whatever the batch size."""
    device, dtype = x_T.device, x_T.dtype
    return lambda x: per_sample_noise(tuple(x.shape), gens, device, dtype)
