"""Parity by default: `DiffSamplerScheduler.from_config(cfg)` with no solver named, against the diffusers
scheduler of `cfg`, measured in one run against the installed diffusers.

Two testbeds, NFE (`num_inference_steps`) 5, 10 and 25, float32 on both sides:

* mixture -- the exact Gaussian mixture in R^16 (4 components) wrapped as a diffusers model (`GMMModel`),
  64 samples of x_T from a fixed seed, the standard diffusers loop;
* digits -- the bundled digits `DDPMPipeline` (`diffsampler.eval.digits.load_digits_pipeline()`), its own
  `__call__` with the diffusers scheduler built from the pipeline's scheduler config with the row's
  options, then with `DiffSamplerScheduler.from_config(that scheduler's config)`, same generator (same
  x_T), 4 images, `output_type="np"`: max abs difference of the images in [0, 1].

Configurations the mapping refuses are listed with the error's first words (the key or class it names).
Writes the `parity` section of benchmarks/RESULTS.md and benchmarks/results/parity.csv.

    python benchmarks/parity.py
"""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402

from _common import machine_line, md_table, write_csv, write_section  # noqa: E402
from diffsampler.eval.digits import load_digits_pipeline  # noqa: E402
from diffsampler.eval.gmm import GaussianMixture, GMMModel  # noqa: E402
from diffsampler.pipelines import DiffSamplerScheduler  # noqa: E402

NFES = (5, 10, 25)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)

#: (diffusers class name, options)
CONFIGS = [
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False)),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", **SD)),
    ("DPMSolverMultistepScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(solver_order=1)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, final_sigmas_type="sigma_min", timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading", **SD)),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", dict(euler_at_final=True)),
    ("DPMSolverMultistepScheduler", dict(prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(prediction_type="sample")),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1.5)),
    ("DEISMultistepScheduler", dict()),
    ("DEISMultistepScheduler", dict(solver_order=1)),
    ("DEISMultistepScheduler", dict(solver_order=3)),
    ("DEISMultistepScheduler", dict(timestep_spacing="trailing")),
    ("DEISMultistepScheduler", dict(timestep_spacing="leading", **SD)),
    # refused (by key or by class)
    ("DDIMScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict()),
    ("HeunDiscreteScheduler", dict()),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
    ("UniPCMultistepScheduler", dict()),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("LMSDiscreteScheduler", dict()),
]


TOL = 1e-4
DIGITS_BATCH = 4


class Image4d(torch.nn.Module):
    """The mixture model on (N, 1, 4, 4) images (diffusers' thresholding needs >= 3-d samples)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, t):
        return SimpleNamespace(sample=self.model(sample.reshape(len(sample), -1), t).sample.reshape(sample.shape))


def label_of(name, kw):
    short = name.removesuffix("Scheduler")
    return f"{short} {kw}" if kw else short


def ours_from(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDIM's trailing-grid note: 5, 10 and 25 divide 1000
        return DiffSamplerScheduler.from_config(config)


def run_loop(sched, model, nfe, x):
    sched.set_timesteps(nfe)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def mixture_row(gmm, name, kw):
    """(solver or None, [max abs diff per NFE] or the refusal message)."""
    cls = getattr(diffusers, name)
    try:
        ours = ours_from(cls(**kw).config)
    except ValueError as e:
        return None, str(e)
    errs = []
    for nfe in NFES:
        ref_sched = cls(**kw)
        ours = ours_from(ref_sched.config)
        model = GMMModel(gmm, ours.schedule, ours.prediction_kind)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        if kw.get("thresholding"):
            model, x = Image4d(model), x.reshape(64, 1, 4, 4)
        errs.append((run_loop(ours, model, nfe, x) - run_loop(ref_sched, model, nfe, x)).abs().max().item())
    return ours.config.solver, errs


def without_generator(sched):
    """DDPMPipeline passes `generator=` to every step; DEISMultistepScheduler.step has no such argument.
    Drop it on the instance (the class, hence the config's class, stays DEISMultistepScheduler)."""
    step = type(sched).step

    def step_(model_output, timestep, sample, generator=None, return_dict=True):
        return step(sched, model_output, timestep, sample, return_dict=return_dict)

    sched.step = step_
    return sched


def pipe_images(pipe, sched, nfe):
    pipe.scheduler = sched
    return pipe(batch_size=DIGITS_BATCH, num_inference_steps=nfe, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def digits_row(pipe, base, name, kw):
    """(solver or None, errors or refusal, as-is).  The diffusers scheduler is `cls.from_config(base, **kw)`
    with the DDPM config's keys that DPMSolverMultistep / DEIS inherit but ignore dropped: clip_sample
    (not their argument, kept in their config) and variance_type='fixed_small' (acted on only when
    'learned*').  `as_is`: the same with those keys kept -- "same" when nothing was dropped, else the
    refusal or the max abs difference over the NFEs."""
    cls = getattr(diffusers, name)
    inherited = "clip_sample" not in inspect.signature(cls.__init__).parameters
    clean_base = {**base, "clip_sample": False} if inherited else base
    clean_kw = dict(variance_type=None) if "variance_type" in inspect.signature(cls.__init__).parameters else {}

    def make(b, extra):
        s = cls.from_config(b, **kw, **extra)
        return without_generator(s) if name == "DEISMultistepScheduler" else s

    def measure(b, extra):
        try:
            ours = ours_from(make(b, extra).config)
        except ValueError as e:
            return None, str(e)
        errs = []
        for nfe in NFES:
            ref_sched = make(b, extra)
            ref = pipe_images(pipe, ref_sched, nfe)
            got = pipe_images(pipe, ours_from(ref_sched.config), nfe)
            errs.append(float(abs(ref - got).max()))
        return ours.config.solver, errs

    solver, errs = measure(clean_base, clean_kw)
    if solver is None or not (inherited or clean_kw):
        return solver, errs, "same"
    s2, e2 = measure(base, {})
    as_is = f"refused: {e2.split(' cannot')[0]}" if s2 is None else f"{max(e2):.1e}"
    return solver, errs, as_is


def cells(errs):
    return [f"{e:.1e}" for e in errs]


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    gmm = GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    rows, csv_rows, refused, notes = [], [], [], []
    counts = {"mixture": [0, 0], "digits": [0, 0]}  # [cells within TOL, cells run]
    for name, kw in CONFIGS:
        label = label_of(name, kw)
        m_solver, m = mixture_row(gmm, name, kw)
        d_solver, d, as_is = digits_row(pipe, base, name, kw)
        if m_solver is None and d_solver is None:
            refused.append((label, m.split(";")[0]))
            csv_rows.append(dict(config=label, status="refused", message=m))
            print(f"{label}: refused: {m[:100]}", flush=True)
            continue
        for tb, solver, errs in (("mixture", m_solver, m), ("digits", d_solver, d)):
            if solver is None:
                csv_rows.append(dict(config=label, testbed=tb, status="refused", message=errs))
                continue
            counts[tb][0] += sum(e <= TOL for e in errs)
            counts[tb][1] += len(errs)
            for nfe, e in zip(NFES, errs):
                csv_rows.append(dict(config=label, testbed=tb, status="reproduced", solver=solver, nfe=nfe,
                                     max_abs_diff=e, digits_config_as_inherited=as_is if tb == "digits" else ""))
        solver = m_solver or d_solver
        rows.append([label, solver]
                    + (cells(m) if m_solver else ["refused"] * len(NFES))
                    + (cells(d) if d_solver else ["refused"] * len(NFES)) + [as_is])
        print(rows[-1], flush=True)
    elapsed = time.time() - t0
    write_csv("parity.csv", csv_rows)
    n_rep, n_ref = len(rows), len(refused)
    out = [
        "## Parity by default: `DiffSamplerScheduler.from_config(cfg)` vs diffusers", "",
        f"Written by `benchmarks/parity.py`; raw numbers in `benchmarks/results/parity.csv`.  Measured in one run "
        f"against the installed diffusers {diffusers.__version__} ({machine_line()}); run time {elapsed:.0f} s.", "",
        f"**{n_rep + n_ref} diffusers configurations: {n_rep} reproduced, {n_ref} refused by name.**  "
        f"Within {TOL:g} (max abs difference): mixture {counts['mixture'][0]} / {counts['mixture'][1]} "
        f"config x NFE cells, digits pipeline {counts['digits'][0]} / {counts['digits'][1]}.", "",
        "No solver is named: `from_config` reads the diffusers config and picks the solver, grid and final "
        "step (the `our solver` column).  *mixture*: the exact Gaussian mixture in R^16 wrapped as a "
        "diffusers model, 64 samples of x_T from one seed, the standard diffusers loop, max abs difference "
        "of the final samples.  *digits*: the bundled digits `DDPMPipeline` "
        "(`load_digits_pipeline()`), its own `__call__` with the diffusers scheduler built from the "
        f"pipeline's scheduler config plus the row's options, then with ours from that scheduler's config, "
        f"same generator (same x_T), {DIGITS_BATCH} images, max abs difference of the `output_type=\"np\"` "
        "images in [0, 1].  float32 on both sides.  (The digits model predicts epsilon: the v / sample "
        "prediction and the `scaled_linear` rows are parity checks of the same computation, not "
        "meaningful images.)", "",
        md_table(["diffusers config", "our solver"] + [f"mixture NFE {n}" for n in NFES]
                 + [f"digits NFE {n}" for n in NFES] + ["digits, DDPM keys kept"], rows,
                 "ll" + "r" * (2 * len(NFES) + 1)), "",
    ]
    out += ["*digits, DDPM keys kept*: `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` and "
            "`DEISMultistepScheduler.from_config(...)` inherit two DDPM keys that diffusers ignores there: "
            "`clip_sample=True` (not their argument, but kept in their config) and, for DPMSolverMultistep, "
            "`variance_type='fixed_small'` (acted on only when 'learned' / 'learned_range').  The digits "
            "NFE columns drop them (`clip_sample=False`, `variance_type=None`); this column runs the config as "
            "inherited: `from_config` refuses `variance_type='fixed_small'`, and applies the inherited "
            "`clip_sample` that diffusers ignores (max abs difference over the three NFEs).  Both are known "
            "gaps of the mapping, not measurement noise.", ""]
    out += ["Refused (the error names the key or class):", "",
            md_table(["diffusers config", "message (first clause)"], refused, "ll")]
    write_section("parity", "\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
