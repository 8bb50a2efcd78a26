"""Brownian-tree noise: a plan's draws as increments of one Brownian motion per sample.

k-diffusion's BrownianTreeNoiseSampler (used by default in its DPM++ SDE samplers, and by diffusers'
DPMSolverSDEScheduler) gives the draw over a span of noise levels (rho_a, rho_b) as

    z = (W(rho_b) - W(rho_a)) / sqrt|rho_b - rho_a|,     W a Brownian motion in rho = sigma / alpha,

from a `torchsde.BrownianTree` on [rho_min, rho_max] (the grid's smallest positive and largest noise
level).  Draws over overlapping spans are correlated (that is what makes DPM++ SDE's in-step stage
noise consistent with its step noise), and the path does not depend on the step size, so runs at
different NFE see the same Brownian motion.  Here each sample has its own tree, seeded from that
sample's seed, so sample k depends only on seed k whatever the batch size; all draws of a run are
made before the loop (on the CPU) and moved to the state's device in one copy.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from .plan import Plan

__all__ = ["draw_spans", "draw_correlation", "BrownianTrees", "brownian_noise", "tree_seeds"]


def draw_spans(plan: Plan) -> list[tuple[float, float]]:
    """The (rho_from, rho_to) span of every draw of a run, in the order the engine draws them: each
    step's in-step draws (`Step.draws`), then its end-of-step draw (`Step.span`, or the step's grid
    interval when the plan has one step per grid interval)."""
    grid, out = plan.grid, []
    rho = (grid.sigma / grid.alpha).tolist()
    per_interval = len(plan.steps) == grid.steps
    for i, s in enumerate(plan.steps):
        out.extend(s.draws)
        if s.noise != 0.0:
            if s.span is not None:
                out.append(s.span)
            elif per_interval:
                out.append((rho[i], rho[i + 1]))
            else:
                raise ValueError(f"solver {plan.solver!r}: step {i} adds noise over no declared span and the plan "
                                 "does not have one step per grid interval; Brownian-tree noise needs each draw's span")
    return out


def draw_correlation(plan: Plan) -> np.ndarray:
    """Correlation matrix of the plan's draws under Brownian-tree noise: for spans I, J in rho,
    +-|I cap J| / sqrt(|I| |J|) (the sign of their orientations)."""
    spans = draw_spans(plan)
    n = len(spans)
    c = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            (a0, a1), (b0, b1) = spans[i], spans[j]
            overlap = max(0.0, min(max(a0, a1), max(b0, b1)) - max(min(a0, a1), min(b0, b1)))
            sign = 1.0 if (a1 - a0) * (b1 - b0) > 0 else -1.0
            c[i, j] = c[j, i] = sign * overlap / math.sqrt(abs(a1 - a0) * abs(b1 - b0))
    return c


class BrownianTrees:
    """One `torchsde.BrownianTree` per sample (entropy = that sample's seed), or one for the whole batch
    (`batched=False`, as k-diffusion with one integer seed), on [rho_lo, rho_hi]; `draw(rho_a, rho_b)`
    is (W(rho_b) - W(rho_a)) / sqrt|rho_b - rho_a| for every sample."""

    def __init__(self, shape: Sequence[int], rho_lo: float, rho_hi: float, seeds: Sequence[int],
                 dtype=torch.float32, batched: bool = True):
        import torchsde

        if not 0 <= rho_lo < rho_hi:
            raise ValueError(f"a Brownian tree needs 0 <= rho_lo < rho_hi, got {rho_lo}, {rho_hi}")
        shape = tuple(shape)
        if batched and len(seeds) != shape[0]:
            raise ValueError(f"got {len(seeds)} tree seeds for a batch of {shape[0]}")
        w0 = torch.zeros(shape[1:] if batched else shape, dtype=dtype)
        self.batched = batched
        self.trees = [torchsde.BrownianTree(float(rho_lo), w0, float(rho_hi), entropy=int(s)) for s in seeds]

    def draw(self, rho_a: float, rho_b: float) -> torch.Tensor:
        lo, hi = (rho_a, rho_b) if rho_a < rho_b else (rho_b, rho_a)
        sign = 1.0 if rho_a < rho_b else -1.0
        with warnings.catch_warnings():  # torchsde rounds its ends to its tol: a query at an end is "outside"
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(float(lo), float(hi)) for tree in self.trees])
        w = w if self.batched else w[0]
        return w * (sign / math.sqrt(hi - lo))


def tree_seeds(generator=None) -> tuple[list[int], bool]:
    """(entropies, batched): one tree per sample, its entropy drawn from that sample's generator (a
    list: sample k depends only on generator k), or one tree for the batch, its entropy drawn from the
    shared generator (torch's global one when None, as k-diffusion and diffusers do)."""
    if isinstance(generator, (list, tuple)):
        return [int(torch.randint(0, 2**63 - 1, (), generator=g, device=g.device)) for g in generator], True
    dev = generator.device if generator is not None else "cpu"
    return [int(torch.randint(0, 2**63 - 1, (), generator=generator, device=dev))], False


def brownian_noise(plan: Plan, x_T: torch.Tensor, generator=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plan's draws as Brownian-tree increments (see module doc), all made before the loop, from
    trees seeded by `tree_seeds(generator)` (per-sample generators: one tree per sample); the tree
    spans the grid's noise levels [smallest positive, largest] (k-diffusion's choice), widened to any
    draw's span outside them."""
    spans = draw_spans(plan)
    rho = (plan.grid.sigma / plan.grid.alpha).tolist()
    ends = [r for r in rho if r > 0] + [r for span in spans for r in span]
    entropies, batched = tree_seeds(generator)
    trees = BrownianTrees(x_T.shape, min(ends), max(ends), entropies, x_T.dtype, batched)
    draws = [trees.draw(a, b) for a, b in spans]
    it = iter(torch.stack(draws).to(x_T.device).unbind(0) if draws else ())
    return lambda x: next(it)
