"""Token alignment of a source and a target prompt (Prompt-to-Prompt's word correspondence).

Words are whitespace-separated; ``difflib`` matches the two word lists and the rules of the
package docstring (:mod:`t2ialign.plugins.tasks.editing`, step 2) turn the match into a map from
target token positions to source token positions, which the attention controller follows.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from t2ialign.core.errors import ConfigError, InputError


@dataclass
class PromptAlignment:
    """Word and token correspondence of a source and a target prompt.

    ``mapping[j]``: source token position whose attention target position ``j`` takes, ``-1``
    where the target keeps its own (length = the backbone's text axis, BOS at 0).
    ``changed``: source word indices that differ in the target (for a pure insertion: the index
    of the source word the insertion precedes).
    """

    source_words: list[str]
    target_words: list[str]
    source_spans: list[list[int]]
    target_spans: list[list[int]]
    mapping: torch.Tensor
    changed: list[int]

    @property
    def aligned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target_positions, source_positions)`` of every aligned token."""
        tgt = torch.nonzero(self.mapping >= 0).flatten()
        return tgt, self.mapping[tgt]


def _word_spans(tokenizer: Any, prompt: str, max_tokens: int, where: str) -> tuple[list[str], list[list[int]]]:
    words = prompt.split()
    if not words:
        raise InputError("the prompt is empty", where=where, fix="give a caption such as 'a red circle'")
    spans, pos, joined = [], 1, []
    for w in words:
        ids = list(tokenizer(w, add_special_tokens=False)["input_ids"])
        spans.append(list(range(pos, pos + len(ids))))
        joined += ids
        pos += len(ids)
    full = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if full != joined:  # only a tokenizer that merges across spaces could do this
        raise InputError(f"the tokenizer does not split '{prompt}' at spaces", where=where,
                         fix="editing aligns prompts word by word; use a CLIP-BPE backbone")
    if pos >= max_tokens:  # BOS + words + EOS must fit
        raise InputError(f"the prompt needs {pos + 1} tokens, more than the {max_tokens} the model reads",
                         where=where, fix="shorten the prompt")
    return words, spans


#: how replaced words are aligned (Prompt-to-Prompt's edit kinds)
ALIGNMENT_MODES = ("auto", "replace", "refine")


def align_prompts(tokenizer: Any, source: str, target: str, max_tokens: int = 77,
                  mode: str = "auto") -> PromptAlignment:
    """Token alignment of ``target`` to ``source`` (rules in the package docstring).

    ``mode``: ``auto`` maps unchanged words and replaced runs of the same token count, lets
    insertions keep their own attention; ``replace`` (the word swap) is ``auto`` but refuses an
    edit that is not one -- a replaced run of another token count, an insertion or a deletion --
    instead of quietly treating it otherwise; ``refine`` maps unchanged words only, so every new
    or replaced word keeps its own attention (adding detail: "a circle" -> "a striped circle").
    """
    if mode not in ALIGNMENT_MODES:
        raise ConfigError(f"alignment must be one of {list(ALIGNMENT_MODES)}, got {mode!r}",
                          where="config key alignment",
                          fix="replace = word swap, refine = added words, auto = whichever fits each word")
    s_words, s_spans = _word_spans(tokenizer, source, max_tokens, "source prompt")
    t_words, t_spans = _word_spans(tokenizer, target, max_tokens, "target prompt")
    mapping = torch.full((max_tokens,), -1, dtype=torch.long)
    mapping[0] = 0
    changed: list[int] = []
    matcher = difflib.SequenceMatcher(a=[w.lower() for w in s_words], b=[w.lower() for w in t_words], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        s_tok = [p for k in range(i1, i2) for p in s_spans[k]]
        t_tok = [p for k in range(j1, j2) for p in t_spans[k]]
        swap = tag == "replace" and len(s_tok) == len(t_tok)
        if mode == "replace" and tag != "equal" and not swap:
            raise InputError(
                f"'{' '.join(s_words[i1:i2]) or '(nothing)'}' -> '{' '.join(t_words[j1:j2]) or '(nothing)'}' is not "
                f"a word swap of equal token length", where="alignment=replace",
                fix="use alignment=refine (or auto) for added, removed or differently long words")
        if tag == "equal" or (swap and mode != "refine"):
            for a, b in zip(t_tok, s_tok):
                mapping[a] = b
        if tag != "equal":
            changed.extend(range(i1, i2) if i2 > i1 else [min(i1, len(s_words) - 1)])
    end_s = s_spans[-1][-1] + 1
    end_t = t_spans[-1][-1] + 1
    for k in range(max_tokens - end_t):  # EOS and padding, in order
        if end_s + k < max_tokens:
            mapping[end_t + k] = end_s + k
    return PromptAlignment(s_words, t_words, s_spans, t_spans, mapping, sorted(set(changed)))


def _bare(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum() or c == "-")


def edited_nouns(alignment: PromptAlignment, nouns: Sequence[str]) -> list[str]:
    """The nouns of ``nouns`` whose object the edit touches.

    A changed word that is itself a noun is edited; a changed attribute belongs to the first noun
    after it (English puts adjectives before their noun: "a *red* circle"), or to the last noun
    before it when none follows.
    """
    position: dict[int, str] = {}
    for noun in nouns:
        last = _bare(noun.split()[-1])
        for i, w in enumerate(alignment.source_words):
            if _bare(w) == last and i not in position:
                position[i] = noun
                break
    if not position:
        return []
    out: list[str] = []
    for c in alignment.changed:
        after = [i for i in sorted(position) if i >= c]
        before = [i for i in sorted(position) if i < c]
        pick = after[0] if after else before[-1]
        if position[pick] not in out:
            out.append(position[pick])
    return out


def word_columns(alignment: PromptAlignment, values: dict[str, float], key: str) -> dict[int, float]:
    """``{target word: value}`` -> ``{target token position: value}`` for every token of each word.

    Words match the target prompt's whitespace-separated words, case and punctuation aside; a
    word the target does not contain is an error that names the target's words.
    """
    out: dict[int, float] = {}
    bare_words = [_bare(w) for w in alignment.target_words]
    for word, value in values.items():
        hits = [i for i, w in enumerate(bare_words) if w == _bare(word)]
        if not hits:
            raise InputError(f"{key} names '{word}', which is not a word of the target prompt "
                             f"'{' '.join(alignment.target_words)}'", where=f"config key {key}",
                             fix=f"use one of the target's words: {sorted(set(bare_words))}")
        for i in hits:
            for col in alignment.target_spans[i]:
                out[col] = float(value)
    return out

