"""ADE20K SceneParsing, 150 classes (plugin ``ade20k``), ADEChallengeData2016 layout.

Layout (as distributed)::

    ADEChallengeData2016/images/{training,validation}/{id}.jpg
    ADEChallengeData2016/annotations/{training,validation}/{id}.png    0 = "other", 1..150

Label 0 ("other") is scored as **background and counted** (no ``reduce_zero_label``; method-spec
§8 / §15.7), so stored labels already follow our convention. Split ``val`` reads ``validation``
and ``train`` reads ``training``. ``root`` may be ``ADEChallengeData2016`` or its parent. The
image list is every annotation PNG of the split, sorted by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t2ialign.core.errors import InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.datasets._layout import Item, MaskDataset, pair_items, plugin_options, require_dir

PLUGIN = "ade20k"
_FOLDERS = {"val": "validation", "train": "training"}

#: mmsegmentation's ADE20K class names (first name of each objectInfo150 entry), background first
ADE_NAMES = (
    "background", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class ADE20K(MaskDataset):
    """ADE20K with label 0 ("other") as counted background."""

    NAMES = ADE_NAMES
    WORDS = ADE_NAMES
    LAYOUT = "ADE20K layout: ADEChallengeData2016/{images,annotations}/{training,validation}"

    def root_candidates(self) -> tuple[list[str], str]:
        return ["", "ADEChallengeData2016", "ade/ADEChallengeData2016"], "annotations"

    def locate(self, root: Path, split: str) -> list[Item]:
        folder = _FOLDERS.get(split, split)
        ann = require_dir(root / "annotations" / folder, f"annotations of split '{split}'", self.LAYOUT, self.where)
        img = require_dir(root / "images" / folder, f"images of split '{split}'", self.LAYOUT, self.where)
        ids = sorted(p.stem for p in ann.glob("*.png"))
        if not ids:
            raise InputError(f"expected {ann / '<id>.png'} annotation files, found none ({self.LAYOUT})",
                             where=self.where, fix="unpack ADEChallengeData2016.zip under the dataset root")
        return pair_items(ids, lambda i: img / f"{i}.jpg", lambda i: ann / f"{i}.png", self.LAYOUT, self.where)

    def convert_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        self.check_values(raw, 150, path, allow_ignore=False)
        return raw


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {PLUGIN: plugin_options()}},
                      description="ADE20K 150 classes, label 0 'other' counted as background")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> ADE20K | None:
    if spec.plugin != PLUGIN:
        return None
    return ADE20K(spec, split)
