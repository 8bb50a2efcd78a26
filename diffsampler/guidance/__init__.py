"""Guidance: transforms of the denoiser (classifier-free guidance, minority guidance) and sampling
strategies."""

from .cfg import CFGModel, ClassifierFreeGuidance, expand_cond
from .minority import (MinorityClassifier, MinorityGuidance, fit_minority_classifier, minority_labels,
                       minority_score, train_minority_classifier)

__all__ = ["CFGModel", "ClassifierFreeGuidance", "expand_cond", "MinorityClassifier", "MinorityGuidance",
           "fit_minority_classifier", "minority_labels", "minority_score", "train_minority_classifier"]
