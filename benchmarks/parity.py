"""Parity by default: `DiffSamplerScheduler.from_config(cfg)` with no solver named, against the diffusers
scheduler of `cfg`, measured in one run against the installed diffusers.

Two testbeds, NFE (`num_inference_steps`) 5, 10 and 25, float32 on both sides:

* mixture -- the exact Gaussian mixture in R^16 (4 components) wrapped as a diffusers model (`GMMModel`),
  64 samples of x_T from a fixed seed, the standard diffusers loop;
* digits -- the UNet of the bundled digits `DDPMPipeline` (`diffsampler.eval.digits.load_digits_pipeline()`)
  in the same loop, the diffusers scheduler built from the pipeline's scheduler config with the row's
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402

from _common import machine_line, md_table, write_csv, write_section  # noqa: E402
from diffsampler.eval.digits import load_digits_pipeline  # noqa: E402
from diffsampler.eval.gmm import EDMGMMModel, GaussianMixture, GMMModel  # noqa: E402
from diffsampler.pipelines import DiffSamplerScheduler  # noqa: E402

NFES = (5, 10, 25)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)

class _Tau:
    """A constant SASolverScheduler tau_func that prints as its value in the table."""

    def __init__(self, tau: float):
        self.tau = tau

    def __call__(self, t):
        return self.tau

    def __repr__(self):
        return f"tau={self.tau}"


TAU_HALF, TAU_ZERO = _Tau(0.5), _Tau(0.0)

#: (diffusers class name, options)
CONFIGS = [
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False)),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", **SD)),
    ("DDIMScheduler", dict()),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="linspace")),
    ("DDIMScheduler", dict(clip_sample=False, **SD)),
    ("DDIMScheduler", dict(eta=1.0)),
    ("DDPMScheduler", dict()),
    ("DDPMScheduler", dict(variance_type="fixed_large", clip_sample=False)),
    ("PNDMScheduler", dict(skip_prk_steps=True, **SD)),
    ("PNDMScheduler", dict()),
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
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True)),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3)),
    ("DPMSolverSinglestepScheduler", dict()),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3)),
    ("DPMSolverSinglestepScheduler", dict(solver_order=1)),
    ("DPMSolverSinglestepScheduler", dict(solver_type="heun")),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, solver_type="heun")),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min")),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun")),
    ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True, solver_order=3)),
    ("DPMSolverSinglestepScheduler", dict(use_exponential_sigmas=True)),
    ("DPMSolverSinglestepScheduler", dict(prediction_type="v_prediction", solver_order=3)),
    ("DPMSolverSinglestepScheduler", dict(thresholding=True, sample_max_value=1.5, solver_order=3)),
    ("DEISMultistepScheduler", dict()),
    ("DEISMultistepScheduler", dict(solver_order=1)),
    ("DEISMultistepScheduler", dict(solver_order=3)),
    ("DEISMultistepScheduler", dict(timestep_spacing="trailing")),
    ("DEISMultistepScheduler", dict(timestep_spacing="leading", **SD)),
    ("UniPCMultistepScheduler", dict()),
    ("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3)),
    ("UniPCMultistepScheduler", dict(use_karras_sigmas=True, **SD)),
    ("EulerDiscreteScheduler", dict()),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, **SD)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", **SD)),
    ("EulerAncestralDiscreteScheduler", dict()),
    ("HeunDiscreteScheduler", dict()),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, prediction_type="v_prediction")),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing", **SD)),
    ("LMSDiscreteScheduler", dict()),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, **SD)),
    ("KDPM2DiscreteScheduler", dict()),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, **SD)),
    ("KDPM2AncestralDiscreteScheduler", dict()),
    ("IPNDMScheduler", dict()),
    ("SASolverScheduler", dict()),
    ("SASolverScheduler", dict(predictor_order=3, corrector_order=3)),
    ("SASolverScheduler", dict(predictor_order=4, corrector_order=4, tau_func=TAU_HALF)),
    ("SASolverScheduler", dict(use_karras_sigmas=True, **SD)),
    ("SASolverScheduler", dict(algorithm_type="noise_prediction", tau_func=TAU_ZERO)),
    # noise_sampler_seed: the class's Brownian tree is seeded by it (its step() takes no generator; with None it
    # draws the seed from torch's global generator, ours then from the loop's generator)
    ("DPMSolverSDEScheduler", dict(noise_sampler_seed=0)),
    ("DPMSolverSDEScheduler", dict(noise_sampler_seed=0, use_karras_sigmas=True)),
    ("EDMEulerScheduler", dict()),
    ("EDMEulerScheduler", dict(sigma_schedule="exponential", prediction_type="v_prediction")),
    ("EDMDPMSolverMultistepScheduler", dict()),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++")),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
]

#: flow-matching configurations, on the mixture in rectified-flow form (no digits model of that kind)
FLOW_CONFIGS = [
    ("FlowMatchEulerDiscreteScheduler", dict()),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0, shift_terminal=0.1)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, use_karras_sigmas=True)),
    ("FlowMatchEulerDiscreteScheduler", dict(use_exponential_sigmas=True)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0, use_beta_sigmas=True)),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True)),
    ("FlowMatchHeunDiscreteScheduler", dict()),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
]

TOL = 1e-4
DIGITS_BATCH = 4


def label_of(name, kw):
    short = name.removesuffix("Scheduler")
    return f"{short} {kw}" if kw else short


#: keys of a row that are `step()` arguments (DDIMPipeline's `eta`), not config keys: diffusers gets them
#: at every step; ours gets them in `from_config` (a top-level solver option) and at every step
STEP_KEYS = ("eta",)


def split_step(kw):
    return ({k: v for k, v in kw.items() if k not in STEP_KEYS}, {k: v for k, v in kw.items() if k in STEP_KEYS})


def ours_from(config, **step_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDIM's trailing-grid note: 5, 10 and 25 divide 1000
        return DiffSamplerScheduler.from_config(config, **step_kw)


def takes_generator(sched) -> bool:
    return "generator" in inspect.signature(sched.step).parameters


def run_loop(sched, model, nfe, x, seed=1, **step_kw):
    """The standard diffusers loop (as StableDiffusion-style pipelines run it): x_T * init_noise_sigma,
    scale_model_input, model, step; stochastic steps draw from a generator seeded `seed` on both sides."""
    sched.set_timesteps(nfe)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    kw = {"generator": torch.Generator().manual_seed(seed)} if takes_generator(sched) else {}
    kw.update(step_kw)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(x_in, t).sample, t, x, **kw).prev_sample
    return x


def mixture_row(gmm, name, kw):
    """(solver or None, [max abs diff per NFE] or the refusal message)."""
    cls = getattr(diffusers, name)
    kw, step_kw = split_step(kw)
    try:
        ours = ours_from(cls(**kw), **step_kw)  # the instance names its class (LMS / KDPM2* share their config keys)
    except ValueError as e:
        return None, str(e)
    errs = []
    for nfe in NFES:
        ref_sched = cls(**kw)
        ours = ours_from(ref_sched, **step_kw)
        model = GMMModel(gmm, ours.schedule, ours.prediction_kind)
        if name.startswith("EDM"):  # the mixture behind EDM's preconditioning
            model = EDMGMMModel(gmm, ref_sched.config.sigma_data, ref_sched.config.prediction_type)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        x = x.reshape(64, 1, 4, 4)  # thresholding needs >= 3-d samples
        errs.append(difference(run_loop(ours, model, nfe, x, **step_kw), run_loop(ref_sched, model, nfe, x, **step_kw)))
    return ours.config.solver, errs


class DigitsUNet(torch.nn.Module):
    """The digits pipeline's UNet called as a diffusers loop calls it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @torch.no_grad()
    def forward(self, x, t):
        return self.unet(x, t)


def digits_images(pipe, sched, nfe, **step_kw):
    """The digits pipeline's UNet in the standard loop from the same x_T (seed 0), decoded as
    DDPMPipeline decodes: images in [0, 1]."""
    x = torch.randn(DIGITS_BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = run_loop(sched, DigitsUNet(pipe.unet), nfe, x, **step_kw)
    return (x / 2 + 0.5).clamp(0, 1)


def digits_row(pipe, base, name, kw):
    """(solver or None, errors or refusal): the diffusers scheduler `cls.from_config(base, **kw)` (the
    digits DDPM config's keys inherited as a user's `from_config(pipe.scheduler.config)` inherits them)."""
    cls = getattr(diffusers, name)
    kw, step_kw = split_step(kw)
    try:
        ours = ours_from(cls.from_config(base, **kw), **step_kw)
    except ValueError as e:
        return None, str(e)
    errs = []
    for nfe in NFES:
        ref_sched = cls.from_config(base, **kw)
        ref = digits_images(pipe, ref_sched, nfe, **step_kw)
        got = digits_images(pipe, ours_from(ref_sched, **step_kw), nfe, **step_kw)
        errs.append(difference(got, ref))
    return ours.config.solver, errs


def difference(ours, ref) -> float:
    """max abs difference; NaN when diffusers' own output is not finite and ours is (reported as such),
    inf when ours is not finite."""
    if not torch.isfinite(ours).all():
        return float("inf")
    if not torch.isfinite(ref).all():
        return float("nan")
    return float((ours - ref).abs().max())


def cells(errs):
    return ["diffusers NaN" if e != e else f"{e:.1e}" for e in errs]


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    gmm = GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    rows, csv_rows, refused, notes = [], [], [], []
    counts = {"mixture": [0, 0], "digits": [0, 0]}  # [cells within TOL, cells run]
    for name, kw in CONFIGS + FLOW_CONFIGS:
        label = label_of(name, kw)
        m_solver, m = mixture_row(gmm, name, kw)
        if (name, kw) in FLOW_CONFIGS:
            d_solver, d = None, "no flow-matching digits model"
        else:
            d_solver, d = digits_row(pipe, base, name, kw)
        if m_solver is None and d_solver is None:
            refused.append((label, m.split(";")[0]))
            csv_rows.append(dict(config=label, status="refused", message=m))
            print(f"{label}: refused: {m[:100]}", flush=True)
            continue
        for tb, solver, errs in (("mixture", m_solver, m), ("digits", d_solver, d)):
            if solver is None:
                csv_rows.append(dict(config=label, testbed=tb, status="not run", message=errs))
                continue
            counts[tb][0] += sum(e <= TOL for e in errs)
            counts[tb][1] += len(errs)
            for nfe, e in zip(NFES, errs):
                csv_rows.append(dict(config=label, testbed=tb, status="reproduced", solver=solver, nfe=nfe,
                                     max_abs_diff=e))
        solver = m_solver or d_solver
        rows.append([label, solver]
                    + (cells(m) if m_solver else ["-"] * len(NFES))
                    + (cells(d) if d_solver else ["-"] * len(NFES)))
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
        "of the final samples.  *digits*: the UNet of the bundled digits `DDPMPipeline` "
        "(`load_digits_pipeline()`) in the same loop, the diffusers scheduler built with `from_config("
        "pipe.scheduler.config, **row options)` (the DDPM keys inherited, as a user's line inherits them), "
        f"then ours from that scheduler's config, same x_T, {DIGITS_BATCH} images decoded to [0, 1] as "
        "DDPMPipeline decodes them, max abs difference.  Stochastic schedulers: the same generator seed "
        "on both sides (our adapter draws each step's noise as diffusers does).  float32 on both sides.  "
        "Flow-matching rows run on the mixture in rectified-flow form only (`-`: not run).  (The digits model predicts epsilon: the v / sample "
        "prediction and the `scaled_linear` rows are parity checks of the same computation, not "
        "meaningful images.)", "",
        md_table(["diffusers config", "our solver"] + [f"mixture NFE {n}" for n in NFES]
                 + [f"digits NFE {n}" for n in NFES], rows,
                 "ll" + "r" * (2 * len(NFES))), "",
        "Cells above the tolerance, investigated: *diffusers NaN* -- UniPC bh1's step onto sigma = 0 multiplies "
        "B(h) = h = -inf by 0 in diffusers itself (ours takes the limit x_0 = D; the steps before it agree to 1e-4, "
        "tests/test_parity_unipc.py); the isolated mixture cells of 1e-4..1e-3 (LMS, Euler trailing, PNDM, DEIS) "
        "come from one of the 64 samples on a boundary between mixture components, where diffusers' own float32 "
        "and float64 runs differ by as much (9e-4 for the Euler cell; the other samples agree to 4e-7), and "
        "from diffusers' float32 sigma / coefficient tables (DEIS equals diffusers to 1e-10 when its tables are "
        "float64: tests/test_parity_float64.py).  DPMSolverSinglestep with algorithm_type dpmsolver (noise "
        "prediction; up to 2e-2 at order 3, NFE 5) and sde-dpmsolver++ order 3: diffusers' float32 coefficient "
        "arithmetic -- with its tables in float64 the samples agree to 1e-10, and ours stays within 3x diffusers' "
        "own float32-vs-float64 gap (tests/test_parity_dpm_singlestep.py).  SASolver noise_prediction at NFE 5 "
        "(2.9e-4) and order 4 at NFE 25 (1.6e-4): diffusers' float32 coefficients, equal to 1e-4 relative once "
        "its sigmas are float64 (tests/test_parity_sasolver.py).", "",
    ]
    out += ["Refused (the error names the key or class):", "",
            md_table(["diffusers config", "message (first clause)"], refused, "ll")]
    write_section("parity", "\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
