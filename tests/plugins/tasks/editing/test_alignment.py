"""Token alignment of source and target prompts, on the tiny SD model's CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.plugins.tasks.editing.alignment import align_prompts, edited_nouns, word_columns


def test_same_length_swap_maps_every_token(backbone):
    a = align_prompts(backbone.tokenizer, "a photo of a red circle", "a photo of a blue circle")
    assert a.changed == [4]
    n = a.source_spans[-1][-1] + 1
    # the swapped word takes the old word's attention; every other token (BOS, EOS, padding) maps to itself
    assert torch.equal(a.mapping, torch.arange(77))
    assert a.target_spans[4] == a.source_spans[4] == [5] and n == 7
    assert edited_nouns(a, ["circle"]) == ["circle"]


def test_different_lengths_align_shared_words_only(backbone):
    a = align_prompts(backbone.tokenizer, "a red circle and a star", "a red circle and a big heart")
    assert a.source_words[-1] == "star" and a.changed == [5]
    big, heart = a.target_spans[5], a.target_spans[6]
    assert all(int(a.mapping[p]) == -1 for p in big + heart)  # 1 word -> 2 words: the target's own attention
    for s_span, t_span in zip(a.source_spans[:5], a.target_spans[:5]):
        assert [int(a.mapping[p]) for p in t_span] == s_span
    eos_s, eos_t = a.source_spans[-1][-1] + 1, a.target_spans[-1][-1] + 1
    assert int(a.mapping[eos_t]) == eos_s and int(a.mapping[eos_t + 3]) == eos_s + 3
    assert edited_nouns(a, ["circle", "star"]) == ["star"]
    # an inserted attribute belongs to the noun after it
    b = align_prompts(backbone.tokenizer, "a circle and a star", "a circle and a green star")
    assert edited_nouns(b, ["circle", "star"]) == ["star"]


def test_too_long_or_empty_prompts_are_refused(backbone):
    with pytest.raises(InputError, match="more than the 77"):
        align_prompts(backbone.tokenizer, " ".join(["circle"] * 80), "a circle")
    with pytest.raises(InputError, match="empty"):
        align_prompts(backbone.tokenizer, "a circle", "   ")


def test_word_options_name_target_words(host, backbone):
    from t2ialign.plugins.tasks.editing.editor import Editor

    a = align_prompts(backbone.tokenizer, "a photo of a red circle", "a photo of a blue circle")
    cols = word_columns(a, {"Blue": 2.0}, "reweight")
    assert list(cols) == a.target_spans[4] and set(cols.values()) == {2.0}
    with pytest.raises(InputError, match="'dragon', which is not a word of the target prompt"):
        word_columns(a, {"dragon": 2.0}, "reweight")
    with pytest.raises(ConfigError, match="must map target words to numbers"):
        Editor(backbone, None, attention=host.attention_editor(backbone), steps=4, reweight={"blue": "lots"})


def test_alignment_modes_replace_and_refine(backbone):
    tok = backbone.tokenizer
    swap = ("a photo of a red circle", "a photo of a blue circle")
    auto = align_prompts(tok, *swap)
    assert torch.equal(align_prompts(tok, *swap, mode="replace").mapping, auto.mapping)
    refine = align_prompts(tok, *swap, mode="refine")
    blue = auto.target_spans[4]
    assert (auto.mapping[blue] >= 0).all() and (refine.mapping[blue] == -1).all()
    unchanged = [p for i, span in enumerate(auto.target_spans) if i != 4 for p in span]
    assert torch.equal(refine.mapping[unchanged], auto.mapping[unchanged])
    with pytest.raises(InputError, match="not a word swap"):
        align_prompts(tok, "a circle", "a striped circle", mode="replace")
    added = align_prompts(tok, "a circle", "a striped circle", mode="refine")
    assert (added.mapping[added.target_spans[1]] == -1).all()
    with pytest.raises(ConfigError, match="alignment must be one of"):
        align_prompts(tok, *swap, mode="swap")
