"""The registry: named backbones, datasets, metrics and tasks with their defaults.

Sources, in the order they are read (later entries override earlier ones by name):
the built-in ``t2ialign/registry.yaml``, files contributed by plugins
(``t2ialign_registry_files``), then the user's ``--registry FILE`` options.

Every file is read with ``yaml.safe_load`` and validated on load: sections, entry shapes, the
``plugin`` key, and -- when the owning plugin is loaded -- every option's name and type. A
later entry that omits ``plugin`` updates the options of an existing entry of the same name (so a
user file can just say ``datasets: {voc: {root: /data/voc}}``). ``${VAR}`` and
``${VAR:-default}`` in string values are expanded when an entry is used, so an unset variable
only matters for the entries that need it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from t2ialign.core.errors import PluginError, RegistryError
from t2ialign.core.plugin_manager import LoadedPlugins
from t2ialign.core.specs import SECTIONS, EntrySpec

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def builtin_registry_path() -> Path:
    """Path of the registry file shipped inside the package."""
    return Path(str(resources.files("t2ialign").joinpath("registry.yaml")))


def read_yaml(path: Path, what: str = "YAML file") -> Any:
    """``yaml.safe_load`` a file with errors that name the file and the line."""
    if not path.is_file():
        raise RegistryError(
            f"{what} not found: {path}", fix="check the path (relative paths are taken from the current folder)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise RegistryError(
            f"{what} {path} uses a YAML tag that safe loading refuses ({exc.problem})",
            where=_mark(path, exc.problem_mark),
            fix="remove python/object tags: only plain mappings, lists, strings and numbers are allowed",
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RegistryError(
            f"{what} {path} is not valid YAML: {getattr(exc, 'problem', exc)}",
            where=_mark(path, mark),
            fix="fix the YAML syntax at that line (indentation, a missing ':' or an unclosed quote)",
        ) from exc


def _mark(path: Path, mark: Any) -> str:
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def type_matches(default: Any, value: Any) -> bool:
    """Does ``value`` have the type the option's ``default`` stands for?"""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` when a close match exists (``prefix`` is put before it)."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


@dataclass
class _RawEntry:
    plugin: str
    options: dict[str, Any]
    origin: str


@dataclass
class Registry:
    """Validated registry entries of all sections."""

    plugins: LoadedPlugins
    entries: dict[str, dict[str, _RawEntry]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    files: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, plugins: LoadedPlugins, user_files: Iterable[str | os.PathLike] = ()) -> "Registry":
        reg = cls(plugins)
        reg.add_file(builtin_registry_path())
        for contributed in plugins.pm.hook.t2ialign_registry_files():
            for path in contributed or []:
                reg.add_file(Path(path))
        for path in user_files:
            reg.add_file(Path(path))
        return reg

    def add_file(self, path: Path) -> None:
        data = read_yaml(path, "registry file")
        self.add_mapping(data, origin=str(path))
        self.files.append(str(path))

    def add_mapping(self, data: Any, origin: str) -> None:
        """Validate and merge one registry document."""
        if data is None:
            return
        if not isinstance(data, dict):
            raise RegistryError(
                f"a registry file must be a mapping of sections, got {type_name(data)}",
                where=origin,
                fix=f"start the file with one of the sections {list(SECTIONS)}",
            )
        for section, entries in data.items():
            if section not in SECTIONS:
                raise RegistryError(
                    f"unknown registry section '{section}'{suggest(str(section), SECTIONS)}",
                    where=origin,
                    fix=f"use one of {list(SECTIONS)}",
                )
            if entries is None:
                continue
            if not isinstance(entries, dict):
                raise RegistryError(
                    f"section '{section}' must map entry names to mappings, got {type_name(entries)}",
                    where=origin,
                    fix=f"write e.g. '{section}:\\n  my_entry: {{plugin: NAME}}'",
                )
            for name, body in entries.items():
                self._add_entry(section, str(name), body, origin)

    def _add_entry(self, section: str, name: str, body: Any, origin: str) -> None:
        where = f"{origin}: {section}.{name}"
        if not isinstance(body, dict):
            raise RegistryError(
                f"entry '{name}' must be a mapping with at least a 'plugin' key, got {type_name(body)}",
                where=where,
                fix=f"write '{name}: {{plugin: NAME, ...options}}'",
            )
        existing = self.entries[section].get(name)
        if "plugin" not in body:
            if existing is None:
                raise RegistryError(
                    f"entry '{name}' has no 'plugin' key and does not override an existing entry",
                    where=where,
                    fix=f"add 'plugin: NAME' (known {section} plugins: {sorted(self.plugins.providers(section))})",
                )
            plugin = existing.plugin
            options = {**existing.options, **body}
        else:
            plugin = body["plugin"]
            if not isinstance(plugin, str) or not plugin:
                raise RegistryError(
                    f"key 'plugin' of entry '{name}' must be a non-empty string, got {type_name(plugin)}",
                    where=where,
                    fix="name the plugin that builds this entry, e.g. 'plugin: stable_diffusion'",
                )
            options = {k: v for k, v in body.items() if k != "plugin"}
        self._check_options(section, name, plugin, options, where)
        self.entries[section][name] = _RawEntry(plugin, options, origin)

    def _check_options(self, section: str, name: str, plugin: str, options: dict[str, Any], where: str) -> None:
        for key in options:
            if not isinstance(key, str):
                raise RegistryError(f"option names must be strings, got {key!r}", where=where)
        provider = self.plugins.providers(section).get(plugin)
        if provider is None:
            return  # unknown or unavailable plugin: reported when the entry is used
        _, schema = provider
        for key, value in options.items():
            if key not in schema:
                raise RegistryError(
                    f"unknown key '{key}' for {section} plugin '{plugin}'{suggest(key, schema)}",
                    where=f"{where}.{key}",
                    fix=f"allowed keys: {sorted(schema)}",
                )
            if not type_matches(schema[key], value):
                raise RegistryError(
                    f"key '{key}' must be {type_name(schema[key])}, got {type_name(value)} ({value!r})",
                    where=f"{where}.{key}",
                    fix=f"write it like the default: {key}: {schema[key]!r}",
                )

    # ---------------------------------------------------------------- lookup
    def names(self, section: str) -> list[str]:
        return sorted(self.entries[section])

    def spec(self, section: str, name: str) -> EntrySpec:
        """The resolved entry ``section.name`` with defaults filled and ``${VAR}`` expanded."""
        if section not in SECTIONS:
            raise RegistryError(f"unknown registry section '{section}'", fix=f"use one of {list(SECTIONS)}")
        raw = self.entries[section].get(name)
        if raw is None:
            raise RegistryError(
                f"no {section[:-1]} named '{name}' in the registry{suggest(name, self.entries[section])}",
                where=", ".join(self.files) or "registry",
                fix=f"use one of {self.names(section)} or add an entry with --registry FILE",
            )
        where = f"{raw.origin}: {section}.{name}"
        provider = self.plugins.providers(section).get(raw.plugin)
        if provider is None:
            raise PluginError(self._missing_plugin_message(section, raw.plugin), where=where,
                              fix=self._missing_plugin_fix(section, raw.plugin))
        _, schema = provider
        options = {k: v for k, v in schema.items()}
        options.update(raw.options)
        options = {k: expand_vars(v, f"{where}.{k}") for k, v in options.items()}
        return EntrySpec(section=section, name=name, plugin=raw.plugin, options=options, origin=raw.origin)

    def _missing_plugin_message(self, section: str, plugin: str) -> str:
        for rec in self.plugins.records:
            if rec.name == plugin and rec.status != "loaded":
                return f"plugin '{plugin}' is {rec.status}" + (f": {rec.error}" if rec.error else "")
        return f"no loaded plugin provides {section} plugin '{plugin}'{suggest(plugin, self.plugins.providers(section))}"

    def _missing_plugin_fix(self, section: str, plugin: str) -> str:
        known = sorted(self.plugins.providers(section))
        return (f"use one of the {section} plugins {known}, install the package that provides "
                f"'{plugin}', or see 't2ialign plugins' for load errors")

    def to_dict(self, resolve: bool = True) -> dict[str, Any]:
        """Every entry as plain data; unresolvable entries carry their error instead."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            sec: dict[str, Any] = {}
            for name in self.names(section):
                raw = self.entries[section][name]
                if not resolve:
                    sec[name] = {"plugin": raw.plugin, **raw.options, "_origin": raw.origin}
                    continue
                try:
                    sec[name] = {**self.spec(section, name).to_dict(), "_origin": raw.origin}
                except (RegistryError, PluginError) as exc:
                    sec[name] = {"plugin": raw.plugin, **raw.options, "_origin": raw.origin,
                                 "_error": str(exc)}
            if sec:
                out[section] = sec
        return out


def expand_vars(value: Any, where: str) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` inside strings, recursively."""
    if isinstance(value, str):
        def repl(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise RegistryError(
                f"environment variable {var} is not set",
                where=where,
                fix=f"export {var}=... (e.g. 'export {var}=/data') or override this key with --registry FILE",
            )

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [expand_vars(v, where) for v in value]
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}") for k, v in value.items()}
    return value
