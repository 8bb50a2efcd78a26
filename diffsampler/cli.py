"""The `diffsampler` command: a dispatch table of subcommands, and Hydra runs / sweeps by default.

    diffsampler [run] [-m] [key=value ...]   one run, or a sweep with -m (Hydra; configs/config.yaml)
    diffsampler <command> [-h] ...           report, search, list, demo, minority-classifier, ...
    diffsampler --help | --version

Each subcommand is one entry of `COMMANDS`, registered with the `@command(name, summary, example...)`
decorator on a function taking the command's argv and returning the exit status; `diffsampler --help`
lists them with their examples, `diffsampler <name> -h` is the command's own help.  A new subcommand
is one decorated function (see `_report_main` for the pattern: an argparse parser from `_parser`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("diffsampler")

DEFAULT_SOLVERS = ["ddim", "heun", "pndm", "deis_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m"]


def demo(solvers=DEFAULT_SOLVERS, nfes=(5, 10, 20), n=512, dim=16, seed=0, spacing="time_uniform", out=None):
    import torch

    from . import DiscreteVP, sample
    from .eval.gmm import GaussianMixture, gmm_denoiser

    gmm = GaussianMixture.random(dim, 6, seed=seed, scale=1.5, std=(0.3, 0.6))
    schedule = DiscreteVP.linear()  # diffusers' default: 1000 linear betas
    den = gmm_denoiser(gmm, schedule, "epsilon")
    out = sys.stdout if out is None else out
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


def _wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=indent + "  ", break_on_hyphens=False)


LIST_SECTIONS = ("solvers", "aliases", "spacings", "guidance", "plans")


def list_main(out=None, sections=LIST_SECTIONS) -> None:
    """`diffsampler list [section ...]`: registered solvers, their A1111 / ComfyUI aliases, spacings
    (time grids), guidance methods and the shipped solver plans."""
    out = sys.stdout if out is None else out
    from .grids import SPACING_ALIASES
    from .samplers import available, get, info
    from .samplers.registry import aliases
    from .samplers.usf import available_plans, load_plan, plan_dirs
    from .schedules import SPACINGS
    from .tools.config_schema import GUIDANCES

    for section in sections:
        if section not in LIST_SECTIONS:
            raise ValueError(f"unknown list section {section!r}; choose from {', '.join(LIST_SECTIONS)}")
    if "solvers" in sections:
        print("solvers (solver=<name>), options given as +solver.options.<key>=<value>:", file=out)
        for name in available():
            i = info(name)
            kind = "SDE, weak order" if i["stochastic"] else "ODE, order"
            print(f"  {name:<20} {kind} {i['order']}, {i['nfe_per_step']} model call(s) per step", file=out)
    if "aliases" in sections:
        print("solver aliases: A1111 / ComfyUI sampler names (solver=\"<name>\"; -> solver, the spacing it fixes, "
              "options):", file=out)
        for name, a in aliases().items():
            try:
                get(name)
                note = ""
            except ValueError as e:
                note = "  [refused: " + ("solver not registered" if "not registered" in str(e) else "option not taken") + "]"
            print(f"  {name!r:<34} -> {a.describe()}  ({a.source}){note}", file=out)
        from .samplers.aliases import REGISTERED_NAMES_NOTES

        print("ComfyUI sampler names that are registered names (the registered solver; ComfyUI's sampler):", file=out)
        for name, text in REGISTERED_NAMES_NOTES.items():
            print(_wrap(f"{name!r:<34} {text}"), file=out)
    if "spacings" in sections:
        print("spacings (spacing=<name>), the time grids:", file=out)
        print(_wrap(", ".join(s for s in SPACINGS if s not in SPACING_ALIASES)), file=out)
        print(_wrap("A1111 schedule labels: " + ", ".join(f"{k!r} -> {v}" for k, v in SPACING_ALIASES.items())),
              file=out)
    if "guidance" in sections:
        print("guidance (guidance=<name>):", file=out)
        for g in GUIDANCES:
            print(f"  {g:<10} {_GUIDANCE_HELP.get(g, '')}", file=out)
    if "plans" in sections:
        dirs = ", ".join(str(d) for d in plan_dirs())
        print(f"shipped plans (solver=plan solver.path=<name>, or solver=\"plan:<name>\" in Python; from {dirs}):",
              file=out)
        for name in available_plans():
            try:
                plan = load_plan(name)
                search = plan.info.get("search") or {}
                what = f"NFE {plan.nfe}" + (f", searched for {search['metric']}" if search.get("metric") else "")
            except (ValueError, OSError) as e:  # a user's broken plan file: shown, not fatal
                what = f"unreadable: {e}"
            print(f"  {name:<20} {what}", file=out)
        if not available_plans():
            print("  (none)", file=out)


def _rank_prefix(rank: int, world: int) -> None:
    """Prefix every log record of this process with `[rank r/w]` (ranks may share one cli.log)."""
    if getattr(_rank_prefix, "installed", False):
        return
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        record.msg = f"[rank {rank}/{world}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
    _rank_prefix.installed = True


def _job_start(name: str, cfg, run_dir: Path, base: Path | None = None) -> tuple[Path, Path | None]:
    """Log the job's command line and config (to <run dir>/cli.log).  With several processes (torchrun,
    submitit / SLURM tasks) every rank takes rank 0's run and sweep directories: Hydra's default
    `${now:...}` names could differ between processes started a second apart."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .eval.generate import dist_env, launch_env

    launch = launch_env()
    if launch.world_size > 1:
        _rank_prefix(launch.rank, launch.world_size)
        dist_env()
        import torch.distributed as dist

        dirs = [str(run_dir), None if base is None else str(base)]
        dist.broadcast_object_list(dirs, src=0)
        if dirs[0] != str(run_dir):
            log.warning("this rank's run directory %s differs from rank 0's: %s is used (give hydra.run.dir)",
                        run_dir, dirs[0])
        run_dir, base = Path(dirs[0]), None if dirs[1] is None else Path(dirs[1])
    log.info("diffsampler %s %s (%s, rank %d of %d): %s", version(), name, launch.launcher, launch.rank,
             launch.world_size, " ".join(HydraConfig.get().overrides.task) or "(no overrides)")
    log.info("run directory %s; config:\n%s", run_dir, OmegaConf.to_yaml(cfg).rstrip())
    return run_dir, base


def _search_hydra_main() -> None:
    """`diffsampler search [overrides]`: the search job (configs/search.yaml, tools/search_job.py)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .tools.config_schema import ConfigError
    from .tools.search_job import run_search_job, search_job_row, validate_search

    @hydra.main(config_path="configs", config_name="search", version_base=None)
    def app(cfg):
        run_dir, _ = _job_start("search", cfg, Path(HydraConfig.get().runtime.output_dir))
        try:
            spec = validate_search(cfg)  # every key, before the model is built
            summary = run_search_job(spec, run_dir)
        except (ConfigError, ValueError) as e:  # a refused value, or a log / cache of another search
            log.info("refused (exit 2; printed on stderr): %s", e)
            print(f"diffsampler search: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        from .eval.generate import is_main

        if is_main():
            msg = (f"best plan: {search_job_row(summary)}; written to {run_dir / 'plan.yaml'} "
                   f"(solver=plan solver.path={run_dir / 'plan.yaml'})")
            log.info(msg)
            print(msg)
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
        run_dir, base = _job_start("run", cfg, run_dir, base)
        try:
            spec = validate(cfg)  # before any value is used, even the results path
            row = execute(spec, run_dir, base / spec.results_file, started=started)
        except ConfigError as e:
            log.info("refused (exit 2; printed on stderr): %s", e)
            print(f"diffsampler: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        if row:
            log.info("result: %s", json.dumps(row))
            log.info("row appended to %s; metrics and fingerprint in %s", base / spec.results_file,
                     run_dir / "metrics.json")
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


# ---------------------------------------------------------------------------------------------
# the dispatch table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One subcommand: `main(argv) -> exit status`, a one-line summary and examples for --help."""
    name: str
    summary: str
    examples: tuple[str, ...]
    main: Callable[[list[str]], int]


#: name -> Command, in the order `diffsampler --help` lists them
COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, *examples: str):
    """Register the decorated `main(argv) -> int` as `diffsampler <name>`."""
    def register(fn: Callable[[list[str]], int]):
        COMMANDS[name] = Command(name, summary, tuple(examples), fn)
        return fn
    return register


def _parser(name: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser for `diffsampler <name>`: the command's summary on top, its examples below."""
    c = COMMANDS[name]
    return argparse.ArgumentParser(
        prog=f"diffsampler {name}", description=textwrap.fill(description or c.summary, 100),
        epilog="examples:\n" + "\n".join(f"  {e}" for e in c.examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)


RUN_EXAMPLES = (
    "diffsampler model=gmm solver=dpmpp_3m nfe=8",
    "diffsampler -m model=digits solver=ddim,dpmpp_2m nfe=5,10,20 hydra.sweep.dir=runs/sweep",
    "torchrun --nproc_per_node 2 -m diffsampler model=digits num_samples=50000 hydra.run.dir=runs/big",
)


@command("run", "one run, or a sweep with -m: sample a model with a solver at an NFE, score it, append a row to "
                "results.csv (Hydra overrides key=value; `diffsampler run --help` shows every group and key). "
                "`run` may be omitted.", *RUN_EXAMPLES)
def _run_main(argv: list[str]) -> int:
    sys.argv = [sys.argv[0]] + argv
    _hydra_main()
    return 0


@command("report", "one page (report.html and report.md) of every results.csv under a run or sweep directory: "
                   "tables, metric-vs-NFE plots, an image matrix of the same seeds across solvers x NFE, search "
                   "convergence",
         "diffsampler report runs/sweep")
def _report_main(argv: list[str]) -> int:
    p = _parser("report")
    p.add_argument("dir", type=Path, help="a run or sweep directory (its results.csv and search summary.json "
                                          "files, searched recursively)")
    args = p.parse_args(argv)
    from .tools.report import report

    return _refusing(lambda: print(report(args.dir)), "report")


@command("search", "solver-schedule search (USF / S^3) on any model=, resumable (Hydra overrides of "
                   "configs/search.yaml; `diffsampler search --help` shows them)",
         "diffsampler search model=gmm search.nfe=5 hydra.run.dir=runs/search",
         "diffsampler model=gmm solver=plan solver.path=runs/search/plan.yaml nfe=5   # use the plan found")
def _search_main(argv: list[str]) -> int:
    sys.argv = [sys.argv[0]] + argv
    _search_hydra_main()
    return 0


@command("list", "registered solvers (with their A1111 / ComfyUI aliases), spacings / time grids, guidance "
                 "methods and shipped solver plans",
         "diffsampler list", "diffsampler list solvers plans")
def _list_main(argv: list[str]) -> int:
    p = _parser("list")
    p.add_argument("sections", nargs="*", metavar="section",
                   help=f"only these sections, of {', '.join(LIST_SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    bad = [x for x in args.sections if x not in LIST_SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]!r}; choose from {', '.join(LIST_SECTIONS)}")
    list_main(sections=tuple(args.sections) or LIST_SECTIONS)
    return 0


@command("demo", "solver accuracy on the exact Gaussian mixture: RMSE against the exact PF-ODE solution, printed",
         "diffsampler demo", "diffsampler demo --solvers ddim dpmpp_3m unipc --nfe 4 8")
def _demo_main(argv: list[str]) -> int:
    p = _parser("demo")
    p.add_argument("--solvers", nargs="+", default=DEFAULT_SOLVERS, metavar="NAME",
                   help=f"registered solvers (diffsampler list solvers; default: {' '.join(DEFAULT_SOLVERS)})")
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20], help="model calls per sample (default: 5 10 20)")
    p.add_argument("--n", type=int, default=512, help="samples (default: 512)")
    args = p.parse_args(argv)
    if min(args.nfe) < 1 or args.n < 1:
        p.error(f"--nfe and --n must be integers >= 1, got --nfe {args.nfe} --n {args.n}")
    from .samplers.registry import is_solver_name

    unknown = [name for name in args.solvers if not is_solver_name(name)]
    if unknown:
        p.error(f"unknown solver {unknown[0]!r} (the registered ones: diffsampler list solvers)")
    return _refusing(lambda: demo(args.solvers, tuple(args.nfe), n=args.n), "demo")


@command("export", "a run's samples as files other FID tools read: a png folder (clean-fid, torch-fidelity) or an "
                   ".npz with arr_0 uint8 (N, H, W, 3) (ADM's evaluator); streamed, memory flat",
         "diffsampler export runs/big --format png       # runs/big/export_png/<seed>.png",
         "diffsampler export runs/big --format npz       # runs/big/samples.npz (arr_0, seeds)")
def _export_main(argv: list[str]) -> int:
    from .tools.export import FORMATS, export

    p = _parser("export")
    p.add_argument("run_dir", type=Path, help="a run directory (holding samples/) or a directory of shard_*.pt files")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="png: one 8-bit file per sample; npz: arr_0 uint8 NHWC, grey replicated to RGB")
    p.add_argument("--out", type=Path, default=None, help="output path (default RUN_DIR/export_png or RUN_DIR/samples.npz)")
    args = p.parse_args(argv)

    def write():
        out, n = export(args.run_dir, args.format, args.out)
        print(f"wrote {n} images to {out}")

    return _refusing(write, "export")


@command("minority-classifier", "score a data set with a pipeline's denoiser and train the minority classifier "
                                "used by guidance=minority",
         "diffsampler minority-classifier --out runs/minority_clf   # the packaged digits model and data",
         "diffsampler model=digits guidance=minority guidance.classifier=runs/minority_clf nfe=20")
def _minority_main(argv: list[str]) -> int:
    from .tools.minority_classifier import build_from_args

    return _refusing(lambda: build_from_args(argv), "minority-classifier")


# ---------------------------------------------------------------------------------------------
# diffsampler --help / --version
# ---------------------------------------------------------------------------------------------

def version() -> str:
    from . import __version__

    return __version__


def usage() -> str:
    """`diffsampler --help`: every command with its examples."""
    lines = [
        "usage: diffsampler [run] [-m] [key=value ...]     a run, or a sweep with -m (Hydra overrides)",
        "       diffsampler <command> [-h] [args ...]",
        "       diffsampler -h | --help | --version",
        "",
        "Diffusion samplers on one plan-based engine: sample a model (model=gmm | digits | diffusers) with any",
        "solver at any NFE, score it (RMSE / FID / KID ...) and compare solvers in one results table.",
        "",
        "commands:",
    ]
    for c in COMMANDS.values():
        lines += textwrap.wrap(f"{c.name:<20} {c.summary}", 100, initial_indent="  ", subsequent_indent=" " * 23,
                               break_on_hyphens=False)
        lines += [f"      $ {e}" for e in c.examples]
    lines += [
        "",
        "`diffsampler <command> -h` shows a command's options; `diffsampler run --help` the run's config groups",
        "and keys; `--hydra-help` Hydra's own flags.  Several processes: `torchrun --nproc_per_node N -m",
        "diffsampler ...` (or `python -m diffsampler ...` under srun / submitit: `+launcher=slurm`); every",
        "run logs what it did to <run dir>/cli.log.",
    ]
    return "\n".join(lines)


def _unknown_command(word: str) -> int:
    close = difflib.get_close_matches(word, list(COMMANDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"diffsampler: error: unknown command {word!r}{hint} (commands: {', '.join(COMMANDS)}; "
          "a run takes key=value overrides; diffsampler --help)", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if argv[:1] in (["--version"], ["-V"]):
        print(f"diffsampler {version()}")
        return 0
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]].main(argv[1:])
    first = next((a for a in argv if not a.startswith("-")), None)  # the first word that is not a flag
    if first is not None and argv.index(first) == 0 and not any(ch in first for ch in "=~+"):
        return _unknown_command(first)  # a bare word is no Hydra override: a mistyped command
    return _run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
