"""The built-in backbone modules share one shape: ``PLUGIN_NAME``, ``OPTIONS``, ``Backbone.from_spec``
and the two hooks, which answer only their own plugin name."""

from __future__ import annotations

import pytest

from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.backbones import stable_diffusion, stable_diffusion_3, stable_diffusion_xl

MODULES = {
    stable_diffusion: stable_diffusion.StableDiffusionBackbone,
    stable_diffusion_3: stable_diffusion_3.StableDiffusion3Backbone,
    stable_diffusion_xl: stable_diffusion_xl.StableDiffusionXLBackbone,
}


@pytest.mark.parametrize("module", list(MODULES), ids=lambda m: m.PLUGIN_NAME)
def test_module_shape(module):
    info = module.t2ialign_plugin_info()
    assert isinstance(info, PluginInfo) and info.description
    assert info.provides == {"backbones": {module.PLUGIN_NAME: module.OPTIONS}}
    # the hook hands out a copy: a caller editing it does not change the plugin's defaults
    info.provides["backbones"][module.PLUGIN_NAME]["model"] = "changed"
    assert module.OPTIONS["model"] == ""
    assert callable(MODULES[module].from_spec)
    other = EntrySpec("backbones", "x", "not_this_plugin", {})
    assert module.t2ialign_make_backbone(spec=other, device="cpu", dtype="float32") is None


def test_each_module_has_its_own_make_hook():
    # the host names the plugin whose make hook raised by the hook's code object
    codes = {m.t2ialign_make_backbone.__code__ for m in MODULES}
    assert len(codes) == len(MODULES)


def test_sdxl_options_extend_sd_options():
    assert set(stable_diffusion_xl.OPTIONS) == set(stable_diffusion.OPTIONS)
    assert stable_diffusion_xl.OPTIONS["cross_gaussian_sigma"] == 3.0
    assert stable_diffusion.OPTIONS["cross_gaussian_sigma"] == 0.0
