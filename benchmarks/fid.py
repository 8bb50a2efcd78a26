"""FID-proxy vs NFE on the packaged digits model (1x16x16 DDPM UNet), our solvers next to diffusers'
schedulers on the same UNet, with the same initial noise.

Metric: the FID-proxy of `diffsampler.tools.runner` -- Frechet distance in the 64-d penultimate features
of the packaged digits classifier (`get_feature_extractor("digits")`) between the generated images
(in [0, 1]) and the held-out test split (`digits_dataset("test")`, 360 images, mapped to [0, 1]).
All runs use the same seeds 0..n-1 and hence the same x_T (`initial_noise(shape, schedule,
seeds=...)`); the diffusers runs start from that same x_T (plain diffusers loop, `_common.run_diffusers`).

Our side uses the default `denoiser_from_pipeline(pipe)`, which honours the pipeline scheduler's
`clip_sample=True` (x0 predictions clipped to [-1, 1]); diffusers' DDIM is run with clip_sample=False
(as asked) and DPMSolverMultistep / UniPC ignore clip_sample.  For a 1:1 comparison our dpmpp_2m is
also run with clipping disabled (`dpmpp_2m (no clip)`).

    python benchmarks/fid.py            # full run: 256 samples, NFE 5/10/20
    python benchmarks/fid.py --quick    # 64 samples, NFE 5/10, fewer solvers
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402

import diffsampler as ds  # noqa: E402
from diffsampler.eval.digits import digits_dataset, load_digits_pipeline  # noqa: E402
from diffsampler.eval.fid import (FeatureExtractorUnavailable, FIDEvaluator, get_feature_extractor,  # noqa: E402
                                  reference_stats)
from diffsampler.pipelines import denoiser_from_pipeline  # noqa: E402
from diffsampler.samplers.loop import initial_noise  # noqa: E402

from _common import CountingModel, machine_line, md_table, run_diffusers, write_csv, write_section, RESULTS_DIR  # noqa: E402

DEFAULT_SPACING = ds.samplers.loop.DEFAULT_SPACING

# (label, solver name, options)
OURS = [
    ("ddim", "ddim", {}),
    ("heun", "heun", {}),
    ("pndm", "pndm", {}),
    ("deis_3", "deis_3", {}),
    ("dpmpp_2s", "dpmpp_2s", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_3m", "dpmpp_3m", {}),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {}),
    ("ghvb (2.5)", "ghvb", {"order": 2.5}),
    ("dpmpp_2m_hb", "dpmpp_2m_hb", {}),
]
NOCLIP = "dpmpp_2m (no clip)"
# (label, scheduler class, kwargs over the pipeline's scheduler config, our counterpart)
DIFFUSERS = [
    ("diffusers DDIM (trailing)", "DDIMScheduler",
     dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"), "ddim"),
    ("diffusers DPM++ 2M", "DPMSolverMultistepScheduler", dict(solver_order=2, timestep_spacing="linspace"), NOCLIP),
    ("diffusers DPM++ 3M", "DPMSolverMultistepScheduler", dict(solver_order=3, timestep_spacing="linspace"), "dpmpp_3m"),
    ("diffusers UniPC", "UniPCMultistepScheduler", dict(timestep_spacing="linspace"), None),
]


def fid_of(ev: FIDEvaluator, images: torch.Tensor) -> float:
    ev.reset_fake()
    for i in range(0, len(images), 256):
        ev.update_fake(images[i:i + 256])
    return float(ev.compute())


def time_extractor(fx, images: torch.Tensor, reps: int = 3) -> float:
    with torch.inference_mode():
        fx(images[:8])
        t = time.perf_counter()
        for _ in range(reps):
            fx(images)
    return reps * len(images) / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 samples, NFE 5 and 10, a subset of solvers")
    p.add_argument("--n", type=int, default=None, help="samples per run (default 256, quick 64)")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md / CSV / plot")
    a = p.parse_args(argv)
    n = a.n or (64 if a.quick else 256)
    nfes = (5, 10) if a.quick else (5, 10, 20)
    ours = [o for o in OURS if o[0] in ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "ghvb (2.5)")] if a.quick else OURS
    hf_list = DIFFUSERS[:2] if a.quick else DIFFUSERS
    t_start = time.perf_counter()
    torch.set_grad_enabled(False)

    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    den = denoiser_from_pipeline(pipe)
    seeds = list(range(n))
    shape = den.sample_shape(n)
    x_T = initial_noise(shape, den.schedule, seeds=seeds)

    fx = get_feature_extractor("digits", device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        ref = reference_stats("digits_test", lambda: (digits_dataset("test")[0] + 1) / 2, fx, cache)
    ev = FIDEvaluator(fx, device="cpu", sync=False)
    ev.set_reference(ref)

    # scale: real train digits (all, and n of them) and decoded pure noise
    train = (digits_dataset("train")[0] + 1) / 2
    sub = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]]
    scale = {
        "floor_train_all": fid_of(ev, train),
        "floor_train_n": fid_of(ev, sub),
        "ceiling_noise": fid_of(ev, den.decode(x_T)),
    }
    print(f"scale: {scale}", flush=True)

    rows, table = [], {}

    def record(label, side, method, nfe, calls, images, secs, note=""):
        f = fid_of(ev, images)
        table[(label, nfe)] = f
        rows.append(dict(solver=label, side=side, method=method, nfe=nfe, nfe_counted=calls, fid_proxy=f,
                         num_samples=n, seeds=f"0-{n - 1}", gen_time_s=round(secs, 2), note=note))
        print(f"{label:28s} NFE {nfe:2d} (calls {calls:2d})  FID-proxy {f:8.3f}  {secs:6.1f}s", flush=True)

    gen_ips = None
    for label, name, opts in ours:
        for k in nfes:
            c0 = den.nfe
            t = time.perf_counter()
            x = ds.sample(den, shape=shape, seeds=seeds, solver=name, nfe=k, **opts)
            secs = time.perf_counter() - t
            if name == "dpmpp_2m" and k == 10:
                gen_ips = n / secs
            record(label, "ours", name, k, den.nfe - c0, den.decode(x), secs,
                   f"spacing={DEFAULT_SPACING}, clip_sample=True" + (", per-seed noise" if "sde" in name else ""))

    # ours without clipping (1:1 with diffusers' DPM, which ignores clip_sample)
    sched = pipe.scheduler
    pipe.scheduler = diffusers.DDPMScheduler.from_config(sched.config, clip_sample=False)
    den_nc = denoiser_from_pipeline(pipe)
    pipe.scheduler = sched
    for k in nfes:
        c0 = den_nc.nfe
        t = time.perf_counter()
        x = ds.sample(den_nc, shape=shape, seeds=seeds, solver="dpmpp_2m", nfe=k)
        record(NOCLIP, "ours", "dpmpp_2m", k, den_nc.nfe - c0, den_nc.decode(x), time.perf_counter() - t,
               f"spacing={DEFAULT_SPACING}, clip_sample=False")

    # diffusers' schedulers, same UNet, same x_T
    for label, cls, kw, _ in hf_list:
        for k in nfes:
            s = getattr(diffusers, cls).from_config(sched.config, **kw)
            m = CountingModel(pipe.unet)
            t = time.perf_counter()
            x = run_diffusers(s, m, k, x_T.clone())
            record(label, "diffusers", cls, k, m.calls, den.decode(x), time.perf_counter() - t,
                   ", ".join(f"{a}={b}" for a, b in kw.items()))

    # throughput (CPU)
    imgs = den.decode(x_T)
    thr = {"gen_dpmpp_2m_nfe10_ips": gen_ips, "digits_features_ips": time_extractor(fx, imgs)}
    try:
        inc = get_feature_extractor("inception", device="cpu")
        thr["inception_features_ips"] = time_extractor(inc, imgs[:32], reps=1)
        inc_note = f"{thr['inception_features_ips']:.1f} images/s"
    except FeatureExtractorUnavailable as e:
        thr["inception_features_ips"] = None
        inc_note = f"unavailable (FeatureExtractorUnavailable: {str(e).splitlines()[0][:400]})"
    gpu = "n/a: no GPU in this run" if not torch.cuda.is_available() else "not measured"
    seconds = time.perf_counter() - t_start
    print(f"throughput: {thr}; inception: {inc_note}; total {seconds:.0f}s", flush=True)

    body = render(rows, table, scale, thr, inc_note, gpu, nfes, ours, hf_list, n, a.quick, seconds)
    print(body)
    if a.no_write:
        return
    for r in rows:
        r.update({k: v for k, v in scale.items()})
    write_csv("fid.csv", rows)
    plot(table, [o[0] for o in ours] + [NOCLIP] + [h[0] for h in hf_list], nfes, scale,
         RESULTS_DIR / "fid_proxy.png", n)
    write_section("fid", body)
    print(f"wrote {RESULTS_DIR / 'fid.csv'}, {RESULTS_DIR / 'fid_proxy.png'} and the fid section of RESULTS.md")


def render(rows, table, scale, thr, inc_note, gpu, nfes, ours, hf_list, n, quick, seconds) -> str:
    labels = [o[0] for o in ours] + [NOCLIP] + [h[0] for h in hf_list]
    L = ["## FID-proxy vs NFE on the digits model", ""]
    L.append(f"Setup: the packaged digits `DDPMPipeline` (epsilon UNet, linear 1000-step DDPM schedule), {n} samples "
             f"from seeds 0..{n - 1} (the same x_T for every run, also for diffusers), FID-proxy = Frechet distance "
             "in the 64-d features of the packaged digits classifier against the 360 held-out test digits "
             "(as `diffsampler.tools.runner`).  Our solvers: `diffsampler.sample(..., nfe=k)` with the default spacing "
             f"(`{DEFAULT_SPACING}`) on the default `denoiser_from_pipeline(pipe)`, which honours the scheduler's "
             "`clip_sample=True` (x0 clipped to [-1, 1]); `dpmpp_2m (no clip)` is built from a "
             "`DDPMScheduler(clip_sample=False)` config, for a 1:1 comparison with diffusers' DPM-Solver (which "
             "ignores clip_sample).  diffusers: the plain scheduler loop on the same UNet from the same x_T, "
             "`num_inference_steps = k` (model calls counted, see CSV); DDIM with clip_sample=False and trailing "
             "spacing, DPM++ 2M/3M and UniPC with linspace spacing (their default).  `dpmpp_2m_sde` draws its "
             "noise per seed.  Lower is better.")
    L.append("")
    L.append(f"For scale: held-out test vs the whole train split (1437 images) **{scale['floor_train_all']:.2f}**, "
             f"vs {n} random train images **{scale['floor_train_n']:.2f}** (the floor at this sample size); "
             f"decoded pure noise (x_T) **{scale['ceiling_noise']:.1f}** (ceiling).")
    L.append("")
    L.append(md_table(["solver"] + [f"NFE {k}" for k in nfes],
                      [[lab] + [f"{table[(lab, k)]:.2f}" if (lab, k) in table else "n/a" for k in nfes]
                       for lab in labels]))
    L.append("")
    L.append(summary(table, labels, nfes, scale, hf_list))
    L.append("")
    gen = f"{thr['gen_dpmpp_2m_nfe10_ips']:.1f}" if thr["gen_dpmpp_2m_nfe10_ips"] else "n/a"
    L.append(f"Throughput (CPU, loaded shared machine, so indicative only): generation with dpmpp_2m at NFE 10, "
             f"batch {n}: {gen} images/s; feature extraction, digits extractor: "
             f"{thr['digits_features_ips']:.0f} images/s; inception extractor: {inc_note}.  GPU: {gpu}.")
    L.append("")
    L.append(f"Plot: `benchmarks/results/fid_proxy.png`; raw numbers: `benchmarks/results/fid.csv`.  "
             f"Run: `python benchmarks/fid.py{' --quick' if quick else ''}` ({seconds:.0f} s; {machine_line()}).")
    return "\n".join(L)


def summary(table, labels, nfes, scale, hf_list) -> str:
    out = []
    dec = [lab for lab in labels if all((lab, k) in table for k in nfes)
           and all(table[(lab, a)] >= table[(lab, b)] for a, b in zip(nfes, nfes[1:]))]
    out.append(f"FID-proxy decreases monotonically with NFE for {len(dec)} of {len(labels)} rows"
               + (f" (not for: {', '.join(lab for lab in labels if lab not in dec)})" if len(dec) < len(labels) else "")
               + ".")
    best = []
    for k in nfes:
        cand = [(table[(lab, k)], lab) for lab in labels if (lab, k) in table]
        f, lab = min(cand)
        best.append(f"NFE {k}: {lab} ({f:.2f})")
    out.append("Best per NFE: " + "; ".join(best) + f" (floor {scale['floor_train_n']:.2f}).")
    pairs = []
    for hl, _, _, ours in hf_list:
        if ours is None:
            continue
        vals = ", ".join(f"{table[(ours, k)]:.2f} vs {table[(hl, k)]:.2f}" for k in nfes)
        pairs.append(f"{ours} vs {hl}: {vals}")
    out.append("Ours vs diffusers, same method (NFE " + "/".join(map(str, nfes)) + "): " + "; ".join(pairs) + ".")
    return " ".join(out)


def plot(table, labels, nfes, scale, path, n) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for lab in labels:
        ks = [k for k in nfes if (lab, k) in table]
        ax.plot(ks, [table[(lab, k)] for k in ks], marker="o", ls="--" if lab.startswith("diffusers") else "-",
                label=lab)
    ax.axhline(scale["floor_train_n"], color="k", ls=":", lw=1, label=f"real train ({n}) floor")
    ax.set_yscale("log")
    ax.set_xticks(list(nfes))
    ax.set_xlabel("NFE (model calls)")
    ax.set_ylabel("FID-proxy (digits features, vs test split)")
    ax.set_title(f"digits DDPM: FID-proxy vs NFE ({n} samples)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
