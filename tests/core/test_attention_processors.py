"""Shared attention-processor pieces: the logits dtype rule and explicit probabilities in float16."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from t2ialign.core.attention_processors import logits_dtype_for, probs_from_projections


def test_logits_dtype_follows_precision_device_and_upcast_flag():
    plain, upcast = SimpleNamespace(upcast_attention=False), SimpleNamespace(upcast_attention=True)
    half_gpu = torch.empty(1, dtype=torch.float16, device="meta")  # any non-CPU device
    assert logits_dtype_for(plain, half_gpu) is torch.float16
    assert logits_dtype_for(upcast, half_gpu) is torch.float32  # SD2.1's fp16 logits overflow
    assert logits_dtype_for(plain, torch.empty(1, dtype=torch.bfloat16, device="meta")) is torch.float32
    assert logits_dtype_for(plain, torch.empty(1, dtype=torch.float16)) is torch.float32  # CPU
    assert logits_dtype_for(plain, torch.empty(1)) is torch.float32


def test_half_precision_logits_stay_close_to_float32():
    from diffusers.models.attention_processor import Attention

    # the tiny SD's cross-attention layer (tests/helpers/tiny_models.py): 2 heads, scale 0.5
    attn = Attention(query_dim=8, cross_attention_dim=16, heads=2, dim_head=4)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, attn.heads * 8, generator=gen) * 2
    k = torch.randn(2, 9, attn.heads * 8, generator=gen) * 2
    exact = probs_from_projections(attn, q, k, logits_dtype=torch.float32)
    half = probs_from_projections(attn, q.half(), k.half(), logits_dtype=torch.float16)
    assert half.dtype is torch.float32
    torch.testing.assert_close(half.sum(-1), torch.ones(2, 64), atol=1e-5, rtol=0)
    assert (half - exact).abs().max() < 5e-3
    assert (half - exact).abs().max() > 0  # the float16 path really ran
