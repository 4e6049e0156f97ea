"""The per-image ELBO-T2IAlign pipeline on a tiny random SD model loaded through the real plugins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2ialign.core.aggregation import propagate
from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.host import Host
from t2ialign.core.pipeline import AlignmentPipeline, Variant, derive_seed
from tests.helpers.tiny_models import make_tiny_sd

WORDS = ["circle", "star", "square"]
VARIANTS = [Variant("baseline", 1.0), Variant("calibrated", 1 / 3), Variant("fixed_s", 1 / 3, fixed=True)]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny")
    reg = folder.parent / "reg.yaml"
    reg.write_text(f"backbones:\n  tiny: {{plugin: stable_diffusion, model: '{folder}'}}\n")
    host = Host(registry_files=[reg])
    backbone = host.backbone("tiny")
    return backbone, host.extractor(backbone), host.weighting(backbone.prediction_type, "uniform")


def _pipe(parts, **kw):
    backbone, extractor, weighting = parts
    opts = dict(elbo_timesteps=[[1, 999, 200]], collect_timesteps=[[20, 101, 40]], elbo_batch_size=4,
                collect_batch_size=2, cross_weight=[1, 1, 1, 1, 1], self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    opts.update(kw)
    return AlignmentPipeline(backbone, extractor, weighting, **opts)


def _image(seed=0, size=40):
    return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


def test_heatmaps_shapes_ranges_and_scores(parts):
    res = _pipe(parts).run(_image(), WORDS, VARIANTS, key="a")
    assert res.words == WORDS
    for name, heat in res.heatmaps.items():
        assert heat.shape == (3, 40, 48), name
        assert torch.isfinite(heat).all()
        assert heat.min() >= 0 and heat.max() <= 1
        assert torch.allclose(heat.flatten(1).amax(1), torch.ones(3))  # per-class min-max
    assert torch.equal(res.scores["baseline"], torch.ones(3))
    s = res.scores["calibrated"]
    assert s.max() == pytest.approx(1.0) and s.min() == pytest.approx(1 / 3, rel=1e-5)
    assert int(s.argmax()) == int(res.elbo.loss.argmin())  # best-explained class keeps S = 1
    assert torch.allclose(res.scores["fixed_s"], torch.full((3,), 1 / 3))
    assert res.forwards["collect"] == 2 and res.forwards["elbo"] == 4  # ceil(3 classes x 5 t / batch 4)


def test_best_class_untouched_others_changed(parts):
    res = _pipe(parts).run(_image(1), WORDS, VARIANTS[:2], key="b")
    s = res.scores["calibrated"]
    best = int(s.argmax())
    # S = 1 means A ** 1: the propagated, normalised map equals the baseline's
    assert torch.allclose(res.heatmaps["calibrated"][best], res.heatmaps["baseline"][best], atol=1e-6)
    worst = int(s.argmin())
    assert not torch.allclose(res.heatmaps["calibrated"][worst], res.heatmaps["baseline"][worst], atol=1e-4)


def test_prefactor_cancels(parts):
    a = _pipe(parts).run(_image(2), WORDS, VARIANTS[:2], key="c")
    b = _pipe(parts, prefactor_exponent=2.0).run(_image(2), WORDS, VARIANTS[:2], key="c")
    # equal up to float32 rounding, which the final min-max of a nearly flat random-model map
    # amplifies (the exact cancellation is shown in float64 in tests/core/test_calibration.py)
    assert torch.allclose(a.heatmaps["calibrated"], b.heatmaps["calibrated"], atol=2e-3)
    assert (a.heatmaps["calibrated"] - b.heatmaps["calibrated"]).abs().mean() < 2e-4


def test_deterministic_per_key_and_no_elbo_for_baseline(parts):
    pipe = _pipe(parts)
    a = pipe.run(_image(3), WORDS[:2], VARIANTS[:2], key="same")
    b = pipe.run(_image(3), WORDS[:2], VARIANTS[:2], key="same")
    c = pipe.run(_image(3), WORDS[:2], VARIANTS[:2], key="other")
    assert torch.equal(a.heatmaps["calibrated"], b.heatmaps["calibrated"])
    assert torch.equal(a.elbo.loss, b.elbo.loss)
    assert not torch.equal(a.elbo.loss, c.elbo.loss)  # other key, other noise
    base_only = pipe.run(_image(3), WORDS[:2], VARIANTS[:1], key="same")
    assert base_only.elbo is None and base_only.forwards["elbo"] == 0
    assert torch.equal(base_only.heatmaps["baseline"], a.heatmaps["baseline"])
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(2, "x")


def test_single_class_gets_score_one(parts):
    res = _pipe(parts).run(_image(4), ["circle"], VARIANTS[:2], key="d")
    assert res.elbo is None  # one class: S = 1 by definition, no ELBO pass needed
    assert torch.equal(res.heatmaps["calibrated"], res.heatmaps["baseline"])


@pytest.mark.parametrize("words, message", [([], "the class list is empty"),
                                            (["cat", "cat"], "duplicate class words ['cat']")])
def test_bad_class_lists(parts, words, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _pipe(parts).run(_image(), words, VARIANTS, key="e")


def test_antithetic_elbo_pass_and_the_fast_preset_reach_the_engine(parts):
    from t2ialign.core.config import resolve_config
    from t2ialign.core.elbo_presets import ELBO_PRESETS
    from t2ialign.core.pipeline import pipeline_from_config
    from t2ialign.plugins.tasks.segmentation import DEFAULTS

    res = _pipe(parts, elbo_timesteps=[["stratified", 1, 999, 3]], elbo_antithetic=True).run(
        _image(5), WORDS, VARIANTS[:2], key="anti")
    assert res.elbo.antithetic and res.elbo.t.numel() == 6
    assert torch.equal(res.elbo.t[0::2], res.elbo.t[1::2])  # each stratified timestep as a +eps/-eps pair
    assert res.forwards["elbo"] == 5  # ceil(3 classes x 6 samples / batch 4)
    backbone, extractor, weighting = parts
    layers = ["layers.cross_weight=[1, 1, 1, 1, 1]", "layers.self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]]"]
    config = resolve_config(DEFAULTS, overrides=["elbo.preset=fast", *layers])
    pipe = pipeline_from_config(backbone, extractor, weighting, config)
    assert pipe.elbo_antithetic is ELBO_PRESETS["fast"]["antithetic"]
    assert pipe.elbo_timesteps == ELBO_PRESETS["fast"]["timesteps"]
    plain = pipeline_from_config(backbone, extractor, weighting, resolve_config(DEFAULTS, overrides=layers))
    assert plain.elbo_antithetic is False and plain.elbo_timesteps == [[1, 999, 50]]


# ---------------------------------------------------------------- fused vs explicit self maps
def _sd15_layout_small():
    """SD1.5's UNet layout (7 groups, 64x64 top grid at 512 px) at a few channels, random weights."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _common import SD15_UNET_CONFIG, sd15_config_backbone

    from t2ialign.plugins.extractors.unet import UNetAttentionExtractor

    cfg = dict(SD15_UNET_CONFIG, block_out_channels=(16, 16, 32, 32), norm_num_groups=8, attention_head_dim=4)
    bb = sd15_config_backbone(unet_config=cfg)
    return bb, UNetAttentionExtractor(bb), 512


def _registry_backbone(tmp_path, plugin, folder, **extra):
    import json

    reg = tmp_path / "reg.yaml"
    reg.write_text(json.dumps({"backbones": {"m": {"plugin": plugin, "model": str(folder), **extra}}}))
    host = Host(registry_files=[reg])
    bb = host.backbone("m")
    return bb, host.extractor(bb)


def _parity_backbone(model, tmp_path):
    from tests.helpers.tiny_models import cached_tiny_sd, cached_tiny_sdxl
    from tests.helpers.tiny_sd3 import IMAGE_SIZE, make_tiny_sd3

    if model == "toy":
        host = Host()
        bb = host.backbone("toy")
        return bb, host.extractor(bb), 64
    if model == "tiny-sd":
        bb, ex = _registry_backbone(tmp_path, "stable_diffusion", cached_tiny_sd(), cross_weight=[1, 1, 1, 1, 1],
                                    self_weight=[[1, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
        return bb, ex, 40
    if model == "tiny-sdxl":
        bb, ex = _registry_backbone(tmp_path, "stable_diffusion_xl", cached_tiny_sdxl(), cross_weight=[1, 1, 1],
                                    self_weight=[[1, 0, 1], [0, 1, 1]])
        return bb, ex, 40
    if model == "tiny-sd3":
        folder = make_tiny_sd3(tmp_path / "sd3", with_t5=False, dual_attention=True)
        bb, ex = _registry_backbone(tmp_path, "stable_diffusion_3", folder, t5_max_length=8)
        return bb, ex, IMAGE_SIZE
    return _sd15_layout_small()


def _parity_pipes(bb, ex):
    from t2ialign.plugins.weightings import UniformWeighting

    return {mode: AlignmentPipeline(bb, ex, UniformWeighting(bb.prediction_type), self_maps=mode,
                                    elbo_timesteps=[[1, 999, 400]], collect_timesteps=[[20, 101, 40]],
                                    collect_batch_size=2) for mode in ("explicit", "fused")}


def test_fused_self_maps_give_the_explicit_heatmaps_on_the_toy_model(tmp_path):
    """End to end on the trained toy model (peaked maps): the heatmaps of both modes agree."""
    bb, ex, size = _parity_backbone("toy", tmp_path)
    heat = {m: p.run(_image(3, size), WORDS, VARIANTS[:2], key="parity") for m, p in _parity_pipes(bb, ex).items()}
    for v in heat["explicit"].heatmaps:
        assert torch.equal(heat["fused"].scores[v], heat["explicit"].scores[v])
        diff = (heat["fused"].heatmaps[v] - heat["explicit"].heatmaps[v]).abs().max()
        assert diff <= 1e-5, f"toy {v}: fused and explicit heatmaps differ by {diff:.2e}"
        assert heat["explicit"].heatmaps[v].std() > 0.05


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "sd15-layout-64x64"])
def test_fused_self_maps_propagate_like_the_explicit_maps(model, tmp_path):
    """Both modes' propagation operators from the pipeline's own attention pass, on each layout.

    A random tiny model's cross and self maps are near uniform, so its propagated maps are flat
    (ranges of 1e-7..1e-3) and a per-class min-max turns float rounding into large differences:
    the same random class maps go through both operators (with a larger logit scale, read by
    both capture modes alike) and the results are compared relative to their size. Heatmaps
    after min-max are compared end to end on the trained toy model above."""
    bb, ex, size = _parity_backbone(model, tmp_path)
    for module in bb.denoiser.modules():
        if hasattr(module, "set_processor") and hasattr(module, "scale"):
            module.scale = module.scale * 16
    z0 = bb.encode_image(torch.from_numpy(_image(3, size)).permute(2, 0, 1)[None].float().div(255))
    got = {}
    for mode, pipe in _parity_pipes(bb, ex).items():
        assert pipe.self_rows, "the parity test needs self-attention propagation"
        maps, K, _ = pipe._attention(z0, WORDS, torch.Generator().manual_seed(0), "parity")
        got[mode] = (maps, K)
    assert torch.equal(got["fused"][0], got["explicit"][0])  # cross maps untouched by the mode
    assert isinstance(got["explicit"][1], list) and not isinstance(got["fused"][1], list)
    a = torch.rand(6, *got["fused"][0].shape[-2:], generator=torch.Generator().manual_seed(1))
    spread = {mode: propagate(K, a) for mode, (_, K) in got.items()}
    ref = spread["explicit"]
    assert float((ref.flatten(1).amax(1) - ref.flatten(1).amin(1)).min()) > 0  # the maps were propagated
    diff = float((spread["fused"] - ref).abs().max() / ref.abs().max())
    assert diff <= 1e-5, f"{model}: fused and explicit propagation differ by {diff:.2e} (relative)"


def test_self_maps_option_is_checked(parts):
    with pytest.raises(ConfigError, match="self_maps must be one of"):
        _pipe(parts, self_maps="sparse")
    with pytest.raises(ConfigError, match="self_factors.dtype"):
        _pipe(parts, self_factor_dtype="int8")
    with pytest.raises(ConfigError, match="self_factors.device"):
        _pipe(parts, self_factor_device="cuda:3")


def test_half_and_host_factor_storage_stay_close(tmp_path):
    """bfloat16 / float16 factors (kept on the host) halve what is kept and move the heatmaps of
    the trained toy model only a little."""
    bb, ex, size = _parity_backbone("toy", tmp_path)
    pipes = _parity_pipes(bb, ex)
    ref = pipes["explicit"].run(_image(4, size), WORDS, VARIANTS[:1], key="k").heatmaps["baseline"]
    for dtype in ("bfloat16", "float16"):
        pipe = AlignmentPipeline(bb, ex, None, self_maps="fused", self_factor_dtype=dtype, self_factor_device="cpu",
                                 collect_timesteps=[[20, 101, 40]], collect_batch_size=2)
        got = pipe.run(_image(4, size), WORDS, VARIANTS[:1], key="k").heatmaps["baseline"]
        assert 0 < (got - ref).abs().max() < 0.05, dtype
