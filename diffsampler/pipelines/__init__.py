"""Integrations with diffusers: `DiffSamplerScheduler` drives any registered solver's plan one model
evaluation at a time behind diffusers' scheduler interface; `denoiser_from_pipeline` /
`denoiser_from_model` let `diffsampler.sample()` run on diffusers networks (or any module / callable);
`solver_for_config` is the solver and grid that reproduce a diffusers scheduler config."""

from .loaders import PipelineDenoiser, denoiser_from_model, denoiser_from_pipeline
from .parity import solver_for_config
from .scheduler import DiffSamplerScheduler, DiffSamplerSchedulerOutput

__all__ = ["DiffSamplerScheduler", "DiffSamplerSchedulerOutput", "PipelineDenoiser", "denoiser_from_model",
           "denoiser_from_pipeline", "solver_for_config"]
