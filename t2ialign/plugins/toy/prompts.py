"""``toy_prompts``: the toy world's attribute-binding prompts, with the objects each one asks for.

Prompts come from :func:`~t2ialign.plugins.toy.world.compositional_prompts`; each sample keeps
its objects (shape, colour) in ``Sample.meta["objects"]`` so that the toy oracle can check a
generated image, and its object phrases in ``Sample.phrases``. Split-free: any split name gives
the same prompts. The dataset hook answering ``toy_prompts`` is the toy world's
(:mod:`t2ialign.plugins.toy.dataset`).
"""

from __future__ import annotations

import re
from typing import Any

from t2ialign.core.errors import ConfigError
from t2ialign.core.prompt_list import PromptList, check_limit
from t2ialign.core.protocols import Sample
from t2ialign.plugins.toy.world import CLASS_NAMES, COLOURS, compositional_prompts

#: options of a ``toy_prompts`` registry entry (name -> default)
OPTIONS: dict[str, Any] = {"n": 500, "seed": 0, "max_objects": 3, "limit": None}

_TOY_OBJECT = re.compile(r"\b(?:a|an) (" + "|".join(COLOURS) + r") (" + "|".join(CLASS_NAMES) + r")\b")


def toy_objects(prompt: str) -> list[dict[str, str]]:
    """``[{"colour", "shape", "phrase"}]`` of a toy prompt, in the order they are named."""
    return [{"colour": m.group(1), "shape": m.group(2), "phrase": m.group(0)} for m in _TOY_OBJECT.finditer(prompt)]


def make_toy_prompts(options: dict[str, Any], split: str, name: str = "toy_prompts") -> PromptList:
    opts = {**OPTIONS, **options}
    n, max_objects = opts["n"], opts["max_objects"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}", where=f"datasets.{name}.n", fix="e.g. n: 500")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not 2 <= max_objects <= len(COLOURS):
        raise ConfigError(f"max_objects must be an integer in [2, {len(COLOURS)}], got {max_objects!r}",
                          where=f"datasets.{name}.max_objects", fix="e.g. max_objects: 3")
    limit = check_limit(opts.get("limit"), f"datasets.{name}.limit")
    prompts = compositional_prompts(n, seed=int(opts["seed"]), max_objects=max_objects)
    if limit is not None:
        prompts = prompts[:limit]
    samples = []
    for i, prompt in enumerate(prompts):
        objects = toy_objects(prompt)
        samples.append(Sample(id=f"{name}_{i:05d}", prompt=prompt, phrases=[o["phrase"] for o in objects],
                              meta={"objects": [{"shape": o["shape"], "colour": o["colour"]} for o in objects]}))
    return PromptList(name, split, samples)


__all__ = ["OPTIONS", "PromptList", "make_toy_prompts", "toy_objects"]
