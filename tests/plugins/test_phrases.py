"""Phrase extraction: the rule chunker on a table of benchmark-style prompts, auto fallback, explicit phrases."""

from __future__ import annotations

import importlib.util

import pytest

from t2ialign.core.errors import InputError, ModelLoadError
from t2ialign.core.host import Host
from t2ialign.core.specs import EntrySpec
from t2ialign.plugins import phrases as ph
from t2ialign.plugins.toy.world import compositional_prompts

TABLE = [
    ("a red cube and a blue sphere", ["a red cube", "a blue sphere"]),
    ("two dogs next to a small yellow car", ["two dogs", "a small yellow car"]),
    ("a cat, a dog, and a bird", ["a cat", "a dog", "a bird"]),
    ("a cat, a dog and a green parrot", ["a cat", "a dog", "a green parrot"]),
    ("a brown bench with a white cat on it", ["a brown bench", "a white cat"]),
    ("a photo of a red star and a blue circle", ["a red star", "a blue circle"]),
    ("a group of people standing in front of a bus", ["people", "a bus"]),
    ("a man holding an umbrella", ["a man", "an umbrella"]),
    ("A black dog sitting on a wooden bench.", ["A black dog", "a wooden bench"]),
    ("three apples on top of a table", ["three apples", "a table"]),
    ("a bunch of bananas in a blue bowl", ["bananas", "a blue bowl"]),
    ("a piece of cake and two cups of coffee", ["cake", "two cups", "coffee"]),
    ("an elephant under the bright moon", ["an elephant", "the bright moon"]),
    ("the cube is red and the sphere is blue", ["the cube", "the sphere"]),
    ("a turtle and a frog", ["a turtle", "a frog"]),
    ("a dog-shaped balloon near the kids' toys", ["a dog-shaped balloon", "the kids' toys"]),
    ("a bear", ["a bear"]),
]


@pytest.mark.parametrize("prompt,expected", TABLE)
def test_rule_chunker_table(prompt, expected):
    assert ph.RuleChunker()(prompt) == expected


def test_phrases_are_substrings_of_the_prompt_and_deduplicated():
    prompt = "a cat and a cat next to a dog"
    out = ph.RuleChunker()(prompt)
    assert out == ["a cat", "a dog"]
    assert all(p in prompt for p in out)


def test_non_entity_plurals_and_extra_stop_words():
    assert ph.RuleChunker()("groups of birds and pieces of bread") == ["birds", "bread"]
    assert ph.RuleChunker(extra_stop_words=["bread"])("groups of birds and pieces of bread") == ["birds"]


def test_every_toy_prompt_splits_into_its_objects():
    for prompt in compositional_prompts(50, seed=1):
        expected = [p.strip() for part in prompt.split(" and ") for p in part.split(",")]
        assert ph.RuleChunker()(prompt) == expected


def test_bad_prompt_is_an_input_error():
    with pytest.raises(InputError):
        ph.RuleChunker()("   ")


def test_auto_falls_back_to_rules_without_spacy():
    extractor = ph.make_extractor("auto")
    if importlib.util.find_spec("spacy") is None:
        assert isinstance(extractor, ph.RuleChunker)
        with pytest.raises(ModelLoadError, match="spaCy is not installed"):
            ph.make_extractor("spacy")
    assert extractor("a red cube and a blue sphere") == ["a red cube", "a blue sphere"]


def test_hook_through_the_host():
    host = Host()
    assert isinstance(host.phrase_extractor("auto"), (ph.RuleChunker, ph.SpacyChunker))
    spec = EntrySpec("phrases", "mine", "rules", {"extra_stop_words": ["sphere"]})
    extractor = host.hook.t2ialign_make_phrase_extractor(spec=spec)
    assert extractor("a red cube and a blue sphere") == ["a red cube"]
    assert host.hook.t2ialign_make_phrase_extractor(spec=EntrySpec("phrases", "x", "other")) is None
