"""Edit pairs from toy scenes: one object's colour or shape swapped, with the ground truth to score it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from t2ialign.core.errors import ConfigError


@dataclass
class EditPair:
    """One edit of a toy scene: which object, from what to what, and the ground truth to score it."""

    id: str
    image: np.ndarray
    source: str
    target: str
    words: list[str]  # distinct shapes of the scene (the heatmap classes), drawing order
    edit_words: list[str]  # the edited object's shape in the source
    kind: str  # "colour" or "shape"
    objects: list[dict[str, Any]]  # source objects
    target_objects: list[dict[str, Any]]
    edited: int  # index of the edited object
    object_mask: np.ndarray  # visible pixels of the edited object
    allowed: np.ndarray  # where the edit may legitimately change pixels
    scene_mask: np.ndarray | None = None  # the scene's label map (object i's pixels: objects[i]["class_id"])


def _allowed_region(obj: dict[str, Any], visible: np.ndarray, size: int) -> np.ndarray:
    """Visible pixels of the object plus a disc 20% larger than its radius (a new shape may be
    a little larger than the old one, e.g. a heart replacing a star)."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = obj["center"]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (1.2 * obj["radius"] + 1.0) ** 2
    return disc | visible


def toy_vocabulary(dataset: Any) -> tuple[list[str], list[str], Callable[[list[dict[str, Any]]], str]]:
    """``(shape words, colour words, caption)`` of the toy world ``dataset`` was drawn from.

    Asked of the dataset instance, not imported from the toy plugin (a task imports no other
    plugin's module): ``shape_names``, ``colours`` (the palette, in palette order) and
    ``caption(objects) -> str`` (the caption of a list of object records).
    """
    shape_names = list(getattr(dataset, "shape_names", None) or [])
    colours = getattr(dataset, "colours", None)
    caption = getattr(dataset, "caption", None)
    if not shape_names or not colours or not callable(caption):
        raise ConfigError(f"dataset '{getattr(dataset, 'name', '?')}' does not describe a toy world: edit pairs "
                          f"need its shape_names, colours and caption(objects)", where="config key dataset",
                          fix="the editing benchmark builds edit pairs from a toy_shapes dataset")
    return shape_names, list(colours), caption


def toy_edit_pairs(dataset: Any, n: int, *, seed: int, kinds: Sequence[str] = ("colour", "shape"),
                   min_objects: int = 2) -> list[EditPair]:
    """``n`` edit pairs from consecutive scenes of a ``toy_shapes`` split (deterministic in ``seed``).

    A scene qualifies when it has at least ``min_objects`` objects of pairwise different shapes
    (so every object is a distinct heatmap class and the oracle can tell them apart). One object
    is picked at random; its colour is changed to another palette colour or its shape to a shape
    absent from the scene, alternating by pair index through ``kinds``.
    """
    shape_names, colours, caption = toy_vocabulary(dataset)
    bad = [k for k in kinds if k not in ("colour", "shape")]
    if bad or not kinds:
        raise ConfigError(f"edit_kinds must be a non-empty list of 'colour' / 'shape', got {list(kinds)}",
                          where="config key edit_kinds", fix="use edit_kinds=[colour, shape]")
    pairs: list[EditPair] = []
    for index in range(len(dataset)):
        if len(pairs) >= n:
            break
        s = dataset[index]
        objects = s.meta["objects"]
        shapes = [o["shape"] for o in objects]
        if len(objects) < min_objects or len(set(shapes)) != len(shapes):
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, 11, index]))
        k = int(rng.integers(len(objects)))
        kind = kinds[len(pairs) % len(kinds)]
        new = [dict(o) for o in objects]
        if kind == "colour":
            choices = [c for c in colours if c != objects[k]["colour"]]
            new[k]["colour"] = choices[int(rng.integers(len(choices)))]
        else:
            choices = [c for c in shape_names if c not in shapes]
            new[k]["shape"] = choices[int(rng.integers(len(choices)))]
        visible = s.mask == objects[k]["class_id"]
        size = s.image.shape[0]
        pairs.append(EditPair(
            id=f"{s.id}_{kind}", image=s.image, source=caption(objects), target=caption(new),
            words=shapes, edit_words=[objects[k]["shape"]], kind=kind, objects=objects, target_objects=new,
            edited=k, object_mask=visible, allowed=_allowed_region(objects[k], visible, size), scene_mask=s.mask))
    return pairs

