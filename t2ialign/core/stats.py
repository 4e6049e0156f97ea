"""The statistics every task reports: confusion-matrix mIoU, bootstrap and Student-t intervals.

One home for them so that segmentation, generation and editing compute "mIoU", "95% CI" and
"paired difference" the same way (method-spec §8):

* :func:`confusion_matrix` / :func:`miou_from_confusion`: dataset-level mIoU from summed
  per-image confusion matrices, background included, averaged over the classes that occur in
  the target *or* the prediction (a class absent from both has no IoU and is left out -- the
  same convention as torchmetrics' ``MulticlassJaccardIndex(average="macro")``);
* :func:`paired_bootstrap_miou`: 95% CI of an mIoU difference by resampling images;
* :func:`mean_ci95` / :func:`ci95_from_sums`: mean with a Student-t 95% interval;
* :func:`paired_difference` / :func:`finite_mean`: per-item differences with a bootstrap interval.

Bootstraps draw from ``numpy.random.default_rng(seed)``, so a seed gives the same interval on
every machine and in every process count.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# confusion-matrix mIoU
# --------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """``(K, K)`` int64 counts of one image, rows = target label, columns = predicted label.

    Pixels whose target is ``ignore_index`` are not counted. Labels must lie in
    ``0 .. num_classes - 1`` on every counted pixel.
    """
    keep = target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    counts = torch.bincount(idx.flatten(), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).numpy().astype(np.int64)


def miou_from_confusion(conf: np.ndarray) -> float:
    """Mean IoU x100 over the classes present in target or prediction (NaN when none is)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean() * 100) if present.any() else float("nan")


def paired_bootstrap_miou(conf_a: dict[str, np.ndarray], conf_b: dict[str, np.ndarray], n: int,
                          seed: int) -> dict[str, float]:
    """``mIoU(b) - mIoU(a)`` with its 95% percentile interval over ``n`` image resamples.

    ``conf_a`` / ``conf_b`` map image ids to per-image confusion matrices of the two variants
    (the same ids); a resample draws images with replacement and re-sums both variants' matrices
    over the same draw (paired). Empty when there are no images or ``n <= 0``.
    """
    ids = sorted(conf_a)
    if not ids or n <= 0:
        return {}
    a = np.stack([conf_a[i] for i in ids])
    b = np.stack([conf_b[i] for i in ids])
    rng = np.random.default_rng(seed)
    diffs = np.empty(n)
    for k in range(n):
        pick = rng.integers(0, len(ids), len(ids))
        counts = np.bincount(pick, minlength=len(ids)).astype(np.int64)
        diffs[k] = miou_from_confusion(np.tensordot(counts, b, 1)) - miou_from_confusion(np.tensordot(counts, a, 1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"delta": miou_from_confusion(b.sum(0)) - miou_from_confusion(a.sum(0)),
            "ci95_low": float(lo), "ci95_high": float(hi), "resamples": n}


# --------------------------------------------------------------------------------------------
# Student-t intervals
# --------------------------------------------------------------------------------------------
def _no_values() -> dict[str, float]:
    return {"mean": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "std": float("nan"), "n": 0}


def mean_ci95(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean and 95% Student-t interval of ``values`` (NaN bounds with fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return _no_values()
    return ci95_from_sums(float(x.sum()), float((x * x).sum()), n)


def ci95_from_sums(total: float, total_sq: float, n: int) -> dict[str, float]:
    """Mean, standard deviation and 95% t-interval from ``sum``, ``sum of squares`` and ``n``.

    Sums rather than values so that metrics can merge their state across processes by adding.
    """
    if n == 0:
        return _no_values()
    mean = total / n
    if n < 2:
        return {"mean": mean, "ci95_low": float("nan"), "ci95_high": float("nan"), "std": float("nan"), "n": n}
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    std = math.sqrt(var)
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "std": std, "n": n}


# --------------------------------------------------------------------------------------------
# paired per-item differences
# --------------------------------------------------------------------------------------------
def finite_mean(values: Sequence[float | None]) -> float:
    """Mean of the finite entries (``None``, NaN and inf skipped); NaN when there are none."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(x.mean()) if x.size else float("nan")


def paired_difference(a: Sequence[float], b: Sequence[float], n: int, seed: int) -> dict[str, float]:
    """Mean of ``b - a`` over items where both are finite, with a 95% bootstrap interval.

    ``n`` resamples of the item differences (percentile interval); the bounds are NaN with
    ``n <= 0`` or fewer than 2 usable items. ``items`` counts the usable items.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    d = (y - x)[ok]
    if d.size == 0:
        return {"delta": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "items": 0}
    res = {"delta": float(d.mean()), "ci95_low": float("nan"), "ci95_high": float("nan"), "items": int(d.size)}
    if n > 0 and d.size > 1:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
        res["ci95_low"], res["ci95_high"] = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return res


__all__ = ["ci95_from_sums", "confusion_matrix", "finite_mean", "mean_ci95", "miou_from_confusion",
           "paired_bootstrap_miou", "paired_difference"]
