"""Prompt datasets for compositional generation: prompt files (ABC-6K, Attend-and-Excite, DVMP).

``prompt_file``: a UTF-8 text file with one prompt per line; blank lines and lines starting with
``#`` are skipped; ``limit`` keeps the first N prompts (the reference uses the first 1000 of each
set, method-spec §9). The files are not shipped: users bring them (the reference reads them from
the Hugging Face dataset ``Matrix53/elbo-t2ialign``; the original sources are named in the error
message when a file is missing).

The toy world's prompt set ``toy_prompts`` lives with the toy world (:mod:`t2ialign.plugins.toy.prompts`).

Prompt files are split-free: any split name gives the same prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.prompt_list import PromptList, check_limit
from t2ialign.core.protocols import Sample
from t2ialign.core.specs import EntrySpec, PluginInfo

#: where each known prompt set comes from (shown when its file is missing)
SOURCES: dict[str, str] = {
    "abc6k": "ABC-6K from StructureDiffusion (Feng et al., ICLR 2023; repo weixi-feng/Structured-Diffusion-Guidance)",
    "attend_and_excite": "the Attend-and-Excite prompt list (Chefer et al., 2023; repo yuval-alaluf/Attend-and-Excite)",
    "dvmp": "DVMP from SynGen (Rassin et al., NeurIPS 2023; repo RoyiRa/Syntax-Guided-Generation)",
}
_REFERENCE_DATA = "the reference code reads these prompt files from the Hugging Face dataset 'Matrix53/elbo-t2ialign'"

OPTIONS: dict[str, dict[str, Any]] = {
    "prompt_file": {"path": "", "limit": None, "source": None},
}


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


def make_prompt_file(options: dict[str, Any], split: str, name: str = "prompt_file") -> PromptList:
    opts = {**OPTIONS["prompt_file"], **options}
    limit = check_limit(opts.get("limit"), f"datasets.{name}.limit")
    prompts = read_prompt_file(opts.get("path") or "", name=name, source=opts.get("source"), limit=limit)
    samples = [Sample(id=f"{name}_{i:05d}", prompt=p, meta={"source": str(opts["path"]), "line_index": i})
               for i, p in enumerate(prompts)]
    return PromptList(name, split, samples)


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"datasets": {k: dict(v) for k, v in OPTIONS.items()}},
                      description="prompt datasets: prompt files (ABC-6K, Attend-and-Excite, DVMP)")


@hookimpl
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> PromptList | None:
    if spec.plugin == "prompt_file":
        return make_prompt_file(dict(spec.options), split, name=spec.name)
    return None


__all__ = ["SOURCES", "make_prompt_file", "read_prompt_file"]
