"""Tiny randomly initialised Stable Diffusion / SDXL pipelines written in the real diffusers layout.

Tests load them through the real backbone plugins (registry entry ``model: <folder>``), so the
loading code is exercised without any download. The architectures keep the *structure* of the
real models at a few channels:

- tiny SD: cross-attention at 3 resolutions in the down path, an attention mid block and two
  attention up blocks -> 7 cross + 7 self layers in 5 resolution groups (16, 8, 4, 8, 16), the
  same down/mid/up pattern as SD 1.5's 7 groups.
- tiny SDXL: the first level has no attention and the lowest level's down/mid/up layers share a
  grid, so -- like SDXL -- there are 3 resolution groups (8, 4, 8); two text encoders (the second
  with projection, tokenizer padding with "!"), text-time micro-conditioning.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from t2ialign.core.clip_tokenizer import clip_tokenizer

TEXT_HIDDEN = 16
LATENT = 16
IMAGE = 32


def _text_config(**extra: Any):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=IMAGE,
        scaling_factor=0.5,
    )


def tiny_sd_unet(**overrides: Any):
    """The tiny SD UNet on its own (16x16 latents, cross-attention dim 16)."""
    from diffusers import UNet2DConditionModel

    config: dict[str, Any] = dict(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def make_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny SD 1.x-layout pipeline into ``folder`` (``model_index.json``, ``unet/`` ...)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=clip_tokenizer(),
        unet=tiny_sd_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_sdxl(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny SDXL-layout pipeline (two text encoders, text-time conditioning) into ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    projection_dim = 8
    time_dim = 4
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=projection_dim)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def write_registry(path: str | Path, name: str, plugin: str, **options: Any) -> Path:
    """A one-entry registry YAML (``backbones: {name: {plugin, **options}}``) at ``path``."""
    path = Path(path)
    path.write_text(yaml.safe_dump({"backbones": {name: {"plugin": plugin, **options}}}))
    return path


@functools.lru_cache(maxsize=None)
def cached_tiny_sd(prediction_type: str = "epsilon") -> Path:
    """A tiny SD folder built once per test session (tests must not modify it)."""
    return make_tiny_sd(Path(tempfile.mkdtemp(prefix=f"t2ialign-tiny-sd-{prediction_type}-")), prediction_type)


@functools.lru_cache(maxsize=None)
def cached_tiny_sdxl(prediction_type: str = "epsilon") -> Path:
    """A tiny SDXL folder built once per test session (tests must not modify it)."""
    return make_tiny_sdxl(Path(tempfile.mkdtemp(prefix=f"t2ialign-tiny-sdxl-{prediction_type}-")), prediction_type)
