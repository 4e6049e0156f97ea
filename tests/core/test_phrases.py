"""Explicit phrases against the prompt, or the configured extractor's (core.phrases)."""

from __future__ import annotations

import pytest

from t2ialign.core.errors import InputError
from t2ialign.core.phrases import dedupe_phrases, resolve_phrases


def test_explicit_phrases_win_and_are_checked():
    def rules(prompt):  # a stand-in extractor: explicit phrases must not reach it unless absent
        return ["from the extractor"]

    assert resolve_phrases("a red cube and a blue sphere", ["blue sphere"], rules) == ["blue sphere"]
    assert resolve_phrases("a red cube and a blue sphere", None, rules) == ["from the extractor"]
    with pytest.raises(InputError, match="do not occur"):
        resolve_phrases("a red cube", ["a green cube"], rules)
    # explicit phrases keep their order, once each, stripped
    assert resolve_phrases("a red cube and a blue sphere", [" blue sphere", "red cube", "blue sphere"], rules) == \
        ["blue sphere", "red cube"]


def test_dedupe_keeps_the_first_occurrence_in_order():
    assert dedupe_phrases(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
