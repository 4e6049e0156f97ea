"""Plugin packages talk through the host: no module of one plugin package imports another's.

A plugin package is a direct child of ``t2ialign/plugins`` (``toy``, ``tasks``, ``metrics``...,
or a single module like ``phrases.py``). What several of them need lives in ``t2ialign.core``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import t2ialign.plugins

PLUGINS = Path(t2ialign.plugins.__file__).parent


def _package(path: Path) -> str:
    rel = path.relative_to(PLUGINS)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["t2ialign", "plugins"] and len(parts) > 2:
                out.add(parts[2])
    return out


def test_no_plugin_package_imports_another():
    crossing = set()
    for path in PLUGINS.rglob("*.py"):
        if path.parent == PLUGINS and path.name == "__init__.py":
            continue
        own = _package(path)
        for other in _imported_packages(path) - {own}:
            crossing.add((str(path.relative_to(PLUGINS)), other))
    assert crossing == set()
