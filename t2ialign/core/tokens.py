"""Where a phrase's tokens sit on the text axis of a prompt's attention maps.

The method reads the cross-attention columns of each class word in a joint prompt
``"a photo of c1, c2, ..."``. The reference takes the *first* exact token sub-sequence match,
which goes wrong when a class name occurs inside another one ("screen" in "screen door",
"car" in "racecar") or twice. Here a match is ranked instead:

1. matches that start and end on word boundaries beat sub-word matches ("car" inside "racecar");
2. a match not overlapping a span already given to another phrase beats one that does;
3. a match that is a whole comma-separated item of the prompt beats one that is part of a
   longer item ("screen" alone beats the "screen" of "screen door"); the first item may carry
   the prompt template ("a photo of"), so a match ending that item counts as half-whole;
4. earlier beats later.

Positions include the BOS token at index 0, i.e. they index the encoded prompt as the text
encoder sees it. Works with any ``transformers`` tokenizer; word boundaries are read from
CLIP's ``</w>`` suffix or SentencePiece/GPT-2 word-start markers.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from t2ialign.core.errors import InputError

_WORD_START_MARKERS = ("\u2581", "\u0120")  # SentencePiece "▁", GPT-2 byte-level "Ġ"


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    # no truncation: positions past the model limit must be detected, not silently cut
    return list(tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"])


def _is_special(tokenizer: Any, token_id: int) -> bool:
    return token_id in set(getattr(tokenizer, "all_special_ids", []) or [])


def _word_boundary_before(tokenizer: Any, tokens: list[str], ids: list[int], start: int) -> bool:
    """Does a word start at ``start`` (not in the middle of a word)?"""
    if start == 0 or _is_special(tokenizer, ids[start - 1]):
        return True
    prev = tokens[start - 1]
    if any(t.endswith("</w>") for t in tokens):  # CLIP BPE: "</w>" closes a word
        return prev.endswith("</w>")
    first = tokens[start]
    if any(t.startswith(_WORD_START_MARKERS) for t in tokens):
        return first.startswith(_WORD_START_MARKERS)
    return True


def _word_boundary_after(tokenizer: Any, tokens: list[str], ids: list[int], end: int) -> bool:
    """Does a word end right before ``end``?"""
    if end >= len(tokens) or _is_special(tokenizer, ids[end]):
        return True
    if any(t.endswith("</w>") for t in tokens):
        return tokens[end - 1].endswith("</w>")
    if any(t.startswith(_WORD_START_MARKERS) for t in tokens):
        return tokens[end].startswith(_WORD_START_MARKERS)
    return True


def _item_score(tokenizer: Any, ids: list[int], comma_ids: set[int], start: int, end: int) -> int:
    """2: the match is a whole comma-separated item; 1: it ends the first item; 0: otherwise."""
    before_is_comma = start > 0 and ids[start - 1] in comma_ids
    after_ends_item = end >= len(ids) or ids[end] in comma_ids or _is_special(tokenizer, ids[end])
    if before_is_comma and after_ends_item:
        return 2
    if after_ends_item and not any(i in comma_ids for i in ids[:start]):
        return 1  # first item: whatever precedes it is the prompt template
    return 0


def _matches(hay: list[int], needle: list[int]) -> list[int]:
    n = len(needle)
    return [s for s in range(len(hay) - n + 1) if hay[s : s + n] == needle]


def find_token_span(
    tokenizer: Any,
    prompt: str,
    phrase: str,
    *,
    occurrence: int | None = None,
    max_tokens: int = 77,
    taken: Iterable[Sequence[int]] = (),
) -> list[int]:
    """Token positions of ``phrase`` inside the encoded ``prompt`` (BOS = position 0).

    ``occurrence``: take the n-th exact match (0-based) instead of the ranking of the module
    docstring. ``taken``: spans already assigned to other phrases (avoided when possible).
    ``max_tokens``: the text encoder's length; a span reaching position ``max_tokens - 1`` (the
    slot the truncated prompt's EOS takes) or beyond is an error.
    """
    if not isinstance(phrase, str) or not phrase.strip():
        raise InputError(f"empty phrase for prompt '{prompt}'",
                         fix="give every class/phrase a non-empty name")
    ids = _ids(tokenizer, prompt, special=True)
    needle = _ids(tokenizer, phrase, special=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in needle:
        # SentencePiece vocabularies (T5) map unknown words to <unk>; dropping it as a special
        # token would leave a bare word-start marker that matches some unrelated position
        raise InputError(
            f"phrase '{phrase}' contains text the tokenizer does not know "
            f"(tokens {tokenizer.convert_ids_to_tokens(needle)})",
            where=f"prompt '{prompt}'",
            fix="use words of the text encoder's vocabulary (an unknown word becomes <unk> and has no map)",
        )
    needle = [i for i in needle if not _is_special(tokenizer, i)]
    if not needle:
        raise InputError(f"phrase '{phrase}' produces no tokens", where=f"prompt '{prompt}'",
                         fix="use a phrase made of words")
    starts = _matches(ids, needle)
    if not starts:
        raise InputError(
            f"phrase '{phrase}' does not occur in prompt '{prompt}' (as tokens {needle})",
            fix="make the prompt contain the phrase exactly as written (same spelling and spacing)",
        )
    if occurrence is not None:
        if not 0 <= occurrence < len(starts):
            raise InputError(
                f"phrase '{phrase}' occurs {len(starts)} time(s) in prompt '{prompt}', "
                f"occurrence {occurrence} requested",
                fix=f"use an occurrence in 0..{len(starts) - 1}",
            )
        start = starts[occurrence]
    else:
        start = _rank(tokenizer, ids, needle, starts, taken)
    span = list(range(start, start + len(needle)))
    if span[-1] >= max_tokens - 1:
        raise InputError(
            f"phrase '{phrase}' sits at token positions {span[0]}..{span[-1]} but the text encoder "
            f"only reads {max_tokens} tokens (prompt too long: {len(ids)} tokens)",
            where=f"prompt '{prompt}'",
            fix="use fewer classes per prompt or shorter class names",
        )
    return span


def _rank(tokenizer: Any, ids: list[int], needle: list[int], starts: list[int],
          taken: Iterable[Sequence[int]]) -> int:
    tokens = tokenizer.convert_ids_to_tokens(ids)
    comma_ids = set(_ids(tokenizer, ",", special=False))
    busy = {p for span in taken for p in span}
    n = len(needle)

    def key(start: int) -> tuple[int, int, int, int]:
        end = start + n
        whole_words = (_word_boundary_before(tokenizer, tokens, ids, start)
                       and _word_boundary_after(tokenizer, tokens, ids, end))
        free = not any(p in busy for p in range(start, end))
        # sort ascending: negate what is better when larger
        return (-int(whole_words), -int(free), -_item_score(tokenizer, ids, comma_ids, start, end), start)

    return min(starts, key=key)


def find_token_spans(
    tokenizer: Any,
    prompt: str,
    phrases: Sequence[str],
    *,
    max_tokens: int = 77,
) -> list[list[int]]:
    """Spans of several phrases of one prompt, each phrase getting its own occurrence.

    Longer phrases are placed first so that "screen" does not take the tokens of "screen door";
    the result is in the order of ``phrases``.
    """
    order = sorted(range(len(phrases)), key=lambda i: -len(_ids(tokenizer, phrases[i], special=False))
                   if isinstance(phrases[i], str) else 0)
    spans: dict[int, list[int]] = {}
    for i in order:
        spans[i] = find_token_span(tokenizer, prompt, phrases[i], max_tokens=max_tokens,
                                   taken=list(spans.values()))
    return [spans[i] for i in range(len(phrases))]
