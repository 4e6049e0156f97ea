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


def test_stratified_entries_draw_one_timestep_per_slice() -> None:
    out = parse_timesteps([["stratified", 1, 999, 5]], seed=7)
    assert len(out) == 5 and out == sorted(out)
    width = 999 / 5
    for k, t in enumerate(out):
        assert 1 + k * width <= t < 1 + (k + 1) * width, (k, t)
    assert parse_timesteps([["stratified", 1, 999, 5]], seed=7) == out
    assert parse_timesteps([["stratified", 1, 999, 5]], seed=8) != out
    # as many slices as integers: every integer exactly once; the top end is reachable
    assert parse_timesteps([["stratified", 0, 9, 10]], seed=3) == list(range(10))
    draws = {t for s in range(200) for t in parse_timesteps([["stratified", 0, 9, 1]], seed=s)}
    assert draws == set(range(10))


def test_stratified_and_random_entries_share_the_stream() -> None:
    spec = [["random", 0, 999, 2], ["stratified", 0, 999, 2]]
    rng = random.Random(5)
    first = [rng.randint(0, 999) for _ in range(2)]
    second = [min(999, int((k + rng.random()) * 500)) for k in range(2)]
    assert parse_timesteps(spec, seed=5) == first + second


@pytest.mark.parametrize(("spec", "what"), [([["stratified", 0, 999]], "lo, hi, n"),
                                            ([["stratified", 9, 1, 3]], "above hi"),
                                            ([["stratified", 0, 9, 0]], "draws nothing")])
def test_malformed_stratified_entries(spec: list, what: str) -> None:
    with pytest.raises(ConfigError, match=what) as info:
        parse_timesteps(spec)
    assert '["stratified", lo, hi_inclusive, n]' in str(info.value)
