"""The toy world's metric hooks: ``clip_score`` with ``toy: true`` is the toy CLIP, answered by the toy plugin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from t2ialign.core.clip_scoring import ClipScore
from t2ialign.core.errors import ModelLoadError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Metric
from t2ialign.plugins.metrics.clip_score import make_clip_score
from t2ialign.plugins.toy.clip import load_toy_clip
from t2ialign.plugins.toy.dataset import make_toy_shapes
from t2ialign.plugins.toy.oracle import ToyOracle


def test_clip_score_toy_is_the_toy_clip_through_the_host():
    host = Host()
    metric = host.metric("clip_score_toy")
    assert isinstance(metric, ClipScore) and metric.name == "clip_score_toy" and metric.batch_size == 32
    ds = make_toy_shapes({"n_val": 3}, "val")
    images, prompts = [ds[i].image for i in range(3)], [ds[i].prompt for i in range(3)]
    model, preprocess, tokenizer = load_toy_clip()
    by_hand = ClipScore(model, preprocess, tokenizer)
    torch.testing.assert_close(metric.score(images, prompts), by_hand.score(images, prompts), rtol=0, atol=0)
    oracle = host.metric("toy_oracle")
    assert isinstance(metric, Metric) and isinstance(oracle, ToyOracle) and isinstance(oracle, Metric)


def test_toy_options_reach_the_toy_clip(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"metrics": {"mine": {"plugin": "clip_score", "toy": True, "batch_size": 2}}}))
    metric = Host(registry_files=[reg]).metric("mine")
    assert metric.batch_size == 2 and metric.name == "mine"
    ds = make_toy_shapes({"n_val": 3}, "val")
    scores = metric.update([ds[i].image for i in range(3)], [ds[i].prompt for i in range(3)])
    assert scores.shape == (3,) and np.isfinite(scores.numpy()).all() and metric.compute()["prompts"] == 3


def test_the_generic_clip_score_says_who_offers_the_toy_clip():
    with pytest.raises(ModelLoadError, match="toy world's plugin 'toy_oracle'"):
        make_clip_score({"toy": True})
    # with the toy plugin excluded, the request reaches the generic plugin and gets that message
    with pytest.raises(ModelLoadError, match="not loaded"):
        Host(disable=["toy_oracle"]).metric("clip_score_toy")
