"""A tiny, randomly initialised PixArt-Sigma pipeline saved in the real diffusers layout.

The real classes (``PixArtTransformer2DModel`` with learned-sigma output channels,
``AutoencoderKL``, ``T5EncoderModel`` with a tokenizers-backed T5 tokenizer, PixArt-Sigma's
``DPMSolverMultistepScheduler`` config), shrunk: 2 blocks, 2 heads of 8 channels, a 16x16x4
latent, an 8x8 token grid.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_flux import IMAGE_SIZE, LATENT_CHANNELS, T5_WIDTH, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae

HEADS, HEAD_DIM = 2, 8
#: PixArt-Sigma's scheduler: linear-beta DDPM schedule, epsilon prediction
PIXART_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                        prediction_type="epsilon", solver_order=2)


def make_tiny_pixart(folder: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny PixArt-Sigma pipeline into ``folder`` with ``PixArtSigmaPipeline.save_pretrained``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS, num_layers=2, cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=T5_WIDTH, sample_size=16, patch_size=2, use_additional_conditions=False,
    ).eval()
    tokenizer = tiny_t5_tokenizer()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5_encoder(len(tokenizer), seed + 1),
        vae=tiny_vae(seed + 2, shift_factor=None, scaling_factor=0.13025), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
    pipe.save_pretrained(folder)
    return folder
