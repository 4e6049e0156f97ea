"""Segmentation metrics (metric plugin ``miou``): dataset-level mIoU, per-class scores, size buckets.

mIoU is accumulated as one confusion matrix over the whole dataset with torchmetrics'
``MulticlassJaccardIndex`` (``average="macro"``, ``ignore_index=255``), background included.
torchmetrics gives a class that never occurs in target *or* prediction a weight of 0 in the
macro average (``_jaccard_index_reduce``: ``weights[confmat.sum(1) + confmat.sum(0) == 0] = 0``),
so the mean runs over the classes that occurred at least once: the mmsegmentation / reference
convention (method-spec §8). We deliberately do *not* use torchmetrics ``MeanIoU``, which
averages per-image scores.

Also reported (all x100): per-class IoU, precision TP/P and recall TP/T with the support T (GT
pixels), and object-size buckets: every (image, foreground class present in the GT) pair is a
record ``[GT-area / image-area, T, P, TP, class]``; records sorted by area ratio are split into
``size_buckets`` equal-count buckets and each bucket's IoU/precision/recall is computed from its
summed counts. Classes that appear only in the prediction have no object size and are not
records (they still count in the confusion matrix).

State (:meth:`SegmentationMetrics.state`) is the confusion matrix plus the record table; merging
adds the matrices and concatenates the records, and :meth:`compute` sorts records by their whole
row, so N processes give the same numbers as one.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.stats import confusion_matrix
from t2ialign.core.thresholds import iou_per_class

PLUGIN = "miou"
OPTIONS: dict[str, Any] = {"num_classes": None, "ignore_index": 255, "size_buckets": 10, "class_names": None}
#: columns of a size record
RECORD_COLUMNS = ("area_ratio", "target", "pred", "tp", "class")


def _pct(num: float, den: float) -> float | None:
    return None if den <= 0 else 100.0 * num / den


class SegmentationMetrics:
    """Accumulating segmentation metric; satisfies :class:`t2ialign.core.protocols.Metric`."""

    def __init__(self, num_classes: int | None = None, ignore_index: int = 255, size_buckets: int = 10,
                 class_names: Sequence[str] | None = None, where: str = "metric miou"):
        if size_buckets < 1:
            raise ConfigError(f"size_buckets must be >= 1, got {size_buckets}", where=f"{where}.size_buckets")
        self.where = where
        self.ignore_index = int(ignore_index)
        self.size_buckets = int(size_buckets)
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self._jaccard: MulticlassJaccardIndex | None = None
        self._records: list[torch.Tensor] = []
        if class_names is not None:
            if num_classes is not None and num_classes != len(class_names):
                raise ConfigError(f"num_classes {num_classes} != {len(class_names)} class names", where=where)
            self.set_class_names(list(class_names))
        elif num_classes is not None:
            self._setup(int(num_classes))

    # ------------------------------------------------------------------ configuration
    def set_class_names(self, names: Sequence[str]) -> None:
        """Name the classes (index 0 = background); fixes ``num_classes`` if not set yet."""
        names = [str(n) for n in names]
        if self.num_classes is not None and len(names) != self.num_classes:
            raise ConfigError(f"{len(names)} class names for a metric of {self.num_classes} classes",
                              where=self.where, fix="pass dataset.class_names (background first)")
        if self.num_classes is None:
            self._setup(len(names))
        self.class_names = names

    def _setup(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (background + classes), got {num_classes}",
                              where=self.where)
        if 0 <= self.ignore_index < num_classes:
            raise ConfigError(f"ignore_index {self.ignore_index} collides with class ids 0..{num_classes - 1}",
                              where=f"{self.where}.ignore_index", fix="use 255 (or another value >= num_classes)")
        self.num_classes = num_classes
        # validate_args=False: we check value ranges ourselves once, with messages that say how to fix
        # no cache (merge changes the state behind torchmetrics' back), no implicit DDP sync (tasks merge
        # explicitly through state()/merge())
        self._jaccard = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=self.ignore_index,
                                               average="macro", validate_args=False,
                                               compute_with_cache=False, sync_on_compute=False)

    def _names(self) -> list[str]:
        assert self.num_classes is not None
        return self.class_names or [str(i) for i in range(self.num_classes)]

    # ------------------------------------------------------------------ Metric protocol
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one image: predicted labels and ground truth, both ``(H, W)`` integers."""
        if self._jaccard is None or self.num_classes is None:
            raise ConfigError("the metric does not know the number of classes", where=self.where,
                              fix="set num_classes in the metric entry or call set_class_names(dataset.class_names)")
        pred = torch.as_tensor(np.asarray(pred) if isinstance(pred, np.ndarray) else pred).to(torch.long).cpu()
        target = torch.as_tensor(np.asarray(target) if isinstance(target, np.ndarray) else target).to(torch.long).cpu()
        if pred.ndim != 2 or pred.shape != target.shape:
            raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (H, W)",
                             where=f"{self.where}.update", fix="resize the prediction to the mask size")
        k = self.num_classes
        valid = target != self.ignore_index
        for what, values in (("target", target[valid]), ("prediction", pred[valid])):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= k):
                bad = int(values.max()) if int(values.max()) >= k else int(values.min())
                raise InputError(f"{what} holds label {bad} outside 0..{k - 1} on a non-ignored pixel",
                                 where=f"{self.where}.update",
                                 fix=f"labels must be 0 (background) .. {k - 1}, ignore = {self.ignore_index}")
        self._jaccard.update(pred, target)
        # per-image counts for the size records (TP, T, P over non-ignored pixels)
        cm = torch.from_numpy(confusion_matrix(pred, target, k, self.ignore_index))
        tp, tsum, psum = cm.diagonal(), cm.sum(1), cm.sum(0)
        present = torch.nonzero(tsum > 0).flatten()
        present = present[present > 0]  # foreground objects only
        if present.numel():
            area = float(target.numel())
            rec = torch.stack([tsum[present].double() / area, tsum[present].double(), psum[present].double(),
                               tp[present].double(), present.double()], dim=1)
            self._records.append(rec)

    def confmat(self) -> torch.Tensor:
        """The accumulated ``(K, K)`` confusion matrix (rows = target, cols = prediction)."""
        if self._jaccard is None:
            raise ConfigError("the metric does not know the number of classes", where=self.where)
        return self._jaccard.confmat.clone()

    def records(self) -> torch.Tensor:
        """All size records ``(N, 5)`` float64 (see :data:`RECORD_COLUMNS`), sorted by whole row."""
        if not self._records:
            return torch.zeros((0, len(RECORD_COLUMNS)), dtype=torch.float64)
        rec = torch.cat(self._records)
        arr = rec.numpy()
        order = np.lexsort(arr.T[::-1])  # primary key: area ratio; later columns break ties
        return rec[torch.from_numpy(order)]

    def compute(self) -> dict[str, Any]:
        """JSON-ready results; IoU, precision and recall are percentages (x100)."""
        if self._jaccard is None:
            raise ConfigError("the metric does not know the number of classes", where=self.where)
        cm = self.confmat()
        names = self._names()
        tp, tsum, psum = cm.diagonal().double(), cm.sum(1).double(), cm.sum(0).double()
        iou = iou_per_class(cm)
        occurred = ~torch.isnan(iou)
        miou = None
        if bool(occurred.any()):
            with warnings.catch_warnings():
                # a metric that only received merged states never saw update(); its state is still complete
                warnings.filterwarnings("ignore", message=".*called before the ``update`` method")
                miou = float(self._jaccard.compute()) * 100.0
        union = tsum + psum - tp
        per_class = {}
        for c, name in enumerate(names):
            per_class[name] = {
                "iou": None if not bool(occurred[c]) else float(iou[c]) * 100.0,
                "precision": _pct(float(tp[c]), float(psum[c])),
                "recall": _pct(float(tp[c]), float(tsum[c])),
                "support": int(tsum[c]),
            }
        def mean_of(values: torch.Tensor, mask: torch.Tensor) -> float | None:
            return float(values[mask].mean()) * 100.0 if bool(mask.any()) else None
        safe_union = union.clamp_min(1)
        return {
            "miou": miou,
            "classes_counted": int(occurred.sum()),
            "mean_precision": mean_of(tp / psum.clamp_min(1), psum > 0),
            "mean_recall": mean_of(tp / tsum.clamp_min(1), tsum > 0),
            "mean_fp_over_union": mean_of((psum - tp) / safe_union, occurred),
            "mean_fn_over_union": mean_of((tsum - tp) / safe_union, occurred),
            "pixel_accuracy": _pct(float(tp.sum()), float(tsum.sum())),
            "pixels": int(tsum.sum()),
            "per_class": per_class,
            **self._size_buckets(),
        }

    def _size_buckets(self) -> dict[str, Any]:
        rec = self.records().numpy()
        if len(rec) == 0:
            return {"size_buckets": [], "size_bucket_edges": []}
        chunks = np.array_split(rec, min(self.size_buckets, len(rec)))
        buckets = []
        for i, chunk in enumerate(chunks):
            t, p, tp = chunk[:, 1].sum(), chunk[:, 2].sum(), chunk[:, 3].sum()
            buckets.append({
                "bucket": i,
                "count": int(len(chunk)),
                "area_min": float(chunk[0, 0]),
                "area_max": float(chunk[-1, 0]),
                "iou": _pct(tp, t + p - tp),
                "precision": _pct(tp, p),
                "recall": _pct(tp, t),
            })
        edges = [float(chunks[0][0, 0])] + [float(c[-1, 0]) for c in chunks]
        return {"size_buckets": buckets, "size_bucket_edges": edges}

    def reset(self) -> None:
        if self._jaccard is not None:
            self._jaccard.reset()
        self._records = []

    def state(self) -> dict[str, torch.Tensor]:
        """``confmat`` (K, K) int64 and ``records`` (N, 5) float64."""
        return {"confmat": self.confmat(), "records": self.records()}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Add another process's state: confusion matrices add, records concatenate."""
        other = state["confmat"]
        if self._jaccard is None or other.shape != self._jaccard.confmat.shape:
            raise InputError(f"cannot merge a {tuple(other.shape)} confusion matrix into this metric "
                             f"({self.num_classes} classes)", where=f"{self.where}.merge",
                             fix="build every process's metric with the same classes")
        self._jaccard.merge_state({"confmat": other.to(self._jaccard.confmat.dtype)})
        if state["records"].numel():
            self._records.append(state["records"].to(torch.float64))


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"metrics": {PLUGIN: dict(OPTIONS)}},
                      description="dataset-level mIoU (torchmetrics Jaccard, bg included), per-class, size buckets")


@hookimpl
def t2ialign_make_metric(spec: EntrySpec) -> SegmentationMetrics | None:
    if spec.plugin != PLUGIN:
        return None
    opts = {**OPTIONS, **spec.options}
    for key in ("num_classes", "size_buckets", "ignore_index"):
        value = opts[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}", where=f"{spec.where}.{key}")
    names = opts["class_names"]
    if names is not None and not isinstance(names, list):
        raise ConfigError(f"'class_names' must be a list, got {names!r}", where=f"{spec.where}.class_names")
    return SegmentationMetrics(num_classes=opts["num_classes"], ignore_index=opts["ignore_index"],
                               size_buckets=opts["size_buckets"], class_names=names, where=spec.where)
