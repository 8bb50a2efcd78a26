"""Honest timing (issue 18 item 6): how fast the CLI's generation path runs against a bare loop of the
same network calls, and what a job of a sweep pays to load its networks.

1. Throughput on the packaged digits model (16x16 UNet), `num_samples` samples at `batch_size`:

   * bare: the network alone in a hand-written DDIM loop -- `nfe` calls of `unet(x, t)` per batch,
     each followed by the DDIM update on precomputed alphas, noise from one `torch.randn` per batch;
   * ours: a run of the runner (`tools/runner.execute`, what `diffsampler model=digits ...` does), its
     row's `gen_time_s`: per-seed noise, the plan, every model call through the denoiser, decoding
     to [0, 1], shards written atomically to disk.  The row's other times (loading, scoring) are not
     in it, and the process has loaded the model before (a warm-up run).

   Samples/s of each, the two (and each solver) interleaved `--repeats` times; the ratio is the median
   of the per-repeat ratios.  The target is ours >= 0.9 x bare at the same batch size.
2. A 9-job sweep (`diffsampler -m model=digits solver=ddim,dpmpp_2m,dpmpp_3m nfe=5,10,20`, Hydra's
   basic launcher, one process): each row's `load_time_s`, first job vs the rest; and, for scale, what
   loading the pipeline and the FID-proxy's feature network costs in a warm process (what every job
   paid before the process kept them).

    python benchmarks/throughput.py                 # ~5 min on 2 busy cores
    python benchmarks/throughput.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

from _common import machine_line, md_table, write_csv, write_section  # noqa: E402


def _spec(solver: str, nfe: int, n: int, batch: int):
    from hydra import compose, initialize_config_module

    from diffsampler.cli import _register_solver_configs
    from diffsampler.tools.run_checks import validate

    _register_solver_configs()
    with initialize_config_module("diffsampler.configs", version_base=None):
        cfg = compose("config", overrides=["model=digits", f"solver={solver}", f"nfe={nfe}", f"num_samples={n}",
                                           f"batch_size={batch}", f"shard_size={batch}", "progress=false"])
    return validate(cfg)


def ours(solver: str, nfe: int, n: int, batch: int, tmp: Path) -> tuple[float, float, float]:
    """(samples per wall second, per CPU second, CPU share outside the network calls) of the runner's
    generation in a fresh run folder: the row's gen_time_s, and the process CPU time of the same phase
    (its `generate_shards` call)."""
    import diffsampler.eval.generate as gen
    from diffsampler.tools.runner import execute

    real, cpu = gen.generate_shards, []

    def timed(*a, **k):
        c0 = time.process_time()
        try:
            return real(*a, **k)
        finally:
            cpu.append(time.process_time() - c0)

    d = Path(tempfile.mkdtemp(dir=tmp))
    _pipe()
    spec = _spec(solver, nfe, n, batch)
    gen.generate_shards = timed
    _NET[0] = 0.0
    try:
        row = execute(spec, d / "run", d / "results.csv")
    finally:
        gen.generate_shards = real
    return n / row["gen_time_s"], n / cpu[0], 1 - _NET[0] / cpu[0]


def bare(nfe: int, n: int, batch: int, seed: int = 0) -> tuple[float, float, float]:
    """(samples per wall second, per CPU second, CPU share outside the network calls) of a hand-written
    DDIM loop of the same network calls at the same batch size."""
    pipe = _pipe()
    unet, ac = pipe.unet, pipe.scheduler.alphas_cumprod.float()
    ts = torch.linspace(len(ac) - 1, 0, nfe).round().long()
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    _NET[0] = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, n, batch):
            b = min(batch, n - i)
            x = torch.randn(b, unet.config.in_channels, size, size, generator=g)
            for k, t in enumerate(ts):
                eps = unet(x, t.expand(b), return_dict=False)[0]
                a, a_next = ac[t], (ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0))
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            ((x + 1) / 2).clamp(0, 1).cpu()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, n / cpu, 1 - _NET[0] / cpu


_PIPE, _LOADER = [], []
_NET = [0.0]  # process CPU seconds spent inside the network's forward since the last reset


def _pipe():
    """The digits pipeline, one object for both loops (the runner gets it through its loader), with
    hooks adding the CPU time of every network call to _NET."""
    import diffsampler.eval.digits as digits

    if not _PIPE:
        _LOADER.append(digits.load_digits_pipeline)
        pipe = digits.load_digits_pipeline()
        started = []
        pipe.unet.register_forward_pre_hook(lambda m, a: started.append(time.process_time()))
        pipe.unet.register_forward_hook(lambda m, a, o: _NET.__setitem__(0, _NET[0] + time.process_time() - started.pop()))
        digits.load_digits_pipeline = lambda *a, **k: pipe
        _PIPE.append(pipe)
    return _PIPE[0]


def throughput(solvers, nfe: int, n: int, batch: int, repeats: int, tmp: Path) -> list[dict]:
    ours(solvers[0], 2, batch, batch, tmp)  # warm-up: imports, the model loaded into this process
    bare(2, batch, batch)
    got = {s: [] for s in ["bare", *solvers]}
    for _ in range(repeats):
        got["bare"].append(bare(nfe, n, batch))
        for s in solvers:
            got[s].append(ours(s, nfe, n, batch, tmp))
    rows = []
    for s in solvers:
        wall = [a[0] / b[0] for a, b in zip(got[s], got["bare"])]
        cpu = [a[1] / b[1] for a, b in zip(got[s], got["bare"])]
        best = max(a[0] for a in got[s]) / max(b[0] for b in got["bare"])
        out_ours, out_bare = statistics.median(a[2] for a in got[s]), statistics.median(b[2] for b in got["bare"])
        rows.append({"solver": s, "nfe": nfe, "num_samples": n, "batch_size": batch,
                     "bare_samples_per_s": max(b[0] for b in got["bare"]),
                     "ours_samples_per_s": max(a[0] for a in got[s]), "ratio_best": best,
                     "ratio_wall_median": statistics.median(wall), "ratio_wall_min": min(wall),
                     "ratio_wall_max": max(wall), "ratio_cpu_median": statistics.median(cpu),
                     "ratio_cpu_min": min(cpu), "ratio_cpu_max": max(cpu), "outside_net_ours": out_ours,
                     "outside_net_bare": out_bare, "ratio_equal_network": (1 - out_ours) / (1 - out_bare),
                     "repeats": repeats})
    return rows


def load_costs(repeats: int = 3) -> dict:
    """Seconds to load the digits pipeline and the FID-proxy feature network in a warm process."""
    import diffsampler.eval.digits as digits
    from diffsampler.eval.fid import get_feature_extractor

    load_digits_pipeline = _LOADER[0] if _LOADER else digits.load_digits_pipeline  # the real one, not _pipe's
    load_digits_pipeline(), get_feature_extractor("digits")  # imports
    out = {}
    for name, fn in (("pipeline", load_digits_pipeline), ("feature", lambda: get_feature_extractor("digits"))):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def sweep(tmp: Path, n: int) -> list[dict]:
    """Each job's row times of a 9-job sweep run as the README runs it."""
    import pandas as pd

    d = tmp / "sweep"
    subprocess.run([sys.executable, "-m", "diffsampler", "-m", "model=digits", "solver=ddim,dpmpp_2m,dpmpp_3m",
                    "nfe=5,10,20", f"num_samples={n}", "progress=false", f"hydra.sweep.dir={d}"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    df = pd.read_csv(d / "results.csv")
    return [{"job": i, "solver": r.solver, "nfe": int(r.nfe), "load_time_s": r.load_time_s, "gen_time_s": r.gen_time_s,
             "score_time_s": r.score_time_s, "wall_time_s": r.wall_time_s} for i, r in enumerate(df.itertuples())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    n, batch, repeats, nfe = (256, 128, 2, 5) if args.quick else (512, 256, 3, 10)
    solvers = ["ddim", "dpmpp_2m", "dpmpp_3m"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_rows = throughput(solvers, nfe, n, batch, repeats, tmp)
        costs = load_costs()
        s_rows = sweep(tmp, n_sweep := 256 if not args.quick else 64)
    write_csv("throughput.csv", t_rows)
    write_csv("throughput_sweep.csv", s_rows)
    rest = [r["load_time_s"] for r in s_rows[1:]]
    body = [
        "## Generation throughput and per-job load time (`benchmarks/throughput.py`)",
        "",
        f"Machine: {machine_line()}.  Digits model (16x16 UNet), NFE {nfe}, {n} samples at batch {batch}; "
        f"the bare loop and ours interleaved {repeats} times.  Samples/s: the best repeat of each (wall "
        "clock); the ratios: of the best repeats, and per repeat in wall-clock and in process CPU time.  On a "
        "busy shared machine the network itself runs faster or slower from one repeat to the next, which "
        "blurs these; the last columns do not depend on it: the share of the generation's CPU time spent "
        "outside the network's forward calls (hooks on the UNet), and the ratio it implies at equal network "
        "speed, (1 - ours' share) / (1 - bare's share).  *bare*: the network alone in a "
        "hand-written DDIM loop (`unet(x, t)` and the update, one `torch.randn` per batch); *ours*: the row's "
        "`gen_time_s` of a run of the runner (`diffsampler model=digits solver=...`): per-seed noise, plan, "
        "denoiser, decoding and the shards written to disk.",
        "",
        md_table(["solver", "bare samples/s", "ours samples/s", "ours / bare, best", "wall: median (min .. max)",
                  "CPU time: median (min .. max)", "outside the network: ours / bare", "ours / bare at equal network"],
                 [[r["solver"], f"{r['bare_samples_per_s']:.1f}", f"{r['ours_samples_per_s']:.1f}",
                   f"{r['ratio_best']:.3f}",
                   f"{r['ratio_wall_median']:.3f} ({r['ratio_wall_min']:.3f} .. {r['ratio_wall_max']:.3f})",
                   f"{r['ratio_cpu_median']:.3f} ({r['ratio_cpu_min']:.3f} .. {r['ratio_cpu_max']:.3f})",
                   f"{100 * r['outside_net_ours']:.2f} % / {100 * r['outside_net_bare']:.2f} %",
                   f"{r['ratio_equal_network']:.4f}"] for r in t_rows]),
        "",
        f"Target ours >= 0.9 x bare: at equal network speed ours / bare is "
        f"{min(r['ratio_equal_network'] for r in t_rows):.4f} .. {max(r['ratio_equal_network'] for r in t_rows):.4f} "
        f"(the runner spends {100 * max(r['outside_net_ours'] for r in t_rows):.2f} % or less of its generation CPU "
        f"time outside the network); the best repeats' wall-clock ratio "
        f"{min(r['ratio_best'] for r in t_rows):.3f} .. {max(r['ratio_best'] for r in t_rows):.3f}.",
        "",
        f"9-job sweep (`diffsampler -m model=digits solver=ddim,dpmpp_2m,dpmpp_3m nfe=5,10,20 "
        f"num_samples={n_sweep}`, one process): `load_time_s` of the first "
        f"job {s_rows[0]['load_time_s']:.2f} s (imports, config checks, pipeline and feature network), of the "
        f"8 others median {statistics.median(rest):.3f} s, max {max(rest):.3f} s.  Loading them again in a warm "
        f"process, what each job paid before the process kept them: pipeline {costs['pipeline']:.3f} s, "
        f"feature network {costs['feature']:.3f} s (this model is tiny; a Stable Diffusion pipeline takes "
        "seconds to minutes).",
        "",
        md_table(["job", "solver", "NFE", "load_time_s", "gen_time_s", "score_time_s", "wall_time_s"],
                 [[r["job"], r["solver"], r["nfe"], r["load_time_s"], r["gen_time_s"], r["score_time_s"],
                   r["wall_time_s"]] for r in s_rows]),
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("throughput", text)


if __name__ == "__main__":
    main()
