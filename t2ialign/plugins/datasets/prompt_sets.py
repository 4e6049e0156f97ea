"""Prompt datasets for compositional generation: prompt files (ABC-6K, Attend-and-Excite, DVMP) and toy prompts.

``prompt_file``: a UTF-8 text file with one prompt per line; blank lines and lines starting with
``#`` are skipped; ``limit`` keeps the first N prompts (the reference uses the first 1000 of each
set, method-spec §9). The files are not shipped: users bring them (the reference reads them from
the Hugging Face dataset ``Matrix53/elbo-t2ialign``; the original sources are named in the error
message when a file is missing).

``toy_prompts``: attribute-binding prompts of the toy world
(:func:`~t2ialign.plugins.datasets.toy_shapes.compositional_prompts`), each with its objects
(shape, colour) in ``Sample.meta["objects"]`` so that the toy oracle can check a generated image,
and its object phrases in ``Sample.phrases``.

Both are split-free: any split name gives the same prompts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import Sample
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.datasets.toy_shapes import CLASS_NAMES, COLOURS, compositional_prompts

#: where each known prompt set comes from (shown when its file is missing)
SOURCES: dict[str, str] = {
    "abc6k": "ABC-6K from StructureDiffusion (Feng et al., ICLR 2023; repo weixi-feng/Structured-Diffusion-Guidance)",
    "attend_and_excite": "the Attend-and-Excite prompt list (Chefer et al., 2023; repo yuval-alaluf/Attend-and-Excite)",
    "dvmp": "DVMP from SynGen (Rassin et al., NeurIPS 2023; repo RoyiRa/Syntax-Guided-Generation)",
}
_REFERENCE_DATA = "the reference code reads these prompt files from the Hugging Face dataset 'Matrix53/elbo-t2ialign'"

OPTIONS: dict[str, dict[str, Any]] = {
    "prompt_file": {"path": "", "limit": None, "source": None},
    "toy_prompts": {"n": 500, "seed": 0, "max_objects": 3, "limit": None},
}

_TOY_OBJECT = re.compile(r"\b(?:a|an) (" + "|".join(COLOURS) + r") (" + "|".join(CLASS_NAMES) + r")\b")


def _check_limit(limit: Any, where: str) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"limit must be a non-negative integer or null, got {limit!r}", where=where,
                          fix="e.g. limit: 1000 (the reference's cap)")
    return limit


class PromptList:
    """A list of prompt samples; satisfies :class:`t2ialign.core.protocols.Dataset`."""

    def __init__(self, name: str, split: str, samples: list[Sample]):
        self.name = name
        self.split = split
        self.class_names: list[str] = []  # prompt sets have no label ids
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]


def read_prompt_file(path: str | Path, *, name: str = "prompt_file", source: str | None = None,
                     limit: int | None = None) -> list[str]:
    """The prompts of a one-prompt-per-line UTF-8 file (blank and ``#`` lines skipped)."""
    where = f"datasets.{name}.path"
    if not str(path).strip():
        raise ConfigError(f"dataset '{name}' has no prompt file", where=where,
                          fix="set path: /path/to/prompts.txt (one prompt per line)")
    path = Path(path).expanduser()
    hint = source or SOURCES.get(name)
    if not path.is_file():
        fix = "point path at the file (one prompt per line)"
        if hint:
            fix += f"; it is {hint}; {_REFERENCE_DATA}"
        raise InputError(f"prompt file {path} does not exist", where=where, fix=fix)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {exc.start})", where=where,
                         fix="re-save it as UTF-8, one prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts", where=where,
                         fix="write one prompt per line (lines starting with # are comments)")
    return prompts if limit is None else prompts[:limit]


def toy_objects(prompt: str) -> list[dict[str, str]]:
    """``[{"colour", "shape", "phrase"}]`` of a toy prompt, in the order they are named."""
    return [{"colour": m.group(1), "shape": m.group(2), "phrase": m.group(0)} for m in _TOY_OBJECT.finditer(prompt)]


def make_prompt_file(options: dict[str, Any], split: str, name: str = "prompt_file") -> PromptList:
    opts = {**OPTIONS["prompt_file"], **options}
    limit = _check_limit(opts.get("limit"), f"datasets.{name}.limit")
    prompts = read_prompt_file(opts.get("path") or "", name=name, source=opts.get("source"), limit=limit)
    samples = [Sample(id=f"{name}_{i:05d}", prompt=p, meta={"source": str(opts["path"]), "line_index": i})
               for i, p in enumerate(prompts)]
    return PromptList(name, split, samples)


def make_toy_prompts(options: dict[str, Any], split: str, name: str = "toy_prompts") -> PromptList:
    opts = {**OPTIONS["toy_prompts"], **options}
    n, max_objects = opts["n"], opts["max_objects"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}", where=f"datasets.{name}.n", fix="e.g. n: 500")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not 2 <= max_objects <= len(COLOURS):
        raise ConfigError(f"max_objects must be an integer in [2, {len(COLOURS)}], got {max_objects!r}",
                          where=f"datasets.{name}.max_objects", fix="e.g. max_objects: 3")
    limit = _check_limit(opts.get("limit"), f"datasets.{name}.limit")
    prompts = compositional_prompts(n, seed=int(opts["seed"]), max_objects=max_objects)
    if limit is not None:
        prompts = prompts[:limit]
    samples = []
    for i, prompt in enumerate(prompts):
        objects = toy_objects(prompt)
        samples.append(Sample(id=f"{name}_{i:05d}", prompt=prompt, phrases=[o["phrase"] for o in objects],
                              meta={"objects": [{"shape": o["shape"], "colour": o["colour"]} for o in objects]}))
    return PromptList(name, split, samples)


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {k: dict(v) for k, v in OPTIONS.items()}},
                      description="prompt datasets: prompt files (ABC-6K, Attend-and-Excite, DVMP) and toy prompts")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> PromptList | None:
    if spec.plugin == "prompt_file":
        return make_prompt_file(dict(spec.options), split, name=spec.name)
    if spec.plugin == "toy_prompts":
        return make_toy_prompts(dict(spec.options), split, name=spec.name)
    return None


__all__ = ["PromptList", "SOURCES", "make_prompt_file", "make_toy_prompts", "read_prompt_file", "toy_objects"]
