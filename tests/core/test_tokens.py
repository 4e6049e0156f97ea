"""Token-span search with SD's real CLIP tokenizer (built offline from open_clip's BPE table)."""

from __future__ import annotations

import pytest

from t2ialign.core.clip_tokenizer import clip_tokenizer
from t2ialign.core.errors import InputError
from t2ialign.core.tokens import find_token_span, find_token_spans


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def _words(tok, prompt, span):
    ids = tok(prompt).input_ids
    return tok.decode([ids[i] for i in span]).strip()


def test_single_and_multi_token_words(tok):
    prompt = "a photo of cat, pottedplant, traffic light"
    # BOS is position 0: "a"=1 "photo"=2 "of"=3 "cat"=4 ","=5
    assert find_token_span(tok, prompt, "cat") == [4]
    span = find_token_span(tok, prompt, "pottedplant")
    assert len(span) > 1 and _words(tok, prompt, span) == "pottedplant"
    span = find_token_span(tok, prompt, "traffic light")
    assert _words(tok, prompt, span) == "traffic light"


def test_word_inside_another_word_is_skipped(tok):
    # "racecar" tokenizes as "racec" + "ar</w>"; "car" must not match a sub-word
    prompt = "a photo of racecar, car"
    span = find_token_span(tok, prompt, "car")
    ids = tok(prompt).input_ids
    assert span == [len(ids) - 2]  # the last word before EOS


@pytest.mark.parametrize(
    "prompt, phrase, expected_index",
    [
        ("a photo of screen door, screen", "screen", 7),  # the whole item, not the one in "screen door"
        ("a photo of screen, screen door", "screen", 4),
        ("a photo of screen door, door", "door", 7),
        ("a photo of door, screen door", "door", 4),
    ],
)
def test_whole_item_preferred(tok, prompt, phrase, expected_index):
    assert find_token_span(tok, prompt, phrase) == [expected_index]


def test_joint_spans_do_not_overlap(tok):
    prompt = "a photo of screen door, screen, door"
    spans = find_token_spans(tok, prompt, ["screen", "screen door", "door"])
    flat = [p for s in spans for p in s]
    assert len(flat) == len(set(flat))
    assert [_words(tok, prompt, s) for s in spans] == ["screen", "screen door", "door"]
    assert spans[1] == [4, 5]


def test_repeated_class_gets_distinct_occurrences(tok):
    spans = find_token_spans(tok, "a photo of car, car", ["car", "car"])
    assert sorted(p for s in spans for p in s) == [4, 6]


def test_explicit_occurrence(tok):
    prompt = "a photo of dog, dog"
    assert find_token_span(tok, prompt, "dog", occurrence=0) == [4]
    assert find_token_span(tok, prompt, "dog", occurrence=1) == [6]
    with pytest.raises(InputError, match="occurs 2 time"):
        find_token_span(tok, prompt, "dog", occurrence=2)


def test_missing_phrase_names_phrase_and_prompt(tok):
    with pytest.raises(InputError) as info:
        find_token_span(tok, "a photo of cat", "zebra")
    assert "zebra" in str(info.value) and "a photo of cat" in str(info.value)


def test_empty_phrase(tok):
    with pytest.raises(InputError, match="empty phrase"):
        find_token_span(tok, "a photo of cat", "  ")


def test_span_past_the_text_window(tok):
    classes = [f"thing{i}" for i in range(40)] + ["zebra"]
    prompt = "a photo of " + ", ".join(classes)
    with pytest.raises(InputError) as info:
        find_token_span(tok, prompt, "zebra")
    assert "zebra" in str(info.value) and "too long" in str(info.value)
    assert "fewer classes" in str(info.value)
    # the same phrase inside the window is fine
    assert find_token_span(tok, "a photo of zebra", "zebra") == [4]
    # the last readable slot (76) belongs to EOS after truncation, so a span there is refused
    fits = " ".join(["a"] * 74) + " zebra"
    assert len(tok(fits).input_ids) == 77
    assert find_token_span(tok, fits, "zebra") == [75]
    with pytest.raises(InputError, match="too long"):
        find_token_span(tok, "a " + fits, "zebra")
