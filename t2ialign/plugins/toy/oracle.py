"""``toy_oracle``: does a generated toy image contain the requested shapes in the requested colours?

The toy world (``toy_shapes``) draws flat, saturated shapes in six palette colours on muted
backgrounds, so an exact detector is possible without any learned model:

1. **colour segmentation**: each pixel goes to its nearest palette colour
   (:data:`~t2ialign.plugins.toy.world.COLOURS`) when it lies within
   ``colour_radius`` (RGB Euclidean distance) of it, else to the background -- the palette
   colours are >= 100 apart and the world jitters object colours by ~12 per channel;
2. **blobs**: connected components of each colour larger than ``min_area_fraction`` of the image;
3. **shape classification** of each blob by template matching: every shape of
   :data:`~t2ialign.plugins.toy.world.CLASS_NAMES` is rendered with the world's own
   :func:`~t2ialign.plugins.toy.world.shape_mask` at the blob's area-matched scale
   (a few scales and the world's rotation range), centroid-aligned with the blob; the shape
   with the best IoU wins if that IoU reaches ``min_iou`` (else the blob is ``unknown``).

Scores per prompt with requested objects ``[(colour, shape), ...]``:
*object accuracy* = fraction of requested shapes found (any colour), *attribute accuracy* =
fraction found in the requested colour, *full-prompt accuracy* = 1 when every requested object
is found in its colour. Reported numbers are means over objects (object/attribute) and prompts
(full). ``tests/plugins/toy/test_oracle.py`` validates the detector on rendered scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from t2ialign.core.errors import InputError
from t2ialign.plugins.toy.world import CLASS_NAMES, COLOURS, shape_mask

OPTIONS: dict[str, Any] = {"colour_radius": 60.0, "min_area_fraction": 0.004, "min_iou": 0.5}

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)
#: rotations the world draws (uniform in [-0.35, 0.35]) and scale corrections tried per blob
_ANGLES = (-0.3, -0.15, 0.0, 0.15, 0.3)
_SCALES = (0.9, 1.0, 1.1)
_REF_RADIUS = 40.0


@dataclass
class Blob:
    """One detected object: colour, best shape (or ``"unknown"``), its IoU, area and centroid."""

    colour: str
    shape: str
    iou: float
    area: int
    center: tuple[float, float]


@lru_cache(maxsize=None)
def _area_per_r2(shape: str) -> float:
    """Mask area of ``shape`` divided by ``r**2`` (measured once at a large radius)."""
    size = int(_REF_RADIUS * 2.6)
    return float(shape_mask(shape, size / 2, size / 2, _REF_RADIUS, 0.0, size).sum()) / _REF_RADIUS ** 2


def _template(shape: str, r: float, angle: float, cy: float, cx: float, top: int, left: int,
              h: int, w: int) -> np.ndarray:
    """``shape`` rendered in the window ``[top:top+h, left:left+w]`` with its centroid at ``(cy, cx)``."""
    side = int(np.ceil(2.6 * r)) + 4
    probe = shape_mask(shape, side / 2, side / 2, r, angle, side)
    if not probe.any():
        return np.zeros((h, w), dtype=bool)
    py, px = ndimage.center_of_mass(probe)
    # shift so the template's centroid lands on the blob's centroid (window coordinates)
    oy, ox = side / 2 + (cy - top) - py, side / 2 + (cx - left) - px
    size = max(h, w)
    return shape_mask(shape, oy, ox, r, angle, size)[:h, :w]


class ToyOracle:
    """Shape/colour detector and accuracy metric; satisfies :class:`t2ialign.core.protocols.Metric`."""

    def __init__(self, colour_radius: float = 60.0, min_area_fraction: float = 0.004, min_iou: float = 0.5):
        self.colour_radius = float(colour_radius)
        self.min_area_fraction = float(min_area_fraction)
        self.min_iou = float(min_iou)
        self.reset()

    # ------------------------------------------------------------------ detection
    def colour_labels(self, image: np.ndarray) -> np.ndarray:
        """``H x W`` int: palette index + 1 of each pixel, 0 = background."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise InputError(f"toy oracle needs an H x W x 3 uint8 image, got shape {img.shape} dtype {img.dtype}",
                             where="metric toy_oracle", fix="pass the generated RGB image as uint8")
        dist = np.linalg.norm(img.astype(np.float32)[:, :, None, :] - _PALETTE[None, None], axis=-1)
        nearest = dist.argmin(-1)
        close = np.take_along_axis(dist, nearest[..., None], -1)[..., 0] <= self.colour_radius
        return np.where(close, nearest + 1, 0)

    def region_colour(self, image: np.ndarray, region: np.ndarray) -> tuple[str | None, float]:
        """The palette colour most of ``region``'s pixels take in ``image``, and that share.

        Shape-blind on purpose: it asks "what colour is the object *here* now", which is what a
        colour edit must change and a kept object must not, even where the model draws a shape
        the template matcher cannot name. ``None`` when no region pixel is near any palette
        colour (share is then the fraction of palette-coloured pixels, 0).
        """
        region = np.asarray(region, dtype=bool)
        if region.shape != np.asarray(image).shape[:2]:
            raise InputError(f"region of shape {region.shape} for an image of shape {np.asarray(image).shape}",
                             where="metric toy_oracle", fix="pass a boolean mask of the image's height and width")
        labels = self.colour_labels(image)[region]
        labels = labels[labels > 0]
        if not region.any() or labels.size == 0:
            return None, 0.0
        counts = np.bincount(labels, minlength=len(_PALETTE_NAMES) + 1)
        best = int(counts[1:].argmax()) + 1
        return _PALETTE_NAMES[best - 1], float(counts[best] / region.sum())

    def classify(self, blob: np.ndarray) -> tuple[str, float]:
        """Best-matching shape of a boolean blob mask and its IoU."""
        ys, xs = np.nonzero(blob)
        area = ys.size
        cy, cx = float(ys.mean()), float(xs.mean())
        best, best_iou = "unknown", 0.0
        for shape in CLASS_NAMES:
            r0 = float(np.sqrt(area / _area_per_r2(shape)))
            margin = int(np.ceil(1.6 * r0 * max(_SCALES))) + 2
            top, left = max(int(cy) - margin, 0), max(int(cx) - margin, 0)
            bottom, right = min(int(cy) + margin + 1, blob.shape[0]), min(int(cx) + margin + 1, blob.shape[1])
            window = blob[top:bottom, left:right]
            h, w = window.shape
            for scale in _SCALES:
                for angle in (_ANGLES if shape not in ("circle", "ring") else (0.0,)):
                    tpl = _template(shape, r0 * scale, angle, cy, cx, top, left, h, w)
                    inter = np.logical_and(tpl, window).sum()
                    union = tpl.sum() + area - inter  # blob pixels outside the window count as misses
                    iou = float(inter / union) if union else 0.0
                    if iou > best_iou:
                        best, best_iou = shape, iou
        return (best if best_iou >= self.min_iou else "unknown"), best_iou

    def detect(self, image: np.ndarray) -> list[Blob]:
        """Every sufficiently large single-colour blob of ``image`` with its shape."""
        labels = self.colour_labels(image)
        min_area = max(4, int(round(self.min_area_fraction * labels.size)))
        blobs = []
        for k, colour in enumerate(_PALETTE_NAMES, start=1):
            comps, n = ndimage.label(labels == k)
            if n == 0:
                continue
            sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
            for j in np.nonzero(sizes >= min_area)[0]:
                mask = comps == j + 1
                shape, iou = self.classify(mask)
                ys, xs = np.nonzero(mask)
                blobs.append(Blob(colour, shape, round(iou, 4), int(mask.sum()), (float(ys.mean()), float(xs.mean()))))
        return blobs

    def check(self, image: np.ndarray, objects: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Per-object verdicts for one image and its requested ``objects`` (dicts with shape, colour)."""
        blobs = self.detect(image)
        found_shapes = {b.shape for b in blobs}
        found_pairs = {(b.colour, b.shape) for b in blobs}
        verdicts = []
        for obj in objects:
            if obj["shape"] not in CLASS_NAMES or obj["colour"] not in COLOURS:
                raise InputError(f"object {obj} is not a toy shape/colour", where="metric toy_oracle",
                                 fix=f"shapes: {CLASS_NAMES}; colours: {list(COLOURS)}")
            verdicts.append({"shape": obj["shape"], "colour": obj["colour"],
                             "object": obj["shape"] in found_shapes,
                             "attribute": (obj["colour"], obj["shape"]) in found_pairs})
        return {"objects": verdicts, "full": bool(verdicts) and all(v["attribute"] for v in verdicts),
                "detected": [b.__dict__ for b in blobs]}

    # ------------------------------------------------------------------ metric protocol
    def reset(self) -> None:
        self._counts = np.zeros(5, dtype=np.int64)  # objects, object hits, attribute hits, prompts, full hits

    def update(self, images: Sequence[np.ndarray], objects: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Check each image against its requested objects; returns the per-image verdicts."""
        images, objects = list(images), list(objects)
        if len(images) != len(objects):
            raise InputError(f"{len(images)} images but {len(objects)} object lists", where="metric toy_oracle",
                             fix="pass one list of requested objects per image")
        out = []
        for img, objs in zip(images, objects):
            res = self.check(img, objs)
            v = res["objects"]
            self._counts += np.array([len(v), sum(x["object"] for x in v), sum(x["attribute"] for x in v),
                                      1, int(res["full"])], dtype=np.int64)
            out.append(res)
        return out

    def compute(self) -> dict[str, Any]:
        n_obj, obj_hit, attr_hit, n_prompt, full_hit = (int(x) for x in self._counts)
        frac = (lambda a, b: a / b if b else float("nan"))
        return {"object_accuracy": frac(obj_hit, n_obj), "attribute_accuracy": frac(attr_hit, n_obj),
                "full_accuracy": frac(full_hit, n_prompt), "objects": n_obj, "prompts": n_prompt}

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": torch.from_numpy(self._counts.copy())}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        self._counts += np.asarray(state["counts"], dtype=np.int64)


__all__ = ["OPTIONS", "Blob", "ToyOracle"]
