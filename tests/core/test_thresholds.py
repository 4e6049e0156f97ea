"""Label rule and threshold sweep: the vectorised sweep equals brute force over the whole grid."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.errors import InputError, NumericalError
from t2ialign.core.thresholds import (ThresholdSweep, default_grid, iou_per_class, labels_from_heatmaps,
                                      mean_iou)
from t2ialign.plugins.metrics.segmentation import SegmentationMetrics

K = 6  # background + 5 classes


def test_label_rule_by_hand():
    heat = torch.tensor([
        [[0.9, 0.2, 0.5, 0.0]],   # class 3
        [[0.1, 0.6, 0.5, 0.3]],   # class 5
    ])
    labels = labels_from_heatmaps(heat, [3, 5], threshold=0.4)
    # argmax per pixel, tie at 0.5 goes to the first class, max 0.3 < 0.4 -> background
    assert labels.tolist() == [[3, 5, 3, 0]]
    assert labels.dtype == torch.long
    # exactly at the threshold is foreground (background only when max < threshold)
    assert labels_from_heatmaps(heat, [3, 5], threshold=0.3).tolist() == [[3, 5, 3, 5]]
    assert labels_from_heatmaps(heat, [3, 5], threshold=0.0).tolist() == [[3, 5, 3, 5]]
    assert labels_from_heatmaps(heat, [3, 5], threshold=1.0).tolist() == [[0, 0, 0, 0]]
    # no candidate classes: everything is background
    assert labels_from_heatmaps(torch.zeros(0, 2, 3), [], 0.5).tolist() == [[0, 0, 0]] * 2


def test_label_rule_errors():
    with pytest.raises(InputError, match="2 heatmaps but 1"):
        labels_from_heatmaps(torch.zeros(2, 3, 3), [1], 0.5)
    with pytest.raises(InputError, match=">= 1"):
        labels_from_heatmaps(torch.zeros(1, 3, 3), [0], 0.5)
    with pytest.raises(NumericalError):
        labels_from_heatmaps(torch.full((1, 2, 2), float("nan")), [1], 0.5)


def _images(n: int, seed: int, quantised: bool):
    """Random heatmaps of random candidate subsets, and targets with ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = 9, 7 + i % 3
        c = int(torch.randint(0, 4, (1,), generator=g))  # 0..3 candidates (0 = no candidate)
        ids = (torch.randperm(K - 1, generator=g)[:c] + 1).tolist()
        if quantised:  # values exactly on the grid exercise the "max == threshold" boundary
            heat = torch.randint(0, 101, (c, h, w), generator=g).double() / 100.0
        else:
            heat = torch.rand(c, h, w, generator=g)
        target = torch.randint(0, K, (h, w), generator=g)
        target[torch.rand(h, w, generator=g) < 0.15] = 255
        out.append((heat, ids, target))
    return out


def _brute_confmat(images, threshold: float) -> torch.Tensor:
    cm = torch.zeros(K, K, dtype=torch.long)
    for heat, ids, target in images:
        pred = labels_from_heatmaps(heat, ids, threshold)
        valid = target != 255
        cm += torch.bincount(target[valid] * K + pred[valid], minlength=K * K).reshape(K, K)
    return cm


@pytest.mark.parametrize("quantised", [False, True])
def test_sweep_equals_brute_force_over_the_grid(quantised):
    images = _images(6, seed=3 if quantised else 4, quantised=quantised)
    sweep = ThresholdSweep(K)
    for heat, ids, target in images:
        sweep.update(heat, ids, target)
    grid = default_grid()
    cms = sweep.confusion_matrices()
    brute = torch.stack([_brute_confmat(images, float(t)) for t in grid])
    assert torch.equal(cms, brute)
    brute_miou = mean_iou(brute)
    curve = sweep.curve()
    assert [t for t, _ in curve] == [float(t) for t in grid]
    assert torch.allclose(torch.tensor([m for _, m in curve], dtype=torch.float64), brute_miou)
    best_t, best_m = sweep.best()
    idx = int(torch.argmax(brute_miou))  # first maximum
    assert best_t == float(grid[idx]) and best_m == pytest.approx(float(brute_miou[idx]))
    # the curve is not flat on this data, so the choice of threshold matters
    assert float(brute_miou.max()) > float(brute_miou.min()) + 1.0


def test_best_threshold_agrees_with_the_miou_metric():
    """The sweep's number at its best threshold is what the metric plugin reports for those labels."""
    images = _images(6, seed=5, quantised=False)
    sweep = ThresholdSweep(K)
    for heat, ids, target in images:
        sweep.update(heat, ids, target)
    best_t, best_m = sweep.best()
    metric = SegmentationMetrics(num_classes=K)
    for heat, ids, target in images:
        metric.update(labels_from_heatmaps(heat, ids, best_t), target)
    assert metric.compute()["miou"] == pytest.approx(best_m)
    assert torch.equal(metric.confmat(), sweep.confusion_matrix(best_t))


def test_custom_grid_and_merge_equals_single_process():
    images = _images(9, seed=6, quantised=True)
    grid = [0.1, 0.25, 0.5, 0.75]
    single = ThresholdSweep(K, grid=grid)
    parts = [ThresholdSweep(K, grid=grid) for _ in range(2)]
    for i, (heat, ids, target) in enumerate(images):
        single.update(heat, ids, target)
        parts[i % 2].update(heat, ids, target)
    parts[0].merge(parts[1].state())
    assert torch.equal(parts[0].hist, single.hist)
    assert parts[0].curve() == single.curve() and parts[0].best() == single.best()
    assert len(single.curve()) == 4
    with pytest.raises(InputError, match="different grids"):
        single.merge(ThresholdSweep(K).state())


def test_iou_helpers_skip_absent_classes():
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    iou = iou_per_class(cm)
    assert iou[0] == pytest.approx(3 / 4) and iou[1] == pytest.approx(2 / 3) and torch.isnan(iou[2])
    assert float(mean_iou(cm)) == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


def test_sweep_errors():
    sweep = ThresholdSweep(K)
    with pytest.raises(InputError, match="no pixels"):
        sweep.best()
    with pytest.raises(InputError, match="target is"):
        sweep.update(torch.zeros(1, 3, 3), [1], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="class id 9"):
        sweep.update(torch.zeros(1, 2, 2), [9], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="outside"):
        sweep.update(torch.zeros(1, 2, 2), [1], torch.full((2, 2), 7))
    with pytest.raises(InputError, match="collides"):
        ThresholdSweep(K, ignore_index=2)
    with pytest.raises(InputError, match="increasing"):
        ThresholdSweep(K, grid=[0.5, 0.2])
    with pytest.raises(InputError, match="not on the sweep grid"):
        sweep.confusion_matrix(0.505)
