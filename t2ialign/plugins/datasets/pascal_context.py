"""PASCAL Context, 59 classes + background (plugin ``pascal_context``), mmsegmentation layout.

Layout (mmsegmentation's ``pascal_context.py`` converter output)::

    VOCdevkit/VOC2010/JPEGImages/{id}.jpg
    VOCdevkit/VOC2010/SegmentationClassContext/{id}.png    0 = background, 1..59 (alphabetical)
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/{split}.txt

Label 0 is background and is *counted* (the reference does not reduce the zero label).
``root`` may be the ``VOC2010`` folder, ``VOCdevkit`` or their parent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.datasets._layout import (Item, MaskDataset, pair_items, plugin_options, read_id_list,
                                               require_dir)

PLUGIN = "pascal_context"

#: mmsegmentation's 59 Pascal Context classes (label ids 1..59), background first
CONTEXT_NAMES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track",
    "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
#: prompt words: the mmseg names with airplane / plant / monitor (method-spec §8)
_RENAME = {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"}
CONTEXT_WORDS = tuple(_RENAME.get(n, n) for n in CONTEXT_NAMES)


class PascalContext59(MaskDataset):
    """Pascal Context with the 59 most frequent classes; stored labels are our convention."""

    NAMES = CONTEXT_NAMES
    WORDS = CONTEXT_WORDS
    LAYOUT = ("Pascal Context mmseg layout: VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,"
              "ImageSets/SegmentationContext}")

    def root_candidates(self) -> tuple[list[str], str]:
        return ["", "VOC2010", "VOCdevkit/VOC2010"], "JPEGImages"

    def locate(self, root: Path, split: str) -> list[Item]:
        masks = require_dir(root / "SegmentationClassContext", "Pascal Context masks", self.LAYOUT, self.where)
        ids = read_id_list(root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                           f"split file of '{split}'", self.LAYOUT, self.where)
        return pair_items(ids, lambda i: root / "JPEGImages" / f"{i}.jpg",
                          lambda i: masks / f"{i}.png", self.LAYOUT, self.where)

    def convert_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        self.check_values(raw, 59, path)
        return raw


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {PLUGIN: plugin_options()}},
                      description="PASCAL Context 59 classes + background (mmsegmentation layout)")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> PascalContext59 | None:
    if spec.plugin != PLUGIN:
        return None
    return PascalContext59(spec, split)
