"""``toy_shapes``: the dataset plugin of the toy world (one split of scenes per request).

Scenes, their seed streams and their captions come from :mod:`t2ialign.plugins.toy.world`; this
module turns registry options into a :class:`ToyShapes` split and answers the host's dataset
hook for ``toy_shapes`` and for the toy world's prompt set ``toy_prompts``
(:mod:`t2ialign.plugins.toy.prompts`).

A :class:`ToyShapes` instance also offers the world's vocabulary (``shape_names``, ``colours``)
and its caption rule (:meth:`ToyShapes.caption`), so that a task given the dataset through the
host can build new captions of the same world without importing this package.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import Sample
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.toy.prompts import OPTIONS as PROMPT_OPTIONS
from t2ialign.plugins.toy.prompts import PromptList, make_toy_prompts
from t2ialign.plugins.toy.world import (
    CLASS_NAMES,
    COLOURS,
    SPLIT_CODE,
    STREAM_PREFIX,
    WorldConfig,
    caption,
    is_split,
    render_scene,
    split_entropy,
    stream_index,
)

#: options of the registry entry (name -> default; the default's type is the accepted type)
DEFAULTS: dict[str, Any] = {
    "n_train": 10000,
    "n_val": 200,
    "n_test": 500,
    "n_stream": 500,
    "seed": 0,
    "image_size": 64,
    "zipf_exponent": 1.2,
    "small_object_prob": 0.25,
    "occlusion_prob": 0.35,
    "min_objects": 1,
    "max_objects": 4,
    "min_visible_fraction": 0.35,
}


def _unknown_split(split: str, name: str) -> InputError:
    return InputError(f"unknown split '{split}'", where=f"datasets.{name}",
                      fix=f"use one of {sorted(SPLIT_CODE)} or an extra evaluation stream "
                          f"'{STREAM_PREFIX}0', '{STREAM_PREFIX}1', ... (n_stream items each)")


class ToyShapes:
    """One split of the shapes world; satisfies :class:`t2ialign.core.protocols.Dataset`."""

    def __init__(self, split: str, length: int, cfg: WorldConfig | None = None, name: str = "toy_shapes"):
        if not is_split(split):
            raise _unknown_split(split, name)
        if length < 0:
            raise ConfigError(f"split size {length} is negative", where=f"datasets.{name}", fix="use n_* >= 0")
        self.name = name
        self.split = split
        self.cfg = cfg or WorldConfig()
        self.length = int(length)
        self.class_names = ["background", *CLASS_NAMES]
        #: the world's shape words in label order (``class_names`` without the background)
        self.shape_names: list[str] = list(CLASS_NAMES)
        #: the world's colour words and their base RGB, in palette order
        self.colours: dict[str, tuple[int, int, int]] = dict(COLOURS)

    def caption(self, objects: list[dict[str, Any]]) -> str:
        """The caption this world writes for ``objects`` (records with ``shape``, ``colour``, ``size``).

        The rule of every sample's ``prompt``; give it edited records to caption an edited scene.
        """
        return caption(objects)

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of item ``index`` (independent of every other item and split)."""
        return np.random.default_rng(np.random.SeedSequence(split_entropy(self.cfg.seed, self.split, index)))

    def __getitem__(self, index: int) -> Sample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} of size {self.length}")
        index %= self.length
        image, mask, objects, bg = render_scene(self.cfg, self.rng(index))
        classes = sorted({o["class_id"] for o in objects})
        return Sample(id=f"{self.split}_{index:06d}", image=image, mask=mask, classes=classes,
                      prompt=caption(objects), meta={"objects": objects, "background": bg})


def make_toy_shapes(options: dict[str, Any], split: str, name: str = "toy_shapes") -> ToyShapes:
    """Build a split from registry-style options (missing keys take :data:`DEFAULTS`)."""
    opts = {**DEFAULTS, **options}
    cfg = WorldConfig(**{k: opts[k] for k in WorldConfig.__dataclass_fields__})
    if not is_split(split):
        raise _unknown_split(split, name)
    size_key = "n_stream" if stream_index(split) is not None else f"n_{split}"
    return ToyShapes(split, int(opts[size_key]), cfg, name=name)


# ------------------------------------------------------------------------------------------------
# plugin hooks
# ------------------------------------------------------------------------------------------------
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {"toy_shapes": dict(DEFAULTS), "toy_prompts": dict(PROMPT_OPTIONS)}},
                      description="procedural shapes world with exact masks and rarity/size/occlusion bias, "
                                  "and its attribute-binding prompts")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> ToyShapes | PromptList | None:
    if spec.plugin == "toy_shapes":
        return make_toy_shapes(dict(spec.options), split, name=spec.name)
    if spec.plugin == "toy_prompts":
        return make_toy_prompts(dict(spec.options), split, name=spec.name)
    return None


__all__ = ["DEFAULTS", "ToyShapes", "make_toy_shapes"]
