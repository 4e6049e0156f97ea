"""Small in-code plugins used by the host tests (registered with ``Host(extra_plugins=...)``)."""

from __future__ import annotations

from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import PluginInfo


class ConstBackbone:
    """Not a real denoiser: only what the registry/host tests look at."""

    def __init__(self, spec, device, dtype):
        self.name = spec.name
        self.spec = spec
        self.device = device
        self.dtype = dtype


class FakeBackbonePlugin:
    """Provides backbone plugin ``const`` with options ``model`` (str), ``steps`` (int), ``scale`` (float)."""

    @hookimpl
    def t2ialign_plugin_info(self):
        return PluginInfo(provides={"backbones": {"const": {"model": "", "steps": 10, "scale": 1.0,
                                                            "weights": [1, 1], "extra": None}}},
                          description="test backbone")

    @hookimpl
    def t2ialign_make_backbone(self, spec, device, dtype):
        if spec.plugin != "const":
            return None
        return ConstBackbone(spec, device, dtype)


class RaisingPlugin:
    """Answers backbone plugin ``boom`` by raising, to test that call errors are wrapped."""

    @hookimpl
    def t2ialign_plugin_info(self):
        return PluginInfo(provides={"backbones": {"boom": {}}})

    @hookimpl
    def t2ialign_make_backbone(self, spec, device, dtype):
        if spec.plugin != "boom":
            return None
        raise RuntimeError("kaboom")


class BrokenInfoPlugin:
    """Its plugin_info raises: the plugin must be marked failed, the others unaffected."""

    @hookimpl
    def t2ialign_plugin_info(self):
        raise ValueError("cannot describe myself")
