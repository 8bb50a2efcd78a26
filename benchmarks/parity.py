"""Parity by default: `DiffSamplerScheduler.from_config(cfg)` with no solver named, against the diffusers
scheduler of `cfg`, in the standard diffusers loop on the same x_T.

Setup: the exact Gaussian mixture in R^16 (4 components) wrapped as a diffusers model (`GMMModel`),
64 samples of x_T from a fixed seed, NFE (`num_inference_steps`) 5, 10 and 25.  For every reproduced
configuration the table gives the solver the mapping picked and the max abs difference of the final
samples (float32 loops on both sides); configurations the mapping refuses are listed with the
error's first words (the key or class it names).  Prints the table; writes nothing.

    python benchmarks/parity.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers  # noqa: E402

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


class Image4d(torch.nn.Module):
    """The mixture model on (N, 1, 4, 4) images (diffusers' thresholding needs >= 3-d samples)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, t):
        return SimpleNamespace(sample=self.model(sample.reshape(len(sample), -1), t).sample.reshape(sample.shape))


def run_loop(sched, model, nfe, x):
    sched.set_timesteps(nfe)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def row(gmm, name, kw):
    cls = getattr(diffusers, name)
    label = f"{name.removesuffix('Scheduler')} {kw}" if kw else name.removesuffix("Scheduler")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = DiffSamplerScheduler.from_config(cls(**kw).config)
    except ValueError as e:
        return label, "refused", [str(e)[:90]]
    errs = []
    for nfe in NFES:
        ref_sched = cls(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = DiffSamplerScheduler.from_config(ref_sched.config)
        model = GMMModel(gmm, ours.schedule, ours.prediction_kind)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        if kw.get("thresholding"):
            model, x = Image4d(model), x.reshape(64, 1, 4, 4)
        errs.append(f"{(run_loop(ours, model, nfe, x) - run_loop(ref_sched, model, nfe, x)).abs().max().item():.1e}")
    return label, ours.config.solver, errs


def main():
    gmm = GaussianMixture.random(16, 4, seed=1, scale=1.0, std=(0.2, 0.5))
    print("| diffusers config | our solver | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    for name, kw in CONFIGS:
        label, solver, cells = row(gmm, name, kw)
        if solver == "refused":
            print(f"| {label} | refused | {cells[0]} |")
        else:
            print(f"| {label} | {solver} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
