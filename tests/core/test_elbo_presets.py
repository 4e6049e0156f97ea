"""Tests of ``elbo.preset``: expansion at config resolution, conflicts, what the run's config.yaml shows."""

from __future__ import annotations

import pytest
import yaml

from t2ialign.core.config import dump_config, resolve_config
from t2ialign.core.elbo_presets import ELBO_PRESETS
from t2ialign.core.errors import ConfigError
from t2ialign.core.timesteps import parse_timesteps
from t2ialign.plugins.tasks.editing.task import DEFAULTS as EDITING_DEFAULTS
from t2ialign.plugins.tasks.segmentation import DEFAULTS


def test_no_preset_keeps_the_papers_schedule() -> None:
    cfg = resolve_config(DEFAULTS)
    assert cfg == DEFAULTS
    assert cfg["elbo"]["preset"] is None
    assert {k: cfg["elbo"][k] for k in ELBO_PRESETS["reference"]} == ELBO_PRESETS["reference"]


@pytest.mark.parametrize("defaults", [DEFAULTS, EDITING_DEFAULTS], ids=["segmentation", "editing"])
def test_fast_preset_expands_into_concrete_values(defaults: dict) -> None:
    cfg = resolve_config(defaults, overrides=["elbo.preset=fast"])
    fast = ELBO_PRESETS["fast"]
    assert {k: cfg["elbo"][k] for k in fast} == fast
    assert cfg["elbo"]["preset"] == "fast"
    assert cfg["elbo"]["batch_size"] == defaults["elbo"]["batch_size"]  # keys the preset does not set stay
    # what a run writes: the name and the values it stood for
    written = yaml.safe_load(dump_config(cfg))["elbo"]
    assert written["preset"] == "fast" and written["timesteps"] == fast["timesteps"]
    assert written["antithetic"] is fast["antithetic"] and written["scheme"] == fast["scheme"]
    assert defaults["elbo"]["preset"] is None  # the defaults are not modified


def test_fast_preset_is_cheaper_than_the_reference() -> None:
    def forwards(p: dict) -> int:
        return len(parse_timesteps(p["timesteps"])) * (2 if p["antithetic"] else 1)
    assert forwards(ELBO_PRESETS["fast"]) < forwards(ELBO_PRESETS["reference"]) == 20


def test_reference_preset_undoes_other_values_in_a_file(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("elbo: {preset: reference, batch_size: 4}\n")
    cfg = resolve_config(DEFAULTS, path)
    assert cfg["elbo"]["timesteps"] == [[1, 999, 50]] and cfg["elbo"]["batch_size"] == 4


def test_a_runs_own_config_can_be_passed_back(tmp_path) -> None:
    cfg = resolve_config(DEFAULTS, overrides=["elbo.preset=fast", "gamma=1/5"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert resolve_config(DEFAULTS, path) == cfg


def _other_value(key: str) -> str:
    """A command-line value of ``elbo.key`` that differs from what the fast preset sets."""
    fast = ELBO_PRESETS["fast"][key]
    if key == "timesteps":
        return "[[1, 999, 100]]"  # 10 steps: not what any preset uses
    if key == "antithetic":
        return str(not fast).lower()
    return "elbo" if fast == "uniform" else "uniform"


@pytest.mark.parametrize("key", ["timesteps", "antithetic", "scheme"])
def test_conflicting_keys_are_an_error_naming_both(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(DEFAULTS, overrides=["elbo.preset=fast", f"elbo.{key}={_other_value(key)}"])
    msg = str(info.value)
    assert "elbo.preset=fast" in msg and f"elbo.{key}" in msg and "command-line override" in msg and "drop" in msg


def test_conflict_between_file_and_command_line_names_the_file(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("elbo: {timesteps: [[1, 999, 100]]}\n")
    with pytest.raises(ConfigError, match="run.yaml"):
        resolve_config(DEFAULTS, path, ["elbo.preset=fast"])


def test_equal_values_are_not_a_conflict() -> None:
    fast = ELBO_PRESETS["fast"]
    cfg = resolve_config(DEFAULTS, overrides=["elbo.preset=fast", f"elbo.scheme={fast['scheme']}"])
    assert cfg["elbo"]["scheme"] == fast["scheme"]


@pytest.mark.parametrize("value", ["fastest", "5", "[fast]"])
def test_unknown_preset_lists_the_known_ones(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(DEFAULTS, overrides=[f"elbo.preset={value}"])
    assert "unknown ELBO preset" in str(info.value) and "'fast'" in str(info.value)


def test_defaults_without_a_preset_key_are_left_alone() -> None:
    defaults = {"elbo": {"timesteps": [[1, 999, 50]], "scheme": "uniform"}}
    assert resolve_config(defaults, overrides=["elbo.scheme=elbo"])["elbo"] == {"timesteps": [[1, 999, 50]],
                                                                                 "scheme": "elbo"}
