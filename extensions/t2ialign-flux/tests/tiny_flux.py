"""A tiny, randomly initialised FLUX.1 pipeline saved in the real diffusers layout.

Every component is the class the real checkpoints use (``FluxTransformer2DModel`` with double- and
single-stream blocks, ``AutoencoderKL`` with a shift factor, ``CLIPTextModel`` for the pooled
embedding, ``T5EncoderModel`` for the token sequence, a dynamic-shift
``FlowMatchEulerDiscreteScheduler`` with FLUX.1's config) so the backbone's loading code runs for
real; only the sizes are shrunk. The CLIP tokenizer is SD's BPE built offline by t2ialign; the T5
tokenizer is a tiny Unigram vocabulary built here, since no sentencepiece model can be downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: words the tiny T5 vocabulary knows (anything else becomes <unk>): a few prompt words and the
#: class names of t2ialign's toy_shapes dataset, which the end-to-end segmentation test uses
T5_WORDS = "a photo of cat dog bus man car bike and the red blue".split()


def _t5_words() -> list[str]:
    from t2ialign.plugins.toy.world import CLASS_NAMES

    return list(dict.fromkeys(T5_WORDS + [w for name in CLASS_NAMES for w in name.split()]))
CLIP_WIDTH, T5_WIDTH = 16, 32
LATENT_CHANNELS = 4
IMAGE_SIZE = 32  # VAE with one downsampling step: 32 px -> 16x16 latent -> 8x8 packed tokens
HEADS, HEAD_DIM = 2, 8
#: FLUX.1-dev's scheduler config (dynamic shift)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tiny_t5_tokenizer():
    """A tokenizers-backed ``T5Tokenizer`` over :data:`T5_WORDS` (no sentencepiece needed)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in _t5_words()] + [(",", -3.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)).eval()


def tiny_vae(seed: int, *, shift_factor: float | None = 0.1159, scaling_factor: float = 0.3611):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                         norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False).eval()


def make_tiny_flux(folder: str | Path, *, guidance_embeds: bool = True, scheduler: dict | None = None,
                   seed: int = 0) -> Path:
    """Save a tiny FLUX.1 pipeline into ``folder`` with ``FluxPipeline.save_pretrained``.

    ``guidance_embeds``: FLUX.1-dev style (guidance-distilled, takes a ``guidance`` input) or
    FLUX.1-schnell style (no guidance input). ``scheduler``: scheduler config (default FLUX.1-dev's).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2ialign.core.clip_tokenizer import clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    tokenizer_2 = tiny_t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or FLUX_SCHEDULER)),
        vae=tiny_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2), seed + 3),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder
