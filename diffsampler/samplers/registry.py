"""Solver base classes and the registry of solvers by stable name.

Names are used alike by `sample()`, the diffusers adapter, Hydra configs and results tables.
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from typing import Callable

import numpy as np

from ..schedules import TimeGrid
from .aliases import ALIASES, alias_of
from .plan import Combo, Plan, PlanBuilder

__all__ = ["Solver", "MultistepSolver", "SinglestepSolver", "register", "register_scheme", "get", "available", "info",
           "is_solver_name", "LOWER_ORDER_FINAL_BELOW", "heavy_ball", "aliases"]

#: like diffusers, multistep solvers cool down their order on the last steps of short runs
LOWER_ORDER_FINAL_BELOW = 15

_REGISTRY: dict[str, tuple[Callable[..., "Solver"], dict]] = {}
#: parametric solvers addressed as "<scheme>:<argument>" or "<scheme>" with options (e.g. "plan:my_plan")
_SCHEMES: dict[str, tuple[Callable[..., "Solver"], str]] = {}


class Solver:
    """A solver turns a time grid into a Plan.  Subclasses set the metadata and implement `build`.

    Metadata (returned by `info()` for the adapter, configs and results tables): `order` (global
    order on smooth ODEs; weak order for SDE solvers), `nfe_per_step`, `stochastic`, `kind` of
    prediction it integrates.
    """

    name: str = ""
    order: int = 1
    nfe_per_step: int = 1
    stochastic: bool = False
    kind: str = "data"

    def steps_for_nfe(self, nfe: int, final_zero: bool = True) -> int:
        """Number of grid steps that spends exactly `nfe` model calls."""
        self.check_nfe(nfe)
        return nfe

    def check_nfe(self, nfe: int) -> None:
        if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or nfe < self.min_nfe:
            raise ValueError(f"solver {self.name!r} needs an integer nfe >= {self.min_nfe}, got {nfe!r}")

    min_nfe: int = 1
    #: set when the solver was got by an alias (aliases.py): that name, and the spacing it fixes
    alias: str | None = None
    alias_spacing: str | None = None

    def build(self, grid: TimeGrid, nfe: int | None = None) -> Plan:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, order={self.order})"


class MultistepSolver(Solver):
    """Linear multistep solvers: one model call per step, history of earlier outputs.

    Step i uses order k_i = min(order, i + 1) (warm-up: only i + 1 outputs exist), lowered on the
    last steps of short runs when `lower_order_final` (k_i <= steps - i when steps < 15, as
    diffusers does), and first order on a step that lands on sigma = 0 for solvers whose
    coefficients need a finite log-SNR step there (`first_order_to_zero`).

    `momentum=beta` adds heavy-ball momentum (Wizadwongsa et al. 2023) to any multistep solver:
    with x_{i+1} = c_x x_i + g_i P_i (g_i the first-order coefficient, P_i the solver's combined
    prediction), V_i = (1 - beta) V_{i-1} + beta P_i and x_{i+1} = c_x x_i + g_i V_i.
    """

    max_order: int = 3
    first_order_to_zero: bool = True

    def __init__(self, order: int | None = None, lower_order_final: bool = True, momentum: float | None = None):
        order = self.max_order if order is None else order
        if not isinstance(order, (int, np.integer)) or not 1 <= order <= self.max_order:
            raise ValueError(f"order must be an integer in 1..{self.max_order}, got {order!r}")
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(f"momentum (heavy-ball damping beta) must be in (0, 1], got {momentum!r}")
        self.order = int(order)
        self.lower_order_final = bool(lower_order_final)
        self.momentum = momentum

    def step_orders(self, grid: TimeGrid) -> list[int]:
        n = grid.steps
        orders = []
        for i in range(n):
            k = min(self.order, i + 1)
            if self.lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
                k = min(k, n - i)
            if self.first_order_to_zero and i == n - 1 and grid.final_zero:
                k = 1
            orders.append(k)
        return orders

    def coefficients(self, grid: TimeGrid, i: int, order: int) -> tuple[float, list[float], float]:
        """(c_x, [c_0, ..., c_{order-1}], c_z) with x_{i+1} = c_x x_i + sum_j c_j M_{i-j} + c_z z."""
        raise NotImplementedError

    def build(self, grid: TimeGrid, nfe: int | None = None) -> Plan:
        if nfe is not None and nfe != grid.steps:
            raise ValueError(f"{self.name!r} spends one model call per step: nfe={nfe} needs {nfe} steps, grid has {grid.steps}")
        b = PlanBuilder(grid)
        history: list[int] = []  # output indices, newest first
        velocity = None
        for i, k in enumerate(self.step_orders(grid)):
            history.insert(0, b.eval_at(i, self.kind))
            cx, cs, cz = self.coefficients(grid, i, k)
            terms = dict(zip(history[:k], (float(c) for c in cs)))
            if self.momentum is not None:  # heavy ball on the solver's own update direction
                g = float(self.coefficients(grid, i, 1)[1][0])
                terms, velocity = heavy_ball(terms, velocity, self.momentum, g)
            b.end_step(Combo(cx, tuple(terms.items())), cz, k)
            del history[self.order:]
        return b.plan(self.name)


def _axpy(a: float, u: dict, b: float, v: dict) -> dict:
    return {m: a * u.get(m, 0.0) + b * v.get(m, 0.0) for m in {**u, **v}}


def heavy_ball(terms: dict, velocity: dict | None, beta: float, g: float) -> tuple[dict, dict]:
    """One heavy-ball step (Wizadwongsa et al. 2023) on coefficient maps {output: coefficient}:
    P_i = (sum_j c_j M_j) / g_i, V_i = (1 - beta) V_{i-1} + beta P_i (V_0 = P_0); returns the update
    terms g_i V_i and V_i.  beta = 1 gives the base solver back."""
    p = {m: c / g for m, c in terms.items()}
    v = p if velocity is None else _axpy(1.0 - beta, velocity, beta, p)
    return {m: g * w for m, w in v.items()}, v


class SinglestepSolver(Solver):
    """Two model calls per step (Heun, DPM-Solver++ 2S).  A budget of `nfe` calls is spent as
    second-order steps, a first-order step onto sigma = 0 when the grid ends there, and one
    first-order step first when the calls left for the others are odd: an even `nfe` with a
    final step onto sigma = 0, an odd `nfe` without one."""

    nfe_per_step = 2

    @staticmethod
    def _orders(nfe: int, final_zero: bool) -> list[int]:
        tail = [1] if final_zero else []
        rest = nfe - len(tail)
        return [1] * (rest % 2) + [2] * (rest // 2) + tail

    def steps_for_nfe(self, nfe, final_zero=True):
        self.check_nfe(nfe)
        return len(self._orders(nfe, final_zero))

    def step_orders(self, grid: TimeGrid, nfe: int | None) -> list[int]:
        n = grid.steps
        if nfe is None:
            nfe = 2 * n - (1 if grid.final_zero else 0)
        orders = self._orders(nfe, grid.final_zero)
        if len(orders) != n:
            raise ValueError(f"{self.name!r}: nfe={nfe} needs {len(orders)} steps, the grid has {n}")
        return orders


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def register(name: str, factory: Callable[..., Solver] | None = None, **defaults):
    """Register a solver under `name`: `@register("mine")` on a Solver subclass, or
    `register("mine", factory)` for any callable returning a Solver (e.g. one built from a plan).
    `defaults` are options bound for this name (e.g. `register("deis_2", DEIS, order=2)`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")

    def deco(f):
        if name in _REGISTRY:
            raise ValueError(f"solver {name!r} is already registered")
        _REGISTRY[name] = (f, dict(defaults))
        return f

    return deco if factory is None else deco(factory)


def register_scheme(scheme: str, factory: Callable[..., Solver], argument: str) -> None:
    """Solvers built from an argument: `get("<scheme>:<value>")` is `factory(<argument>=value)`,
    and `get("<scheme>", <argument>=value)` the same (the form Hydra configs use)."""
    if scheme in _REGISTRY:
        raise ValueError(f"scheme {scheme!r} clashes with a registered solver name")
    _SCHEMES[scheme] = (factory, argument)


def is_solver_name(name) -> bool:
    """True for a registered name, an alias (aliases.py), a scheme (e.g. "plan") or "<scheme>:<argument>"."""
    return isinstance(name, str) and (name in _REGISTRY or name in ALIASES or name.split(":", 1)[0] in _SCHEMES)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def available() -> list[str]:
    """Registered solver names, sorted."""
    return sorted(_REGISTRY)


def aliases() -> dict[str, "Alias"]:  # noqa: F821
    """The A1111 / ComfyUI sampler names get() accepts: name -> Alias(solver, spacing, options)."""
    return dict(ALIASES)


def _get_alias(name: str, options: dict) -> Solver:
    """The solver alias `name` maps to, with its options under the caller's; refused naming the
    alias when its solver is not registered, an option contradicts it or the solver lacks one."""
    a = alias_of(name)
    if a.refused:
        raise ValueError(f"{name!r} ({a.source}) is not registered in diffsampler: {a.refused}")
    if a.solver not in _REGISTRY:
        raise ValueError(f"{name!r} maps to solver {a.solver!r}, which is not registered; available: "
                         f"{', '.join(available())}")
    clash = sorted(k for k in options if k in a.options and options[k] != a.options[k])
    if clash:
        k = clash[0]
        raise ValueError(f"{name!r} is {a.solver!r} with {k}={a.options[k]!r}; got {k}={options[k]!r} "
                         f"(drop it, or name the solver {a.solver!r} itself)")
    try:
        solver = get(a.solver, **{**a.options, **options})
    except ValueError as e:
        missing = sorted(set(a.options) - set(_option_names(a.solver)))
        if missing:
            raise ValueError(f"{name!r} maps to solver {a.solver!r} with option(s) {missing}, which it does not "
                             f"take: {e}") from None
        raise
    solver.alias, solver.alias_spacing = name, a.spacing
    return solver


def _option_names(name: str) -> set:
    factory, defaults = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return set(params) | {"*"}
    return set(params) - set(defaults)


_CHECKED_TYPES = (bool, int, float, str, type(None))


def _option_types(factory: Callable, key: str) -> tuple | None:
    """The types option `key` of `factory` takes (from its annotation, else its default's type);
    None when that is not a plain scalar type (then the factory validates it itself)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hint = typing.get_type_hints(target).get(key)
    except Exception:  # unresolvable annotations: fall back to the default's type
        hint = None
    if hint is None:
        param = inspect.signature(factory).parameters.get(key)
        if param is None or param.default is param.empty or param.default is None:
            return None
        hint = type(param.default)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    return allowed if all(a in _CHECKED_TYPES for a in allowed) else None


def _fits(value, allowed: tuple) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, (bool, np.bool_)):
        return bool in allowed
    if isinstance(value, numbers.Integral):
        return int in allowed or float in allowed
    if isinstance(value, numbers.Real):
        return float in allowed
    return isinstance(value, str) and str in allowed


def _check_option_types(name: str, factory: Callable, options: dict) -> None:
    """Options of the types the solver declares: "false" is not a bool, 2.0 is not an int order."""
    for key, value in options.items():
        allowed = _option_types(factory, key)
        if allowed is not None and not _fits(value, allowed):
            names = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
            raise ValueError(f"solver {name!r}: option {key}={value!r} must be {names}, "
                             f"got {type(value).__name__}")


def get(name: "str | Solver", **options) -> Solver:
    """Instantiate solver `name` with `options` (on top of the name's bound defaults)."""
    if isinstance(name, Solver):
        if options:
            raise ValueError(f"options {sorted(options)} given with an already-built solver {name!r}")
        return name
    if isinstance(name, str) and name not in _REGISTRY and name in ALIASES:
        return _get_alias(name, options)
    scheme = name.split(":", 1)[0] if isinstance(name, str) else None
    if scheme in _SCHEMES and name not in _REGISTRY:
        factory, arg = _SCHEMES[scheme]
        if name != scheme:
            if arg in options:
                raise ValueError(f"solver {name!r} already names its {arg}; got {arg}={options[arg]!r} too")
            options = {**options, arg: name.split(":", 1)[1]}
        _check_option_types(name, factory, options)
        return factory(**options)
    if name not in _REGISTRY:
        schemes = "".join(f", {s}:<{a}>" for s, (_, a) in sorted(_SCHEMES.items()))
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}{schemes}, or an A1111 / "
                         f"ComfyUI sampler name (diffsampler list)")
    factory, defaults = _REGISTRY[name]
    kwargs = {**defaults, **options}
    params = inspect.signature(factory).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(set(params) - set(defaults))
            raise ValueError(f"solver {name!r} got unknown option(s) {unknown}; allowed: {allowed}")
    _check_option_types(name, factory, options)
    try:
        solver = factory(**kwargs)
    except ValueError as e:  # option errors name the registered solver
        raise ValueError(f"solver {name!r}: {e}") from None
    solver.name = name
    return solver


def info(name: str) -> dict:
    """Registry metadata of a solver: order, nfe_per_step, stochastic, kind."""
    s = get(name)
    return {"name": name, "order": s.order, "nfe_per_step": s.nfe_per_step, "stochastic": s.stochastic,
            "kind": s.kind, "min_nfe": s.min_nfe, "adaptive": bool(getattr(s, "adaptive", False))}
