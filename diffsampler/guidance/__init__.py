"""Guidance: transforms of the denoiser (classifier-free guidance) and sampling strategies (SVDD)."""

from .cfg import CFGModel, ClassifierFreeGuidance, expand_cond
from .rewards import ClassifierLogProb, JPEGCompressibility, NegativeDistance
from .svdd import SVDD, ValueNet, train_value_model

__all__ = ["CFGModel", "ClassifierFreeGuidance", "expand_cond",
           "SVDD", "ValueNet", "train_value_model", "ClassifierLogProb", "NegativeDistance", "JPEGCompressibility"]
