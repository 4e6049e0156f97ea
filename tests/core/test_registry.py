"""Registry loading and validation: every malformed file gets an error naming file, entry and key."""

from __future__ import annotations

import textwrap

import pytest

from t2ialign.core.errors import PluginError, RegistryError
from t2ialign.core.host import Host
from tests.helpers.fake_plugins import FakeBackbonePlugin


def _write(tmp_path, text, name="reg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _host(*files, **kw):
    return Host(registry_files=files, extra_plugins=[("fake", FakeBackbonePlugin())], **kw)


def test_valid_entry_fills_defaults_and_overrides(tmp_path):
    reg = _write(tmp_path, """
        backbones:
          mine: {plugin: const, model: /models/x, steps: 3}
    """)
    host = _host(reg)
    spec = host.registry.spec("backbones", "mine")
    assert spec.plugin == "const"
    assert spec.options == {"model": "/models/x", "steps": 3, "scale": 1.0, "weights": [1, 1], "extra": None}
    assert spec.origin == str(reg)
    # a later file without `plugin` only updates options of the existing entry
    over = _write(tmp_path, "backbones: {mine: {scale: 2}}", "over.yaml")
    host = _host(reg, over)
    spec = host.registry.spec("backbones", "mine")
    assert spec.options["scale"] == 2 and spec.options["model"] == "/models/x"
    assert host.backbone("mine").spec.options["steps"] == 3


@pytest.mark.parametrize(
    "text, message, where",
    [
        ("- just\n- a list\n", "must be a mapping of sections", "reg.yaml"),
        ("backbone:\n  x: {plugin: const}\n", "unknown registry section 'backbone' (did you mean 'backbones'?)", "reg.yaml"),
        ("backbones: [a, b]\n", "section 'backbones' must map entry names to mappings", "reg.yaml"),
        ("backbones:\n  x: const\n", "entry 'x' must be a mapping", "backbones.x"),
        ("backbones:\n  x: {model: /m}\n", "entry 'x' has no 'plugin' key", "backbones.x"),
        ("backbones:\n  x: {plugin: 3}\n", "key 'plugin' of entry 'x' must be a non-empty string", "backbones.x"),
        ("backbones:\n  x: {plugin: const, stepz: 3}\n", "unknown key 'stepz' for backbones plugin 'const' (did you mean 'steps'?)", "backbones.x.stepz"),
        ("backbones:\n  x: {plugin: const, steps: many}\n", "key 'steps' must be an integer, got a string", "backbones.x.steps"),
        ("backbones:\n  x: {plugin: const, steps: 2.5}\n", "key 'steps' must be an integer, got a number", "backbones.x.steps"),
        ("backbones:\n  x: {plugin: const, weights: 1}\n", "key 'weights' must be a list", "backbones.x.weights"),
        ("backbones:\n  x: !!python/object/apply:os.system ['echo hi']\n", "YAML tag that safe loading refuses", "line 2"),
        ("backbones:\n  x: {plugin: const\n", "is not valid YAML", "line"),
    ],
)
def test_malformed_registry_files(tmp_path, text, message, where):
    reg = _write(tmp_path, text)
    with pytest.raises(RegistryError) as info:
        _host(reg)
    msg = str(info.value)
    assert message in msg
    assert where in msg
    assert str(reg) in msg
    assert "how to fix" in msg


def test_missing_registry_file(tmp_path):
    with pytest.raises(RegistryError, match="registry file not found"):
        _host(tmp_path / "nope.yaml")


def test_env_interpolation(tmp_path, monkeypatch):
    reg = _write(tmp_path, """
        backbones:
          a: {plugin: const, model: "${T2I_TEST_ROOT}/m"}
          b: {plugin: const, model: "${T2I_TEST_UNSET:-/fallback}/m"}
    """)
    monkeypatch.delenv("T2I_TEST_ROOT", raising=False)
    host = _host(reg)
    assert host.registry.spec("backbones", "b").options["model"] == "/fallback/m"
    with pytest.raises(RegistryError) as info:
        host.registry.spec("backbones", "a")
    assert "environment variable T2I_TEST_ROOT is not set" in str(info.value)
    assert "backbones.a.model" in str(info.value)
    monkeypatch.setenv("T2I_TEST_ROOT", "/data")
    assert host.registry.spec("backbones", "a").options["model"] == "/data/m"


def test_unknown_plugin_is_reported_when_used(tmp_path):
    reg = _write(tmp_path, "backbones:\n  x: {plugin: nobody_has_this}\n")
    host = _host(reg)  # loading is fine: the plugin may come from a package installed later
    with pytest.raises(PluginError) as info:
        host.backbone("x")
    assert "no loaded plugin provides backbones plugin 'nobody_has_this'" in str(info.value)
    assert "const" in str(info.value)  # lists what is available


def test_unknown_entry_name_suggests(tmp_path):
    reg = _write(tmp_path, "backbones:\n  mine: {plugin: const}\n")
    with pytest.raises(RegistryError, match="no backbone named 'mien' in the registry \\(did you mean 'mine'\\?\\)"):
        _host(reg).backbone("mien")


def test_builtin_registry_ships_in_package():
    from t2ialign.core.registry import builtin_registry_path

    path = builtin_registry_path()
    assert path.is_file()
    host = Host()
    assert "toy" in host.registry.names("backbones")
