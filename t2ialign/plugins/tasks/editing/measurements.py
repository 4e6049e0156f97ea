"""What an edit is scored by: background fidelity outside the allowed region, mask IoU, colours."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from t2ialign.core.errors import InputError
from t2ialign.plugins.tasks.editing.editor import resize_mask
from t2ialign.plugins.tasks.editing.pairs import EditPair


def background_scores(reference: np.ndarray, edited: np.ndarray, allowed: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and mean SSIM of ``edited`` vs ``reference`` over pixels OUTSIDE ``allowed``.

    SSIM is the mean of scikit-image's full SSIM map over those pixels (each value looks at a
    7x7 window, so pixels next to the region see some of it: a slightly pessimistic score).
    """
    from skimage.metrics import structural_similarity

    if reference.shape != edited.shape or allowed.shape != reference.shape[:2]:
        raise InputError(f"shapes differ: reference {reference.shape}, edited {edited.shape}, region {allowed.shape}",
                         where="background_scores", fix="resize the images to one size first")
    bg = ~allowed
    if not bg.any():
        return {"bg_psnr": float("nan"), "bg_ssim": float("nan"), "bg_fraction": 0.0}
    diff = reference.astype(np.float64)[bg] - edited.astype(np.float64)[bg]
    mse = float((diff ** 2).mean())
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
    _, smap = structural_similarity(reference, edited, channel_axis=2, data_range=255, full=True)
    return {"bg_psnr": psnr, "bg_ssim": float(smap.mean(axis=2)[bg].mean()), "bg_fraction": float(bg.mean())}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def colour_verdicts(oracle: Any, pair: EditPair, edited: np.ndarray, source_decoded: np.ndarray,
                    size: int) -> dict[str, float]:
    """Where-aware colour checks of one edit (the toy model renders colours, not crisp shapes).

    ``colour_edited`` (colour edits only): the edited object's visible pixels now mostly take the
    target colour. ``colour_others``: every other object's pixels take the same majority colour
    as in the source's own decode (so an object the VAE already washes out is not counted
    against the edit). Both from :meth:`ToyOracle.region_colour`; 1.0 / 0.0, NaN when undefined.
    """
    out: dict[str, float] = {"colour_edited": float("nan"), "colour_others": float("nan")}
    if pair.kind == "colour":
        got, _ = oracle.region_colour(edited, resize_mask(pair.object_mask, size))
        out["colour_edited"] = float(got == pair.target_objects[pair.edited]["colour"])
    kept = []
    for i, obj in enumerate(pair.objects):
        if i == pair.edited:
            continue
        region = resize_mask(pair.scene_mask == obj["class_id"], size)
        if region.any():
            kept.append(oracle.region_colour(edited, region)[0] == oracle.region_colour(source_decoded, region)[0])
    if kept:
        out["colour_others"] = float(all(kept))
    return out
