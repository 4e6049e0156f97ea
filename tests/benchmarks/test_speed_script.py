"""``benchmarks/speed.py``'s capture measurement on a tiny model: the forward and the fused path's
deferred propagation are timed apart, so neither is counted twice."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import speed  # noqa: E402


def test_capture_times_the_forward_without_the_deferred_propagation(monkeypatch, tmp_path):
    backbone, extractor, _ = speed.build_backbone("tiny-random", workdir=tmp_path)
    args = argparse.Namespace(collect_steps=2, elbo_steps=2, collect_batch=2, elbo_batch=4,
                              self_maps=["fused", "explicit"], factor_dtype=None, factor_max_mib=None)
    pipe = speed.make_pipeline(backbone, extractor, args, "fused")
    real_call = speed.SelfPropagation.__call__

    def slow_call(self, maps):  # a propagation that takes visibly longer than the tiny forward
        time.sleep(0.3)
        return real_call(self, maps)

    monkeypatch.setattr(speed.SelfPropagation, "__call__", slow_call)
    cap = speed.measure_capture(backbone, pipe, speed.bench_image(backbone), extractor, 2, ["fused", "explicit"])
    fused = cap["by_self_maps"]["fused"]
    assert fused["propagation_s"]["wall_s"] >= 0.3
    assert fused["capture_s"]["wall_s"] < 0.3  # the forward alone
    plain = cap["plain_s"]["wall_s"]
    expected = (fused["capture_s"]["wall_s"] + fused["propagation_s"]["wall_s"]) / plain
    assert abs(fused["with_propagation"]["wall"] - expected) < 0.01 * expected + 1e-3
    assert len(fused["forward_runs"]) == 2 and fused["propagation_layer_applications"] > 0
    assert "propagation_layer_applications" not in cap["by_self_maps"]["explicit"]
