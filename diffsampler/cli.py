"""The `diffsampler` command.

    diffsampler [hydra overrides]          one run (see diffsampler/configs/config.yaml)
    diffsampler -m solver=ddim,dpmpp_3m nfe=5,10,20     a sweep: one row per job in one results table
    diffsampler report <run or sweep dir>  metric-vs-NFE plots (PNG) and a markdown table
    diffsampler demo                       solver accuracy on the exact Gaussian mixture, printed
    diffsampler list                       solvers (with their A1111 / ComfyUI names), spacings, guidance, plans
    diffsampler minority-classifier --out DIR [...]   score a data set, train the minority classifier
    diffsampler search [search.nfe=5 model=... overrides]   solver-schedule search (USF / S^3) on any
                                           model= (configs/search.yaml); -m sweeps; resumable
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

DEFAULT_SOLVERS = ["ddim", "heun", "pndm", "deis_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m"]


def demo(solvers=DEFAULT_SOLVERS, nfes=(5, 10, 20), n=512, dim=16, seed=0, spacing="time_uniform", out=sys.stdout):
    from . import DiscreteVP, sample
    from .eval.gmm import GaussianMixture, gmm_denoiser

    gmm = GaussianMixture.random(dim, 6, seed=seed, scale=1.5, std=(0.3, 0.6))
    schedule = DiscreteVP.linear()  # diffusers' default: 1000 linear betas
    den = gmm_denoiser(gmm, schedule, "epsilon")
    x_T = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = gmm.ode_endpoint(x_T, float(schedule.alpha(schedule.t_max)), float(schedule.sigma(schedule.t_max)), 1.0, 0.0)
    print(f"RMSE vs the exact PF-ODE solution ({n} samples, {dim}-d 6-component mixture, {spacing} grid)", file=out)
    print(f"{'solver':<12}" + "".join(f"{'NFE ' + str(k):>12}" for k in nfes), file=out)
    rows = {}
    for name in solvers:
        rows[name] = [float((sample(den, x_T.clone(), solver=name, nfe=k, spacing=spacing) - ref).pow(2).mean().sqrt())
                      for k in nfes]
        print(f"{name:<12}" + "".join(f"{e:>12.4f}" for e in rows[name]), file=out)
    return rows


_GUIDANCE_HELP = {
    "none": "no guidance",
    "cfg": "classifier-free guidance: guidance.scale, guidance.rescale, guidance.interval=[sigma_lo,sigma_hi]",
    "minority": "minority guidance (image models): guidance.classifier, scale, target, interval",
    "svdd": "SVDD candidate selection (stochastic solvers): guidance.reward, num_candidates, alpha",
}


def list_main(out=sys.stdout) -> None:
    """`diffsampler list`: registered solvers with their aliases, spacings, guidance, shipped plans."""
    from .samplers import available, info
    from .samplers.registry import aliases
    from .samplers.usf import available_plans
    from .schedules import SPACINGS
    from .tools.config_schema import GUIDANCES

    from .samplers import get

    print("solvers (solver=<name>):", file=out)
    for name in available():
        i = info(name)
        kind = "SDE, weak order" if i["stochastic"] else "ODE, order"
        print(f"  {name:<20} {kind} {i['order']}, {i['nfe_per_step']} model call(s) per step", file=out)
    print("A1111 / ComfyUI sampler names (solver=\"<name>\"; -> solver, the spacing it fixes, options):", file=out)
    for name, a in aliases().items():
        try:
            get(name)
            note = ""
        except ValueError as e:
            note = "  [refused: " + ("solver not registered" if "not registered" in str(e) else "option not taken") + "]"
        print(f"  {name!r:<34} -> {a.describe()}  ({a.source}){note}", file=out)
    print("spacings (spacing=<name>):", file=out)
    print("  " + ", ".join(SPACINGS), file=out)
    print("guidance (guidance=<name>):", file=out)
    for g in GUIDANCES:
        print(f"  {g:<10} {_GUIDANCE_HELP.get(g, '')}", file=out)
    print("shipped plans (solver=plan solver.path=<name>, or solver=\"plan:<name>\" in Python):", file=out)
    print("  " + (", ".join(available_plans()) or "(none)"), file=out)


def _search_hydra_main() -> None:
    """`diffsampler search [overrides]`: the search job (configs/search.yaml, tools/search_job.py)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .tools.config_schema import ConfigError
    from .tools.search_job import run_search_job, search_job_row, validate_search

    @hydra.main(config_path="configs", config_name="search", version_base=None)
    def app(cfg):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            spec = validate_search(cfg)  # every key, before the model is built
            summary = run_search_job(spec, run_dir)
        except (ConfigError, ValueError) as e:  # a refused value, or a log / cache of another search
            print(f"diffsampler search: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        from .eval.generate import is_main

        if is_main():
            print(f"best plan: {search_job_row(summary)}; written to {run_dir / 'plan.yaml'} "
                  f"(solver=plan solver.path={run_dir / 'plan.yaml'})")
        return summary["verify_score"]

    app()


def _register_solver_configs() -> None:
    """Every registered solver (built-in or user-registered) is a `solver=<name>` option."""
    from hydra.core.config_store import ConfigStore

    from .samplers import available
    from .samplers.registry import aliases

    cs = ConfigStore.instance()
    for name in available() + sorted(aliases()):  # A1111 / ComfyUI names too: solver="DPM++ 2M Karras"
        cs.store(group="solver", name=name, node={"name": name, "options": {}})
    # a saved solver plan: solver=plan solver.path=<YAML file or plan name> (samplers/usf.py)
    # solver.plan_dir: a directory of the user's plans, searched first for a plan given by name
    cs.store(group="solver", name="plan", node={"name": "plan", "path": None, "plan_dir": None,
                                                "options": {"path": "${solver.path}"}})


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .tools.config_schema import ConfigError
    from .tools.run_checks import validate
    from .tools.runner import execute

    _register_solver_configs()

    @hydra.main(config_path="configs", config_name="config", version_base=None)
    def app(cfg):
        started = time.perf_counter()  # the row's load time counts the checks (and a first job's imports)
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        base = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else run_dir
        try:
            spec = validate(cfg)  # before any value is used, even the results path
            row = execute(spec, run_dir, base / spec.results_file, started=started)
        except ConfigError as e:
            print(f"diffsampler: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        if row:
            print(", ".join(f"{k}={v}" for k, v in row.items() if k not in ("run_dir", "solver_options")))
        metrics = [v for k, v in row.items() if k in ("fid_proxy", "fid", "rmse", "fd")]
        return metrics[0] if metrics else None  # the Optuna sweeper's objective

    app()


def _refusing(command, name: str) -> int:
    """Run a subcommand; a refused input (ValueError, a missing file) is one line on stderr, exit 2."""
    try:
        command()
    except (ValueError, FileNotFoundError) as e:
        print(f"diffsampler {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from .tools.report import report

        if len(argv) != 2:
            print("usage: diffsampler report <run or sweep dir>", file=sys.stderr)
            return 2
        return _refusing(lambda: print(report(Path(argv[1]))), "report")
    if argv[:1] == ["demo"]:
        demo()
        return 0
    if argv[:1] == ["search"]:
        sys.argv = [sys.argv[0]] + argv[1:]
        _search_hydra_main()
        return 0
    if argv[:1] == ["list"]:
        if len(argv) != 1:
            print("usage: diffsampler list", file=sys.stderr)
            return 2
        list_main()
        return 0
    if argv[:1] == ["minority-classifier"]:
        from .tools.minority_classifier import build_from_args

        return _refusing(lambda: build_from_args(argv[1:]), "minority-classifier")
    sys.argv = [sys.argv[0]] + argv
    _hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
