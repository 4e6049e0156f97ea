"""COCO-Object (plugin ``coco_object``): the 80 COCO thing classes + background, GroupViT protocol.

Layout (mmsegmentation's ``coco_stuff164k`` preparation)::

    coco_stuff164k/images/{split}2017/{id}.jpg
    coco_stuff164k/annotations/{split}2017/{id}_labelTrainIds.png    0..79 things, 80..181 stuff, 255 unlabeled

Conversion (method-spec §8, GroupViT): ``label = gt + 1`` computed in uint8, so unlabeled 255
wraps to 0; values above 80 (stuff) become 0. Stuff and unlabeled pixels are therefore
*background and counted*; nothing is ignored. ``root`` may be ``coco_stuff164k`` or its parent.
The image list is every annotation file of the split, sorted by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t2ialign.core.errors import InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.datasets._layout import Item, MaskDataset, pair_items, plugin_options, require_dir

PLUGIN = "coco_object"
SUFFIX = "_labelTrainIds.png"

#: COCO thing classes in train-id order (label ids 1..80 after the +1 shift), background first
COCO_NAMES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
#: prompt words of the reference evaluation (method-spec §8)
_RENAME = {
    "airplane": "aeroplane", "motorcycle": "motorbike", "tie": "necktie", "couch": "sofa",
    "potted plant": "pottedplant", "dining table": "diningtable", "toilet": "closestool", "tv": "tvmonitor",
    "mouse": "computer mouse", "remote": "remote controller", "sink": "hand sink",
}
COCO_WORDS = tuple(_RENAME.get(n, n) for n in COCO_NAMES)


class COCOObject(MaskDataset):
    """COCO-Object from cocostuff164k train-id annotations."""

    NAMES = COCO_NAMES
    WORDS = COCO_WORDS
    LAYOUT = "cocostuff164k layout: coco_stuff164k/{images,annotations}/{split}2017 with *_labelTrainIds.png"

    def root_candidates(self) -> tuple[list[str], str]:
        return ["", "coco_stuff164k"], "annotations"

    def locate(self, root: Path, split: str) -> list[Item]:
        folder = f"{split}2017" if not split.endswith("2017") else split
        ann = require_dir(root / "annotations" / folder, f"annotations of split '{split}'", self.LAYOUT, self.where)
        img = require_dir(root / "images" / folder, f"images of split '{split}'", self.LAYOUT, self.where)
        ids = sorted(p.name[: -len(SUFFIX)] for p in ann.glob(f"*{SUFFIX}"))
        if not ids:
            raise InputError(f"expected {ann / ('<id>' + SUFFIX)} files, found none ({self.LAYOUT})",
                             where=self.where,
                             fix="convert the COCO-Stuff annotations to train ids (mmseg tools/dataset_converters/coco_stuff164k.py)")
        return pair_items(ids, lambda i: img / f"{i}.jpg", lambda i: ann / f"{i}{SUFFIX}", self.LAYOUT, self.where)

    def convert_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        self.check_values(raw, 181, path)
        # uint8 arithmetic on purpose: 255 (unlabeled) + 1 wraps to 0 = background, as in GroupViT
        label = (raw.astype(np.uint8) + np.uint8(1)).astype(np.int64)
        label[label > 80] = 0
        return label


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {PLUGIN: plugin_options()}},
                      description="COCO-Object: 80 COCO things + background from cocostuff164k (GroupViT protocol)")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> COCOObject | None:
    if spec.plugin != PLUGIN:
        return None
    return COCOObject(spec, split)
