"""diffsampler.sample() on real diffusers networks through denoiser_from_pipeline / denoiser_from_model
(tiny random-weight models saved and loaded back with from_pretrained)."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import diffsampler as ds
from diffsampler.guidance import CFGModel
from diffsampler.pipelines import denoiser_from_model, denoiser_from_pipeline

from tiny_pipelines import ddpm_pipeline, flow_transformer, sd_pipeline


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    return ddpm_pipeline(tmp_path_factory.mktemp("ddpm"))


EMB = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
NEG = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("nfe", [5, 10])
def test_sd_text_guided_sampling_matches_the_pipeline(sd, nfe, rescale):
    """Same latents and images as StableDiffusionPipeline with DPMSolverMultistepScheduler, CFG 5."""
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt_embeds=EMB.expand(2, 5, 16), negative_prompt_embeds=NEG.expand(2, 5, 16), guidance_scale=5.0,
              guidance_rescale=rescale, num_inference_steps=nfe, latents=latents.clone(), height=16, width=16)
    ref = sd(output_type="latent", **kw).images
    img = sd(output_type="pt", **kw).images
    den = denoiser_from_pipeline(sd, 5.0, rescale, prompt_embeds=EMB, negative_prompt_embeds=NEG)
    ours = ds.sample(den, latents.clone(), solver="dpmpp_2m", nfe=nfe, spacing="linspace", final="zero")
    assert den.nfe == nfe and (ours - ref).abs().max() <= 1e-4
    assert (den.decode(ours) - img).abs().max() <= 1e-4


@pytest.mark.parametrize("name", [n for n in ds.available() if not ds.samplers.info(n)["adaptive"]])  # fixed plans
def test_every_solver_on_pixel_and_latent_pipelines(ddpm, sd, name):
    for den in (denoiser_from_pipeline(ddpm),
                denoiser_from_pipeline(sd, 3.0, prompt_embeds=EMB, negative_prompt_embeds=NEG)):
        x = ds.sample(den, shape=den.sample_shape(2, *((16, 16) if den.vae is not None else ())),
                      seeds=[0, 1], solver=name, nfe=6)
        assert den.nfe == 6 and torch.isfinite(x).all()
        img = den.decode(x)
        assert img.shape == (2, 3, 8 if den.vae is None else 16, 8 if den.vae is None else 16)
        assert img.min() >= 0 and img.max() <= 1
        # the pipeline's own decoding: its VAE on unscaled latents, then [-1, 1] -> [0, 1] and clamped
        raw = x if den.vae is None else sd.vae.decode(x / sd.vae.config.scaling_factor).sample
        assert torch.equal(img, (raw / 2 + 0.5).clamp(0, 1))


def test_class_conditional_guidance(tmp_path):
    pipe = ddpm_pipeline(tmp_path / "cc", num_class_embeds=4)
    labels = torch.tensor([1, 2])
    plain = denoiser_from_pipeline(pipe, class_labels=labels)
    same = denoiser_from_pipeline(pipe, 1.0, class_labels=labels, null_class=0)
    guided = denoiser_from_pipeline(pipe, 3.0, class_labels=labels, null_class=0)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = (ds.sample(d, x_T.clone(), "dpmpp_2m", nfe=5) for d in (plain, same))
    assert torch.equal(a, b)  # scale 1 is the conditional model alone
    g = ds.sample(guided, x_T.clone(), "dpmpp_2m", nfe=5)
    assert guided.nfe == 5 and torch.isfinite(g).all() and (g - a).abs().max() > 1e-3


def test_cfg_formula_and_rescale():
    """out = u + w (c - u); rescale phi mixes in out * std(c) / std(out) (Lin et al. 2024)."""
    def net(x, t, c):  # output depends on the condition only through c
        return x * 0 + c.view(-1, 1, 1, 1) * torch.arange(4.0).view(1, 1, 1, 4)

    x, t = torch.zeros(2, 1, 1, 4), torch.zeros(2)
    cond, unc = {"c": torch.tensor([2.0, 3.0])}, {"c": torch.tensor([1.0, 1.0])}
    out = CFGModel(net, cond, unc, 4.0)(x, t)
    u, c = net(x, t, unc["c"]), net(x, t, cond["c"])
    torch.testing.assert_close(out, u + 4.0 * (c - u))
    r = CFGModel(net, cond, unc, 4.0, rescale=0.5)(x, t)
    g = u + 4.0 * (c - u)
    torch.testing.assert_close(r, 0.5 * g * c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True) + 0.5 * g)


def test_flow_transformer_every_solver(tmp_path):
    """A flow-matching transformer (SD3 architecture) through its FlowMatch scheduler config: every
    solver runs, spends exactly its NFE, and at NFE 80 every deterministic solver lands within 5e-3
    RMSE of a 400-call DPM-Solver++(3M) solution of the same ODE.  (Random weights make the network
    oscillate in t, so error is not monotone at low NFE; orders on flow models are measured on the
    exact mixture in test_user_needs.)"""
    tr, sched = flow_transformer(tmp_path)
    cond = {"encoder_hidden_states": EMB, "pooled_projections": torch.randn(1, 16, generator=torch.Generator().manual_seed(3))}
    den = denoiser_from_model(tr, sched.config, cond=cond)
    assert den.prediction_type == "flow" and isinstance(den.schedule, ds.RectifiedFlow)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ds.sample(den, x_T.clone(), "dpmpp_3m", nfe=400)
    for name in ds.available():
        den.reset_nfe()
        # an adaptive solver's accuracy is set by its tolerances and nfe is only its budget (it spends at most
        # that many calls): asked for rtol = atol = 1e-3 within 400 calls (this random network oscillates in t)
        adaptive = ds.samplers.info(name).get("adaptive")
        nfe, tol = (400, dict(rtol=1e-3, atol=1e-3)) if adaptive else (80, {})
        x = ds.sample(den, x_T.clone(), name, nfe=nfe, seeds=[0, 1], **tol)
        spent_ok = den.nfe <= nfe if adaptive else den.nfe == nfe
        assert spent_ok and torch.isfinite(x).all(), (name, den.nfe)
        if not ds.samplers.info(name)["stochastic"]:
            assert float((x - ref).pow(2).mean().sqrt()) < 5e-3, name


def test_loader_errors(sd, ddpm):
    with pytest.raises(ValueError, match="guidance needs negative_prompt_embeds"):
        denoiser_from_pipeline(sd, 5.0, prompt_embeds=EMB)
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 needs a condition"):
        denoiser_from_pipeline(ddpm, 2.0)
    with pytest.raises(ValueError, match="class-conditional guidance needs null_class"):
        denoiser_from_pipeline(ddpm, 2.0, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="neither a unet nor a transformer"):
        denoiser_from_pipeline(type("P", (), {"scheduler": sd.scheduler})())
    with pytest.raises(ValueError, match=r"conditioning 'encoder_hidden_states' has batch 3, samples have 2"):
        den = denoiser_from_pipeline(sd, prompt_embeds=EMB.expand(3, 5, 16))
        ds.sample(den, shape=(2, 4, 8, 8), seeds=[0, 1], nfe=2)
