"""Error types: every failure a user can cause says what was wrong, where, and how to fix it."""

from __future__ import annotations


class T2IAlignError(Exception):
    """Base of all errors t2ialign raises on purpose.

    ``what`` is the problem, ``where`` the file/entry/key/item it concerns and ``fix`` what the
    user can do about it. The CLI prints the message and exits with :attr:`exit_code`.
    """

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        parts = [what]
        if where:
            parts.append(f"(in {where})")
        msg = " ".join(parts)
        if fix:
            msg += f"\n  how to fix: {fix}"
        super().__init__(msg)


class ConfigError(T2IAlignError):
    """A configuration file, override or option is malformed."""


class RegistryError(ConfigError):
    """A registry YAML file or entry is malformed, or names something unknown."""


class PluginError(T2IAlignError):
    """A plugin failed to load, or no plugin answers a request."""


class InputError(T2IAlignError):
    """An input (image, mask, class list, prompt, dataset folder) cannot be used."""


class ModelLoadError(T2IAlignError):
    """A model could not be loaded (missing folder, hub id while offline, wrong layout)."""


class NumericalError(T2IAlignError):
    """NaN or Inf appeared in model outputs or maps."""

    exit_code = 3


class RunLockedError(T2IAlignError):
    """Another run holds the output folder."""
