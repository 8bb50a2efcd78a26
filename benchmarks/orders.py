"""The README's order table: the measured convergence order of every registered solver.

It runs the measurements of tests/test_convergence.py (same mixture, grids, NFE ranges and code:
`measured_order`, `weak_order`, `adaptive_order`) for every solver in `diffsampler.available()` and
writes one row per measured entry (a solver may have several: options, noise kinds) between the
`<!-- orders:start -->` / `<!-- orders:end -->` markers of README.md.  A registered solver with no
entry gets a "not measured" row (and tests/test_convergence.py's guard test fails for it).

    python benchmarks/orders.py            # measure (~1-2 min on one core) and rewrite the README table
    python benchmarks/orders.py --no-write # print only
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402
import test_convergence as tc  # noqa: E402

import diffsampler as ds  # noqa: E402

README = ROOT / "README.md"
WEAK_NFES = tc.weak_order.__defaults__[0]
START, END = "<!-- orders:start -->", "<!-- orders:end -->"


def _opts(opts: dict) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in opts.items()) or "defaults"


def rows() -> list[list[str]]:
    setup = tc.make_setup(conftest.gmm8.__wrapped__())
    out = []
    for name in ds.available():
        info = ds.samplers.info(name)
        found = False
        if name in tc.EXPECTED:
            order, nfes, why = tc.EXPECTED[name]
            slope, _ = tc.measured_order(setup, name, nfes)
            out.append([f"`{name}`", "defaults", "global", str(order),
                        f"{slope:.2f}", "-".join(map(str, (nfes[0], nfes[-1]))), why])
            found = True
        for sname, order, nfes in getattr(tc, "SINGLESTEP_ORDERS", []):
            if sname == name:
                slope, _ = tc.measured_order(setup, name, nfes, order=order)
                out.append([f"`{name}`", f"`order={order}`", "global", str(order), f"{slope:.2f}",
                            f"{nfes[0]}-{nfes[-1]}", "every step of this order but a last lower one"])
                found = True
        for pred, pp, cc, order in getattr(tc, "SA_ORDERS", []) if name == "sa_solver" else []:
            slope, _ = tc.sa_solver_ode_order(setup, pred, pp, cc)
            out.append([f"`{name}`", _opts(dict(tau=0.0, prediction=pred, predictor_order=pp, corrector_order=cc)),
                        "global", str(order), f"{slope:.2f}", "80-320", "SA-Solver on the PF-ODE (tau = 0)"])
            found = True
        for wname, opts, order, why in tc.WEAK_ORDER:
            if wname == name:
                slope, _ = tc.weak_order(wname, opts)
                out.append([f"`{name}`", _opts(opts), "weak", str(order), f"{slope:.2f}",
                            "-".join(map(str, (WEAK_NFES[0], WEAK_NFES[-1]))), why])
                found = True
        if info.get("adaptive"):
            for order in (2, 3):
                slope, spent, _ = tc.adaptive_order(setup, order)
                out.append([f"`{name}`", f"`order={order}`", "vs calls spent", str(order),
                            f"{slope:.2f}", f"{spent[0]}-{spent[-1]} calls", "no grid: error against the calls spent"])
            found = True
        if not found:
            out.append([f"`{name}`", "", "not measured", "", "", "", "no entry in tests/test_convergence.py"])
        print(" | ".join(out[-1][:5]), flush=True)
    return out


def table(rs: list[list[str]]) -> str:
    hdr = ["solver", "options", "order measured", "expected", "measured", "NFE", "why"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 3 + ["---"]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rs]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help="print only; do not touch README.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    body = (f"{START}\n"
            f"Measured by `python benchmarks/orders.py` ({len(ds.available())} registered solvers; the same code "
            "as `tests/test_convergence.py`, which checks each within 0.3 of the expected order).  **global**: "
            "slope of log RMSE against the exact PF-ODE endpoint at t_min vs log NFE (8-d mixture, 64 samples, "
            "LinearVP, logSNR grid, `final=\"last\"`).  **weak**: slope of |mean error| + |std error| of the "
            "output law, computed exactly (one batched run per NFE), on Gaussian data.  **vs calls spent**: an "
            "adaptive solver's RMSE against the model calls it spent as rtol goes 1e-3 .. 1e-5 (atol = rtol / 10)."
            "\n\n"
            f"{table(rows())}\n{END}")
    print(body)
    if not args.no_write:
        text = README.read_text()
        pat = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
        if not pat.search(text):
            raise SystemExit(f"README.md has no {START} ... {END} block to replace")
        README.write_text(pat.sub(lambda _: body, text, count=1))
        print(f"wrote the order table of {README}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
