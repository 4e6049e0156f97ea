"""The unet_attention extractor: exact probabilities, unchanged outputs, clean restore."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.aggregation import aggregate_cross, aggregate_self, cross_layer_weights, needed_layers, propagate
from t2ialign.core.errors import PluginError
from t2ialign.core.host import Host
from t2ialign.plugins.extractors.unet import CaptureProcessor, UNetAttentionExtractor
from tests.helpers.tiny_models import LATENT, cached_tiny_sd, write_registry

PROMPT = "a photo of cat, dog"


@pytest.fixture(scope="module")
def host_and_sd(tmp_path_factory):
    reg = write_registry(tmp_path_factory.mktemp("reg") / "r.yaml", "tiny", "stable_diffusion",
                         model=str(cached_tiny_sd()), cross_weight=[1, 1, 1, 1, 1],
                         self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    host = Host(registry_files=[reg])
    return host, host.backbone("tiny")


@pytest.fixture(scope="module")
def inputs(host_and_sd):
    _, sd = host_and_sd
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, LATENT, LATENT, generator=g)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([20.0])
    return sd.add_noise(z0, t, noise), t, sd.encode_text([PROMPT])


def _reference_probs(sd):
    """Forward pre-hooks that recompute softmax(QK^T * scale) independently from each layer's inputs."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    modules = dict(sd.unet.named_modules())

    def make(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            ctx = kwargs.get("encoder_hidden_states")
            ctx = x if ctx is None else ctx
            q, k = module.to_q(x), module.to_k(ctx)
            b, h = q.shape[0], module.heads
            q = q.reshape(b, q.shape[1], h, -1).permute(0, 2, 1, 3)
            k = k.reshape(b, k.shape[1], h, -1).permute(0, 2, 1, 3)
            p = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * module.scale, dim=-1)
            seen.setdefault(name, []).append(p.detach())
        return hook

    for layer in sd.attention_layers():
        handles.append(modules[layer.name].register_forward_pre_hook(make(layer.name), with_kwargs=True))
    return seen, handles


def test_host_picks_the_unet_extractor(host_and_sd):
    host, sd = host_and_sd
    assert isinstance(host.extractor(sd), UNetAttentionExtractor)


def test_captured_probabilities_are_exact(host_and_sd, inputs):
    host, sd = host_and_sd
    zt, t, cond = inputs
    ex = host.extractor(sd)
    span = sd.token_spans(PROMPT, "dog")
    seen, handles = _reference_probs(sd)
    try:
        with ex.capture(token_indices=span + [0]) as store:
            sd.predict(zt, t, cond)
    finally:
        for h in handles:
            h.remove()
    layers = sd.attention_layers()
    assert store.hooked == {"cross": 7, "self": 7}
    assert set(store.cross) == {l.name for l in layers if l.kind == "cross"}
    assert set(store.self_) == {l.name for l in layers if l.kind == "self"}
    for layer in layers:
        ref = seen[layer.name][0].mean(dim=1)  # head mean, (B, Q, K)
        if layer.kind == "cross":
            got = store.cross[layer.name]
            assert got.shape == (1, layer.grid[0] * layer.grid[1], 2)
            assert torch.allclose(got, ref[..., span + [0]], atol=1e-6)
        else:
            got = store.self_[layer.name]
            assert torch.allclose(got, ref, atol=1e-6)
            assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5)


def test_full_cross_rows_sum_to_one_and_chunking_does_not_matter(host_and_sd, inputs):
    _, sd = host_and_sd
    zt, t, cond = inputs
    name = [l.name for l in sd.attention_layers() if l.kind == "cross"][0]
    maps = []
    for chunk_mb in (256, 0):  # 0 MB -> one query row (all heads) per block
        with UNetAttentionExtractor(sd, chunk_mb=chunk_mb).capture(cross_layers=[name], self_layers=[]) as store:
            sd.predict(zt, t, cond)
        maps.append(store.cross[name])
        assert store.hooked == {"cross": 1, "self": 0}
    assert maps[0].shape[-1] == 77
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, maps[0].shape[1]), atol=1e-5)
    assert torch.allclose(maps[0], maps[1], atol=1e-6)


def test_outputs_unchanged_and_only_requested_layers_swapped(host_and_sd, inputs):
    host, sd = host_and_sd
    zt, t, cond = inputs
    before = sd.predict(zt, t, cond)
    layers = sd.attention_layers()
    wanted = [layers[1].name]
    modules = dict(sd.unet.named_modules())
    with host.extractor(sd).capture(cross_layers=wanted, self_layers=[]):
        during = sd.predict(zt, t, cond)
        swapped = [l.name for l in layers if isinstance(modules[l.name].processor, CaptureProcessor)]
    assert swapped == wanted
    assert torch.allclose(before, during, atol=1e-6)


def test_row_blocks_of_any_size_give_the_same_maps(host_and_sd, inputs):
    """Self maps computed in blocks of 1 row, a few rows, the CPU default and all rows agree."""
    _, sd = host_and_sd
    zt, t, cond = inputs
    name = [l.name for l in sd.attention_layers() if l.kind == "self"][0]
    maps = []
    for chunk_mb in (0, 0.05, None, 1024):
        with UNetAttentionExtractor(sd, chunk_mb=chunk_mb).capture(cross_layers=[], self_layers=[name]) as store:
            sd.predict(zt, t, cond)
        maps.append(store.self_[name])
    for m in maps[1:]:
        assert torch.allclose(m, maps[0], atol=1e-7)


def test_bad_chunk_option_is_refused(host_and_sd):
    from t2ialign.core.specs import EntrySpec
    from t2ialign.plugins.extractors.unet import t2ialign_make_attention_extractor

    _, sd = host_and_sd
    spec = EntrySpec("extractors", "big", "unet_attention", {"chunk_mb": "lots"})
    with pytest.raises(PluginError, match="chunk_mb must be a number of megabytes"):
        t2ialign_make_attention_extractor(backbone=sd, spec=spec)
    ok = t2ialign_make_attention_extractor(backbone=sd, spec=EntrySpec("extractors", "big", "unet_attention",
                                                                        {"chunk_mb": 64}))
    assert ok.chunk_bytes == 64 * 2**20


def test_capture_reuses_the_processors_projections(host_and_sd, inputs):
    """Capturing must not recompute q/k: each hooked layer's to_q runs once per forward."""
    host, sd = host_and_sd
    zt, t, cond = inputs
    modules = dict(sd.unet.named_modules())
    names = [l.name for l in sd.attention_layers()]
    calls = {n: 0 for n in names}
    handles = []
    for n in names:
        def count(*_args, n=n):
            calls[n] += 1
        handles.append(modules[n].to_q.register_forward_hook(count))
    try:
        with host.extractor(sd).capture(token_indices=[1, 2]):
            sd.predict(zt, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert calls == {n: 1 for n in names}
    # and the observing hooks are gone afterwards
    assert all(not modules[n].to_q._forward_hooks for n in names)


def test_fused_projections_fall_back_to_recomputation(inputs):
    """With fused to_qkv / to_kv the projection hooks see nothing; the maps must still be exact."""
    from diffusers import UNet2DConditionModel

    from t2ialign.plugins.backbones.stable_diffusion import StableDiffusionBackbone  # noqa: F401

    host = Host(registry_files=[write_registry_tmp()])
    sd = host.backbone("tiny")
    assert isinstance(sd.unet, UNet2DConditionModel)
    zt, t, cond = inputs
    seen, handles = _reference_probs(sd)
    sd.unet.fuse_qkv_projections()
    try:
        before = sd.predict(zt, t, cond)
        with host.extractor(sd).capture(token_indices=[1, 2]) as store:
            during = sd.predict(zt, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(before, during, atol=1e-6)
    for layer in sd.attention_layers():
        ref = seen[layer.name][-1].mean(dim=1)
        got = store.cross[layer.name] if layer.kind == "cross" else store.self_[layer.name]
        want = ref[..., [1, 2]] if layer.kind == "cross" else ref
        assert torch.allclose(got, want, atol=1e-5), layer.name


def write_registry_tmp():
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="t2ialign-fused-"))
    return write_registry(folder / "r.yaml", "tiny", "stable_diffusion", model=str(cached_tiny_sd()))


def test_running_mean_over_calls(host_and_sd, inputs):
    host, sd = host_and_sd
    zt, _, cond = inputs
    name = [l.name for l in sd.attention_layers() if l.kind == "self"][-1]
    singles = []
    for t in (20.0, 200.0):
        with host.extractor(sd).capture(cross_layers=[], self_layers=[name]) as store:
            sd.predict(zt, torch.tensor([t]), cond)
        singles.append(store.self_[name])
    with host.extractor(sd).capture(cross_layers=[], self_layers=[name], keep_steps=True) as store:
        for t in (20.0, 200.0):
            sd.predict(zt, torch.tensor([t]), cond)
    assert store.calls("self", name) == 2 and len(store.steps) == 2
    assert torch.allclose(store.self_[name], (singles[0] + singles[1]) / 2, atol=1e-6)


def test_processors_restored_after_an_exception(host_and_sd, inputs):
    host, sd = host_and_sd
    originals = dict(sd.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with host.extractor(sd).capture():
            assert any(isinstance(p, CaptureProcessor) for p in sd.unet.attn_processors.values())
            raise RuntimeError("boom")
    after = sd.unet.attn_processors
    assert all(after[k] is originals[k] for k in originals)


def test_zero_hooked_layers_and_unknown_names(host_and_sd):
    host, sd = host_and_sd
    ex = host.extractor(sd)
    with pytest.raises(PluginError, match="no attention layer would be hooked"):
        with ex.capture(cross_layers=[], self_layers=[]):
            pass
    with pytest.raises(PluginError) as info:
        with ex.capture(cross_layers=["down_blocks.9.attn2"], self_layers=[]):
            pass
    assert "down_blocks.9.attn2" in str(info.value) and "down_blocks.0" in str(info.value)
    # nothing stayed installed
    assert not any(isinstance(p, CaptureProcessor) for p in sd.unet.attn_processors.values())


def test_end_to_end_heatmap_with_backbone_defaults(host_and_sd, inputs):
    """Capture only the layers the weights need, aggregate and propagate: finite per-class maps."""
    host, sd = host_and_sd
    zt, t, cond = inputs
    layers = sd.attention_layers()
    d = sd.layer_defaults
    cw = cross_layer_weights(layers, group_weights=d["cross_weight"], gaussian_sigma=d["cross_gaussian_sigma"])
    from t2ialign.core.aggregation import self_layer_weights

    sw = self_layer_weights(layers, d["self_weight"])
    spans = [sd.token_spans(PROMPT, c) for c in ("cat", "dog")]
    cols = [p for s in spans for p in s]
    with host.extractor(sd).capture(cross_layers=needed_layers(layers, cw), self_layers=needed_layers(layers, sw),
                                    token_indices=cols) as store:
        sd.predict(zt, t, cond)
    assert store.hooked["self"] == 3  # groups 0 and 4: the 16x16 self layers only
    cross = {k: v[0] for k, v in store.cross.items()}
    A = aggregate_cross(cross, layers, cw, (LATENT, LATENT))
    K = aggregate_self({k: v[0] for k, v in store.self_.items()}, layers, d["self_weight"], (LATENT, LATENT))
    heat = propagate(K, A)
    assert heat.shape == (2, LATENT, LATENT) and torch.isfinite(heat).all()


def test_fused_capture_keeps_factors_that_apply_the_explicit_maps(host_and_sd, inputs):
    """Fused self capture: no maps, per-layer q/k whose attention product equals map @ V, outputs unchanged."""
    _, sd = host_and_sd
    zt, t, cond = inputs
    zt, t, cond = zt.expand(3, -1, -1, -1), t.expand(3), cond.select([0, 0, 0])
    selfs = [l.name for l in sd.attention_layers() if l.kind == "self"]
    stores, outs = {}, {}
    for mode in ("explicit", "fused"):
        with UNetAttentionExtractor(sd).capture(cross_layers=[], self_layers=selfs) as store:
            store.reduce_batch = True
            store.self_maps = mode
            outs[mode] = sd.predict(zt[:2], t[:2], cond.select([0, 0]))
            sd.predict(zt[2:], t[2:] * 5, cond.select([0]))  # a second call of another batch size
        stores[mode] = store
    assert torch.equal(outs["fused"], outs["explicit"])
    fused = stores["fused"]
    assert not fused.self_ and set(fused.self_factors) == set(selfs)
    assert fused.factor_bytes() == sum(f.nbytes for f in fused.self_factors.values()) > 0
    for name, factors in fused.self_factors.items():
        m = stores["explicit"].self_[name][0]
        assert factors.rows == 3 and fused.calls("self", name) == 3
        v = torch.rand(m.shape[1], 5, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(factors.apply(v), m @ v, atol=1e-6), name


def test_fused_factors_need_batch_reduction(host_and_sd, inputs):
    _, sd = host_and_sd
    zt, t, cond = inputs
    name = [l.name for l in sd.attention_layers() if l.kind == "self"][0]
    with pytest.raises(ValueError, match="reduce_batch"):
        with UNetAttentionExtractor(sd).capture(cross_layers=[], self_layers=[name]) as store:
            store.self_maps = "fused"
            sd.predict(zt, t, cond)
