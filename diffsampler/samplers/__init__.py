"""Registry of solvers over one plan-based engine.  `available()` lists the names."""

from . import ddim, deis, dpm_adaptive, dpm_solver, kdiffusion, momentum, plms, sa_solver, stochastic, unipc, usf  # noqa: F401  (registers the built-in solvers)
from .loop import initial_noise, make_plan, per_sample_generators, sample
from .plan import Combo, Eval, Plan, PlanBuilder, Step, Stepper, run_plan
from .registry import (MultistepSolver, SinglestepSolver, Solver, available, get, info, is_solver_name, register,
                       unregister)
from .usf import SpecSolver, SolverSpec, StepSpec, available_plans, load_plan, spec_of, spec_solvers

__all__ = [
    "available", "get", "info", "register", "unregister", "sample", "make_plan", "initial_noise",
    "per_sample_generators", "Solver", "MultistepSolver", "SinglestepSolver", "Plan", "PlanBuilder",
    "Step", "Eval", "Combo", "Stepper", "run_plan", "is_solver_name", "SolverSpec", "StepSpec", "SpecSolver", "load_plan",
    "available_plans", "spec_of", "spec_solvers",
]
