"""Built-in plugins of t2ialign.

They are declared once, as entry points of this distribution in ``pyproject.toml`` (group
``t2ialign`` for the plugins, ``t2ialign.commands`` for their light command modules, named after
the plugin whose commands they are), and registered through them the same way third-party
plugins are. :func:`builtin_entry_points` reads that table from the source tree's
``pyproject.toml``: the plugin manager asks for it only when the installed metadata has no entry
of t2ialign's own for a group (running from a source tree that was never installed, or an install
that predates a group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2ialign.core.errors import PluginError

#: where the source tree keeps the declaration (next to the ``t2ialign`` package folder)
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

_INSTALL_FIX = ("install t2ialign so that its entry points are recorded: `pip install -e .` in a source "
                "checkout (re-run it after editing the entry points of pyproject.toml), or `pip install t2ialign`")


def builtin_entry_points(group: str) -> dict[str, str]:
    """``{name: module}`` of t2ialign's own entry-point ``group``, as ``pyproject.toml`` declares them.

    A group the file does not declare is empty. Raises :class:`PluginError` when there is no
    ``pyproject.toml`` of t2ialign next to the package (an uninstalled copy of the package alone).
    """
    data = _read_pyproject(PYPROJECT)
    project = data.get("project") if isinstance(data, dict) else None
    if not isinstance(project, dict) or project.get("name") != "t2ialign":
        raise PluginError(f"{PYPROJECT} is not t2ialign's pyproject.toml, so the built-in plugins are unknown",
                          where="built-in plugins", fix=_INSTALL_FIX)
    return {str(name): str(value) for name, value in project.get("entry-points", {}).get(group, {}).items()}


def _read_pyproject(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PluginError(
            "the built-in plugins are declared nowhere: the installed metadata has no entry points of "
            f"distribution 't2ialign' and there is no pyproject.toml at {path} ({type(exc).__name__})",
            where="built-in plugins", fix=_INSTALL_FIX,
        ) from exc
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the backport, if installed
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as exc:
            raise PluginError(f"cannot read {path} on this Python (no tomllib, no tomli)", where="built-in plugins",
                              fix=_INSTALL_FIX + ", or `pip install tomli`") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PluginError(f"cannot read the built-in plugins from {path}: {exc}", where="built-in plugins",
                          fix="fix the TOML syntax of pyproject.toml") from exc
