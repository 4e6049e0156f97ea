"""Run configuration: task defaults, ``--config FILE.yaml`` and ``key=value`` overrides.

Every key of a run config must exist in the task's defaults and have the default's type;
anything else is an error that names the key, where it came from and what is allowed. A
default of ``None`` accepts any value; an empty mapping accepts any keys (free-form options).
Float keys also accept fractions written as ``1/3``.
"""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import yaml

from t2ialign.core.errors import ConfigError
from t2ialign.core.registry import read_yaml, suggest, type_matches, type_name


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` like YAML (numbers, lists, booleans...)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _coerce(default: Any, value: Any) -> Any:
    """Small, lossless conversions: ``1/3`` -> float, int -> float for float keys."""
    if isinstance(default, float) and not isinstance(default, bool):
        if isinstance(value, str) and "/" in value:
            try:
                return float(Fraction(value.strip()))
            except (ValueError, ZeroDivisionError):
                return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def merge_checked(defaults: dict[str, Any], update: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``defaults``, checking names and types."""
    out = copy.deepcopy(defaults)
    if not isinstance(update, dict):
        example = next(iter(defaults), "gamma")
        raise ConfigError(
            f"expected a mapping, got {type_name(update)}", where=f"{source}: {prefix or '<top>'}",
            fix=(f"write '{prefix.rstrip('.')}' as 'key: value' lines under it" if prefix else
                 f"a config file holds 'key: value' lines (a mapping), e.g. '{example}: {_show(defaults.get(example))}'"
                 " -- the config.yaml a run writes is an example"))
    free_form = not defaults and prefix != ""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in defaults and not free_form:
            raise ConfigError(
                f"unknown config key '{dotted}'{suggest(str(key), defaults, prefix)}",
                where=source,
                fix=f"allowed keys{' under ' + prefix.rstrip('.') if prefix else ''}: {sorted(defaults)}",
            )
        default = defaults.get(key)
        if isinstance(default, dict) and default:
            out[key] = merge_checked(default, value, source, prefix=f"{dotted}.")
            continue
        value = _coerce(default, value)
        if not type_matches(default, value):
            raise ConfigError(
                f"config key '{dotted}' must be {type_name(default)}, got {type_name(value)} ({value!r})",
                where=source,
                fix=f"write it like the default: {dotted}={_show(default)}",
            )
        out[key] = value
    return out


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def overrides_to_mapping(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value",
                where="command line",
                fix="write overrides as key=value, e.g. gamma=1/3 or elbo.timesteps='[[1, 999, 50]]'",
            )
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key", where="command line")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{p}'",
                                  where="command line")
        node[parts[-1]] = parse_value(text)
    return out


def resolve_config(
    defaults: dict[str, Any],
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Defaults <- config file <- overrides, each step checked against the defaults; then an
    ``elbo.preset`` is expanded into the keys it stands for (:mod:`t2ialign.core.elbo_presets`)."""
    config = copy.deepcopy(defaults)
    explicit: dict[str, tuple[Any, str]] = {}  # elbo sub-keys set by the user: value, source
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a file", where="--config",
                              fix=f"name a YAML file, e.g. --config {path / 'config.yaml'} (a run writes its "
                                  "config.yaml into its output folder)")
        data = read_yaml(path, "config file")
        if data is None:
            raise ConfigError(f"config file {path} is empty", where="--config",
                              fix="write 'key: value' lines into it, or leave --config out to use the defaults")
        config = merge_checked(config, data, source=str(config_file))
        explicit.update(_elbo_keys(data, f"config file {config_file}"))
    mapping = overrides_to_mapping(overrides)
    if mapping:
        config = merge_checked(config, mapping, source="command-line override")
        explicit.update(_elbo_keys(mapping, "a command-line override"))
    if isinstance(defaults.get("elbo"), dict) and "preset" in defaults["elbo"]:
        from t2ialign.core.elbo_presets import apply_elbo_preset

        config = apply_elbo_preset(config, explicit)
    return config


def _elbo_keys(mapping: dict[str, Any], source: str) -> dict[str, tuple[Any, str]]:
    elbo = mapping.get("elbo")
    return {k: (v, source) for k, v in elbo.items() if k != "preset"} if isinstance(elbo, dict) else {}


def dump_config(config: dict[str, Any]) -> str:
    """The resolved config as YAML text (what runs write next to their outputs)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
