"""The toy world: vocabulary, scene rendering, captions and seed streams behind ``toy_shapes``.

The dataset plugin (:mod:`t2ialign.plugins.toy.dataset`) serves these scenes by split; the toy
oracle, the toy prompts, the toy CLIP and the toy model's training draw from the same world.

No pretrained diffusion model or real dataset can be downloaded in every environment, so the toolkit
ships its own small world in which the whole pipeline runs offline and the paper's claim (ELBO
calibration helps rare, small and occluded classes) can be measured against exact ground truth.

A scene is 1..``max_objects`` flat-coloured shapes on a textured background (noise, stripes,
gradient or checker). Every scene is a pure function of ``(seed, split, index)``: the random
stream is ``numpy.random.default_rng(SeedSequence([seed, SPLIT_CODE[split], index]))``, so the
``train`` / ``val`` / ``test`` splits draw from different seed streams (disjoint by construction)
and any item can be regenerated on its own, in any order, in about a millisecond. Extra evaluation
streams ``stream0``, ``stream1``, ... (``n_stream`` items each) use
``SeedSequence([seed, STREAM_CODE, k, index])``: a family of its own that no model, layer choice
or threshold of the shipped toy model was ever fitted on (see :func:`split_entropy`).

The biases the paper blames for misalignment are baked in and each has a knob:

* **rarity**: class ``k`` (1-based, in :data:`CLASS_NAMES` order) is drawn with probability
  proportional to ``1 / k ** zipf_exponent``; the default 1.2 makes the rarest class ~2.6% of
  all objects;
* **size**: with probability ``small_object_prob`` an object is drawn at about a third of the
  normal size (its caption says "small");
* **occlusion**: with probability ``occlusion_prob`` a new object is placed overlapping an
  earlier one (painted on top of it); ``min_visible_fraction`` keeps every mentioned object
  visible enough to be a fair segmentation target.

Masks hold the shape class id of each *visible* pixel (0 = background); ``Sample.meta`` has one
record per object (shape, colour, size class, full and visible area, occluded fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.draw import disk, polygon

from t2ialign.core.errors import ConfigError, InputError

#: shape classes in frequency-rank order (index + 1 = label id and Zipf rank)
CLASS_NAMES: list[str] = [
    "circle", "square", "triangle", "star", "heart",
    "cross", "hexagon", "diamond", "ring", "crescent",
]
#: colour words and their base RGB (jittered per object)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
}
SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}
#: second entropy word of the extra evaluation streams ``stream<k>``; reserved: no named split may use it
STREAM_CODE = 3
#: name prefix of the extra evaluation streams
STREAM_PREFIX = "stream"
BACKGROUNDS = ("noise", "stripes", "gradient", "checker")


@dataclass
class WorldConfig:
    """Validated knobs of the world (registry options: :data:`t2ialign.plugins.toy.dataset.DEFAULTS`)."""

    seed: int = 0
    image_size: int = 64
    zipf_exponent: float = 1.2
    small_object_prob: float = 0.25
    occlusion_prob: float = 0.35
    min_objects: int = 1
    max_objects: int = 4
    min_visible_fraction: float = 0.35

    def __post_init__(self) -> None:
        where = "datasets.toy_shapes"
        if self.image_size < 64:
            raise ConfigError(f"image_size={self.image_size} is too small", where=where,
                              fix="use image_size >= 64 (shapes are unreadable below)")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}",
                              where=where, fix="e.g. min_objects: 1, max_objects: 4")
        for key in ("small_object_prob", "occlusion_prob", "min_visible_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}={value} is not a probability", where=where, fix=f"set {key} in [0, 1]")
        if self.zipf_exponent < 0:
            raise ConfigError(f"zipf_exponent={self.zipf_exponent} is negative", where=where,
                              fix="use 0 for uniform classes, larger values for a longer tail")

    @property
    def class_probs(self) -> np.ndarray:
        """Zipf-like class probabilities, class ``k`` (1-based) proportional to ``k**-s``."""
        ranks = np.arange(1, len(CLASS_NAMES) + 1, dtype=np.float64)
        weights = ranks ** -self.zipf_exponent
        return weights / weights.sum()


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, r: float, phase: float) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([-np.cos(a), np.sin(a)], axis=1) * r  # (dy, dx); vertex 0 points up


def _outline(shape: str, r: float, angle: float) -> np.ndarray | None:
    """Polygon (N x 2 of dy, dx around the centre) of polygonal shapes, ``None`` for round ones."""
    if shape == "square":
        pts = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], dtype=float) * r * 0.8
    elif shape == "triangle":
        pts = _regular(3, r, 0.0) + np.array([r * 0.2, 0.0])  # centre the mass
    elif shape == "star":
        outer, inner = _regular(5, r, 0.0), _regular(5, r * 0.42, np.pi / 5)
        pts = np.stack([outer, inner], axis=1).reshape(-1, 2)
    elif shape == "hexagon":
        pts = _regular(6, r * 0.95, np.pi / 6)
    elif shape == "diamond":  # an elongated rhombus, so it never looks like a rotated square
        pts = np.array([[-1, 0], [0, 0.6], [1, 0], [0, -0.6]], dtype=float) * r
    elif shape == "cross":
        a, b = r * 0.9, r * 0.32
        pts = np.array([[-a, -b], [-a, b], [-b, b], [-b, a], [b, a], [b, b], [a, b],
                        [a, -b], [b, -b], [b, -a], [-b, -a], [-b, -b]], dtype=float)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        pts = np.stack([-(y - 3) / 17.0, x / 17.0], axis=1) * r
    else:
        return None
    return _rotate(pts, angle)


def shape_mask(shape: str, cy: float, cx: float, r: float, angle: float, size: int) -> np.ndarray:
    """Boolean ``size x size`` mask of one shape centred at ``(cy, cx)`` with radius ``r``."""
    mask = np.zeros((size, size), dtype=bool)
    pts = _outline(shape, r, angle)
    if pts is not None:
        rr, cc = polygon(pts[:, 0] + cy, pts[:, 1] + cx, shape=(size, size))
        mask[rr, cc] = True
    elif shape == "circle":
        mask[disk((cy, cx), r * 0.9, shape=(size, size))] = True
    elif shape == "ring":
        mask[disk((cy, cx), r, shape=(size, size))] = True
        mask[disk((cy, cx), r * 0.55, shape=(size, size))] = False
    elif shape == "crescent":
        mask[disk((cy, cx), r, shape=(size, size))] = True
        oy, ox = _rotate(np.array([[0.0, r * 0.5]]), angle)[0]
        mask[disk((cy + oy, cx + ox), r * 0.85, shape=(size, size))] = False
    else:  # pragma: no cover - CLASS_NAMES is closed
        raise InputError(f"unknown shape '{shape}'", where="toy_shapes", fix=f"use one of {CLASS_NAMES}")
    return mask


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A muted, low-saturation texture so that saturated objects stay the salient thing."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    def muted() -> np.ndarray:
        grey = rng.uniform(60, 200)
        return np.clip(grey + rng.normal(0, 18, size=3), 0, 255)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = muted(), muted()
    if kind == "noise":
        coarse = rng.normal(0, 1, size=(size // 8, size // 8, 1)).repeat(8, 0).repeat(8, 1)
        img = c1 + 20 * coarse + rng.normal(0, 10, size=(size, size, 3))
    elif kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.25)
        phase = (np.cos(theta) * xx + np.sin(theta) * yy) / period
        w = (np.sin(2 * np.pi * phase) > 0).astype(np.float32)[..., None]
        img = w * c1 + (1 - w) * c2
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        g = (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) / 1.42 + 0.5
        img = g[..., None] * c1 + (1 - g[..., None]) * c2
    else:
        cell = int(rng.integers(size // 16, size // 5))
        w = (((yy * size) // cell + (xx * size) // cell) % 2)[..., None]
        img = w * c1 + (1 - w) * c2
    img = img + rng.normal(0, 4, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), kind


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: dict[str, Any], *, colour: bool = True, size: bool = True) -> str:
    """``"a small red star"`` from an object record (attributes can be dropped)."""
    words = []
    if size and obj["size"] == "small":
        words.append("small")
    if colour:
        words.append(obj["colour"])
    words.append(obj["shape"])
    return f"{_article(words[0])} {' '.join(words)}"


def join_phrases(phrases: list[str]) -> str:
    """``"x"``, ``"x and y"``, ``"x, y and z"``."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(objects: list[dict[str, Any]]) -> str:
    """The full caption: every object with its colour and size, in drawing order."""
    return "a photo of " + join_phrases([object_phrase(o) for o in objects])


def render_scene(cfg: WorldConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], str]:
    """Draw one scene: ``(image HxWx3 uint8, mask HxW int64, object records, background kind)``."""
    size = cfg.image_size
    image, bg_kind = _background(rng, size)
    instance = np.zeros((size, size), dtype=np.int16)  # 0 = background, i + 1 = object i
    objects: list[dict[str, Any]] = []
    fulls: list[np.ndarray] = []
    probs = cfg.class_probs
    colour_names = list(COLOURS)
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(n_objects):
        cls = int(rng.choice(len(CLASS_NAMES), p=probs)) + 1
        small = bool(rng.random() < cfg.small_object_prob)
        r = size * (rng.uniform(0.06, 0.09) if small else rng.uniform(0.14, 0.24))
        angle = rng.uniform(-0.35, 0.35)
        want_overlap = bool(objects) and rng.random() < cfg.occlusion_prob
        placed = None
        for _try in range(12):
            if want_overlap:
                # centre near the rim of a random earlier object: it will cover part of it
                j = int(rng.integers(len(objects)))
                a = rng.uniform(0, 2 * np.pi)
                dist = objects[j]["radius"] * rng.uniform(0.7, 1.3) + r * 0.3
                cy, cx = objects[j]["center"][0] + dist * np.sin(a), objects[j]["center"][1] + dist * np.cos(a)
                if not (r * 0.5 <= cy <= size - r * 0.5 and r * 0.5 <= cx <= size - r * 0.5):
                    continue
            else:
                cy, cx = rng.uniform(r, size - r, size=2)
                if any(np.hypot(cy - o["center"][0], cx - o["center"][1]) < (r + o["radius"]) * 0.9 for o in objects):
                    continue
            full = shape_mask(CLASS_NAMES[cls - 1], cy, cx, r, angle, size)
            if full.sum() < 6:
                continue
            trial = instance.copy()
            trial[full] = len(objects) + 1
            # every earlier object must stay visible enough to be named in the caption
            if all((trial == i + 1).sum() >= cfg.min_visible_fraction * f.sum() for i, f in enumerate(fulls)):
                placed = (cy, cx, full, trial)
                break
        if placed is None:
            continue
        cy, cx, full, instance = placed
        colour = colour_names[int(rng.integers(len(colour_names)))]
        rgb = np.clip(np.array(COLOURS[colour], dtype=np.float64) + rng.normal(0, 12, size=3), 0, 255)
        image[full] = rgb.astype(np.uint8)
        fulls.append(full)
        objects.append({"shape": CLASS_NAMES[cls - 1], "class_id": cls, "colour": colour,
                        "size": "small" if small else "normal", "center": (float(cy), float(cx)),
                        "radius": float(r), "angle": float(angle)})
    labels = np.zeros(len(objects) + 1, dtype=np.int64)
    for i, obj in enumerate(objects):
        labels[i + 1] = obj["class_id"]
        visible = int((instance == i + 1).sum())
        area = int(fulls[i].sum())
        obj.update(area=visible, full_area=area, occluded_fraction=1.0 - visible / area)
    mask = labels[instance]
    return image, mask, objects, bg_kind


# ------------------------------------------------------------------------------------------------
# splits and prompts
# ------------------------------------------------------------------------------------------------
def stream_index(split: str) -> int | None:
    """``k`` of an extra evaluation stream ``"stream<k>"``, ``None`` for any other name."""
    rest = split[len(STREAM_PREFIX):] if split.startswith(STREAM_PREFIX) else ""
    if rest.isdigit() and (rest == "0" or not rest.startswith("0")) and int(rest) < 2 ** 32:
        return int(rest)
    return None


def is_split(split: str) -> bool:
    """Is ``split`` a split of this world (``train``/``val``/``test`` or ``stream<k>``)?"""
    return split in SPLIT_CODE or stream_index(split) is not None


def split_entropy(seed: int, split: str, index: int) -> list[int]:
    """The ``SeedSequence`` entropy of item ``index`` of ``split``.

    Named splits use ``[seed, code, index]``, stream ``k`` uses ``[seed, STREAM_CODE, k, index]``.
    Why that is disjoint: ``SeedSequence`` pads short entropy with zero words, so
    ``[seed, code, index]`` is the same stream as ``[seed, code, index, 0]``; the second word
    (``code`` in 0..2 against ``STREAM_CODE`` = 3) then tells the two families apart, and inside
    each family the remaining words differ. All words must fit in 32 bits (a larger integer is
    split into several words, which would break the argument), hence the bounds checked here.
    """
    k = stream_index(split)
    words = [seed, SPLIT_CODE[split], index] if k is None else [seed, STREAM_CODE, k, index]
    if any(not 0 <= w < 2 ** 32 for w in words):
        raise ConfigError(f"seed {seed} / index {index} of split '{split}' does not fit in 32 bits",
                          where="datasets.toy_shapes", fix="use 0 <= seed < 2**32")
    return words


def compositional_prompts(n: int, seed: int = 0, max_objects: int = 3) -> list[str]:
    """``n`` attribute-binding prompts like ``"a red star and a blue circle"``.

    Each prompt names 2..``max_objects`` objects with distinct shapes and distinct colours, so
    that a model which binds colours to the wrong shape is caught by a swap test. Shapes are
    drawn uniformly (not Zipf) so rare classes are well represented.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 97]))
    prompts = []
    for _ in range(n):
        k = int(rng.integers(2, max_objects + 1))
        shapes = rng.choice(CLASS_NAMES, size=k, replace=False)
        colours = rng.choice(list(COLOURS), size=k, replace=False)
        prompts.append(join_phrases([f"{_article(str(c))} {c} {s}" for c, s in zip(colours, shapes)]))
    return prompts
