"""Plugin discovery: built-ins and third-party distributions load the same way, failures are isolated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from t2ialign.core import hookspecs
from t2ialign.core.errors import PluginError
from t2ialign.core.host import Host
from t2ialign.core.plugin_manager import load_plugins
from t2ialign.plugins import builtin_entry_points
from tests.helpers.fake_plugins import BrokenInfoPlugin, FakeBackbonePlugin, RaisingPlugin

REPO = Path(__file__).resolve().parents[2]


BUILTIN_PLUGINS = builtin_entry_points("t2ialign")


def test_builtin_table_is_read_from_pyproject():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["t2ialign"] == BUILTIN_PLUGINS


def test_builtins_are_registered_through_entry_points():
    loaded = load_plugins()
    builtin = {r.name: r for r in loaded.records if r.source == "builtin"}
    assert set(builtin) == set(BUILTIN_PLUGINS)
    assert all(r.status == "loaded" for r in builtin.values()), [
        (r.name, r.error) for r in builtin.values() if r.status != "loaded"]


def test_disable_and_unknown_disable():
    some = next(iter(BUILTIN_PLUGINS))
    loaded = load_plugins(disable=[some])
    assert loaded.record(some).status == "disabled"
    assert loaded.pm.get_plugin(some) is None
    with pytest.raises(PluginError, match="cannot disable unknown plugin"):
        load_plugins(disable=["no_such_plugin"])


def test_broken_plugin_is_isolated():
    host = Host(extra_plugins=[("broken", BrokenInfoPlugin()), ("fake", FakeBackbonePlugin())])
    rec = host.plugins.record("broken")
    assert rec.status == "failed" and "cannot describe myself" in rec.error
    assert host.plugins.record("fake").status == "loaded"
    assert "const" in host.plugins.providers("backbones")


def test_plugin_raising_at_call_is_wrapped(tmp_path):
    reg = tmp_path / "r.yaml"
    reg.write_text("backbones: {b: {plugin: boom}}\n")
    host = Host(registry_files=[reg], extra_plugins=[("raising", RaisingPlugin())])
    with pytest.raises(PluginError) as info:
        host.backbone("b")
    assert "raised RuntimeError while building backbone 'b'" in str(info.value)
    assert "kaboom" in str(info.value)


EXT_PLUGIN = '''
"""A third-party t2ialign extension, as an extension author would write it."""
from pathlib import Path
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import PluginInfo

class ConstantBackbone:
    prediction_type = "epsilon"
    def __init__(self, spec):
        self.name = spec.name
        self.scale = spec.options["scale"]

class CountMetric:
    def __init__(self):
        self.n = 0
    def update(self, *args, **kwargs):
        self.n += 1
    def compute(self):
        return {"count": self.n}
    def reset(self):
        self.n = 0
    def state(self):
        import torch
        return {"n": torch.tensor(self.n)}
    def merge(self, state):
        self.n += int(state["n"])

@hookimpl
def t2ialign_plugin_info():
    return PluginInfo(provides={"backbones": {"ext_const": {"scale": 1.0}},
                                "metrics": {"ext_count": {}}},
                      description="example extension")

@hookimpl
def t2ialign_make_backbone(spec, device, dtype):
    return ConstantBackbone(spec) if spec.plugin == "ext_const" else None

@hookimpl
def t2ialign_make_metric(spec):
    return CountMetric() if spec.plugin == "ext_count" else None

@hookimpl
def t2ialign_registry_files():
    return [str(Path(__file__).with_name("ext_registry.yaml"))]
'''

EXT_REGISTRY = """
backbones:
  ext_model: {plugin: ext_const, scale: 2.5}
metrics:
  ext_metric: {plugin: ext_count}
"""


@pytest.fixture(scope="module")
def installed_extension(tmp_path_factory):
    """Build and pip-install a real distribution with a `t2ialign` entry point into a target dir."""
    root = tmp_path_factory.mktemp("ext")
    src = root / "src"
    pkg = src / "t2ialign_ext_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(EXT_PLUGIN)
    (pkg / "ext_registry.yaml").write_text(EXT_REGISTRY)
    (pkg / "broken.py").write_text("raise ImportError('this extension module is broken on purpose')\n")
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "t2ialign-ext-demo"
        version = "0.3.1"
        [project.entry-points.t2ialign]
        ext_demo = "t2ialign_ext_demo"
        ext_broken = "t2ialign_ext_demo.broken"
        [tool.setuptools.packages.find]
        include = ["t2ialign_ext_demo*"]
        [tool.setuptools.package-data]
        t2ialign_ext_demo = ["*.yaml"]
    """))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "t2ialign", *args], env=env, capture_output=True, text=True)


def test_third_party_distribution_is_listed(installed_extension):
    out = _cli(installed_extension, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    recs = {r["name"]: r for r in data["plugins"]}
    assert recs["ext_demo"]["source"] == "t2ialign-ext-demo 0.3.1"
    assert recs["ext_demo"]["status"] == "loaded"
    assert recs["ext_demo"]["provides"] == {"backbones": ["ext_const"], "metrics": ["ext_count"]}
    assert "ext_demo" in data["hooks"]["t2ialign_make_backbone"]
    assert "ext_demo" in data["hooks"]["t2ialign_make_metric"]
    # the broken module of the same distribution is reported, and did not take the others down
    assert recs["ext_broken"]["status"] == "failed"
    assert "this extension module is broken on purpose" in recs["ext_broken"]["error"]
    assert "plugin 'ext_broken' (t2ialign-ext-demo 0.3.1) failed to load" in out.stderr
    assert all(recs[n]["status"] == "loaded" for n in BUILTIN_PLUGINS)


def test_third_party_entries_usable_by_name(installed_extension):
    code = textwrap.dedent("""
        from t2ialign.core.host import Host
        host = Host()
        b = host.backbone("ext_model")
        m = host.metric("ext_metric")
        m.update(); m.update()
        print(b.name, b.scale, m.compute()["count"])
    """)
    out = subprocess.run([sys.executable, "-c", code], env=installed_extension, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ext_model", "2.5", "2"]
    reg = _cli(installed_extension, "registry", "--json")
    entries = json.loads(reg.stdout)["entries"]
    assert entries["backbones"]["ext_model"]["scale"] == 2.5
    assert entries["backbones"]["ext_model"]["_origin"].endswith("ext_registry.yaml")


def test_disable_third_party_plugin(installed_extension):
    out = _cli(installed_extension, "-p", "no:ext_demo", "plugins", "--json")
    recs = {r["name"]: r for r in json.loads(out.stdout)["plugins"]}
    assert recs["ext_demo"]["status"] == "disabled"
    assert "ext_demo" not in json.loads(out.stdout)["hooks"]["t2ialign_make_backbone"]


def test_every_hook_of_the_contract_is_listed():
    out = subprocess.run([sys.executable, "-m", "t2ialign", "plugins", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    hooks = json.loads(out.stdout)["hooks"]
    declared = {n for n in dir(hookspecs) if n.startswith("t2ialign_")}
    assert set(hooks) == declared
    for name in declared:
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"
