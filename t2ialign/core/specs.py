"""Plain data records passed between the host and plugins: registry entries and plugin facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Registry sections a plugin can provide implementations for.
SECTIONS = ("backbones", "datasets", "metrics", "tasks", "extractors", "weightings", "phrases")


@dataclass(frozen=True)
class EntrySpec:
    """One resolved registry entry.

    ``section`` is the registry section (``backbones`` ...), ``name`` the entry's key (``sd15``),
    ``plugin`` the implementation that must build it, ``options`` every other key of the entry
    after ``${VAR}`` expansion, and ``origin`` the file that defined (or last overrode) it.
    """

    section: str
    name: str
    plugin: str
    options: dict[str, Any] = field(default_factory=dict)
    origin: str = "<code>"

    def get(self, key: str, default: Any = None) -> Any:
        """Return option ``key`` or ``default``."""
        return self.options.get(key, default)

    @property
    def where(self) -> str:
        """Human-readable location of this entry, for error messages."""
        return f"{self.origin}: {self.section}.{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """The entry as it would be written in a registry file."""
        return {"plugin": self.plugin, **self.options}


@dataclass
class PluginInfo:
    """What one plugin provides: ``provides[section][plugin_name] = {option: default}``.

    A default's type is the accepted type of that option (``int`` also accepts a whole
    ``float``-free number, ``float`` accepts ``int``); a default of ``None`` accepts any value.
    ``description`` is a one-line summary shown by ``t2ialign plugins``.
    """

    provides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    description: str = ""
