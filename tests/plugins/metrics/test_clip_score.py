"""CLIP score on a tiny random open_clip model registered from a custom config (no weights are downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from t2ialign.core.clip_scoring import ClipScore
from t2ialign.core.errors import InputError, ModelLoadError
from t2ialign.core.host import Host
from t2ialign.plugins.metrics import clip_score as cs
from tests.helpers.tiny_clip import ARCH, tiny_clip_checkpoint

PROMPTS = ["a red star", "a blue circle", "a green square", "a yellow heart"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny arch registered with open_clip, and its random weights saved as a checkpoint file."""
    return tiny_clip_checkpoint(tmp_path_factory.mktemp("clip"))[1]


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in PROMPTS]


def _hand_scores(metric, images, prompts):
    """100 * cosine computed step by step on the same tensors, without the metric's code."""
    from PIL import Image

    with torch.no_grad():
        x = torch.stack([metric.preprocess(Image.fromarray(im)) for im in images])
        f_i = metric.model.encode_image(x).double()
        f_t = metric.model.encode_text(metric.tokenizer(prompts)).double()
    cos = (f_i * f_t).sum(-1) / (f_i.norm(dim=-1) * f_t.norm(dim=-1))
    return 100 * cos


def test_score_equals_hand_computed_cosine_and_is_unclamped(checkpoint, images):
    metric = cs.make_clip_score({"model": ARCH, "pretrained": str(checkpoint), "batch_size": 3})
    scores = metric.score(images, PROMPTS)  # batch_size 3 -> two batches
    hand = _hand_scores(metric, images, PROMPTS)
    torch.testing.assert_close(scores, hand, rtol=1e-5, atol=1e-4)  # float32 towers, batch-size dependent rounding
    # all pairs of this fixed random model, to find negative cosines: they must stay negative
    grid = metric.score([im for im in images for _ in PROMPTS], [p for _ in images for p in PROMPTS])
    assert (grid < 0).any() and (grid > 0).any()
    assert grid.abs().max() <= 100


def test_weights_really_come_from_the_checkpoint(checkpoint, images):
    loaded = cs.make_clip_score({"model": ARCH, "pretrained": str(checkpoint)})
    state = torch.load(checkpoint)
    assert torch.equal(loaded.model.state_dict()["text_projection"], state["text_projection"])


def test_mean_over_prompts_first_ci_and_merge(checkpoint, images):
    metric = cs.make_clip_score({"model": ARCH, "pretrained": str(checkpoint)})
    # prompt 0 has two images (images 0 and 1), prompts 2 and 3 one each
    # scored in the same batches as the updates below: a float32 encoder's last bits depend on
    # the batch composition, and this test is about the per-prompt averaging, not about that
    s = np.concatenate([metric.score(images[:2], [PROMPTS[0], PROMPTS[0]]).numpy(),
                        metric.score(images[2:], PROMPTS[2:]).numpy()])
    a = cs.make_clip_score({"model": ARCH, "pretrained": str(checkpoint)})
    a.update(images[:2], [PROMPTS[0], PROMPTS[0]])
    b = cs.make_clip_score({"model": ARCH, "pretrained": str(checkpoint)})
    b.update(images[2:], PROMPTS[2:])
    a.merge(b.state())
    res = a.compute()
    per_prompt = np.array([(s[0] + s[1]) / 2, s[2], s[3]])
    assert res["prompts"] == 3 and res["images"] == 4
    assert res["clip_score"] == pytest.approx(per_prompt.mean(), rel=1e-9)
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * per_prompt.std(ddof=1) / np.sqrt(3)
    assert res["ci95_low"] == pytest.approx(per_prompt.mean() - half, rel=1e-9)
    assert res["ci95_high"] == pytest.approx(per_prompt.mean() + half, rel=1e-9)
    a.reset()
    assert a.compute()["prompts"] == 0 and np.isnan(a.compute()["clip_score"])


def test_precomputed_scores_and_bad_input(checkpoint, images):
    metric = cs.make_clip_score({"model": ARCH, "pretrained": str(checkpoint)})
    metric.update(images[:2], PROMPTS[:2], scores=[10.0, 30.0])
    assert metric.compute()["clip_score"] == pytest.approx(20.0)
    with pytest.raises(InputError, match="2 images but 1 prompts"):
        metric.score(images[:2], PROMPTS[:1])
    with pytest.raises(InputError, match="uint8"):
        metric.score([images[0].astype(np.float32)], PROMPTS[:1])


def test_through_the_host_and_missing_weights(checkpoint, tmp_path, images):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"metrics": {
        "clip_tiny": {"plugin": "clip_score", "model": ARCH, "pretrained": str(checkpoint)},
        "clip_offline": {"plugin": "clip_score", "model": ARCH, "pretrained": str(tmp_path / "missing.bin")},
    }}))
    host = Host(registry_files=[reg])
    metric = host.metric("clip_tiny")
    assert isinstance(metric, ClipScore)
    with pytest.raises(ModelLoadError, match="pretrained: /path/to/checkpoint"):
        host.metric("clip_offline")
