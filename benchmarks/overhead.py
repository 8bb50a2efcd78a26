"""Per-step solver overhead of diffsampler's plan engine vs the diffusers scheduler doing the same
method, with a model so cheap that the solver's own tensor work and Python bookkeeping dominate.

For each method and batch shape, three loops are timed (median of several repeats after warm-up):

* bare:      `nfe` calls of the model alone (the cost every sampler pays);
* ours:      `run_plan(plan, denoiser, x)` with the plan built once outside the timing
             (`make_plan`), the Denoiser built once, `check_finite="off"` (diffusers checks nothing);
* diffusers: the pipeline loop `scale_model_input -> model -> step` over `scheduler.timesteps`, on a
             copy of a scheduler whose `set_timesteps` ran outside the timing.

per-step overhead = (loop - bare) / steps.  A second pair of columns includes the per-sampling setup
on both sides (ours `make_plan` + `run_plan`, diffusers `set_timesteps` + loop), and a third column
shows ours with the Denoiser's default `check_finite` ("auto" = "step" on CPU: an isfinite reduction
and a host sync per model call).  For the SDE the cost of drawing the noise (the same torch.randn on
both sides) is also subtracted in an extra column.  Host syncs per sampling run are counted on CUDA
only (skipped without a GPU).

Allocator: with glibc's default malloc, the 1 MB temporaries of the 16x4x64x64 batch are sometimes
returned to the OS and page-faulted back on every step, which makes timings bimodal (2-5x swings
between identical runs, depending on the allocation history of the process, not on the solver).  The
main figures are therefore taken with `mallopt` set so freed memory stays in the heap ("steady");
`--allocator both` (default) also runs the glibc default in a subprocess and reports it alongside.

A second table times whole pipeline calls: a tiny random-weight `DDPMPipeline` (32x32 UNet, built
in-script) run through its own `__call__` with `DiffSamplerScheduler.from_config(cfg, solver=...)`
vs the diffusers scheduler of the same method (same grid), batch 4, 20 steps; ours/diffusers wall
time, the two interleaved, median of repeats (`--skip-pipeline` to leave it out).

    python benchmarks/overhead.py            # ~1-2 min on 2 cores
    python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import inspect
import json
import os
import statistics
import subprocess
import tempfile
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402

from diffsampler.denoisers import Denoiser  # noqa: E402
from diffsampler.samplers import make_plan, run_plan  # noqa: E402
from diffsampler.samplers.loop import per_sample_generators, per_sample_noise  # noqa: E402
from diffsampler.schedules import DiscreteVP  # noqa: E402

from _common import machine_line, md_table, write_csv, write_section  # noqa: E402

TARGET_RATIO = 0.5

# (label, ours solver, make_plan kwargs, diffusers class, kwargs, stochastic)
PAIRS = [
    ("DDIM", "ddim", dict(spacing="trailing", final="zero"),
     "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"), False),
    ("Euler", "euler", dict(spacing="linspace", final="zero"), "EulerDiscreteScheduler", dict(), False),
    ("DPM++ 2M", "dpmpp_2m", dict(spacing="linspace", final="zero"),
     "DPMSolverMultistepScheduler", dict(solver_order=2), False),
    ("DPM++ 3M", "dpmpp_3m", dict(spacing="linspace", final="zero"),
     "DPMSolverMultistepScheduler", dict(solver_order=3), False),
    ("DEIS 3", "deis_logrho_3", dict(spacing="linspace", final="last"),
     "DEISMultistepScheduler", dict(solver_order=3), False),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", dict(spacing="linspace", final="zero"),
     "DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="sde-dpmsolver++"), True),
]


def steady_allocator() -> bool:
    """Keep freed memory in the heap (no mmap for large blocks, no trimming): glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except OSError:
        return False


def eps_model(x, t):
    """The cheapest epsilon 'network': one elementwise op."""
    return 0.1 * x


def _median_time(fn, setup, repeats: int, warmup: int, sync) -> float:
    """Median wall time of fn(state) over `repeats` runs; setup() (untimed) makes the state."""
    for _ in range(warmup):
        fn(setup())
        sync()
    times = []
    for _ in range(repeats):
        state = setup()
        sync()
        t0 = time.perf_counter()
        fn(state)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Bench:
    def __init__(self, shape, device, steps, repeats, warmup):
        self.shape, self.device, self.steps, self.repeats, self.warmup = shape, device, steps, repeats, warmup
        cfg = diffusers.DDPMScheduler().config
        self.cfg = dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                        beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule)
        self.schedule = DiscreteVP.from_diffusers_config(cfg)
        self.x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def t(self, fn, setup):
        return _median_time(fn, setup, self.repeats, self.warmup, self.sync)

    # --- the three loops ------------------------------------------------------------------
    def bare(self, nfe: int) -> float:
        ts = [torch.tensor(float(999 - i)) for i in range(nfe)]

        def fn(x):
            for t in ts:
                eps_model(x, t)
        return self.t(fn, lambda: self.x_T)

    def noise(self, draws: int) -> float:
        """`draws` noise draws of the batch shape from one generator (what both SDE loops do)."""
        def fn(g):
            for _ in range(draws):
                torch.randn(self.shape, generator=g, device=self.device)
        return self.t(fn, lambda: torch.Generator(self.device).manual_seed(0))

    def ours(self, solver, kw, stochastic, check_finite="off", setup_in_timing=False, per_sample=False):
        den = Denoiser(eps_model, self.schedule, "epsilon", **({} if check_finite is None else
                                                              {"check_finite": check_finite}))
        plan = make_plan(solver, self.schedule, nfe=self.steps, **kw)
        nfe, draws = plan.nfe, sum(1 for st in plan.steps if st.noise != 0.0)

        def noise_fn_factory():
            if not stochastic:
                return None
            g = torch.Generator(self.device).manual_seed(0)
            return lambda x: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

        if per_sample:  # what sample(seeds=...) does: one generator per sample, noise drawn up front
            from diffsampler.samplers import loop

            def fn(_):
                gens = per_sample_generators(range(self.shape[0]))
                if hasattr(loop, "predrawn_noise"):
                    nf = loop.predrawn_noise(plan, gens, self.x_T)
                else:
                    nf = lambda x: per_sample_noise(x.shape, gens, x.device, x.dtype)  # noqa: E731
                run_plan(plan, den, self.x_T, noise_fn=nf)
        elif setup_in_timing:
            def fn(state):
                p = make_plan(solver, self.schedule, nfe=self.steps, **kw)
                run_plan(p, den, self.x_T, noise_fn=state)
        else:
            def fn(state):
                run_plan(plan, den, self.x_T, noise_fn=state)
        return self.t(fn, noise_fn_factory), nfe, draws

    def diffusers(self, cls_name, kw, stochastic, setup_in_timing=False):
        template = getattr(diffusers, cls_name)(**{**self.cfg, **kw})
        template.set_timesteps(self.steps, device=self.device)
        calls = len(template.timesteps)

        def setup():
            g = torch.Generator(self.device).manual_seed(0) if stochastic else None
            if setup_in_timing:
                return getattr(diffusers, cls_name)(**{**self.cfg, **kw}), g
            return copy.deepcopy(template), g

        def fn(state):
            sched, g = state
            if setup_in_timing:
                sched.set_timesteps(self.steps, device=self.device)
            x = self.x_T * sched.init_noise_sigma
            extra = {"generator": g} if stochastic else {}
            for t in sched.timesteps:
                out = eps_model(sched.scale_model_input(x, t), t)
                x = sched.step(out, t, x, **extra).prev_sample
        return self.t(fn, setup), calls

    # --- host syncs (CUDA only) -------------------------------------------------------------
    def count_syncs(self, fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(m.message).lower() for m in w)


def run(shape, device, steps, repeats, warmup, rows, sync_rows):
    B = Bench(shape, device, steps, repeats, warmup)
    label_shape = "x".join(map(str, shape))
    bare_cache = {}
    for label, solver, kw, cls_name, hkw, stoch in PAIRS:
        ours_t, nfe, draws = B.ours(solver, kw, stoch)
        hf_t, calls = B.diffusers(cls_name, hkw, stoch)
        if nfe != calls:
            raise RuntimeError(f"{label}: ours makes {nfe} model calls, diffusers {calls}")
        if nfe not in bare_cache:
            bare_cache[nfe] = B.bare(nfe)
        bare = bare_cache[nfe]
        ours_setup_t = B.ours(solver, kw, stoch, setup_in_timing=True)[0]
        hf_setup_t, _ = B.diffusers(cls_name, hkw, stoch, setup_in_timing=True)
        ours_chk_t = B.ours(solver, kw, stoch, check_finite=None)[0]  # the Denoiser's default
        ours_ps_t = B.ours(solver, kw, stoch, per_sample=True)[0] if stoch else float("nan")
        nan = float("nan")
        noise_draw = B.noise(1) if stoch else nan  # one draw; loops draw `draws` (ours) / nfe (diffusers) times
        us = lambda t: (t - bare) / steps * 1e6  # noqa: E731
        r = dict(shape=label_shape, method=label, ours=solver, diffusers=f"{cls_name}", steps=steps, nfe=nfe,
                 bare_model_us_per_call=bare / nfe * 1e6,
                 ours_loop_ms=ours_t * 1e3, diffusers_loop_ms=hf_t * 1e3,
                 ours_overhead_us=us(ours_t), diffusers_overhead_us=us(hf_t),
                 ratio=us(ours_t) / us(hf_t),
                 ours_with_setup_us=us(ours_setup_t), diffusers_with_setup_us=us(hf_setup_t),
                 ratio_with_setup=us(ours_setup_t) / us(hf_setup_t),
                 ours_default_check_finite_us=us(ours_chk_t),
                 ours_per_sample_seeds_us=us(ours_ps_t) if stoch else nan,
                 noise_draw_us=noise_draw * 1e6, ours_noise_draws=draws if stoch else 0,
                 diffusers_noise_draws=calls if stoch else 0,
                 ours_excl_noise_us=us(ours_t - draws * noise_draw) if stoch else nan,
                 diffusers_excl_noise_us=us(hf_t - calls * noise_draw) if stoch else nan)
        r["ratio_excl_noise"] = r["ours_excl_noise_us"] / r["diffusers_excl_noise_us"] if stoch else nan
        rows.append(r)
        print(f"  {label_shape:12s} {label:14s} ours {r['ours_overhead_us']:8.1f} us/step  diffusers "
              f"{r['diffusers_overhead_us']:8.1f} us/step  ratio {r['ratio']:.2f}  (with setup {r['ratio_with_setup']:.2f}; "
              f"default check_finite {r['ours_default_check_finite_us']:.1f})", flush=True)
        if device.type == "cuda":
            den = Denoiser(eps_model, B.schedule, "epsilon", check_finite="off")
            den_step = Denoiser(eps_model, B.schedule, "epsilon", check_finite="step")
            plan = make_plan(solver, B.schedule, nfe=steps, **kw)
            g = torch.Generator(device).manual_seed(0)
            nf = (lambda x: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)) if stoch else None
            s_ours = B.count_syncs(lambda: run_plan(plan, den, B.x_T, noise_fn=nf))
            s_step = B.count_syncs(lambda: run_plan(plan, den_step, B.x_T, noise_fn=nf))
            sched = getattr(diffusers, cls_name)(**{**B.cfg, **hkw})
            sched.set_timesteps(steps, device=device)

            def hf_loop():
                x = B.x_T * sched.init_noise_sigma
                for t in sched.timesteps:
                    x = sched.step(eps_model(sched.scale_model_input(x, t), t), t, x,
                                   **({"generator": g} if stoch else {})).prev_sample
            s_hf = B.count_syncs(hf_loop)
            sync_rows.append(dict(shape=label_shape, method=label, ours_syncs=s_ours, ours_check_finite_step_syncs=s_step,
                                  diffusers_syncs=s_hf))


# --- whole pipeline calls: a tiny DDPMPipeline ----------------------------------------------------

# (label, ours solver, ours from_config kwargs, diffusers class, from_config kwargs); every config
# starts from DDPMScheduler's (DDIM: "trailing", as in the per-step table)
PIPE_PAIRS = [
    ("DDIM", "ddim", dict(), "DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False)),
    ("DPM++ 2M", "dpmpp_2m", dict(), "DPMSolverMultistepScheduler", dict(solver_order=2)),
    ("DPM++ 3M", "dpmpp_3m", dict(), "DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DEIS 3", "deis_logrho_3", dict(final="last"), "DEISMultistepScheduler", dict(solver_order=3)),
]


def tiny_ddpm_pipeline(sample_size: int = 32):
    """Random-weight 2-level UNet2DModel (8/16 channels, as tests/tiny_pipelines.py) + DDPMScheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = diffusers.DDPMPipeline(unet=unet.eval(), scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_scheduler(cls_name, cfg, kw):
    cls = getattr(diffusers, cls_name)
    if "generator" not in inspect.signature(cls.step).parameters:  # DEIS: DDPMPipeline always passes it

        class WithGenerator(cls):
            def step(self, model_output, timestep, sample, generator=None, return_dict=True):
                return super().step(model_output, timestep, sample, return_dict=return_dict)
        cls = WithGenerator
    return cls.from_config(cfg, **kw)


def pipeline_bench(steps, batch, repeats, warmup, rows, sample_size=32):
    """Wall time of `pipe(batch_size, num_inference_steps=steps)` with ours vs diffusers' scheduler."""
    from diffsampler.pipelines import DiffSamplerScheduler

    pipe = tiny_ddpm_pipeline(sample_size)
    base = pipe.scheduler.config
    shape = (batch, 3, sample_size, sample_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ts = [torch.tensor(999 - 50 * i) for i in range(steps)]

    @torch.no_grad()
    def bare():  # the network alone, `steps` calls (what every scheduler pays)
        for t in ts:
            pipe.unet(x, t)

    def call(sched):
        pipe.scheduler = sched
        return pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    for label, solver, okw, cls_name, hkw in PIPE_PAIRS:
        ref_sched = _diffusers_scheduler(cls_name, base, hkw)
        ours_sched = DiffSamplerScheduler.from_config(ref_sched.config, solver=solver, **okw)
        diff = float(abs(call(ours_sched) - call(ref_sched)).max())
        for _ in range(warmup):
            bare()
            call(ours_sched)
            call(ref_sched)
        times = {"bare": [], "ours": [], "diffusers": []}
        for _ in range(repeats):  # interleaved, so drifts of a shared machine hit both sides alike
            for key, fn in (("bare", bare), ("ours", lambda: call(ours_sched)), ("diffusers", lambda: call(ref_sched))):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        r = dict(method=label, ours=solver, diffusers=cls_name, steps=steps, batch=batch, sample_size=sample_size,
                 bare_unet_ms=med["bare"] * 1e3, ours_ms=med["ours"] * 1e3, diffusers_ms=med["diffusers"] * 1e3,
                 ratio=statistics.median(o / d for o, d in zip(times["ours"], times["diffusers"])),
                 max_abs_image_diff=diff)
        rows.append(r)
        print(f"  pipeline {label:10s} ours {r['ours_ms']:7.1f} ms  diffusers {r['diffusers_ms']:7.1f} ms  "
              f"ratio {r['ratio']:.3f}  (unet alone {r['bare_unet_ms']:.1f} ms; images differ by {diff:.1e})",
              flush=True)


def render_pipeline(rows, repeats, warmup) -> str:
    r0 = rows[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    L = ["### Tiny DDPMPipeline wall time", "",
         f"`DDPMPipeline.__call__` (batch {r0['batch']}, {r0['steps']} steps, output_type=\"np\") with "
         "`DiffSamplerScheduler.from_config(cfg, solver=...)` vs the diffusers scheduler of the same method from the "
         f"same config (`DDPMScheduler`'s; DDIM with `timestep_spacing=\"trailing\", clip_sample=False`; DEIS order 3, "
         "ours with `final=\"last\"`): same grid, same images.  Random-weight 2-level UNet2DModel (8/16 channels), "
         f"{r0['sample_size']}x{r0['sample_size']} pixels, float32, same threads as above; the two pipelines and the "
         f"bare UNet loop interleaved, {warmup} warm-up rounds, {repeats} timed rounds.  Times: medians; ratio: median "
         "of the per-round ratios (each round times both sides back to back, so load from other processes hits "
         f"both alike; 1-minute load average at the end of this run: {load:.1f}).  Ours includes the adapter's "
         "`isfinite` check per model call.", ""]
    L.append(md_table(["method (ours / diffusers)", "ours ms", "diffusers ms", "ratio", f"{r0['steps']} UNet calls alone ms",
                       "max abs image diff"],
                      [[f"{r['method']} (`{r['ours']}` / `{r['diffusers']}`)", f"{r['ours_ms']:.1f}",
                        f"{r['diffusers_ms']:.1f}", f"{r['ratio']:.3f}", f"{r['bare_unet_ms']:.1f}",
                        f"{r['max_abs_image_diff']:.1e}"] for r in rows], "lrrrrr"))
    lo, hi = min(r["ratio"] for r in rows), max(r["ratio"] for r in rows)
    L += ["", f"Whole-call ratio ours/diffusers {lo:.2f}-{hi:.2f}: the UNet calls are most of a pipeline call even for "
          "this tiny network, which bounds what any scheduler can save end to end; the per-step table above isolates "
          "the scheduler's own cost."]
    return "\n".join(L)


def _ratio_summary(rows, key="ratio") -> str:
    miss = [r for r in rows if r[key] > TARGET_RATIO]
    lo, hi = min(r[key] for r in rows), max(rows, key=lambda r: r[key])
    head = (f"met for all {len(rows)} method x batch pairs" if not miss else
            f"missed for {len(miss)} of {len(rows)}: " + ", ".join(f"{r['method']} @ {r['shape']} ({r[key]:.2f})" for r in miss))
    return head + f" (ratios {lo:.2f}-{hi[key]:.2f})"


def render(rows, default_rows, sync_rows, device, steps, repeats, warmup, threads, allocator, quick, seconds,
           pipe_rows=(), pipe_repeats=0) -> str:
    L = ["## Per-step solver overhead" + (" (quick run)" if quick else ""), ""]
    sde = [r for r in rows if r["ratio_excl_noise"] == r["ratio_excl_noise"]]
    chk = max(r["ours_default_check_finite_us"] - r["ours_overhead_us"] for r in rows)
    summ = (f"**Summary.** Target ours/diffusers per-step overhead ratio <= {TARGET_RATIO}, allocator "
            f"{allocator}: {_ratio_summary(rows)}.")
    if sde:
        summ += (" For the SDE, the noise draw (the same `torch.randn` on both sides, "
                 + ", ".join(f"{r['noise_draw_us']:.0f} us @ {r['shape']}" for r in sde)
                 + ") is most of the step; without it the ratio is "
                 + ", ".join(f"{r['ratio_excl_noise']:.2f} @ {r['shape']}" for r in sde) + ".")
    summ += (f"  Including the per-sampling setup (ours `make_plan`, diffusers `set_timesteps`): "
             f"{_ratio_summary(rows, 'ratio_with_setup')}.  The Denoiser's default `check_finite` (\"auto\" = \"step\" "
             f"on CPU) adds up to {chk:.0f} us per step (`torch.isfinite(out).all()` per model call).")
    if default_rows:
        summ += f"  With glibc's default allocator: {_ratio_summary(default_rows)} (noisy, see below)."
    L.append(summ)
    L.append("")
    L.append(f"Setup: eps model `0.1 * x` (one elementwise op), float32, {steps} steps (NFE = steps for every "
             f"method here), default linear-beta `DiscreteVP` / diffusers config, device {device}, "
             f"`torch.set_num_threads({threads})`, {warmup} warm-up runs, median of {repeats}.  "
             "Per-step overhead = (sampling loop - bare model loop) / steps, in microseconds.  Ours: "
             "`run_plan(plan, Denoiser(model, schedule, 'epsilon', check_finite='off'), x)` with the plan built "
             "outside the timing; diffusers: `scale_model_input` / model / `step` over `timesteps` on a fresh copy "
             "of a scheduler whose `set_timesteps` ran outside the timing.  Same grids on both sides "
             "(ours `spacing=\"linspace\"`/`\"trailing\"` = diffusers' timesteps).  Allocator: "
             f"{allocator} (see the script's docstring).  {machine_line()}.  "
             f"Run: `python benchmarks/overhead.py{' --quick' if quick else ''}`, {seconds:.0f}s.")
    L.append("")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sub = [r for r in rows if r["shape"] == shape]
        L.append(f"### batch {shape} (bare model call {sub[0]['bare_model_us_per_call']:.0f} us)")
        L.append("")
        hdr = ["method (ours / diffusers)", "ours us/step", "diffusers us/step", "ratio", "<= 0.5",
               "with setup: ours / diffusers (ratio)", "ours, default check_finite", "SDE: excl. noise draws (ratio)"]
        trs = []
        for r in sub:
            sde_cell = ""
            if r["ratio_excl_noise"] == r["ratio_excl_noise"]:
                sde_cell = (f"{r['ours_excl_noise_us']:.0f} / {r['diffusers_excl_noise_us']:.0f} "
                            f"({r['ratio_excl_noise']:.2f}); per-sample seeds: {r['ours_per_sample_seeds_us']:.0f}")
            trs.append([f"{r['method']} (`{r['ours']}` / `{r['diffusers']}`)", f"{r['ours_overhead_us']:.0f}",
                        f"{r['diffusers_overhead_us']:.0f}", f"{r['ratio']:.2f}",
                        "yes" if r["ratio"] <= TARGET_RATIO else "**no**",
                        f"{r['ours_with_setup_us']:.0f} / {r['diffusers_with_setup_us']:.0f} ({r['ratio_with_setup']:.2f})",
                        f"{r['ours_default_check_finite_us']:.0f}", sde_cell])
        L.append(md_table(hdr, trs, "lrrrlrrl"))
        L.append("")
    L.append("SDE: ours draws noise on the steps that have any (the last step onto sigma = 0 has none), diffusers on "
             "every step; \"excl. noise\" subtracts each side's draws at the measured cost of one draw.  "
             "\"per-sample seeds\": ours with one generator per sample and all noise drawn up front, as "
             "`diffsampler.sample(seeds=...)` does (noise generation included, so compare with the \"ours\" column).")
    L.append("")
    if default_rows:
        L.append("### The same with glibc's default allocator")
        L.append("")
        L.append(md_table(["batch", "method", "ours us/step", "diffusers us/step", "ratio"],
                          [[r["shape"], r["method"], f"{r['ours_overhead_us']:.0f}", f"{r['diffusers_overhead_us']:.0f}",
                            f"{r['ratio']:.2f}"] for r in default_rows], "llrrr"))
        L.append("")
        L.append("Separate process, same settings.  At 16x4x64x64 these figures swing 2-5x between identical runs "
                 "(page faults when freed 1 MB temporaries go back to the OS and are faulted in again on the next "
                 "step), on either side; at 1x4x64x64 they agree with the steady-allocator table.")
        L.append("")
    L.append("### Host syncs per sampling run")
    L.append("")
    if sync_rows:
        L.append(md_table(["shape", "method", "ours (check_finite off)", "ours (check_finite \"step\")", "diffusers"],
                          [[r["shape"], r["method"], r["ours_syncs"], r["ours_check_finite_step_syncs"], r["diffusers_syncs"]]
                           for r in sync_rows]))
        L.append("")
        L.append("Counted with `torch.cuda.set_sync_debug_mode(\"warn\")`.")
    else:
        L.append("Skipped: `torch.cuda.is_available()` is False on this machine, so host-device syncs cannot be "
                 "counted (on CPU there is no host sync to count).  On a CUDA machine this script counts them with "
                 "`torch.cuda.set_sync_debug_mode(\"warn\")` for ours (check_finite off / \"step\") and diffusers.")
    if pipe_rows:
        L += ["", render_pipeline(pipe_rows, pipe_repeats, warmup)]
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, 10 steps, no default-allocator pass")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every timing (default 1)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 20, quick 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 11, quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shapes", type=str, default="1x4x64x64,16x4x64x64")
    p.add_argument("--device", type=str, default="cpu", help="timing device (cpu; cuda if available)")
    p.add_argument("--allocator", choices=("both", "steady", "default"), default=None,
                   help="steady: mallopt keeps freed memory; default: glibc as is; both (default; quick: steady)")
    p.add_argument("--skip-pipeline", action="store_true", help="leave out the tiny DDPMPipeline wall-time table")
    p.add_argument("--pipeline-repeats", type=int, default=None, help="pipeline calls timed (default 15, quick 3)")
    p.add_argument("--json-out", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    allocator = args.allocator or ("steady" if args.quick else "both")
    t0 = time.time()

    default_rows = []
    if allocator == "both":  # glibc default in a fresh process (mallopt cannot be undone here)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--allocator", "default", "--no-write", "--json-out", out,
                   "--threads", str(args.threads), "--warmup", str(args.warmup), "--shapes", args.shapes,
                   "--device", args.device]
            for flag, val in (("--steps", args.steps), ("--repeats", args.repeats)):
                if val is not None:
                    cmd += [flag, str(val)]
            print("glibc default allocator (subprocess):", flush=True)
            subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
            with open(out) as f:
                default_rows = json.load(f)
    if allocator in ("both", "steady"):
        ok = steady_allocator()
        allocator_label = "steady (glibc mallopt: no mmap, no trim)" if ok else "glibc default (mallopt unavailable)"
        print(f"allocator: {allocator_label}", flush=True)
    else:
        allocator_label = "glibc default"

    torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 11)
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows, sync_rows = [], []
    for shape in shapes:
        run(shape, device, steps, repeats, args.warmup, rows, sync_rows)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f)
        return
    if device.type != "cuda" and torch.cuda.is_available():  # timings on CPU, sync counts on the GPU
        for shape in shapes:
            run(shape, torch.device("cuda"), steps, 1, 1, [], sync_rows)
    pipe_rows = []
    pipe_repeats = args.pipeline_repeats or (3 if args.quick else 15)
    if not args.skip_pipeline:
        print("tiny DDPMPipeline wall time (CPU):", flush=True)
        pipeline_bench(steps, 4, pipe_repeats, args.warmup, pipe_rows)
    body = render(rows, default_rows, sync_rows, device, steps, repeats, args.warmup, args.threads, allocator_label,
                  args.quick, time.time() - t0, pipe_rows, pipe_repeats)
    print(body)
    if not args.no_write:
        write_section("overhead", body)
        for r in default_rows:
            r["allocator"] = "glibc default"
        for r in rows:
            r["allocator"] = "steady"
        path = write_csv("overhead.csv", rows + default_rows)
        if sync_rows:
            write_csv("overhead_syncs.csv", sync_rows)
        if pipe_rows:
            write_csv("overhead_pipeline.csv", pipe_rows)
        print(f"wrote {path} and the overhead section of RESULTS.md")
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
