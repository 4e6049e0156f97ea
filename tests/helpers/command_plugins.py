"""Command plugins of a pretend third-party package, for ``tests/core/test_cli.py``.

``LIGHT`` is what a package declares under the entry-point group ``t2ialign.commands`` (no heavy
import); ``LEGACY`` is a main-group plugin that adds its command from its own module (the way
before that group existed), which must keep working.
"""

from __future__ import annotations

from typing import Any

from t2ialign.core.hookspecs import hookimpl


def _hello(args: Any, host: Any) -> int:
    # touching the host builds it: proves the handler gets a working one
    print(f"hello {args.name} ({len(host.plugins.records)} plugins)")
    return 0


class LightCommands:
    @hookimpl
    def t2ialign_add_commands(self, subparsers: Any) -> None:
        p = subparsers.add_parser("hello", help="say hello (test command plugin)")
        p.add_argument("name")
        p.set_defaults(handler=_hello)


class LegacyCommands:
    @hookimpl
    def t2ialign_add_commands(self, subparsers: Any) -> None:
        p = subparsers.add_parser("legacy-hello", help="say hello from a main-group plugin (test)")
        p.add_argument("name")
        p.set_defaults(handler=_hello)


LIGHT = LightCommands()
LEGACY = LegacyCommands()
