"""Noun-phrase extraction for compositional generation and editing (method-spec §9).

The reference takes spaCy's ``noun_chunks`` whose root is a common noun (POS ``NOUN``) and whose
lower-cased root is not a "non-entity" word (group, bunch, piece, side, ...); the phrase is the
whole chunk text, determiners and adjectives included ("a red cube"). Three extractors:

* ``spacy``: exactly that, with an installable spaCy English model (``model`` option);
* ``rules``: a dependency-free chunker for the prompt styles of compositional benchmarks
  ("a red cube and a blue sphere", "two dogs next to a small yellow car", "a cat, a dog, and a
  bird", "a man holding an umbrella"): the prompt is cut at conjunctions, prepositions, common
  verbs and punctuation, each piece keeps its determiners / numbers / adjectives, and pieces
  whose last word (the head) is a non-entity word, a pronoun or an adjective are dropped;
* ``auto``: ``spacy`` when spaCy and its model import, else ``rules``.

Every phrase is returned as the exact substring of the prompt, so its token positions can be
found in the encoded prompt (``backbone.token_spans``). Users can bypass extraction by passing
phrases explicitly (task config ``phrases:`` or ``t2ialign generate --phrases``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from t2ialign.core.errors import InputError, ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.phrases import dedupe_phrases
from t2ialign.core.specs import EntrySpec, PluginInfo

#: heads that name an amount, a part, a place in the picture or the picture itself -- not an
#: object one could draw on its own (our list, in the spirit of the reference's stop list)
NON_ENTITY_WORDS: frozenset[str] = frozenset("""
    group bunch piece part side top bottom front back middle center centre edge corner end area
    time number lot lots couple pair dozen set kind type sort variety array assortment collection
    amount bit half rest plenty few many several all none some each other others
    row line stack pile herd flock crowd team batch series selection mix mixture
    view picture photo photograph image shot closeup close-up snapshot scene style version
    example background foreground distance left right way day thing things something stuff
    color colour shape size shade pattern surface inside outside top-down
""".split())

#: words that close the current phrase: conjunctions, prepositions, relative words, auxiliaries
#: and verbs frequent in captions ("a man holding an umbrella", "a dog sitting on a bench")
BREAK_WORDS: frozenset[str] = frozenset("""
    and or but nor with without on in at of to into onto from by for as than like near next
    under over above below behind beside besides between inside outside against along around
    through across beneath underneath atop beyond toward towards upon within via while
    is are was were be been being am has have had do does did can could will would should
    that which who whom whose where when there here then also very
    wearing holding sitting standing riding eating carrying looking walking lying laying
    watching using drinking reading playing sleeping running parked covered filled made topped
    surrounded hanging resting flying swimming jumping leaning posing waiting facing containing
    stands sits holds rides lies looks waits
""".split())

#: heads that cannot be an entity on their own (pronouns, bare numbers, frequent adjectives)
NON_HEAD_WORDS: frozenset[str] = frozenset("""
    it its it's they them their this that these those he she him her his we us you i me my
    one two three four five six seven eight nine ten a an the some another
    red green blue yellow purple orange black white brown pink gray grey silver gold golden
    small big large tiny huge little tall short long wide narrow round square-shaped
    shiny wooden old new young empty full open closed bright dark light happy sad beautiful
    pretty cute clean dirty wet dry hot cold
""".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*")
_PUNCT_BREAK = re.compile(r"[,.;:!?()\[\]\"]")


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and word[:-2].endswith(("sh", "ch", "x", "ss")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _is_non_entity(head: str, extra: frozenset[str]) -> bool:
    low = head.lower()
    return any(w in NON_ENTITY_WORDS or w in extra for w in {low, _singular(low)})


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"cannot extract phrases from {prompt!r}", where="phrase extractor",
                         fix="pass a non-empty prompt string")
    return prompt


class RuleChunker:
    """Dependency-free noun-phrase chunker (see the module docstring for the rules).

    ``extra_stop_words``: more heads to treat as non-entities (lower-case).
    """

    name = "rules"

    def __init__(self, extra_stop_words: Iterable[str] = ()):
        self.extra = frozenset(w.lower() for w in extra_stop_words)

    def chunks(self, prompt: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the candidate chunks before filtering."""
        spans: list[tuple[int, int]] = []
        current: list[tuple[int, int]] = []
        last_end = 0
        for match in _WORD.finditer(prompt):
            gap = prompt[last_end:match.start()]
            if current and _PUNCT_BREAK.search(gap):
                spans.append((current[0][0], current[-1][1]))
                current = []
            last_end = match.end()
            if match.group(0).lower() in BREAK_WORDS:
                if current:
                    spans.append((current[0][0], current[-1][1]))
                    current = []
                continue
            current.append((match.start(), match.end()))
        if current:
            spans.append((current[0][0], current[-1][1]))
        return spans

    def __call__(self, prompt: str) -> list[str]:
        prompt = _check_prompt(prompt)
        out = []
        for start, end in self.chunks(prompt):
            text = prompt[start:end]
            head = _WORD.findall(text)[-1].lower()
            if head in NON_HEAD_WORDS or head in BREAK_WORDS or head.isdigit():
                continue
            if _is_non_entity(head, self.extra):
                continue
            out.append(text)
        return dedupe_phrases(out)


class SpacyChunker:
    """The reference rule on spaCy's parse: noun chunks rooted at a common noun, minus non-entities."""

    name = "spacy"

    def __init__(self, model: str = "en_core_web_sm", extra_stop_words: Iterable[str] = ()):
        try:
            import spacy
        except ImportError as exc:
            raise ModelLoadError("spaCy is not installed", where="phrases.spacy",
                                 fix="pip install spacy && python -m spacy download en_core_web_sm, "
                                     "or use the built-in 'rules' extractor") from exc
        try:
            self.nlp = spacy.load(model)
        except OSError as exc:
            raise ModelLoadError(f"spaCy model '{model}' is not installed", where="phrases.spacy",
                                 fix=f"python -m spacy download {model}, or use the built-in 'rules' "
                                     "extractor") from exc
        self.model = model
        self.extra = frozenset(w.lower() for w in extra_stop_words)

    def __call__(self, prompt: str) -> list[str]:
        prompt = _check_prompt(prompt)
        doc = self.nlp(prompt)
        out = [chunk.text for chunk in doc.noun_chunks
               if chunk.root.pos_ == "NOUN" and not _is_non_entity(chunk.root.text, self.extra)]
        return dedupe_phrases(out)


def make_extractor(plugin: str, options: dict[str, Any] | None = None) -> RuleChunker | SpacyChunker:
    """Build ``auto`` / ``spacy`` / ``rules`` from registry-style options."""
    opts = {**OPTIONS.get(plugin, {}), **(options or {})}
    extra = list(opts.get("extra_stop_words") or [])
    if plugin == "rules":
        return RuleChunker(extra)
    if plugin == "spacy":
        return SpacyChunker(str(opts.get("model") or "en_core_web_sm"), extra)
    if plugin == "auto":
        try:
            return SpacyChunker(str(opts.get("model") or "en_core_web_sm"), extra)
        except ModelLoadError:  # spaCy or its English model missing: the rules cover benchmark prompts
            return RuleChunker(extra)
    raise InputError(f"unknown phrase extractor '{plugin}'", where="phrases", fix="use auto, spacy or rules")


OPTIONS: dict[str, dict[str, Any]] = {
    "auto": {"model": "en_core_web_sm", "extra_stop_words": []},
    "spacy": {"model": "en_core_web_sm", "extra_stop_words": []},
    "rules": {"extra_stop_words": []},
}


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"phrases": {k: dict(v) for k, v in OPTIONS.items()}},
                      description="noun-phrase extractors: spaCy noun chunks, or built-in rules without spaCy")


@hookimpl
def t2ialign_make_phrase_extractor(spec: EntrySpec) -> RuleChunker | SpacyChunker | None:
    if spec.plugin not in OPTIONS:
        return None
    return make_extractor(spec.plugin, dict(spec.options))


__all__ = [
    "BREAK_WORDS",
    "NON_ENTITY_WORDS",
    "RuleChunker",
    "SpacyChunker",
    "make_extractor",
]
