"""Plugin manager: loads built-in and third-party plugins the same way, through entry points.

Built-in plugins are declared in t2ialign's own ``pyproject.toml`` under the entry-point group
``t2ialign`` exactly like a third-party package declares its own, so they can be listed,
disabled (``-p no:NAME``) and replaced the same way. A plugin that fails to import is recorded
with its name and error and the others still load.

Command-line front ends live in a second group, ``t2ialign.commands``: light modules (stdlib and
``t2ialign.core`` only at import time) that implement ``t2ialign_add_commands`` and import their
heavy machinery when the command runs. The CLI builds its parser from them alone
(:func:`load_command_plugins`), so ``--help`` and usage errors never wait for torch. An entry of
that group is named after the plugin it fronts: ``-p no:NAME`` disables both.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from t2ialign.core import hookspecs
from t2ialign.core.errors import PluginError
from t2ialign.core.specs import PluginInfo

ENTRY_POINT_GROUP = "t2ialign"
COMMANDS_GROUP = "t2ialign.commands"
OWN_DISTRIBUTION = "t2ialign"


@dataclass
class PluginRecord:
    """Where a plugin came from and whether it loaded."""

    name: str
    module: str
    source: str  # "builtin" or "<distribution> <version>"
    status: str = "loaded"  # "loaded" | "failed" | "disabled"
    error: str | None = None
    info: PluginInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "module": self.module, "source": self.source, "status": self.status}
        if self.error:
            out["error"] = self.error
        if self.info is not None:
            out["provides"] = {k: sorted(v) for k, v in self.info.provides.items()}
            out["description"] = self.info.description
        return out


@dataclass
class LoadedPlugins:
    """A ready plugin manager plus the record of what was loaded, failed or disabled."""

    pm: pluggy.PluginManager
    records: list[PluginRecord] = field(default_factory=list)

    @property
    def failures(self) -> list[PluginRecord]:
        return [r for r in self.records if r.status == "failed"]

    def record(self, name: str) -> PluginRecord | None:
        return next((r for r in self.records if r.name == name), None)

    def providers(self, section: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """``{plugin_name: (providing_plugin, option_defaults)}`` for one registry section."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for rec in self.records:
            if rec.status != "loaded" or rec.info is None:
                continue
            for pname, options in rec.info.provides.get(section, {}).items():
                out[pname] = (rec.name, dict(options))
        return out

    def hooks(self) -> dict[str, list[str]]:
        """Every hook of the contract with the names of the plugins implementing it."""
        out: dict[str, list[str]] = {}
        for hook_name in sorted(n for n in dir(hookspecs) if n.startswith("t2ialign_")):
            caller = getattr(self.pm.hook, hook_name)
            out[hook_name] = [impl.plugin_name for impl in caller.get_hookimpls()]
        return out


def _builtin_fallback() -> list[tuple[str, str]]:
    """Built-in (name, module) pairs when t2ialign runs from a source tree without metadata."""
    from t2ialign.plugins import builtin_entry_points

    return list(builtin_entry_points(ENTRY_POINT_GROUP).items())


def _builtin_commands_fallback() -> list[tuple[str, str]]:
    """Built-in command modules when the installed metadata predates (or lacks) the commands group."""
    from t2ialign.plugins import builtin_entry_points

    return list(builtin_entry_points(COMMANDS_GROUP).items())


def _group_entry_points(group: str, fallback: Any) -> list[tuple[str, str, str]]:
    """(name, module, source) for every entry point of ``group``, built-ins first."""
    found: list[tuple[str, str, str]] = []
    own_seen = False
    for ep in md.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "unknown"
        if dist_name and dist_name.lower() == OWN_DISTRIBUTION:
            own_seen = True
            source = "builtin"
        else:
            source = f"{dist_name} {dist.version if dist is not None else '?'}"
        found.append((ep.name, ep.value, source))
    if not own_seen:
        found = [(n, m, "builtin") for n, m in fallback()] + found
    # built-ins register first so third-party plugins (registered later) are called first by
    # pluggy (LIFO) and can override a built-in answer
    found.sort(key=lambda item: item[2] != "builtin")
    # the same entry point can be seen twice (e.g. an editable install plus a source tree)
    unique: dict[str, tuple[str, str, str]] = {}
    for item in found:
        unique.setdefault(item[0], item)
    return list(unique.values())


def _entry_points() -> list[tuple[str, str, str]]:
    """(name, module, source) for every plugin of the main group ``t2ialign``, built-ins first."""
    return _group_entry_points(ENTRY_POINT_GROUP, _builtin_fallback)


def _command_entry_points() -> list[tuple[str, str, str]]:
    """(name, module, source) for every light command module (group ``t2ialign.commands``)."""
    return _group_entry_points(COMMANDS_GROUP, _builtin_commands_fallback)


def third_party_plugin_names() -> list[str]:
    """Names of the installed plugins that are not t2ialign's own (metadata only, nothing imported)."""
    return [name for name, _, source in _entry_points() + _command_entry_points() if source != "builtin"]


def _register(pm: pluggy.PluginManager, name: str, value: str, rec: PluginRecord) -> bool:
    """Import ``module[:attr.path]`` and register it; a failure is recorded on ``rec``."""
    try:
        obj = importlib.import_module(value.split(":")[0])
        if ":" in value:
            for attr in value.split(":", 1)[1].split("."):
                obj = getattr(obj, attr)
        pm.register(obj, name=name)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the host down
        rec.status = "failed"
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.traceback = traceback.format_exc()  # type: ignore[attr-defined]
        return False
    return True


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _unknown_disabled(disable: set[str], known: set[str]) -> None:
    unknown = disable - known
    if unknown:
        raise PluginError(
            f"cannot disable unknown plugin(s) {sorted(unknown)}",
            where="-p no:NAME",
            fix=f"use one of the plugin names listed by 't2ialign plugins': {sorted(known)}",
        )


def load_command_plugins(disable: Iterable[str] = ()) -> LoadedPlugins:
    """The plugin manager the CLI builds its parser from: command modules only, no heavy imports.

    Loads every entry of the group ``t2ialign.commands``; for compatibility it also imports the
    third-party plugins of the main group that have no entry of the same name there (a plugin
    may implement ``t2ialign_add_commands`` in its main module; it then pays its own import time
    on ``--help``) -- unless their distribution declares any ``t2ialign.commands`` entry: such a
    package has said where its commands are (an extension without commands declares an empty
    light module, as ``t2ialign-flux`` does), so its heavy modules stay unimported. Built-in
    main-group plugins are never imported here. Names are checked against both groups'
    metadata (nothing imported), like :func:`load_plugins` does.
    """
    disable = set(disable)
    pm = _new_manager()
    loaded = LoadedPlugins(pm)
    commands = _command_entry_points()
    main_group = _entry_points()
    names = {n for n, _, _ in commands}
    declared = {source for _, _, source in commands}  # distributions that use the commands group
    legacy = [item for item in main_group
              if item[2] != "builtin" and item[0] not in names and item[2] not in declared]
    _unknown_disabled(disable, names | {n for n, _, _ in main_group})
    for name, value, source in commands + legacy:
        rec = _load_entry(loaded, disable, name, value, source)
        if rec is not None:
            rec.info = PluginInfo()  # what the plugin provides is the host's business, not the parser's
    return loaded


def _load_entry(loaded: LoadedPlugins, disable: set[str], name: str, value: str,
                source: str) -> PluginRecord | None:
    """Record one entry point on ``loaded`` and register it unless disabled; the record when
    it registered, None when it is disabled or failed to load (the record says which)."""
    rec = PluginRecord(name=name, module=value, source=source)
    loaded.records.append(rec)
    if name in disable:
        rec.status = "disabled"
        loaded.pm.set_blocked(name)
        return None
    return rec if _register(loaded.pm, name, value, rec) else None


def load_plugins(
    disable: Iterable[str] = (), extra: Iterable[tuple[str, Any]] = ()
) -> LoadedPlugins:
    """Create the plugin manager and register every discoverable plugin.

    ``disable``: plugin names to block for this run (the CLI's ``-p no:NAME``).
    ``extra``: ``(name, plugin_object)`` pairs registered after entry points (tests, notebooks).
    """
    disable = set(disable)
    pm = _new_manager()
    loaded = LoadedPlugins(pm)
    # a command module's name (group t2ialign.commands) is a valid -p no:NAME too
    known = {n for n, _, _ in _command_entry_points()}
    for name, value, source in _entry_points():
        known.add(name)
        rec = _load_entry(loaded, disable, name, value, source)
        if rec is not None:
            rec.info = _plugin_info(pm, name, rec)
    for name, obj in extra:
        known.add(name)
        rec = PluginRecord(name=name, module=repr(obj), source="registered in code")
        loaded.records.append(rec)
        if name in disable:
            rec.status = "disabled"
            continue
        pm.register(obj, name=name)
        rec.info = _plugin_info(pm, name, rec)
    _unknown_disabled(disable, known)
    return loaded


def _plugin_info(pm: pluggy.PluginManager, name: str, rec: PluginRecord) -> PluginInfo | None:
    """Ask one plugin for its :class:`PluginInfo`; a failure marks the plugin failed."""
    plugin = pm.get_plugin(name)
    impl = getattr(plugin, "t2ialign_plugin_info", None)
    if impl is None:
        return PluginInfo()
    try:
        info = impl()
    except Exception as exc:  # noqa: BLE001
        rec.status = "failed"
        rec.error = f"t2ialign_plugin_info raised {type(exc).__name__}: {exc}"
        pm.unregister(name=name)
        return None
    if not isinstance(info, PluginInfo):
        rec.status = "failed"
        rec.error = f"t2ialign_plugin_info returned {type(info).__name__}, expected PluginInfo"
        pm.unregister(name=name)
        return None
    return info
