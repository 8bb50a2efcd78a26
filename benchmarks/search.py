"""Solver-schedule search (USF / S^3) on the exact Gaussian mixture: searched plans vs the best fixed
registered solver and the best diffusers scheduler, on held-out seeds.

Setup (as benchmarks/accuracy.py): GaussianMixture.random(16, 6, seed=0), diffusers' default linear
betas as a DiscreteVP, the exact mixture as an epsilon model, float64, RMSE against the exact PF-ODE
endpoint at sigma = 0.  The search (`diffsampler.tools.search`) sees only calibration seeds
(>= 1,000,000); every method is then scored on the held-out seeds 0 .. N_EVAL-1:

* best fixed registered solver: every deterministic solver x spacing (logsnr, time_uniform,
  time_quadratic, karras, linspace, trailing) x final (zero, last), the best on the held-out set
  itself (an optimistic baseline: its choice sees the evaluation seeds);
* best diffusers scheduler: DPM++ 2M/3M, DPM++ 2S/3S singlestep, UniPC bh2 2/3, DEIS 3, Euler,
  Heun, LMS, DDIM, each with its sigma options (default, Karras, exponential, logSNR = `use_lu_lambdas`
  where the class has it) at the largest step count within the NFE budget, again the best on the
  held-out set;
* the searched plan (full USF space), and the time-grid-only search for `dpmpp_3m`.

The ratio column has a 90 % paired-bootstrap interval over held-out samples (RMSE here is dominated
by the few samples whose trajectory ends in another mixture component).

    python benchmarks/search.py                 # full run; writes RESULTS.md section, CSV, plans
    python benchmarks/search.py --nfe 5 --budget 200 --no-write     # a quick look
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffsampler as ds  # noqa: E402
from diffsampler.samplers import initial_noise  # noqa: E402
from diffsampler.tools.search import search  # noqa: E402

from _common import RESULTS_DIR, fmt_e, machine_line, md_table, write_csv, write_section  # noqa: E402
from accuracy import DTYPE, Setup, rmse  # noqa: E402

SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras", "linspace", "trailing")
SIGMA_OPTIONS = {"default": {}, "Karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
                 "logSNR": {"use_lu_lambdas": True}}
HF = [  # (label, class, kwargs)
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(solver_order=2)),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPM++ 2S", "DPMSolverSinglestepScheduler", dict(solver_order=2)),
    ("DPM++ 3S", "DPMSolverSinglestepScheduler", dict(solver_order=3)),
    ("UniPC bh2 2", "UniPCMultistepScheduler", dict(solver_order=2)),
    ("UniPC bh2 3", "UniPCMultistepScheduler", dict(solver_order=3)),
    ("DEIS 3", "DEISMultistepScheduler", dict(solver_order=3)),
    ("Euler", "EulerDiscreteScheduler", dict()),
    ("Heun", "HeunDiscreteScheduler", dict()),
    ("LMS", "LMSDiscreteScheduler", dict()),
    ("DDIM", "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
]
PLAN_DIR = Path(ds.__file__).resolve().parent / "plans"


def per_sample_sq(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return (x.double() - ref.double()).pow(2).mean(1).numpy()


def boot_ratio(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90 % paired-bootstrap interval of RMSE(a) / RMSE(b) from per-sample squared errors."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    r = np.sqrt(a[idx].mean(1) / b[idx].mean(1))
    return float(np.quantile(r, 0.05)), float(np.quantile(r, 0.95))


def best_fixed(S: Setup, nfe: int) -> dict:
    best = None
    for name in ds.available():
        if ds.samplers.info(name)["stochastic"]:
            continue
        for spacing in SPACINGS:
            for final in ("zero", "last"):
                try:
                    x = ds.sample(S.denoiser(), S.x_T.clone(), solver=name, nfe=nfe, spacing=spacing, final=final)
                except ValueError:  # e.g. duplicate integer timesteps
                    continue
                e = rmse(x, S.ref)
                if best is None or e < best["rmse"]:
                    best = dict(method=f"{name} ({spacing}, final={final})", rmse=e, sq=per_sample_sq(x, S.ref))
    return best


def best_diffusers(S: Setup, nfe: int) -> tuple[dict, list[dict]]:
    import diffusers

    best, rows = None, []
    for label, cls, kw in HF:
        for opt, okw in SIGMA_OPTIONS.items():
            if okw and not set(okw) <= set(inspect.signature(getattr(diffusers, cls).__init__).parameters):
                continue
            if cls == "DDIMScheduler" and okw:
                continue
            try:
                k = {**kw, **okw}
                steps = S.steps_for_nfe(cls, k, nfe)
                x, calls, _ = S.diffusers(cls, k, steps)
            except Exception as e:  # noqa: BLE001 - a config diffusers rejects is reported, not fatal
                rows.append(dict(method=f"{label} ({opt})", nfe=nfe, rmse=float("nan"), note=f"{type(e).__name__}: {e}"[:120]))
                continue
            e = rmse(x, S.ref)
            rows.append(dict(method=f"{label} ({opt})", nfe=nfe, actual_nfe=calls, rmse=e))
            if np.isfinite(e) and (best is None or e < best["rmse"]):
                best = dict(method=f"{label} ({opt}, {calls} calls)", rmse=e, sq=per_sample_sq(x, S.ref))
    return best, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", type=str, default="4,5,6,8,10")
    p.add_argument("--budget", type=int, default=800, help="true evaluations per search")
    p.add_argument("--budget-times", type=int, default=300, help="true evaluations of the time-only search")
    p.add_argument("--n-calib", type=int, default=2048)
    p.add_argument("--n-eval", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the mixture's small tensors gain nothing from more, and a shared "
                        "machine's oversubscribed OpenMP threads slow every model call down many times)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    t_all = time.time()

    S = Setup(8, 8)
    # the held-out evaluation set: per-sample seeds 0 .. n_eval-1 (the search uses seeds >= 1e6)
    eval_seeds = list(range(args.n_eval))
    S.x_T = initial_noise((args.n_eval, 16), S.schedule, seeds=eval_seeds).to(DTYPE)
    S.ref = S.gmm.ode_endpoint(S.x_T, S.a_T, S.s_T, 1.0, 0.0)

    def exact(x):
        return S.gmm.ode_endpoint(x.double(), S.a_T, S.s_T, 1.0, 0.0)

    log_dir = RESULTS_DIR / "search_logs"
    rows, table, plans = [], [], {}
    for nfe in nfes:
        print(f"NFE {nfe}: baselines", flush=True)
        fixed = best_fixed(S, nfe)
        hf, hf_rows = best_diffusers(S, nfe)
        rows.extend(dict(table="diffusers", **r) for r in hf_rows)
        print(f"  best fixed {fixed['method']} {fixed['rmse']:.4f}; best diffusers {hf['method']} {hf['rmse']:.4f}", flush=True)
        found = {}
        for kind, base, budget in (("plan", None, args.budget), ("times", "dpmpp_3m", args.budget_times)):
            log = None if args.no_write else log_dir / f"nfe{nfe}_{kind}.jsonl"
            r = search(S.denoiser(), nfe, shape=(16,), reference=exact, budget=budget, n_calib=args.n_calib,
                       n_verify=8, seed=args.seed, holdout_seeds=eval_seeds, base=base, log=log, dtype=DTYPE,
                       batch=max(8, budget // 40),
                       name=f"gmm_nfe{nfe}" if base is None else f"gmm_dpmpp_3m_times_nfe{nfe}", progress=False)
            x = ds.sample(S.denoiser(), S.x_T.clone(), solver=r.plan.compile(S.schedule))
            found[kind] = (r, rmse(x, S.ref), per_sample_sq(x, S.ref))
            print(f"  search {kind}: calib {r.calib_score:.4f} verify {r.verify_score:.4f} held-out {found[kind][1]:.4f} "
                  f"({r.evaluations} evals, {r.model_calls} model calls, {r.seconds:.0f}s)", flush=True)
        r, e, sq = found["plan"]
        rt, et, _ = found["times"]
        lo_f, hi_f = boot_ratio(sq, fixed["sq"])
        lo_h, hi_h = boot_ratio(sq, hf["sq"])
        row = dict(table="search", nfe=nfe, searched_rmse=e, calib_rmse=r.calib_score, verify_rmse=r.verify_score,
                   best_fixed=fixed["method"], best_fixed_rmse=fixed["rmse"], ratio_fixed=e / fixed["rmse"],
                   ratio_fixed_lo=lo_f, ratio_fixed_hi=hi_f, best_diffusers=hf["method"], best_diffusers_rmse=hf["rmse"],
                   ratio_diffusers=e / hf["rmse"], ratio_diffusers_lo=lo_h, ratio_diffusers_hi=hi_h,
                   times_only_rmse=et, evaluations=r.evaluations, model_calls=r.model_calls,
                   sample_evaluations=r.sample_evaluations, search_seconds=r.seconds, reference_seconds=r.reference_seconds,
                   times_only_seconds=rt.seconds, plan_steps=len(r.plan.steps), plan_orders="/".join(map(str, r.plan.orders)), plan=_steps_str(r.plan),
                   plan_final=r.plan.final)
        rows.append(row)
        table.append(row)
        plans[nfe] = r.plan

    body = render(table, args, time.time() - t_all)
    print(body)
    if not args.no_write:  # plans, table and CSV together, once every search is done
        PLAN_DIR.mkdir(exist_ok=True)
        for nfe, plan in plans.items():
            plan.save(PLAN_DIR / f"gmm_nfe{nfe}.yaml")
        write_section("search", body)
        path = write_csv("search.csv", rows)
        print(f"wrote {path}, the search section of RESULTS.md and {PLAN_DIR}/gmm_nfe*.yaml")


def _steps_str(sp) -> str:
    parts = []
    for s, k in zip(sp.steps, sp.orders):
        tag = f"{s.prediction[0].upper()}{k}" + {"multistep": "", "multistep_dpm": "dpm", "multistep_t": "t",
                                                  "singlestep": "s", "fallback": "", "unipc": "u", "ghvb": "ghvb"}[s.estimator]
        parts.append(tag + ("+c" if s.corrector else "") + ("(analytic)" if s.analytic else "")
                     + (f"[r{s.relax:+.2f}]" if s.relax else "") + (f"(b{s.beta:.2f})" if s.beta is not None else ""))
    return " ".join(parts)


#: the record of earlier full runs of this script (same baselines and held-out seeds), kept with the table
EARLIER = (
    "Earlier runs, before the linear relaxation and GHVB steps were in the search space: budget 800 / 1024 calibration samples gave "
    "ratios vs diffusers 0.65, 0.78, 0.78, 0.73, 0.74 at NFE 4/5/6/8/10; budget 3000 / 2048 gave 0.63, 0.70 (0.701), "
    "0.75, 0.61, 0.50; budget 8000 / 4096 gave 0.66, 0.71, 0.57, 0.54, 0.45 (NFE 5 missed the target in all three; "
    "its verification score, 0.298, was far above its calibration score, 0.249: the 4096-sample calibration RMSE, "
    "dominated by the few trajectories that change mixture component, was being overfitted).  The run above "
    "(relaxation and GHVB in the space, budget 4000 on 8192 calibration samples) was chosen in advance as the one to report."
)


def render(table, args, seconds) -> str:
    ok = lambda v: "yes" if v <= 0.7 else "**no**"  # noqa: E731
    rows = []
    for r in table:
        rows.append([r["nfe"], fmt_e(r["searched_rmse"]), f"{r['best_fixed']} {fmt_e(r['best_fixed_rmse'])}",
                     f"{r['ratio_fixed']:.2f} [{r['ratio_fixed_lo']:.2f}, {r['ratio_fixed_hi']:.2f}] {ok(r['ratio_fixed'])}",
                     f"{r['best_diffusers']} {fmt_e(r['best_diffusers_rmse'])}",
                     f"{r['ratio_diffusers']:.2f} [{r['ratio_diffusers_lo']:.2f}, {r['ratio_diffusers_hi']:.2f}] {ok(r['ratio_diffusers'])}",
                     fmt_e(r["times_only_rmse"])])
    cost = [[r["nfe"], r["evaluations"], r["model_calls"], f"{r['sample_evaluations']:.2e}", f"{r['search_seconds']:.0f}",
             f"{r['reference_seconds']:.1f}", f"{r['times_only_seconds']:.0f}", r["plan_final"], r["plan"]]
            for r in table]
    met = sum(r["ratio_fixed"] <= 0.7 and r["ratio_diffusers"] <= 0.7 for r in table)
    return "\n".join([
        "## Solver-schedule search (USF / S^3) on the exact Gaussian mixture",
        "",
        "Written by `benchmarks/search.py`.  Setup of `benchmarks/accuracy.py` (16-d, 6-component mixture, diffusers' "
        "default linear betas, exact epsilon model, float64); RMSE against the exact PF-ODE endpoint on "
        f"{args.n_eval} held-out seeds (0..{args.n_eval - 1}).  Each search saw only calibration seeds (>= 1,000,000: "
        f"{args.n_calib} for scoring, {args.n_calib} more to verify the top 8), budget {args.budget} true evaluations "
        f"(time-only search: {args.budget_times}), search seed {args.seed}.  Baselines are the best on the held-out set itself "
        "(every registered deterministic solver x 6 spacings x 2 finals; every diffusers scheduler listed in the script "
        "x its sigma options default / Karras / exponential / logSNR).  Ratio = searched / baseline RMSE with a 90 % "
        "paired-bootstrap interval; target <= 0.7.  Searched plans are shipped as `plan:gmm_nfe<N>`.",
        "",
        md_table(["NFE", "searched plan", "best fixed registered solver", "ratio", "best diffusers scheduler", "ratio",
                  "dpmpp_3m, searched times only"], rows),
        "",
        f"Target (<= 0.7x both) met at {met} of {len(table)} NFE budgets.",
        "",
        "Search cost (wall time on the shared machine below, which other jobs were using at the same time; model calls "
        "are batched network calls, sample evaluations = calls x batch rows; the exact reference costs no network call):",
        "",
        md_table(["NFE", "true evaluations", "model calls", "sample evaluations", "search s", "reference s",
                  "time-only search s", "plan final", "plan steps"], cost),
        "",
        "Plan steps: prediction (D data, N noise), effective order, estimator (u UniPC-bh2, dpm DPM-Solver++ weights, "
        "t tAB-DEIS, s singlestep, ghvb GHVB momentum, none: exact Taylor multistep), +c corrector, [r c] linear relaxation D' (1 + c h); "
        "the full plans are the YAML files `diffsampler/plans/gmm_nfe*.yaml`.",
        "",
        EARLIER,
        "",
        f"Total {seconds / 60:.1f} min.  {machine_line()}.",
    ])


if __name__ == "__main__":
    main()
