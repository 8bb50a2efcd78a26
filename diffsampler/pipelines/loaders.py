"""Denoisers built from diffusers pipelines and models, so `diffsampler.sample()` (with any solver
and guidance) runs on real networks: pixel UNets, latent text-to-image UNets, flow transformers."""

from __future__ import annotations

from typing import Any

import torch

from ..denoisers import Denoiser
from ..guidance.cfg import CFGModel
from .scheduler import DiffSamplerScheduler

__all__ = ["PipelineDenoiser", "denoiser_from_pipeline", "denoiser_from_model"]


class PipelineDenoiser(Denoiser):
    """A Denoiser over a diffusers network, with what sampling around it needs: the shape of the
    state (`sample_shape`) and, for latent models, VAE decoding (`decode`)."""

    def __init__(self, model, schedule, prediction_type, *, network, vae=None, sample_size=None,
                 channels: int | None = None, **kw):
        super().__init__(model, schedule, prediction_type, **kw)
        self.network, self.vae = network, vae
        cfg = _diffusers_config(network) or {}
        self.channels = channels or cfg.get("in_channels", 3 if cfg else None)
        self.sample_size = sample_size or cfg.get("sample_size")

    def sample_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple:
        """(batch, C, h, w) of the state; height/width are image pixels (divided by the VAE factor)."""
        h = w = self.sample_size if isinstance(self.sample_size, int) else None
        if isinstance(self.sample_size, (tuple, list)):
            h, w = self.sample_size
        if height is not None:
            h, w = height // self.vae_factor, (width or height) // self.vae_factor
        if h is None:
            raise ValueError("the network has no sample_size: pass height and width")
        if self.channels is None:
            raise ValueError("the network has no config with in_channels: pass channels= to denoiser_from_model")
        return (batch, self.channels, h, w)

    @property
    def vae_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W): the state itself for pixel models, VAE-decoded latents
        (x / scaling_factor + shift_factor) for latent models."""
        if self.vae is not None:
            c = self.vae.config
            z = x / c.scaling_factor + (c.get("shift_factor") or 0.0)
            x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return (x / 2 + 0.5).clamp(0, 1)


def _diffusers_config(network) -> Any:
    """The network's diffusers config (a dict-like `.config`), or None for a plain module / callable."""
    cfg = getattr(network, "config", None)
    return cfg if isinstance(cfg, dict) else None


def _plain_call(f) -> Any:
    """Calling convention of a plain module or callable: f(x, t, **cond) -> output tensor."""
    def call(x, t, **cond):
        out = f(x, t, **cond)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; f(x, t, **cond) must return a tensor")
        return out

    return call


def _network_call(network) -> Any:
    """Calling convention of a diffusers network: x, t and conditioning keywords -> output tensor."""
    if _diffusers_config(network) is None:
        return _plain_call(network)
    name = type(network).__name__
    if "Transformer" in name:
        def call(x, t, **cond):
            return network(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
    else:
        def call(x, t, **cond):
            return network(x, t, return_dict=False, **cond)[0]
    channels = network.config.get("in_channels")

    def checked(x, t, **cond):
        out = call(x, t, **cond)
        if channels and out.shape[1] == 2 * channels:  # learned variance (IF, DiT): keep the mean
            out = out[:, :channels]
        return out

    return checked


def denoiser_from_model(network, scheduler_config=None, *, schedule=None, prediction_type: str | None = None,
                        vae=None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                        guidance_interval: tuple[float, float] | None = None,
                        cond: dict | None = None, uncond: dict | None = None, **denoiser_kw) -> Denoiser:
    """A Denoiser over a network given the noise schedule it was trained with.

    `network`: a diffusers UNet / transformer, or any `torch.nn.Module` or callable `f(x, t, **cond)`
    returning the output tensor (t: model times, one per sample).  The schedule and prediction type
    come from `scheduler_config` (a diffusers scheduler config, read through DiffSamplerScheduler's
    mapping, with its thresholding / clip_sample), or from `schedule` (a `NoiseSchedule`) and
    `prediction_type`.  A network without a diffusers `.config` has no `in_channels` / `sample_size`:
    pass `channels=` / `sample_size=` for `sample_shape`.  `guidance_interval=(sigma_lo, sigma_hi)`
    limits guidance to those noise levels sigma_t / alpha_t (guidance/cfg.py)."""
    if scheduler_config is not None and schedule is not None:
        raise ValueError("give scheduler_config or schedule (with prediction_type), not both")
    if scheduler_config is None and schedule is None:
        what = "" if _diffusers_config(network) is not None else " (the model has no diffusers config to read)"
        raise ValueError(f"denoiser_from_model needs scheduler_config, or schedule and prediction_type{what}")
    if schedule is not None and prediction_type is None:
        raise ValueError("denoiser_from_model(schedule=...) needs prediction_type "
                         "('epsilon', 'v_prediction', 'sample' or 'flow')")
    if not callable(network):
        raise TypeError(f"network must be a torch.nn.Module or a callable f(x, t, **cond), got {type(network).__name__}")
    adapter = None
    if schedule is None:
        kw = {} if prediction_type is None else {"prediction_type": prediction_type}
        adapter = DiffSamplerScheduler.from_config(scheduler_config, solver="dpmpp_2m", **kw)
        schedule, prediction_type = adapter.schedule, adapter.prediction_kind
    model = CFGModel(_network_call(network), dict(cond or {}), uncond, guidance_scale, guidance_rescale,
                     param_source=network,  # model I/O in the network's dtype
                     interval=guidance_interval, schedule=schedule)
    den = PipelineDenoiser(model, schedule, prediction_type, network=network, vae=vae, **denoiser_kw)
    if adapter is None:
        return den
    return adapter.transform_denoiser(den)  # thresholding / clip_sample from the scheduler config


def denoiser_from_pipeline(pipe, guidance_scale: float = 1.0, guidance_rescale: float = 0.0, *,
                           guidance_interval: tuple[float, float] | None = None,
                           prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                           prompt_embeds: torch.Tensor | None = None,
                           negative_prompt_embeds: torch.Tensor | None = None,
                           pooled_prompt_embeds: torch.Tensor | None = None,
                           negative_pooled_prompt_embeds: torch.Tensor | None = None,
                           class_labels: torch.Tensor | None = None, null_class: int | None = None,
                           **cond) -> PipelineDenoiser:
    """Denoiser from a pipeline's unet/transformer, scheduler config and VAE.

    Text models: pass `prompt_embeds` (and `negative_prompt_embeds` for guidance), so no tokenizer
    is needed, or `prompt` / `negative_prompt` (encoded with the pipeline's own `encode_prompt`).  Flow transformers also
    take `pooled_prompt_embeds`.  Class-conditional UNets: `class_labels`, and `null_class` (the
    label of the unconditional class) for guidance.  Extra `cond` keywords go to every call.
    """
    network = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if network is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    vae = getattr(pipe, "vae", None)
    c, u = dict(cond), None
    if prompt is not None:
        if prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        enc = pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt, device=network.device,
                                 num_images_per_prompt=1, do_classifier_free_guidance=guidance_scale != 1.0) \
            if "Transformer" not in type(network).__name__ else None
        if enc is None:
            raise ValueError("for flow transformers pass prompt_embeds / pooled_prompt_embeds")
        prompt_embeds, negative_prompt_embeds = enc[0], enc[1]
    if prompt_embeds is not None:
        c["encoder_hidden_states"] = prompt_embeds
        if pooled_prompt_embeds is not None:
            c["pooled_projections"] = pooled_prompt_embeds
        if guidance_scale != 1.0:
            if negative_prompt_embeds is None:
                raise ValueError("guidance needs negative_prompt_embeds (or a prompt with the pipeline's tokenizer)")
            u = {**c, "encoder_hidden_states": negative_prompt_embeds}
            if pooled_prompt_embeds is not None:
                if negative_pooled_prompt_embeds is None:
                    raise ValueError("guidance on a pooled-projection model needs negative_pooled_prompt_embeds")
                u["pooled_projections"] = negative_pooled_prompt_embeds
    if class_labels is not None:
        c["class_labels"] = torch.as_tensor(class_labels).long().reshape(-1)
        if guidance_scale != 1.0:
            if null_class is None:
                raise ValueError("class-conditional guidance needs null_class (the unconditional label)")
            u = {**c, "class_labels": torch.full_like(c["class_labels"], null_class)}
    if guidance_scale != 1.0 and u is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a condition: prompt(_embeds) or class_labels")
    return denoiser_from_model(network, pipe.scheduler.config, vae=vae, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, guidance_interval=guidance_interval, cond=c,
                               uncond=u)
