"""Plugins that fail while being *called*, registered through fake entry points by the robustness tests.

``CALL_RAISER`` raises only for the backbone plugin it provides (``boom``); ``GREEDY`` raises for
every backbone request, so it breaks other plugins' entries until it is disabled with
``-p no:NAME``. Entry-point values point at these module attributes (``module:attribute``).
"""

from __future__ import annotations

from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import PluginInfo
from tests.helpers.fake_plugins import RaisingPlugin


class GreedyRaiser:
    """Implements ``t2ialign_make_backbone`` by raising, whatever the request."""

    @hookimpl
    def t2ialign_plugin_info(self):
        return PluginInfo(description="raises for every backbone request (test plugin)")

    @hookimpl
    def t2ialign_make_backbone(self, spec, device, dtype):
        raise ZeroDivisionError("greedy plugin divided by zero")


CALL_RAISER = RaisingPlugin()
GREEDY = GreedyRaiser()
