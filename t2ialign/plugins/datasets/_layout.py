"""Shared machinery of the mask datasets (VOC, Pascal Context, COCO-Object, ADE20K).

Each concrete dataset only says where its files live (:meth:`MaskDataset.locate`) and how its
label PNGs encode classes (:meth:`MaskDataset.convert_label`). Everything else is here:

* reading images of any Pillow mode (grayscale, RGBA, palette, 16-bit, CMYK) as ``H x W x 3``
  uint8 RGB, and label PNGs as class indices (never through RGB: a palette PNG's *indices*
  are the labels, its colours are decoration);
* our label convention: ``0`` = background, ``1..C`` = classes, ``255`` = ignore;
* candidate classes: from the ground-truth mask (the *referring* protocol of method-spec §8)
  or from a labels file (open-vocabulary use: JSON ``{image_id: [class names or ids]}``);
* split handling (below), an optional ``ids_file`` subset and ``limit``;
* prompt words per class (method-spec §8) that the ``class_words`` option can override.

Splits. Public ground truth of these benchmarks exists for ``train`` and ``val`` only, and papers
report on ``val``. The split a task asks for is therefore *logical*: ``"test"`` means the
benchmark split (option ``split``, default ``val``), ``"val"`` means the held-out split used to
tune hyper-parameters such as the background threshold (option ``heldout_split``, default
``train``, which is disjoint from the benchmark split). Any other name (``train``,
``train_aug``...) is used literally. ``ids_file`` restricts the benchmark split,
``heldout_ids_file`` the held-out split; ``limit`` caps either. Tuning on the benchmark split
itself (what the reference code does) is an *oracle* and is left to the task, which must say so.

A wrong layout raises :class:`~t2ialign.core.errors.InputError` naming the exact file or folder
that was expected and the layout assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from PIL import Image

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.images import load_rgb
from t2ialign.core.protocols import Sample
from t2ialign.core.specs import EntrySpec

#: label value of pixels that are excluded from every metric
IGNORE = 255

#: options every mask dataset accepts (``registry.yaml`` keys) with their defaults
COMMON_OPTIONS: dict[str, Any] = {
    "root": "",
    "split": "val",
    "heldout_split": "train",
    "classes_from": "mask",
    "labels_file": None,
    "ids_file": None,
    "heldout_ids_file": None,
    "limit": None,
    "class_words": {},
}

_FIX_ROOT = ("set T2IALIGN_DATA to the folder holding your datasets (export T2IALIGN_DATA=/data) "
             "or override 'root' of this entry with --registry FILE")


@dataclass(frozen=True)
class Item:
    """One image of a split: its id and the two files that make it."""

    id: str
    image: Path
    mask: Path


# --------------------------------------------------------------------------------------------
# file reading
# --------------------------------------------------------------------------------------------
def _deep_gray_to_rgb(arr: np.ndarray, mode: str) -> np.ndarray:
    """Rescale a 16/32-bit integer or float grayscale image to uint8 RGB.

    ``I;16*`` is 16-bit. ``I`` (32-bit) carries no declared depth, so the value range decides:
    <= 255 is taken as 8-bit data, <= 65535 as 16-bit, larger as "full range = max". ``F`` is
    taken as [0, 1] when it fits, else as [0, 255].
    """
    data = arr.astype(np.float64)
    top = float(data.max(initial=0.0))
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F":
        scale = 1.0 if top <= 1.0 else 255.0
    else:
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    gray = np.clip(np.rint(data / scale * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_label(path: Path) -> np.ndarray:
    """Read a label PNG as an ``H x W`` int64 array of the values stored in it.

    Palette PNGs give their indices (VOC's colour-coded masks are palette images), grayscale
    PNGs their values. A colour (RGB/RGBA) PNG is refused: its classes would only be
    recoverable through a colour table, which means the wrong folder was given.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                raise InputError(
                    f"label file {path} is a colour ({img.mode}) image, expected class indices "
                    "(palette or grayscale PNG)",
                    fix="point the dataset at the index-valued annotation PNGs (e.g. VOC "
                        "SegmentationClass palette PNGs, cocostuff *_labelTrainIds.png), not colour renderings",
                )
            if img.mode == "F":
                raise InputError(f"label file {path} stores floating-point values, expected integer class ids",
                                 fix="save the annotation as an 8- or 16-bit index PNG")
            if img.mode == "LA":
                img = img.convert("L")
            return np.asarray(img).astype(np.int64)
    except FileNotFoundError as exc:
        raise InputError(f"label file not found: expected {path}",
                         fix="check the dataset's annotation folder") from exc
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read label file {path}: {exc}",
                         fix="replace the file with a readable PNG") from exc


def read_id_list(path: Path, what: str, layout: str, where: str | None = None) -> list[str]:
    """Ids from a text file, one per line (first whitespace-separated field; blanks skipped)."""
    if not path.is_file():
        raise InputError(f"{what} not found: expected {path} ({layout})", where=where,
                         fix="check the dataset root and split name, or download/prepare the split file")
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            ids.append(parts[0])
    if not ids:
        raise InputError(f"{what} {path} lists no image ids", where=where,
                         fix="write one image id per line")
    return ids


def pair_items(ids: Sequence[str], image_of, mask_of, layout: str, where: str) -> list[Item]:
    """Items for ``ids`` whose image and mask files exist; the first missing file is an error.

    Checked up front (cheap ``stat`` calls) so a broken layout fails before any model runs.
    """
    items = []
    for image_id in ids:
        image, mask = Path(image_of(image_id)), Path(mask_of(image_id))
        for path, what in ((image, "image"), (mask, "label file")):
            if not path.is_file():
                raise InputError(f"{what} of '{image_id}' not found: expected {path} ({layout})", where=where,
                                 fix="check that the image and annotation folders are complete for this split")
        items.append(Item(image_id, image, mask))
    return items


def require_dir(path: Path, what: str, layout: str, where: str | None = None) -> Path:
    """``path`` if it is a folder, else an :class:`InputError` naming it and the layout."""
    if not path.is_dir():
        raise InputError(f"{what} not found: expected folder {path} ({layout})", where=where,
                         fix="check that 'root' points at the dataset folder of this layout")
    return path


def resolve_root(root: str, candidates: Sequence[str], marker: str, layout: str, where: str) -> Path:
    """Find the dataset folder under the user's ``root``.

    ``candidates`` are sub-paths tried in order (``""`` = root itself) so users may point at the
    dataset folder or at a parent (``VOCdevkit``, the data root); the first one that contains
    ``marker`` wins.
    """
    if not root:
        raise InputError("dataset root is empty", where=where, fix=_FIX_ROOT)
    base = Path(root).expanduser()
    if not base.exists():
        raise InputError(f"dataset root {base} does not exist", where=where, fix=_FIX_ROOT)
    for sub in candidates:
        cand = base / sub if sub else base
        if (cand / marker).exists():
            return cand
    tried = ", ".join(str((base / s) if s else base) for s in candidates)
    raise InputError(
        f"expected {base / candidates[0] / marker if candidates[0] else base / marker} ({layout}); "
        f"no '{marker}' found in any of: {tried}",
        where=where,
        fix="point 'root' at the dataset folder laid out as described, e.g. with --registry FILE",
    )


# --------------------------------------------------------------------------------------------
# the base dataset
# --------------------------------------------------------------------------------------------
class MaskDataset:
    """An image + label-mask segmentation dataset in our label convention.

    Subclasses set :attr:`NAMES` (canonical class names, background first), :attr:`WORDS`
    (prompt words, same order), :attr:`LAYOUT` (one line describing the folder layout, used in
    errors) and implement :meth:`locate` and :meth:`convert_label`.
    """

    NAMES: ClassVar[Sequence[str]] = ()
    WORDS: ClassVar[Sequence[str]] = ()
    LAYOUT: ClassVar[str] = ""

    def __init__(self, spec: EntrySpec, split: str):
        opts = {**COMMON_OPTIONS, **spec.options}
        self.spec = spec
        self.name = spec.name
        self.where = spec.where
        self.requested_split = split
        if split == "test":
            disk_split, ids_file = str(opts["split"]), opts["ids_file"]
        elif split == "val":
            disk_split, ids_file = str(opts["heldout_split"]), opts["heldout_ids_file"]
        else:
            disk_split, ids_file = split, None
        #: the split on disk (``val``, ``train``...) this object reads
        self.split = disk_split
        self.num_classes = len(self.NAMES)  # background included
        self.canonical_names = list(self.NAMES)
        self.class_names = self._prompt_words(opts.get("class_words") or {})
        root = self._resolve(str(opts["root"] or ""))
        self.root = root
        items = self.locate(root, disk_split)
        if ids_file:
            items = self._subset(items, Path(str(ids_file)))
        limit = opts.get("limit")
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ConfigError(f"'limit' must be a non-negative integer or null, got {limit!r}",
                                  where=f"{self.where}.limit", fix="write e.g. 'limit: 100'")
            items = items[:limit]
        self.items: list[Item] = items
        self.classes_from = str(opts["classes_from"])
        self.labels: dict[str, list[int]] | None = None
        if self.classes_from == "labels_file":
            if not opts.get("labels_file"):
                raise ConfigError("classes_from is 'labels_file' but no labels_file is given",
                                  where=f"{self.where}.labels_file",
                                  fix="set 'labels_file: /path/labels.json' ({image_id: [class names or ids]})")
            self.labels = self._read_labels(Path(str(opts["labels_file"])))
        elif self.classes_from != "mask":
            raise ConfigError(f"classes_from must be 'mask' or 'labels_file', got {self.classes_from!r}",
                              where=f"{self.where}.classes_from",
                              fix="'mask' = referring protocol (GT classes), 'labels_file' = classes from a JSON file")

    # ------------------------------------------------------------------ subclass interface
    def root_candidates(self) -> tuple[list[str], str]:
        """Sub-paths of ``root`` to try and the marker file/folder that identifies the dataset."""
        raise NotImplementedError

    def locate(self, root: Path, split: str) -> list[Item]:
        """Items of ``split`` in the order of the split file (or sorted file names)."""
        raise NotImplementedError

    def convert_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Stored label values -> our convention (0 bg, 1..C, 255 ignore); ``path`` for errors."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        item = self.items[index]
        image = load_rgb(item.image)
        mask = self.convert_label(read_label(item.mask), item.mask)
        if mask.shape != image.shape[:2]:
            raise InputError(
                f"mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but image {item.image} is "
                f"{image.shape[1]}x{image.shape[0]} (width x height)",
                where=self.where,
                fix="the annotation does not belong to this image: check the image and annotation folders",
            )
        present = [int(c) for c in np.unique(mask) if 0 < c < self.num_classes]
        if self.labels is None:
            classes = present
        else:
            if item.id not in self.labels:
                raise InputError(f"image id '{item.id}' is missing from the labels file",
                                 where=self.where,
                                 fix="list every image of the split in the labels file (use [] for none)")
            classes = self.labels[item.id]
        return Sample(id=item.id, image=image, mask=mask, classes=classes,
                      meta={"image_path": str(item.image), "mask_path": str(item.mask),
                            "gt_classes": present, "split": self.split})

    # ------------------------------------------------------------------ helpers
    def _resolve(self, root: str) -> Path:
        candidates, marker = self.root_candidates()
        return resolve_root(root, candidates, marker, self.LAYOUT, self.where)

    def _prompt_words(self, overrides: dict[str, Any]) -> list[str]:
        words = list(self.WORDS)
        words[0] = "background"
        for key, word in overrides.items():
            idx = self._class_index(key)
            if idx is None or idx == 0:
                raise ConfigError(
                    f"class_words names an unknown class {key!r}",
                    where=f"{self.where}.class_words",
                    fix=f"use class names or ids 1..{self.num_classes - 1}, e.g. {self.NAMES[1]!r}",
                )
            if not isinstance(word, str) or not word.strip():
                raise ConfigError(f"class_words[{key!r}] must be a non-empty string, got {word!r}",
                                  where=f"{self.where}.class_words")
            words[idx] = word
        return words

    def _class_index(self, key: Any) -> int | None:
        """A class id from an id, a canonical name or a default prompt word."""
        if isinstance(key, int) and not isinstance(key, bool):
            return key if 0 <= key < self.num_classes else None
        text = str(key).strip()
        if text.isdigit():
            return self._class_index(int(text))
        for table in (self.NAMES, self.WORDS):
            for i, name in enumerate(table):
                if name.strip().lower() == text.lower():
                    return i
        return None

    def _subset(self, items: list[Item], ids_file: Path) -> list[Item]:
        wanted = read_id_list(ids_file, "ids_file", "one image id per line", self.where)
        by_id = {it.id: it for it in items}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise InputError(
                f"ids_file {ids_file} lists {len(missing)} id(s) not in split '{self.split}' "
                f"(first: {missing[0]!r})",
                where=self.where,
                fix="use an ids file made for this split, or change 'split'",
            )
        return [by_id[i] for i in wanted]

    def _read_labels(self, path: Path) -> dict[str, list[int]]:
        if not path.is_file():
            raise InputError(f"labels file not found: expected {path}", where=f"{self.where}.labels_file",
                             fix="write a JSON file {image_id: [class names or ids]} or use classes_from: mask")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"labels file {path} is not valid JSON: {exc}", where=f"{self.where}.labels_file",
                             fix="write a JSON object {image_id: [class names or ids]}") from exc
        if not isinstance(data, dict):
            raise InputError(f"labels file {path} must hold a JSON object, got {type(data).__name__}",
                             where=f"{self.where}.labels_file",
                             fix="write {\"2007_000033\": [\"plane\", 15], ...}")
        out: dict[str, list[int]] = {}
        for image_id, entries in data.items():
            if not isinstance(entries, list):
                raise InputError(f"labels of '{image_id}' in {path} must be a list, got {entries!r}",
                                 where=f"{self.where}.labels_file")
            ids = set()
            for entry in entries:
                idx = self._class_index(entry)
                if idx is None or idx == 0:
                    raise InputError(
                        f"labels file {path} names unknown class {entry!r} for image '{image_id}'",
                        where=f"{self.where}.labels_file",
                        fix=f"use class names, prompt words or ids 1..{self.num_classes - 1} of {self.name}",
                    )
                ids.add(idx)
            out[str(image_id)] = sorted(ids)
        return out

    def check_values(self, label: np.ndarray, allowed_max: int, path: Path, allow_ignore: bool = True) -> None:
        """Refuse label values outside ``0..allowed_max`` (and 255 when ``allow_ignore``)."""
        bad = (label < 0) | (label > allowed_max)
        if allow_ignore:
            bad &= label != IGNORE
        if bad.any():
            values = np.unique(label[bad])[:5].tolist()
            raise InputError(
                f"label file {path} holds values {values} outside 0..{allowed_max}"
                + (" and 255" if allow_ignore else ""),
                where=f"{self.where} ({self.LAYOUT})",
                fix="these are not class-index annotations of this dataset (instance masks or another "
                    "dataset's labels?); point the mask folder at the right annotations",
            )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root={str(self.root)!r}, "
                f"items={len(self.items)}, classes={self.num_classes - 1})")


def plugin_options(**extra: Any) -> dict[str, Any]:
    """The option schema of one mask-dataset plugin: the common options plus ``extra``."""
    return {**COMMON_OPTIONS, **extra}
