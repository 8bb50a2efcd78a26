"""Integrations with diffusers pipelines: `DiffSamplerScheduler` drives any registered solver's plan
one model evaluation at a time behind diffusers' scheduler interface."""

from .scheduler import DiffSamplerScheduler, DiffSamplerSchedulerOutput

__all__ = ["DiffSamplerScheduler", "DiffSamplerSchedulerOutput"]
