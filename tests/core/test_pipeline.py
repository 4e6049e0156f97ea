"""The per-image ELBO-T2IAlign pipeline on a tiny random SD model loaded through the real plugins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2ialign.core.errors import InputError
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
