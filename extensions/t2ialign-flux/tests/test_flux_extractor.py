"""``flux_attention``: captured maps equal an explicit joint softmax that reproduces the model's own
attention output, in double- and single-stream blocks; outputs are unchanged by capture."""

from __future__ import annotations

import pytest
import torch

from conftest import write_registry
from t2ialign.core.errors import InputError, PluginError
from t2ialign.core.host import Host
from t2ialign.core.protocols import AttentionExtractor
from t2ialign_flux.extractor import FluxAttentionExtractor, FluxCaptureProcessor
from tiny_flux import IMAGE_SIZE

T5_LEN = 8
PROMPT = "a photo of cat, dog"
N_IMG = 64


@pytest.fixture(scope="module")
def host_and_backbone(flux_folders, tmp_path_factory):
    reg = write_registry(tmp_path_factory.mktemp("reg") / "r.yaml",
                         tiny={"plugin": "flux", "model": str(flux_folders["dev"]), "t5_max_length": T5_LEN})
    host = Host(registry_files=[reg])
    return host, host.backbone("tiny")


@pytest.fixture(scope="module")
def bb(host_and_backbone):
    return host_and_backbone[1]


@pytest.fixture(scope="module")
def inputs(bb):
    gen = torch.Generator().manual_seed(1)
    z0 = bb.encode_image(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)).expand(2, -1, -1, -1)
    t = torch.tensor([20.0, 400.0])
    return bb.add_noise(z0, t, torch.randn(z0.shape, generator=gen)), t, bb.encode_text([PROMPT])


def _processors(bb):
    return {l.name: bb.denoiser.get_submodule(l.name).processor for l in bb.attention_layers()}


def _record_calls(bb):
    """Forward hooks keeping each attention module's inputs and output (independent of the extractor)."""
    seen, handles = {}, []
    for layer in bb.attention_layers():
        def hook(_m, args, kwargs, out, name=layer.name):
            seen[name] = (kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), kwargs["image_rotary_emb"], out)
        handles.append(bb.denoiser.get_submodule(layer.name).register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def _full_softmax_and_value(attn, hs, ehs, rotary):
    """The whole ``(B, heads, N, N)`` joint attention over ``[text; image]`` and the values, built
    the straightforward way: every token's q/k/v, sequence-major layout as diffusers' processor."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x, proj, norm=None):
        y = proj(x).unflatten(-1, (attn.heads, -1))
        return norm(y) if norm is not None else y

    q, k, v = heads(hs, attn.to_q, attn.norm_q), heads(hs, attn.to_k, attn.norm_k), heads(hs, attn.to_v)
    if ehs is not None:
        q = torch.cat([heads(ehs, attn.add_q_proj, attn.norm_added_q), q], dim=1)
        k = torch.cat([heads(ehs, attn.add_k_proj, attn.norm_added_k), k], dim=1)
        v = torch.cat([heads(ehs, attn.add_v_proj), v], dim=1)
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs, v


def test_host_picks_this_extractor_for_flux(host_and_backbone):
    host, bb = host_and_backbone
    ex = host.extractor(bb)
    assert isinstance(ex, FluxAttentionExtractor) and isinstance(ex, AttentionExtractor)
    assert "flux_attention" in host.plugins.providers("extractors")


def test_captured_maps_equal_the_softmax_that_makes_the_models_output(bb, inputs):
    z_t, t, cond = inputs
    cols = bb.token_spans(PROMPT, "cat") + bb.token_spans(PROMPT, "dog")
    seen, handles = _record_calls(bb)
    try:
        with torch.no_grad(), FluxAttentionExtractor(bb).capture(token_indices=cols) as store:
            bb.predict(z_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert store.hooked == {"cross": 4, "self": 4} and set(store.cross) == set(seen)
    for name, (hs, ehs, rotary, out) in seen.items():
        attn = bb.denoiser.get_submodule(name)
        with torch.no_grad():
            probs, v = _full_softmax_and_value(attn, hs, ehs, rotary)
            # the explicit softmax IS the model's attention: P @ V reproduces the module's output
            mixed = (probs @ v).transpose(1, 2).flatten(2)
            if ehs is not None:  # double stream: image part through to_out
                torch.testing.assert_close(attn.to_out[0](mixed[:, T5_LEN:]), out[0], atol=1e-5, rtol=1e-4)
            else:  # single stream: the module returns the mixed values of [text; image]
                torch.testing.assert_close(mixed, out, atol=1e-5, rtol=1e-4)
        image_rows = probs[:, :, T5_LEN:].mean(dim=1)  # (B, img, text + img)
        torch.testing.assert_close(store.cross[name], image_rows[..., cols], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(store.self_[name], image_rows[..., T5_LEN:], atol=1e-6, rtol=1e-5)
        # not renormalised: image->text and image->image blocks share each row's unit mass
        total = image_rows[..., :T5_LEN].sum(-1) + store.self_[name].sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total))


def test_outputs_unchanged_by_capture_and_processors_restored(bb, inputs):
    z_t, t, cond = inputs
    before = _processors(bb)
    with torch.no_grad():
        plain = bb.predict(z_t, t, cond)
        with FluxAttentionExtractor(bb).capture(token_indices=[3]) as store:
            captured = bb.predict(z_t, t, cond)
            assert all(isinstance(p, FluxCaptureProcessor) for p in _processors(bb).values())
    assert torch.equal(plain, captured)
    assert _processors(bb) == before
    assert all(m.shape == (2, N_IMG, 1) for m in store.cross.values())


def test_all_text_columns_and_small_chunks(bb, inputs):
    z_t, t, cond = inputs
    with torch.no_grad():
        with FluxAttentionExtractor(bb).capture() as whole:
            bb.predict(z_t, t, cond)
        with FluxAttentionExtractor(bb, chunk_mb=0.001).capture() as chunked:  # one query row per block
            bb.predict(z_t, t, cond)
    for name, m in whole.cross.items():
        assert m.shape == (2, N_IMG, T5_LEN)
        torch.testing.assert_close(chunked.cross[name], m, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(chunked.self_[name], whole.self_[name], atol=1e-7, rtol=1e-6)


def test_only_requested_layers_are_hooked(bb, inputs):
    z_t, t, cond = inputs
    single = "single_transformer_blocks.1.attn"
    before = _processors(bb)
    with torch.no_grad(), FluxAttentionExtractor(bb).capture(cross_layers=[single], self_layers=[],
                                                             token_indices=[3]) as store:
        now = _processors(bb)
        assert [n for n in now if now[n] is not before[n]] == [single]
        bb.predict(z_t, t, cond)
    assert set(store.cross) == {single} and not store.self_


def test_processors_restored_after_an_error(bb, inputs):
    z_t, t, cond = inputs
    before = _processors(bb)
    with pytest.raises(InputError):
        with torch.no_grad(), FluxAttentionExtractor(bb).capture(token_indices=[3]):
            bb.predict(z_t[:1], t[:1], bb.encode_text(["a", "b"]))
    assert _processors(bb) == before


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cross_layers=[], self_layers=[]), PluginError, "no attention layer hooked"),
    (dict(cross_layers=["transformer_blocks.7.attn"]), InputError, "unknown layer"),
    (dict(token_indices=[T5_LEN]), InputError, "outside the text axis"),
    (dict(token_indices=[]), InputError, "empty"),
])
def test_bad_requests_fail_at_once(bb, kwargs, error, match):
    with pytest.raises(error, match=match):
        with FluxAttentionExtractor(bb).capture(**kwargs):
            pass


def test_bfloat16_backbone_captures_without_changing_outputs(host_and_backbone, flux_folders, inputs):
    """A bfloat16 run (what FLUX.1 is used in on GPUs): capture is still transparent, maps come out
    in float32 and stay close to the float32 run's (the logits are formed from float32 q/k)."""
    host, bb32 = host_and_backbone
    bb16 = host.backbone("tiny", dtype="bfloat16")
    z_t, t, _ = inputs
    maps = {}
    for bb in (bb32, bb16):
        cond = bb.encode_text([PROMPT])
        with torch.no_grad():
            plain = bb.predict(z_t, t, cond)
            with host.extractor(bb).capture(token_indices=[3, 5]) as store:
                captured = bb.predict(z_t, t, cond)
        assert torch.equal(plain, captured) and plain.dtype == torch.float32
        maps[bb.dtype] = store.cross
    assert bb16.denoiser.dtype == torch.bfloat16
    for name, m in maps[torch.bfloat16].items():
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, maps[torch.float32][name], atol=0.02, rtol=0.2)
