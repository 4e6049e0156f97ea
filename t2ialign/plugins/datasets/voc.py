"""PASCAL VOC 2012 segmentation (plugin ``voc``): 20 classes + background, 255 = boundary (ignored).

Layout (as distributed, and as mmsegmentation prepares it)::

    VOCdevkit/VOC2012/JPEGImages/{id}.jpg
    VOCdevkit/VOC2012/SegmentationClass/{id}.png      palette PNG, index = class (official)
    VOCdevkit/VOC2012/SegmentationClassAug/{id}.png   grayscale PNG, SBD-augmented masks (optional)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt

``root`` may be the ``VOC2012`` folder, ``VOCdevkit`` or their parent. ``mask_dir: auto`` picks
``SegmentationClassAug`` when present (what the reference evaluation read; identical to
``SegmentationClass`` on the val images) and ``SegmentationClass`` otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t2ialign.core.errors import InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.datasets._layout import Item, MaskDataset, pair_items, plugin_options, read_id_list

PLUGIN = "voc"

#: VOC class names, label id order (0 = background)
VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
#: prompt words of the reference evaluation (method-spec §8)
VOC_WORDS = (
    "background", "plane", "bicycle", "bird", "boat", "bottle", "buses", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "people", "plant", "sheep", "sofa", "train", "monitor",
)


class VOCSegmentation(MaskDataset):
    """VOC2012 semantic segmentation; labels are already in our convention (0, 1-20, 255)."""

    NAMES = VOC_NAMES
    WORDS = VOC_WORDS
    LAYOUT = "VOC2012 layout: VOCdevkit/VOC2012/{JPEGImages,SegmentationClass[Aug],ImageSets/Segmentation}"

    def root_candidates(self) -> tuple[list[str], str]:
        return ["", "VOC2012", "VOCdevkit/VOC2012"], "JPEGImages"

    def locate(self, root: Path, split: str) -> list[Item]:
        mask_dir = self._mask_dir(root)
        ids = read_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt",
                           f"split file of '{split}'", self.LAYOUT, self.where)
        return pair_items(ids, lambda i: root / "JPEGImages" / f"{i}.jpg",
                          lambda i: mask_dir / f"{i}.png", self.LAYOUT, self.where)

    def _mask_dir(self, root: Path) -> Path:
        choice = str(self.spec.get("mask_dir", "auto") or "auto")
        if choice == "auto":
            for name in ("SegmentationClassAug", "SegmentationClass"):
                if (root / name).is_dir():
                    return root / name
            raise InputError(
                f"expected {root / 'SegmentationClass'} or {root / 'SegmentationClassAug'} ({self.LAYOUT})",
                where=self.where, fix="unpack the VOC2012 segmentation masks next to JPEGImages",
            )
        path = root / choice
        if not path.is_dir():
            raise InputError(f"mask folder not found: expected {path} ({self.LAYOUT})",
                             where=f"{self.where}.mask_dir",
                             fix="use mask_dir: auto, SegmentationClass or SegmentationClassAug")
        return path

    def convert_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        self.check_values(raw, 20, path)
        return raw


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {PLUGIN: plugin_options(mask_dir="auto")}},
                      description="PASCAL VOC 2012 segmentation (20 classes + background, 255 ignored)")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> VOCSegmentation | None:
    if spec.plugin != PLUGIN:
        return None
    return VOCSegmentation(spec, split)
