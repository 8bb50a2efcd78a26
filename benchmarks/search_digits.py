"""Solver-schedule search (USF / S^3) on the digits model with the FID proxy as the metric.

The search sees calibration seeds only (>= 1,000,000; `search`'s own); the found plan and the fixed
solvers are then scored on held-out seeds 0 .. N_EVAL-1 (FID proxy against the 360 held-out test
digits; its floor at this sample size is printed too).  A first data point for issue 8's "the same
on the small trained image model": small budget, NFE 5.

    python benchmarks/search_digits.py [--nfe 5] [--budget 80] [--n-calib 512] [--n-eval 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffsampler as ds  # noqa: E402
from diffsampler.eval.digits import digits_dataset, fid_proxy, load_digits_classifier, load_digits_pipeline  # noqa: E402
from diffsampler.pipelines import denoiser_from_pipeline  # noqa: E402
from diffsampler.samplers.search import search  # noqa: E402

from _common import RESULTS_DIR, machine_line, md_table, run_diffusers, write_csv, write_section  # noqa: E402

FIXED = ("ddim", "deis_3", "dpmpp_2m", "dpmpp_3m", "ghvb")
SPACINGS = ("time_uniform", "logsnr", "trailing")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--budget", type=int, default=80)
    p.add_argument("--n-calib", type=int, default=512)
    p.add_argument("--n-eval", type=int, default=2048)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    pipe = load_digits_pipeline()
    den = denoiser_from_pipeline(pipe)
    clf, ref = load_digits_classifier(), digits_dataset("test")[0]
    shape = (1, 16, 16)

    def metric(samples, x_T):
        return fid_proxy(samples.clamp(-1, 1), ref, clf)

    held_out = list(range(a.n_eval))
    t0 = time.perf_counter()
    den.reset_nfe()
    log = RESULTS_DIR / "search_logs" / f"digits_nfe{a.nfe}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    r = search(den, a.nfe, shape=shape, metric=metric, budget=a.budget, n_calib=a.n_calib, batch=8,
               holdout_seeds=held_out, log=log, progress=True)
    search_s, search_calls = time.perf_counter() - t0, den.nfe

    def score(**kw):
        x = ds.sample(den, shape=(a.n_eval, *shape), seeds=held_out, nfe=a.nfe, **kw)
        return metric(x, None)

    rows = [{"method": "searched plan", "fid_proxy": score(solver=r.plan.compile(den.schedule))}]
    for name in FIXED:
        for sp in SPACINGS:
            rows.append({"method": f"{name} ({sp})", "fid_proxy": score(solver=name, spacing=sp)})
    for label, cls in (("diffusers UniPC", "UniPCMultistepScheduler"), ("diffusers DPM++ 3M", "DPMSolverMultistepScheduler")):
        import diffusers

        sched = getattr(diffusers, cls).from_config(pipe.scheduler.config, **({"solver_order": 3} if "DPM" in cls else {}))
        x_T = ds.samplers.initial_noise((a.n_eval, *shape), den.schedule, seeds=held_out)
        with torch.no_grad():
            x = run_diffusers(sched, pipe.unet, a.nfe, x_T)
        rows.append({"method": label + " (default sigmas)", "fid_proxy": metric(x, None)})
    floor = fid_proxy(digits_dataset("train")[0][: min(a.n_eval, 1437)], ref, clf)
    fixed = min((row for row in rows[1:] if not row["method"].startswith("diffusers")), key=lambda q: q["fid_proxy"])
    hf = min((row for row in rows if row["method"].startswith("diffusers")), key=lambda q: q["fid_proxy"])
    s = rows[0]["fid_proxy"]
    body = [
        "## Solver-schedule search on the digits model (FID proxy) (`benchmarks/search_digits.py`)", "",
        f"NFE {a.nfe}; search budget {a.budget} true evaluations on {a.n_calib} calibration samples (seeds >= 1,000,000), "
        f"{search_calls} model calls, {search_s:.0f} s; scored on {a.n_eval} held-out seeds (0..{a.n_eval - 1}) "
        f"against the 360 test digits.  Floor at this sample size (train digits vs test): {floor:.2f}.", "",
        md_table(["method", "FID proxy"], [[q["method"], f"{q['fid_proxy']:.3f}"] for q in rows]), "",
        f"Searched {s:.3f} vs best fixed registered {fixed['method']} {fixed['fid_proxy']:.3f} "
        f"(ratio {s / fixed['fid_proxy']:.2f}) and best {hf['method']} {hf['fid_proxy']:.3f} "
        f"(ratio {s / hf['fid_proxy']:.2f}); target <= 0.7.  {machine_line()}",
    ]
    print("\n".join(body))
    if not a.no_write:
        write_csv("search_digits.csv", rows)
        write_section("search_digits", "\n".join(body))
        r.plan.save(RESULTS_DIR / f"digits_nfe{a.nfe}_plan.yaml")


if __name__ == "__main__":
    main()
