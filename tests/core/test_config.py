"""Run configs: defaults <- --config file <- key=value overrides, all type-checked."""

from __future__ import annotations

import pytest

from t2ialign.core.config import dump_config, resolve_config
from t2ialign.core.errors import ConfigError, RegistryError

DEFAULTS = {
    "gamma": 0.333,
    "seed": 4307,
    "oracle": False,
    "elbo": {"timesteps": [[1, 999, 50]], "scheme": "uniform", "batch_size": 8},
    "backbone": "toy",
    "limit": None,
    "options": {},
}


def test_overrides_are_typed():
    cfg = resolve_config(DEFAULTS, overrides=["gamma=1/3", "seed=1", "elbo.timesteps=[[1, 999, 200]]",
                                              "oracle=true", "limit=5", "options.anything=[1]"])
    assert cfg["gamma"] == pytest.approx(1 / 3)
    assert cfg["seed"] == 1 and cfg["oracle"] is True and cfg["limit"] == 5
    assert cfg["elbo"] == {"timesteps": [[1, 999, 200]], "scheme": "uniform", "batch_size": 8}
    assert cfg["options"] == {"anything": [1]}
    assert DEFAULTS["gamma"] == 0.333  # defaults untouched


@pytest.mark.parametrize(
    "override, message",
    [
        ("gama=0.5", "unknown config key 'gama' (did you mean 'gamma'?)"),
        ("elbo.shceme=elbo", "unknown config key 'elbo.shceme' (did you mean 'elbo.scheme'?)"),
        ("seed=abc", "config key 'seed' must be an integer, got a string"),
        ("oracle=1", "config key 'oracle' must be a boolean"),
        ("elbo.timesteps=5", "config key 'elbo.timesteps' must be a list"),
        ("gamma", "is not of the form key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(DEFAULTS, overrides=[override])
    assert message in str(info.value)


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gamma: 0.5\nelbo: {batch_size: 4}\n")
    cfg = resolve_config(DEFAULTS, path, ["elbo.batch_size=2"])
    assert cfg["gamma"] == 0.5 and cfg["elbo"]["batch_size"] == 2
    assert "gamma: 0.5" in dump_config(cfg)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gamma: [1]\n")
    with pytest.raises(ConfigError, match="run.yaml"):
        resolve_config(DEFAULTS, path)
    path.write_text("!!python/object/apply:os.getcwd []\n")
    with pytest.raises(RegistryError, match="safe loading refuses"):
        resolve_config(DEFAULTS, path)
