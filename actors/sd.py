"""Stable Diffusion by name or path, and the random-weight variants that tests, the offline demo
and GPU benchmarks use.

`load_sd` is the one way every stage gets SD. A hub id or a local folder goes through diffusers'
`from_pretrained`; `"tiny"` and `"sd15-random"` build the same pipeline class from configs in
code (random weights, seeded, so they are identical on every machine). Either way the scheduler
is swapped for DDIM (the paper's sampler) and the safety checker is left out (it blanks images;
labels need the pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from actors.names import (
    DEFAULT_MODEL,
    RANDOM_MODELS,
    SD15_RANDOM,
    TINY,
    ModelNotFoundError,
    model_not_found,
)
from actors.tokenizer import clip_tokenizer


def sd15_scheduler_config() -> dict:
    """SD 1.x's noise schedule (from its scheduler_config.json)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                steps_offset=1, prediction_type="epsilon")


@dataclass(frozen=True)
class RandomSDConfig:
    """Sizes of an SD 1.x-shaped model with random weights (defaults: SD 1.5's own configs).
    The topology is always SD 1.x's: four down blocks, the first three with cross-attention, a
    mid block, four up blocks, so features come at four resolutions."""

    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int = 8  # SD 1.x's config value (diffusers reads it as the head count)
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    norm_groups: int = 32
    text_width: int = 768  # CLIP ViT-L/14 text encoder
    text_layers: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    image_size: int = 512

    @classmethod
    def tiny(cls) -> RandomSDConfig:  # tests and the offline demo: 64x64 images, 8x8 latents
        return cls(unet_channels=(8, 16, 16, 16), layers_per_block=1, attention_head_dim=2,
                   vae_channels=(8, 8, 8, 8), norm_groups=4, text_width=32, text_layers=2,
                   text_heads=4, text_ffn=64, image_size=64)


RANDOM_SD_CONFIGS = {TINY: RandomSDConfig.tiny, SD15_RANDOM: RandomSDConfig}
assert set(RANDOM_SD_CONFIGS) == set(RANDOM_MODELS)


def random_sd_components(cfg: RandomSDConfig, seed: int = 0) -> dict:
    """SD's components with random weights, seeded without touching the global RNG, and the
    real CLIP tokenizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // 8,
            block_out_channels=cfg.unet_channels,
            layers_per_block=cfg.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cfg.text_width,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_groups,
        )
        vae = AutoencoderKL(
            sample_size=cfg.image_size,
            block_out_channels=cfg.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=cfg.text_ffn,
            num_attention_heads=cfg.text_heads, num_hidden_layers=cfg.text_layers,
            max_position_embeddings=77, projection_dim=cfg.text_width, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                scheduler=DDIMScheduler(**sd15_scheduler_config()))


def load_sd(model: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
            dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """SD as a diffusers pipeline with a DDIM scheduler: `model` is a hub id, a folder holding a
    diffusers `save_pretrained` layout, or a random-weight variant ("tiny", "sd15-random")."""
    if model in RANDOM_SD_CONFIGS:
        components = random_sd_components(RANDOM_SD_CONFIGS[model]())
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, safety_checker=None, requires_safety_checker=False, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(model_not_found(model, e)) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if pipe.unet.dtype != dtype:  # random-weight models are built in float32
        pipe.to(dtype=dtype)
    return pipe
