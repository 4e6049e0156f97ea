"""A tiny, randomly initialised Stable Diffusion 3 / 3.5 pipeline saved in the real diffusers layout.

Every component is the class the real checkpoints use (``SD3Transformer2DModel``,
``AutoencoderKL`` with a shift factor, two ``CLIPTextModelWithProjection``, optionally a
``T5EncoderModel``) so the backbone plugin's loading code is exercised for real; only the sizes
are shrunk (2 transformer layers, 2 heads of 8 channels, a 16x16x16 latent, an 8x8 token grid).
The CLIP tokenizers are SD's real BPE tokenizer built offline; the T5 tokenizer is a tiny
Unigram vocabulary, since the real sentencepiece model cannot be downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: words the tiny T5 vocabulary knows (anything else becomes <unk>)
T5_WORDS = "a photo of cat dog bus man car bike and , the red blue".split()
#: sizes other tests may rely on
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 16, 24, 48
LATENT_CHANNELS, LATENT_SIZE, PATCH = 16, 16, 2
IMAGE_SIZE = 32  # VAE with one downsampling step: 32 px -> 16 latent -> 8x8 tokens
HEADS, HEAD_DIM = 2, 8


def tiny_t5_tokenizer():
    """A ``T5Tokenizer`` (tokenizers-backed) over :data:`T5_WORDS`, built without any download."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in T5_WORDS] + [(",", -3.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_encoder(width: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config).eval()


def make_tiny_sd3(
    folder: str | Path,
    with_t5: bool = False,
    dual_attention: bool = True,
    shift: float = 3.0,
    seed: int = 0,
) -> Path:
    """Save a tiny SD3 pipeline into ``folder`` with ``StableDiffusion3Pipeline.save_pretrained``.

    ``with_t5``: include a tiny ``T5EncoderModel`` + tokenizer (else ``text_encoder_3=None``,
    which diffusers replaces by zeros). ``dual_attention``: give block 0 SD3.5's extra image-only
    ``attn2`` and use RMS q/k norms (SD3.5 style); ``False`` gives an SD3.0-style model.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from t2ialign.core.clip_tokenizer import clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=PATCH,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=LATENT_SIZE // PATCH,
        dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        from transformers import T5Config, T5EncoderModel

        tokenizer_3 = tiny_t5_tokenizer()
        torch.manual_seed(seed + 2)
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=T5_WIDTH,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=_clip_encoder(CLIP_L_WIDTH, seed + 3),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_encoder(CLIP_G_WIDTH, seed + 4),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return folder
