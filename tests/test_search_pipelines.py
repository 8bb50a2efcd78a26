"""`diffsampler search` on a tiny Stable-Diffusion pipeline (random weights, built from configs, with a
character tokenizer so model.prompt works): a search end to end with CFG, reference endpoints cached
by the model's fingerprint and reused, and the found plan run in the pipeline through the adapter."""

import json

import pytest
import torch

from diffsampler.tools.search_job import run_search_job, validate_search
from test_search_cli import composed
from tiny_pipelines import sd_pipeline_with_tokenizer


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd_search")
    sd_pipeline_with_tokenizer(path)
    return path


def _spec(sd, cache, *extra):
    return validate_search(composed("model=diffusers", f"model.path={sd}", "model.prompt=a cat", "guidance=cfg",
                                    "search.nfe=4", "search.budget=8", "search.calib=4", "search.verify=4",
                                    "search.top_k=2", "search.batch=4", "search.time_shift=false",
                                    "search.reference_nfe=16", f"search.cache_dir={cache}", "progress=false", *extra))


def test_cfg_search_on_a_tiny_sd_pipeline_and_its_plan_in_the_pipeline(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffsampler.pipelines import DiffSamplerScheduler, denoiser_from_pipeline
    from diffsampler.samplers.usf import SolverSpec

    cache = tmp_path / "cache"
    summary = run_search_job(_spec(sd, cache, "search.holdout=2"), tmp_path / "run")
    plan = SolverSpec.load(tmp_path / "run" / "plan.yaml")
    info = plan.info["search"]
    assert plan.nfe == 4 and plan.time_shift is None and info["guidance"]["name"] == "cfg"
    assert info["model"] == "diffusers" and info["model_path"] == str(sd)
    assert info["reference"] == "dpmpp_3m at 16 calls (logsnr)"
    assert "(auto: data mean rms" in info["analytic_first_step"]
    assert summary["evaluations"] == 8 and summary["reference_cache"].startswith(str(cache))
    assert "searched plan diffusers_nfe4" in (tmp_path / "run" / "comparison.md").read_text()
    shards = sorted((cache / "search_references").rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert len(shards) == 2  # calibration + verification seeds, held-out seeds
    # a second search on the same model reuses the reference endpoints (a subset of the seeds)
    run_search_job(_spec(sd, cache, "search.holdout=0", "search.calib=2", "search.verify=2", "search.seed=1"),
                   tmp_path / "run2")
    assert sorted((cache / "search_references").rglob("*.pt")) == shards
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    # the plan in the pipeline, through the adapter, equals sample() with the same CFG denoiser
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DiffSamplerScheduler.from_config(pipe.scheduler.config,
                                                      solver=f"plan:{tmp_path / 'run' / 'plan.yaml'}")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = pipe("a cat", num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                   output_type="latent").images
    den = denoiser_from_pipeline(pipe, 7.5, prompt="a cat", negative_prompt="")
    import diffsampler as ds

    ref = ds.sample(den, latents.clone() * pipe.scheduler.init_noise_sigma, solver=plan.compile(den.schedule))
    assert (out - ref).abs().max() < 1e-4


def test_pipeline_keys_are_checked_before_the_model(sd, tmp_path):
    from diffsampler.tools.config_schema import ConfigError

    with pytest.raises(ConfigError, match="guidance=cfg with guidance.scale=7.5 needs a condition"):
        validate_search(composed("model=diffusers", f"model.path={sd}", "guidance=cfg"))
    with pytest.raises(ConfigError, match="search.metric=fid on model=diffusers needs eval.reference"):
        _spec(sd, tmp_path, "search.metric=fid")
    with pytest.raises(ConfigError, match="does not exist"):
        validate_search(composed("model=diffusers", f"model.path={tmp_path / 'none'}"))
    json.dumps(_spec(sd, tmp_path).config)  # the composed config is plain data
