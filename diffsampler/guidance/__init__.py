"""Guidance: transforms of the denoiser (classifier-free guidance) and sampling strategies."""

from .cfg import CFGModel, ClassifierFreeGuidance, expand_cond

__all__ = ["CFGModel", "ClassifierFreeGuidance", "expand_cond"]
