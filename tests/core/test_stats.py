"""The shared statistics: confusion-matrix mIoU (against torchmetrics), bootstraps and t-intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torchmetrics.classification import MulticlassJaccardIndex

from t2ialign.core.stats import (
    ci95_from_sums,
    confusion_matrix,
    finite_mean,
    mean_ci95,
    miou_from_confusion,
    paired_bootstrap_miou,
    paired_difference,
)

NAN = float("nan")


# ------------------------------------------------------------------------------------ confusion mIoU
def test_confusion_matrix_counts_rows_target_columns_prediction_and_skips_ignore():
    target = torch.tensor([[0, 1, 1], [2, 255, 2]])
    pred = torch.tensor([[0, 1, 2], [2, 0, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.dtype == np.int64
    assert conf.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]  # the ignored pixel (pred 0) is not counted
    # another ignore label: 255 is then an ordinary (out-of-range) label, so it must not occur
    assert confusion_matrix(pred, torch.where(target == 255, 7, target), 3, ignore_index=7).tolist() == conf.tolist()


def test_miou_from_confusion_by_hand():
    conf = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    # IoU: class 0 = 1/2, class 1 = 1/2, class 2 = 1/3
    assert miou_from_confusion(conf) == pytest.approx(100 * (1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert np.isnan(miou_from_confusion(np.zeros((3, 3), dtype=np.int64)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_equals_torchmetrics_macro_jaccard_with_absent_classes(seed):
    """Summed per-image confusions give torchmetrics' dataset-level macro Jaccard (x100).

    Classes 5 and 6 never occur (left out of the mean by both), class 4 occurs only in the
    predictions (IoU 0, counted by both), and 255 pixels are ignored.
    """
    g = torch.Generator().manual_seed(seed)
    k = 7
    jaccard = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")
    total = np.zeros((k, k), dtype=np.int64)
    for _ in range(5):
        target = torch.randint(0, 4, (12, 10), generator=g)
        target[torch.rand(12, 10, generator=g) < 0.1] = 255
        pred = torch.randint(0, 5, (12, 10), generator=g)
        jaccard.update(pred, target)
        total += confusion_matrix(pred, target, k)
    ours = miou_from_confusion(total)
    assert ours == pytest.approx(float(jaccard.compute()) * 100, abs=1e-4)
    # the absent classes matter: averaging over all k classes would give a smaller number
    tp = np.diag(total)
    union = total.sum(0) + total.sum(1) - tp
    assert (union[5:] == 0).all() and union[4] > 0 and tp[4] == 0
    assert ours > 100 * np.mean(tp / np.maximum(union, 1))


def _images(rng, n, k=4, size=(6, 6), noise=0.3):
    """Per-image confusions of a noisy prediction (a) and of a perfect one (b)."""
    a, b = {}, {}
    for i in range(n):
        t = torch.from_numpy(rng.integers(0, k, size))
        p = torch.where(torch.from_numpy(rng.random(size) < noise), torch.from_numpy(rng.integers(0, k, size)), t)
        a[f"img{i:02d}"], b[f"img{i:02d}"] = confusion_matrix(p, t, k), confusion_matrix(t, t, k)
    return a, b


def test_paired_bootstrap_miou_delta_interval_and_seed():
    a, b = _images(np.random.default_rng(0), 12)
    res = paired_bootstrap_miou(a, b, 200, seed=3)
    full = miou_from_confusion(sum(b.values())) - miou_from_confusion(sum(a.values()))
    assert res["delta"] == pytest.approx(full) and res["resamples"] == 200
    # b is perfect on every image, so every resample improves on a
    assert 0 < res["ci95_low"] <= res["delta"] <= res["ci95_high"]
    assert paired_bootstrap_miou(a, b, 200, seed=3) == res
    assert paired_bootstrap_miou(a, b, 200, seed=4) != res


def test_paired_bootstrap_miou_of_identical_variants_and_edge_cases():
    a, _ = _images(np.random.default_rng(1), 5)
    same = paired_bootstrap_miou(a, a, 50, seed=0)
    assert same["delta"] == 0 and same["ci95_low"] == 0 and same["ci95_high"] == 0
    assert paired_bootstrap_miou({}, {}, 50, seed=0) == {}
    assert paired_bootstrap_miou(a, a, 0, seed=0) == {}


# ------------------------------------------------------------------------------------ t-intervals
def test_ci_helpers():
    r = mean_ci95([1.0, 2.0, 3.0])
    assert r["mean"] == pytest.approx(2.0) and r["ci95_low"] < 2.0 < r["ci95_high"]
    assert np.isnan(mean_ci95([5.0])["ci95_low"]) and mean_ci95([])["n"] == 0


def test_mean_ci95_is_the_student_t_interval_and_contains_the_mean():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=25)
    r = mean_ci95(x)
    lo, hi = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert r["ci95_low"] == pytest.approx(lo) and r["ci95_high"] == pytest.approx(hi)
    assert r["ci95_low"] < r["mean"] < r["ci95_high"] and r["n"] == 25
    assert r["std"] == pytest.approx(x.std(ddof=1))
    assert ci95_from_sums(float(x.sum()), float((x * x).sum()), len(x)) == r


def test_ci95_from_sums_edge_cases():
    assert np.isnan(ci95_from_sums(0.0, 0.0, 0)["mean"])
    one = ci95_from_sums(4.0, 16.0, 1)
    assert one["mean"] == 4.0 and np.isnan(one["ci95_high"]) and one["n"] == 1
    flat = ci95_from_sums(6.0, 12.0, 3)  # three values 2.0: zero spread, zero-width interval
    assert flat["ci95_low"] == flat["ci95_high"] == 2.0


# ------------------------------------------------------------------------------------ paired differences
def test_paired_difference_known_answers():
    d = paired_difference([1.0, 2.0, NAN], [2.0, 4.0, 5.0], n=100, seed=0)
    assert d["delta"] == pytest.approx(1.5) and d["items"] == 2
    assert d["ci95_low"] <= 1.5 <= d["ci95_high"]
    # differences 1 and 3: a resample mean is 1, 2 or 3, and both extremes have probability 1/4
    two = paired_difference([0.0, 0.0], [1.0, 3.0], n=1000, seed=0)
    assert (two["delta"], two["ci95_low"], two["ci95_high"]) == (2.0, 1.0, 3.0)
    # constant differences: a zero-width interval
    flat = paired_difference([0.0, 1.0, 2.0], [0.5, 1.5, 2.5], n=50, seed=1)
    assert flat["delta"] == flat["ci95_low"] == flat["ci95_high"] == 0.5


def test_paired_difference_without_enough_items():
    none = paired_difference([NAN, 1.0], [2.0, float("inf")], n=100, seed=0)
    assert none["items"] == 0 and np.isnan(none["delta"]) and np.isnan(none["ci95_low"])
    one = paired_difference([1.0], [3.0], n=100, seed=0)
    assert one["delta"] == 2.0 and one["items"] == 1 and np.isnan(one["ci95_high"])
    no_resamples = paired_difference([1.0, 2.0], [3.0, 3.0], n=0, seed=0)
    assert no_resamples["delta"] == 1.5 and np.isnan(no_resamples["ci95_low"])


def test_finite_mean_skips_missing_values():
    assert finite_mean([1.0, None, NAN, float("inf"), 3.0]) == 2.0
    assert np.isnan(finite_mean([])) and np.isnan(finite_mean([None, NAN]))
