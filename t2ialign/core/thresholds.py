"""Turning per-class heatmaps into label maps, and choosing the background threshold honestly.

Label rule (method-spec §7 step 4): stack the candidate classes' heatmaps, take the argmax class
and its value; pixels whose best value is below the threshold ``θ`` become background (0).
Classes compete only through the argmax (no softmax). Ignore pixels are not decided here: the
metric drops them.

Threshold protocol. ``θ`` is a hyper-parameter and must be chosen on a *held-out* split, then
applied unchanged to the test split: run :class:`ThresholdSweep` over the held-out images,
take :meth:`ThresholdSweep.best`, then label the test images with
:func:`labels_from_heatmaps` at that threshold. The reference code instead tunes ``θ`` on the
evaluated split itself (and by a binary search that assumes a unimodal curve); that number is an
*oracle* upper bound. Tasks may offer it only under an explicitly named oracle option and must
label the result as such. The sweep here evaluates every grid point (no unimodality assumption).

Everything is model-agnostic: heatmaps are ``(C, H, W)`` tensors in ``[0, 1]``, one per candidate
class, whatever backbone produced them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from t2ialign.core.errors import InputError, NumericalError


def default_grid() -> torch.Tensor:
    """Thresholds 0.01, 0.02, ..., 0.99 (float64; ``k / 100`` is the same double as the literal)."""
    return torch.arange(1, 100, dtype=torch.float64) / 100.0


def _check_inputs(heat: torch.Tensor, class_ids: Sequence[int], where: str) -> torch.Tensor:
    if heat.ndim != 3:
        raise InputError(f"heatmaps must be a (C, H, W) tensor, got shape {tuple(heat.shape)}", where=where,
                         fix="stack one (H, W) heatmap per candidate class along dim 0")
    if heat.shape[0] != len(class_ids):
        raise InputError(f"{heat.shape[0]} heatmaps but {len(class_ids)} class ids", where=where,
                         fix="pass exactly one class id per heatmap, in the same order")
    ids = torch.as_tensor(list(class_ids), dtype=torch.long)
    if ids.numel() and int(ids.min()) < 1:
        raise InputError(f"class ids must be foreground ids >= 1, got {list(class_ids)}", where=where,
                         fix="label 0 is the background; pass only candidate foreground classes")
    if heat.numel() and not torch.isfinite(heat).all():
        raise NumericalError("heatmaps contain NaN or Inf", where=where,
                             fix="check the heatmap normalisation (a constant map min-max normalised gives 0/0)")
    return ids


def labels_from_heatmaps(heat: torch.Tensor, class_ids: Sequence[int], threshold: float) -> torch.Tensor:
    """Label map ``(H, W)`` int64 from per-class heatmaps ``(C, H, W)`` in ``[0, 1]``.

    Pixel label = ``class_ids[argmax_c heat[c]]``, or 0 (background) where ``max_c heat[c] <
    threshold``. With no candidate classes (``C == 0``) every pixel is background. Ties in the
    argmax go to the first class listed.
    """
    ids = _check_inputs(heat, class_ids, "labels_from_heatmaps")
    h, w = heat.shape[1:]
    if ids.numel() == 0:
        return torch.zeros((h, w), dtype=torch.long, device=heat.device)
    # compare in float64 so the rule is exactly the one ThresholdSweep evaluates
    best, arg = heat.to(torch.float64).max(dim=0)
    labels = ids.to(heat.device)[arg]
    return torch.where(best < float(threshold), torch.zeros_like(labels), labels)


def iou_per_class(confmat: torch.Tensor) -> torch.Tensor:
    """IoU of each class from confusion matrices ``(..., K, K)`` (rows = target, cols = prediction).

    Classes absent from both target and prediction get NaN, so :func:`mean_iou` skips them.
    """
    cm = confmat.to(torch.float64)
    tp = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-1) + cm.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(confmat: torch.Tensor) -> torch.Tensor:
    """Mean IoU x100 over classes that occurred in target or prediction (background included).

    This is the dataset-level convention of mmsegmentation and the reference code (sum the
    confusion matrix over all images, then average per-class IoUs). NaN when nothing occurred.
    """
    return torch.nanmean(iou_per_class(confmat), dim=-1) * 100.0


class ThresholdSweep:
    """Dataset-level mIoU of the label rule at every threshold of a grid, from one pass.

    Per image it computes the argmax class and max value once, then records, for every
    (threshold bucket, target, argmax class) triple, how many pixels fall there: pixel ``p`` is
    foreground for exactly the grid thresholds ``θ <= max_p`` and background for the rest. The
    state is that histogram ``(G + 1, K, K)``; the ``G`` confusion matrices follow by cumulative
    sums, so the cost per image does not grow with the grid size. States of several processes
    add up.
    """

    def __init__(self, num_classes: int, grid: Sequence[float] | torch.Tensor | None = None,
                 ignore_index: int = 255):
        if num_classes < 2:
            raise InputError(f"num_classes must count background + at least one class, got {num_classes}",
                             where="ThresholdSweep", fix="pass len(dataset.class_names)")
        if 0 <= ignore_index < num_classes:
            raise InputError(f"ignore_index {ignore_index} collides with class ids 0..{num_classes - 1}",
                             where="ThresholdSweep", fix="use an ignore value outside the class range (255)")
        g = default_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64).flatten()
        if g.numel() == 0 or not bool((g[1:] > g[:-1]).all()):
            raise InputError("threshold grid must be non-empty and strictly increasing", where="ThresholdSweep",
                             fix="pass e.g. [0.1, 0.2, ..., 0.9]")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.grid = g
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.hist = torch.zeros((self.grid.numel() + 1, k, k), dtype=torch.long)

    def update(self, heat: torch.Tensor, class_ids: Sequence[int], target: torch.Tensor) -> None:
        """Add one image: heatmaps ``(C, H, W)``, their class ids, ground truth ``(H, W)``."""
        ids = _check_inputs(heat, class_ids, "ThresholdSweep.update")
        target = torch.as_tensor(target)
        if tuple(target.shape) != tuple(heat.shape[1:]):
            raise InputError(f"target is {tuple(target.shape)} but heatmaps are {tuple(heat.shape[1:])}",
                             where="ThresholdSweep.update", fix="resize heatmaps to the mask size first")
        k = self.num_classes
        if ids.numel() and int(ids.max()) >= k:
            raise InputError(f"class id {int(ids.max())} >= num_classes {k}", where="ThresholdSweep.update",
                             fix="num_classes must be len(dataset.class_names)")
        target = target.reshape(-1).to(torch.long).cpu()
        if ids.numel():
            best, arg = heat.reshape(heat.shape[0], -1).to(torch.float64).max(dim=0)
            fg = ids[arg.cpu()]
            # n = how many grid thresholds are <= the pixel's max: foreground for grid indices < n
            n = torch.searchsorted(self.grid, best.cpu().contiguous(), right=True)
        else:
            fg = torch.zeros_like(target)
            n = torch.zeros_like(target)
        valid = target != self.ignore_index
        t, fg, n = target[valid], fg[valid], n[valid]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise InputError(f"target holds label {int(t.max()) if int(t.max()) >= k else int(t.min())} "
                             f"outside 0..{k - 1} (ignore = {self.ignore_index})", where="ThresholdSweep.update",
                             fix="convert the mask to the dataset's label convention first")
        flat = (n * k + t) * k + fg
        self.hist += torch.bincount(flat, minlength=self.hist.numel()).reshape(self.hist.shape)

    def confusion_matrices(self) -> torch.Tensor:
        """``(G, K, K)`` confusion matrices (rows = target, cols = prediction), one per threshold."""
        g = self.grid.numel()
        cum = self.hist.cumsum(0)  # cum[j] = pixels whose max lies below grid[j] (n <= j)
        total = cum[-1]
        cms = total.unsqueeze(0) - cum[:g]  # still foreground at threshold j: n > j
        cms[:, :, 0] += cum[:g].sum(-1)  # background at threshold j, counted per target class
        return cms

    def confusion_matrix(self, threshold: float) -> torch.Tensor:
        """The ``(K, K)`` confusion matrix at one grid threshold."""
        match = torch.isclose(self.grid, torch.tensor(float(threshold), dtype=torch.float64), rtol=0, atol=1e-12)
        if not bool(match.any()):
            raise InputError(f"threshold {threshold} is not on the sweep grid", where="ThresholdSweep",
                             fix=f"use one of {[round(float(x), 6) for x in self.grid[:5]]}...")
        return self.confusion_matrices()[int(match.nonzero()[0])]

    def curve(self) -> list[tuple[float, float]]:
        """``[(threshold, mIoU x100), ...]`` over the grid (NaN mIoU if nothing was added)."""
        mious = mean_iou(self.confusion_matrices())
        return [(float(t), float(m)) for t, m in zip(self.grid, mious)]

    def best(self) -> tuple[float, float]:
        """``(threshold, mIoU x100)`` with the highest mIoU; ties go to the lowest threshold."""
        if int(self.hist.sum()) == 0:
            raise InputError("no pixels were added to the threshold sweep", where="ThresholdSweep.best",
                             fix="call update() on the held-out images first")
        mious = mean_iou(self.confusion_matrices())
        idx = int(torch.argmax(torch.nan_to_num(mious, nan=-1.0)))  # argmax returns the first maximum
        return float(self.grid[idx]), float(mious[idx])

    def state(self) -> dict[str, torch.Tensor]:
        """The histogram and the grid; histograms of several processes add up."""
        return {"hist": self.hist.clone(), "grid": self.grid.clone()}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Add another process's :meth:`state` (same grid and class count)."""
        if state["hist"].shape != self.hist.shape or not torch.equal(state["grid"], self.grid):
            raise InputError("cannot merge threshold sweeps with different grids or class counts",
                             where="ThresholdSweep.merge", fix="build every process's sweep with the same options")
        self.hist += state["hist"].to(self.hist.dtype)
