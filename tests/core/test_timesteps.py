"""Tests of the timestep-spec parser (method-spec §4.3)."""

from __future__ import annotations

import random

import pytest

from t2ialign.core.errors import ConfigError
from t2ialign.core.timesteps import parse_timesteps


def test_reference_default_is_twenty_steps() -> None:
    out = parse_timesteps([[1, 999, 50]])
    assert out == [1 + 50 * k for k in range(20)]
    assert out[-1] == 951


def test_entries_concatenate_in_order() -> None:
    assert parse_timesteps([[20, 201, 20], [5, 0, -5]]) == [20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 5]


def test_random_entries_use_one_seeded_stream() -> None:
    spec = [["random", 0, 999, 5], [1, 3, 1], ["random", 10, 12, 4]]
    out = parse_timesteps(spec, seed=4307)
    rng = random.Random(4307)
    expected = [rng.randint(0, 999) for _ in range(5)] + [1, 2] + [rng.randint(10, 12) for _ in range(4)]
    assert out == expected
    assert parse_timesteps(spec, seed=4307) == out
    assert parse_timesteps(spec, seed=1) != out
    assert all(10 <= t <= 12 for t in out[-4:])


@pytest.mark.parametrize(
    ("spec", "where", "what"),
    [
        ([[1, 999]], "entry 0", "three integers"),
        ([[1, 999, 50], [1, 999, 0]], "entry 1", "step is 0"),
        ([[999, 1, 50]], "entry 0", "empty"),
        ([[1.0, 999, 50]], "entry 0", "three integers"),
        ([[True, 5, 1]], "entry 0", "three integers"),
        ([["random", 0, 999]], "entry 0", "lo, hi, n"),
        ([["random", 9, 1, 3]], "entry 0", "above hi"),
        ([["random", 0, 9, 0]], "entry 0", "draws nothing"),
        ([[1, 2, 1], "1, 999, 50"], "entry 1", "not a list"),
    ],
)
def test_malformed_entries_name_the_entry_and_the_accepted_forms(spec: list, where: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_timesteps(spec)
    msg = str(info.value)
    assert where in msg and what in msg
    assert "[start, end_exclusive, step]" in msg and '["random", lo, hi_inclusive, n]' in msg


@pytest.mark.parametrize("spec", [[], "[[1, 999, 50]]", 5])
def test_empty_or_non_list_spec(spec: object) -> None:
    with pytest.raises(ConfigError, match="timestep spec"):
        parse_timesteps(spec)  # type: ignore[arg-type]
