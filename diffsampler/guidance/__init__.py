"""Guidance: transforms of the denoiser (classifier-free guidance, minority guidance) and sampling
strategies (SVDD)."""

from .cfg import CFGModel, ClassifierFreeGuidance, expand_cond
from .minority import (MinorityClassifier, MinorityGuidance, fit_minority_classifier, minority_labels,
                       minority_score, train_minority_classifier)
from .rewards import ClassifierLogProb, JPEGCompressibility, NegativeDistance
from .svdd import SVDD, ValueNet, train_value_model

__all__ = ["CFGModel", "ClassifierFreeGuidance", "expand_cond", "MinorityClassifier", "MinorityGuidance",
           "fit_minority_classifier", "minority_labels", "minority_score", "train_minority_classifier",
           "SVDD", "ValueNet", "train_value_model", "ClassifierLogProb", "NegativeDistance", "JPEGCompressibility"]
