"""diffsampler: fast diffusion samplers and guidance on one plan-based solver core."""

from . import samplers
from .denoisers import Denoiser, Thresholded
from .samplers import available, sample
from .schedules import CosineVP, DiscreteVP, EDM, LinearVP, RectifiedFlow, TimeGrid, time_grid

__version__ = "0.1.0"
__all__ = ["sample", "available", "samplers", "Denoiser", "Thresholded", "DiscreteVP", "LinearVP",
           "CosineVP", "EDM", "RectifiedFlow", "TimeGrid", "time_grid"]
