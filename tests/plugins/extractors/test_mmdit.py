"""Tests of the MM-DiT joint-attention extractor on a tiny random SD3.5-style pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from t2ialign.core.errors import InputError, PluginError
from t2ialign.core.host import Host
from t2ialign.core.protocols import AttentionExtractor
from t2ialign.core.specs import EntrySpec
from t2ialign.plugins.extractors.mmdit import (
    JointCaptureProcessor,
    MMDiTAttentionExtractor,
    image_query_probs,
    t2ialign_make_attention_extractor,
)
from tests.helpers.tiny_sd3 import IMAGE_SIZE, make_tiny_sd3

T5_LEN = 8
JOINT = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
IMAGE_ONLY = "transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def host_and_backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3x")
    folder = make_tiny_sd3(root / "model", with_t5=False, dual_attention=True)
    reg = root / "registry.yaml"
    reg.write_text(json.dumps({"backbones": {"tiny": {"plugin": "stable_diffusion_3", "model": str(folder),
                                                      "t5_max_length": T5_LEN}}}))
    host = Host(registry_files=[reg])
    return host, host.backbone("tiny")


@pytest.fixture(scope="module")
def bb(host_and_backbone):
    return host_and_backbone[1]


@pytest.fixture(scope="module")
def inputs(bb):
    """Two noised copies of one image at two timesteps and a two-class prompt."""
    gen = torch.Generator().manual_seed(1)
    z0 = bb.encode_image(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)).expand(2, -1, -1, -1)
    t = torch.tensor([20.0, 200.0])
    z_t = bb.add_noise(z0, t, torch.randn(z0.shape, generator=gen))
    prompt = "a photo of cat, dog"
    return z_t, t, bb.encode_text([prompt]), prompt


def _processors(bb):
    return {n: m.processor for n, m in bb.denoiser.named_modules() if hasattr(m, "set_processor")}


def _record_attention_inputs(bb):
    """Forward pre-hooks that keep what each Attention module receives (independent of the extractor)."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    handles = []
    for layer in bb.attention_layers():
        module = bb.denoiser.get_submodule(layer.name)

        def hook(mod, args, kwargs, name=layer.name):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            seen.setdefault(name, []).append((hs.detach(), kwargs.get("encoder_hidden_states")))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _full_joint_softmax(attn, hs: torch.Tensor, ehs: torch.Tensor | None) -> torch.Tensor:
    """The whole ``(B, heads, N, N)`` joint attention matrix over ``[image; text]`` queries and keys."""
    def split(x, proj, norm):
        y = proj(x)
        y = y.view(y.shape[0], y.shape[1], attn.heads, -1).transpose(1, 2)
        return norm(y) if norm is not None else y

    q = split(hs, attn.to_q, attn.norm_q)
    k = split(hs, attn.to_k, attn.norm_k)
    if ehs is not None:
        q = torch.cat([q, split(ehs, attn.add_q_proj, attn.norm_added_q)], dim=2)
        k = torch.cat([k, split(ehs, attn.add_k_proj, attn.norm_added_k)], dim=2)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1)


# ------------------------------------------------------------------------------------ discovery
def test_host_builds_the_extractor_for_mmdit_backbones_only(host_and_backbone):
    host, bb = host_and_backbone
    ext = host.extractor(bb)
    assert isinstance(ext, MMDiTAttentionExtractor) and isinstance(ext, AttentionExtractor)

    class UNetLike:
        attention_kind = "unet"

    assert t2ialign_make_attention_extractor(UNetLike(), EntrySpec("extractors", "auto", "auto")) is None
    assert t2ialign_make_attention_extractor(bb, EntrySpec("extractors", "x", "unet_attention")) is None


# ------------------------------------------------------------------------------------ correctness
def test_captured_blocks_equal_an_explicit_joint_softmax(bb, inputs):
    z_t, t, cond, prompt = inputs
    columns = bb.token_spans(prompt, "cat") + bb.token_spans(prompt, "dog")
    ext = MMDiTAttentionExtractor(bb)
    seen, handles = _record_attention_inputs(bb)
    try:
        with torch.no_grad(), ext.capture(token_indices=columns, keep_steps=True) as store:
            bb.predict(z_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert store.hooked == {"cross": 2, "self": 3}
    assert sorted(store.cross) == JOINT and sorted(store.self_) == sorted(JOINT + [IMAGE_ONLY])
    img = bb.grid[0] * bb.grid[1]
    with torch.no_grad():
        for name in JOINT + [IMAGE_ONLY]:
            (hs, ehs), = seen[name]
            P = _full_joint_softmax(bb.denoiser.get_submodule(name), hs, ehs)
            n = img + (0 if ehs is None else bb.max_tokens)
            assert P.shape == (2, 2, n, n)
            torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))
            expected_self = P[:, :, :img, :img].mean(1).float()
            torch.testing.assert_close(store.self_[name], expected_self, atol=1e-6, rtol=1e-5)
            if ehs is None:
                assert name not in store.cross
                continue
            expected_cross = P[:, :, :img, [img + c for c in columns]].mean(1).float()
            torch.testing.assert_close(store.cross[name], expected_cross, atol=1e-6, rtol=1e-5)
            # the stored blocks are not renormalised: self mass + all text mass = 1 per image query
            text_mass = P[:, :, :img, img:].mean(1).sum(-1).float()
            torch.testing.assert_close(store.self_[name].sum(-1) + text_mass, torch.ones_like(text_mass))
            assert (store.self_[name].sum(-1) < 1 - 1e-4).all()


def test_all_text_columns_when_no_token_indices(bb, inputs):
    z_t, t, cond, _ = inputs
    with torch.no_grad(), MMDiTAttentionExtractor(bb).capture() as store:
        bb.predict(z_t, t, cond)
    for name in JOINT:
        cross, self_ = store.cross[name], store.self_[name]
        assert cross.shape[-1] == bb.max_tokens
        # image -> [image; text] probabilities of each image query sum to 1 across both blocks
        torch.testing.assert_close(cross.sum(-1) + self_.sum(-1), torch.ones_like(cross[..., 0]))


def test_outputs_unchanged_by_capture(bb, inputs):
    z_t, t, cond, _ = inputs
    with torch.no_grad():
        plain = bb.predict(z_t, t, cond)
        with MMDiTAttentionExtractor(bb).capture() as store:
            captured = bb.predict(z_t, t, cond)
    assert store.calls("cross", JOINT[0]) == 1
    torch.testing.assert_close(captured, plain, atol=0, rtol=0)


def test_chunked_computation_matches_one_shot(bb, inputs):
    z_t, t, cond, _ = inputs
    seen, handles = _record_attention_inputs(bb)
    try:
        with torch.no_grad():
            bb.predict(z_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    attn = bb.denoiser.get_submodule(JOINT[1])
    (hs, ehs), = seen[JOINT[1]]
    one = image_query_probs(attn, hs, ehs)
    chunked = image_query_probs(attn, hs, ehs, max_chunk_elements=1)  # one head of one row at a time
    torch.testing.assert_close(chunked, one)


def test_keep_steps_and_running_mean(bb, inputs):
    z_t, t, cond, _ = inputs
    with torch.no_grad(), MMDiTAttentionExtractor(bb).capture(cross_layers=[JOINT[0]], self_layers=[],
                                                               token_indices=[4], keep_steps=True) as store:
        bb.predict(z_t, t, cond)
        bb.predict(z_t.flip(0), t.flip(0), cond)
    assert store.calls("cross", JOINT[0]) == 2 and store.self_ == {}
    steps = [m for kind, name, m in store.steps if kind == "cross"]
    assert len(steps) == 2
    torch.testing.assert_close(store.cross[JOINT[0]], (steps[0] + steps[1]) / 2)
    # the second call saw the rows in reverse order
    assert not torch.allclose(steps[0], steps[1])


# ------------------------------------------------------------------------------------ hooking
def test_only_requested_layers_are_hooked_and_restored(bb, inputs):
    z_t, t, cond, _ = inputs
    before = _processors(bb)
    with torch.no_grad(), MMDiTAttentionExtractor(bb).capture(cross_layers=[JOINT[1]], self_layers=[IMAGE_ONLY]) as store:
        during = _processors(bb)
        bb.predict(z_t, t, cond)
    assert store.hooked == {"cross": 1, "self": 1}
    wrapped = {n for n, p in during.items() if isinstance(p, JointCaptureProcessor)}
    assert wrapped == {JOINT[1], IMAGE_ONLY}
    assert during[JOINT[0]] is before[JOINT[0]]
    assert list(store.cross) == [JOINT[1]] and list(store.self_) == [IMAGE_ONLY]
    assert _processors(bb) == before


def test_processors_restored_after_an_exception(bb, inputs):
    z_t, t, cond, _ = inputs
    before = _processors(bb)
    with pytest.raises(RuntimeError, match="boom"):
        with MMDiTAttentionExtractor(bb).capture():
            assert any(isinstance(p, JointCaptureProcessor) for p in _processors(bb).values())
            raise RuntimeError("boom")
    assert _processors(bb) == before
    # an error raised inside the model (bad token index for the text axis) also restores them
    ext = MMDiTAttentionExtractor(bb)
    ext.backbone = type("NoLimit", (), {"attention_layers": bb.attention_layers, "denoiser": bb.denoiser,
                                        "name": "tiny", "max_tokens": 0})()
    with pytest.raises(InputError, match="outside the"):
        with torch.no_grad(), ext.capture(token_indices=[bb.max_tokens + 5]):
            bb.predict(z_t, t, cond)
    assert _processors(bb) == before


def test_zero_hooked_layers_fail_at_once(bb):
    with pytest.raises(PluginError, match="no attention layer hooked"):
        with MMDiTAttentionExtractor(bb).capture(cross_layers=[], self_layers=[]):
            pass


@pytest.mark.parametrize("kwargs, match", [
    (dict(cross_layers=[IMAGE_ONLY]), "'self' layer"),
    (dict(self_layers=["transformer_blocks.7.attn"]), "unknown names"),
    (dict(token_indices=[-1]), "outside the text axis"),
])
def test_bad_requests_are_input_errors(bb, kwargs, match):
    before = _processors(bb)
    with pytest.raises(InputError, match=match):
        with MMDiTAttentionExtractor(bb).capture(**kwargs):
            pass
    assert _processors(bb) == before


# ------------------------------------------------------------------------------------ fused self maps
def _capture(bb, inputs, mode, columns):
    z_t, t, cond, _ = inputs
    with torch.no_grad(), MMDiTAttentionExtractor(bb).capture(token_indices=columns) as store:
        store.reduce_batch = True
        store.self_maps = mode
        out = bb.predict(z_t, t, cond)
    return store, out


def test_fused_factors_apply_the_unrenormalised_image_block(bb, inputs):
    """Joint layers: SDPA over image + text keys with zero text values == the explicit image->image
    block (not renormalised) times V; the image-only attn2 likewise; cross maps are unchanged."""
    prompt = inputs[3]
    columns = bb.token_spans(prompt, "cat") + bb.token_spans(prompt, "dog")
    explicit, out_e = _capture(bb, inputs, "explicit", columns)
    fused, out_f = _capture(bb, inputs, "fused", columns)
    assert torch.equal(out_e, out_f)  # the model output does not depend on the mode
    assert set(fused.self_factors) == set(explicit.self_) == set(JOINT) | {IMAGE_ONLY}
    assert not fused.self_
    for name, m in fused.cross.items():
        assert torch.equal(m, explicit.cross[name])
    for name, factors in fused.self_factors.items():
        block = explicit.self_[name][0]  # (Q, Q), rows sum to < 1 on joint layers (text keys took some)
        if name in JOINT:
            assert float(block.sum(-1).max()) < 1 - 1e-4
        v = torch.rand(block.shape[0], 3, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(factors.apply(v), block @ v, atol=1e-6), name
        assert factors.rows == inputs[0].shape[0]
