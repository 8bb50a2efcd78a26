"""The `diffsampler` command.

    diffsampler [hydra overrides]          one run (see diffsampler/configs/config.yaml)
    diffsampler -m solver=ddim,dpmpp_3m nfe=5,10,20     a sweep: one row per job in one results table
    diffsampler report <run or sweep dir>  metric-vs-NFE plots (PNG) and a markdown table
    diffsampler demo                       solver accuracy on the exact Gaussian mixture, printed
    diffsampler list                       registered solvers and their metadata
"""

from __future__ import annotations

import sys
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


def _register_solver_configs() -> None:
    """Every registered solver (built-in or user-registered) is a `solver=<name>` option."""
    from hydra.core.config_store import ConfigStore

    from .samplers import available

    cs = ConfigStore.instance()
    for name in available():
        cs.store(group="solver", name=name, node={"name": name, "options": {}})
    # a saved solver plan: solver=plan solver.path=<YAML file or plan name> (samplers/usf.py)
    cs.store(group="solver", name="plan", node={"name": "plan", "path": None, "options": {"path": "${solver.path}"}})


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .runner import ConfigError, run

    _register_solver_configs()

    @hydra.main(config_path="configs", config_name="config", version_base=None)
    def app(cfg):
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        base = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else run_dir
        try:
            row = run(cfg, run_dir, base / cfg.results_file)
        except ConfigError as e:
            print(f"diffsampler: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        if row:
            print(", ".join(f"{k}={v}" for k, v in row.items() if k not in ("run_dir", "solver_options")))
        metrics = [v for k, v in row.items() if k in ("fid_proxy", "fid", "rmse", "fd")]
        return metrics[0] if metrics else None  # the Optuna sweeper's objective

    app()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from .report import report

        if len(argv) != 2:
            print("usage: diffsampler report <run or sweep dir>", file=sys.stderr)
            return 2
        print(report(Path(argv[1])))
        return 0
    if argv[:1] == ["demo"]:
        demo()
        return 0
    if argv[:1] == ["list"]:
        from .samplers import available, info

        for name in available():
            print(info(name))
        return 0
    sys.argv = [sys.argv[0]] + argv
    _hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
