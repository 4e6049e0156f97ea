"""The ``miou`` metric: a hand-computed example, the absent-class convention, size buckets, merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Metric
from t2ialign.plugins.metrics.segmentation import SegmentationMetrics

# Classes: 0 background, 1 cat, 2 dog, 3 bird (bird never occurs in GT or prediction).
NAMES = ["background", "cat", "dog", "bird"]
# image A (2 x 4); the 255 pixel is ignored whatever the prediction says there
TARGET_A = [[0, 0, 1, 1], [2, 2, 255, 1]]
PRED_A = [[0, 1, 1, 1], [2, 0, 2, 0]]
# image B (2 x 2): a small cat that the prediction misses
TARGET_B = [[1, 0], [0, 0]]
PRED_B = [[0, 0], [0, 0]]
# confusion matrix written out by hand, rows = target, cols = prediction:
#   A: (t0,p0) (t0,p1) (t1,p1) (t1,p1) (t2,p2) (t2,p0) (t1,p0)   B: (t1,p0) + 3 x (t0,p0)
HAND_CONFMAT = [
    [4, 1, 0, 0],
    [2, 2, 0, 0],
    [1, 0, 1, 0],
    [0, 0, 0, 0],
]
# IoU = TP / (T + P - TP):  bg 4/(5+7-4) = 1/2, cat 2/(4+3-2) = 2/5, dog 1/(2+1-1) = 1/2, bird: never occurred
HAND_IOU = {"background": 50.0, "cat": 40.0, "dog": 50.0, "bird": None}
HAND_MIOU = (50.0 + 40.0 + 50.0) / 3  # mean over the 3 classes that occurred
HAND_PRECISION = {"background": 400 / 7, "cat": 200 / 3, "dog": 100.0, "bird": None}
HAND_RECALL = {"background": 80.0, "cat": 50.0, "dog": 50.0, "bird": None}


def _hand_metric(**kw) -> SegmentationMetrics:
    m = SegmentationMetrics(class_names=NAMES, **kw)
    m.update(torch.tensor(PRED_A), torch.tensor(TARGET_A))
    m.update(np.array(PRED_B), np.array(TARGET_B))
    return m


def test_hand_computed_confusion_matrix_and_scores():
    m = _hand_metric(size_buckets=2)
    assert isinstance(m, Metric)
    assert m.confmat().tolist() == HAND_CONFMAT
    out = m.compute()
    json.dumps(out)  # JSON-serialisable as promised
    assert out["miou"] == pytest.approx(HAND_MIOU)
    assert out["classes_counted"] == 3
    for name in NAMES:
        pc = out["per_class"][name]
        for key, table in (("iou", HAND_IOU), ("precision", HAND_PRECISION), ("recall", HAND_RECALL)):
            assert (pc[key] is None) == (table[name] is None), (name, key)
            if table[name] is not None:
                assert pc[key] == pytest.approx(table[name]), (name, key)
    assert [out["per_class"][n]["support"] for n in NAMES] == [5, 4, 2, 0]
    assert out["pixel_accuracy"] == pytest.approx(100 * 7 / 11)


def test_absent_class_is_excluded_not_counted_as_zero():
    """Our mIoU averages over classes that occurred; counting bird as IoU 0 would give 35.0."""
    out = _hand_metric().compute()
    assert out["miou"] == pytest.approx(140 / 3)
    assert out["miou"] != pytest.approx((50 + 40 + 50 + 0) / 4)
    assert out["per_class"]["bird"]["iou"] is None


def test_size_buckets_by_hand():
    # fg records (area ratio, T, P, TP): A-cat (3/8, 3, 3, 2), A-dog (2/8, 2, 1, 1), B-cat (1/4, 1, 0, 0)
    out = _hand_metric(size_buckets=2).compute()
    small, large = out["size_buckets"]
    # sorted by area: B-cat (0.25), A-dog (0.25), A-cat (0.375); equal-count split 2 + 1
    assert (small["count"], large["count"]) == (2, 1)
    assert small["iou"] == pytest.approx(100 * 1 / (3 + 1 - 1))
    assert small["precision"] == pytest.approx(100.0) and small["recall"] == pytest.approx(100 / 3)
    assert large["iou"] == pytest.approx(100 * 2 / (3 + 3 - 2))
    assert out["size_bucket_edges"] == pytest.approx([0.25, 0.25, 0.375])
    assert (small["area_min"], large["area_max"]) == (0.25, 0.375)
    # more buckets than records: one bucket per record
    assert len(_hand_metric(size_buckets=10).compute()["size_buckets"]) == 3


def _random_images(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        h, w = int(torch.randint(5, 12, (1,), generator=g)), int(torch.randint(5, 12, (1,), generator=g))
        target = torch.randint(0, k, (h, w), generator=g)
        target[torch.rand(h, w, generator=g) < 0.1] = 255
        pred = torch.where(torch.rand(h, w, generator=g) < 0.6, target.clamp_max(k - 1),
                           torch.randint(0, k, (h, w), generator=g))
        yield pred, target


def test_merged_states_equal_one_process():
    images = list(_random_images(12, 5, seed=1))
    single = SegmentationMetrics(num_classes=5, size_buckets=4)
    for p, t in images:
        single.update(p, t)
    ranks = [SegmentationMetrics(num_classes=5, size_buckets=4) for _ in range(3)]
    for i, (p, t) in enumerate(images):
        ranks[i % 3].update(p, t)
    merged = SegmentationMetrics(num_classes=5, size_buckets=4)  # a fresh "rank 0" that saw no image
    for r in reversed(ranks):
        merged.merge(r.state())
    assert torch.equal(merged.confmat(), single.confmat())
    assert torch.equal(merged.records(), single.records())
    assert merged.compute() == single.compute()


def test_reset_and_state_shapes():
    m = _hand_metric()
    state = m.state()
    assert state["confmat"].shape == (4, 4) and state["records"].shape == (3, 5)
    m.reset()
    out = m.compute()
    assert out["miou"] is None and out["size_buckets"] == [] and m.confmat().sum() == 0


def test_bad_inputs_are_specific_errors():
    with pytest.raises(ConfigError, match="set_class_names"):
        SegmentationMetrics().update(torch.zeros(2, 2), torch.zeros(2, 2))
    m = SegmentationMetrics(num_classes=3)
    with pytest.raises(InputError, match="prediction holds label 7"):
        m.update(torch.full((2, 2), 7), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="target holds label 3"):
        m.update(torch.zeros(2, 2), torch.full((2, 2), 3))
    with pytest.raises(InputError, match="equal"):
        m.update(torch.zeros(2, 3), torch.zeros(2, 2))
    # a prediction of 255 on an ignored GT pixel is fine (the reference writes 255 there)
    m.update(torch.tensor([[255, 0]]), torch.tensor([[255, 0]]))
    with pytest.raises(ConfigError, match="collides"):
        SegmentationMetrics(num_classes=3, ignore_index=1)
    with pytest.raises(ConfigError):
        SegmentationMetrics(num_classes=3).set_class_names(["a", "b"])
    with pytest.raises(InputError, match="merge"):
        m.merge(SegmentationMetrics(num_classes=4).state())


def test_built_through_the_registry(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"metrics": {"m": {"plugin": "miou", "size_buckets": 2}}}))
    host = Host(registry_files=[reg])
    spec = host.registry.spec("metrics", "m")
    assert spec.options == {"num_classes": None, "ignore_index": 255, "size_buckets": 2, "class_names": None}
    m = host.metric("m")
    m.set_class_names(NAMES)
    m.update(torch.tensor(PRED_A), torch.tensor(TARGET_A))
    m.update(torch.tensor(PRED_B), torch.tensor(TARGET_B))
    assert m.compute()["miou"] == pytest.approx(HAND_MIOU)
