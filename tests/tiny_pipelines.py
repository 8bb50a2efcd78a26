"""Tiny random-weight diffusers models and pipelines, built from configs, saved with
save_pretrained and loaded back with from_pretrained (the real, offline loading path)."""

import torch
from diffusers import (AutoencoderKL, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusionPipeline,
                       UNet2DConditionModel, UNet2DModel)


def tiny_unet(num_class_embeds=None, sample_size=8):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds)


def ddpm_pipeline(path, num_class_embeds=None):
    DDPMPipeline(unet=tiny_unet(num_class_embeds), scheduler=DDPMScheduler()).save_pretrained(path)
    return DDPMPipeline.from_pretrained(path)


def sd_pipeline(path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=100, max_position_embeddings=16,
                                        projection_dim=16))
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   tokenizer=None, requires_safety_checker=False)


def flow_transformer(path):
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                               caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    tr.save_pretrained(path / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(path / "scheduler")
    return (SD3Transformer2DModel.from_pretrained(path / "transformer"),
            FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"))


def ddim_pipeline():
    from diffusers import DDIMPipeline, DDIMScheduler

    return DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())


def sd3_pipeline(shift=3.0):
    """A StableDiffusion3Pipeline around a tiny SD3 transformer and VAE (shift_factor / scaling_factor set as
    SD3's); no text encoders: the tests pass prompt embeddings (pooled ones too) directly."""
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                               caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, shift_factor=0.1, scaling_factor=1.5)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def tiny_clip_tokenizer(path):
    """A CLIP tokenizer of single characters (vocab and merges written here: no download), saved to path."""
    import json
    import string

    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
        [c + "</w>" for c in string.ascii_lowercase]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    tok.save_pretrained(path)
    return tok


def sd_pipeline_with_tokenizer(path):
    """sd_pipeline with a tokenizer, so prompts given as text work (model.prompt on the command line)."""
    sd_pipeline(path)
    tiny_clip_tokenizer(path / "tokenizer")
    import json

    index = json.loads((path / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
