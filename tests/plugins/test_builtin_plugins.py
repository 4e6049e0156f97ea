"""The built-in plugins are declared once (pyproject.toml); the source-tree fallback reads it there."""

from __future__ import annotations

import importlib.metadata as md
from types import SimpleNamespace

import pytest

import t2ialign.plugins
from t2ialign.core import plugin_manager
from t2ialign.core.errors import PluginError
from t2ialign.core.plugin_manager import COMMANDS_GROUP, ENTRY_POINT_GROUP, load_command_plugins, load_plugins
from t2ialign.plugins import builtin_entry_points

GROUPS = (ENTRY_POINT_GROUP, COMMANDS_GROUP)


def _installed(group: str) -> dict[str, str]:
    """t2ialign's own entry points of ``group`` in the installed metadata."""
    return {ep.name: ep.value for ep in md.entry_points(group=group)
            if ep.dist is not None and ep.dist.metadata["Name"].lower() == "t2ialign"}


def _no_metadata(monkeypatch, keep: tuple[str, ...] = ()) -> None:
    """Installed metadata with no entry point at all (except those of the groups in ``keep``)."""
    monkeypatch.setattr(plugin_manager, "md", SimpleNamespace(
        entry_points=lambda group: md.entry_points(group=group) if group in keep else []))


@pytest.mark.parametrize("group", GROUPS)
def test_fallback_equals_installed_metadata(group):
    installed = _installed(group)
    if not installed:
        pytest.skip("t2ialign is not installed here (running from a bare source tree)")
    # a difference means pyproject.toml changed since the install: re-run `pip install -e .`
    assert builtin_entry_points(group) == installed


def test_fallback_without_metadata_loads_every_builtin(monkeypatch):
    _no_metadata(monkeypatch)
    loaded = load_plugins()
    assert [r.name for r in loaded.records] == list(builtin_entry_points(ENTRY_POINT_GROUP))
    assert all(r.source == "builtin" and r.status == "loaded" for r in loaded.records), [
        (r.name, r.error) for r in loaded.records if r.status != "loaded"]
    assert "stable_diffusion" in loaded.providers("backbones")
    commands = load_command_plugins()
    assert {r.name for r in commands.records} == set(builtin_entry_points(COMMANDS_GROUP))
    assert all(r.status == "loaded" for r in commands.records)


def test_fallback_for_a_group_the_install_predates(monkeypatch):
    _no_metadata(monkeypatch, keep=(ENTRY_POINT_GROUP,))
    commands = load_command_plugins()
    assert {r.name for r in commands.records if r.source == "builtin"} == set(builtin_entry_points(COMMANDS_GROUP))


def test_no_metadata_and_no_pyproject_is_a_clear_error(monkeypatch, tmp_path):
    _no_metadata(monkeypatch)
    monkeypatch.setattr(t2ialign.plugins, "PYPROJECT", tmp_path / "pyproject.toml")
    with pytest.raises(PluginError) as info:
        load_plugins()
    assert "declared nowhere" in str(info.value) and "pip install -e ." in str(info.value)


def test_a_pyproject_of_another_project_is_refused(monkeypatch, tmp_path):
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\n[project.entry-points.t2ialign]\nx = "other.x"\n')
    monkeypatch.setattr(t2ialign.plugins, "PYPROJECT", other)
    with pytest.raises(PluginError, match="is not t2ialign's pyproject.toml"):
        builtin_entry_points(ENTRY_POINT_GROUP)


def test_the_table_follows_whatever_pyproject_declares(monkeypatch, tmp_path):
    # other module paths, another order, an undeclared group: the fallback mirrors the file as it is
    own = tmp_path / "pyproject.toml"
    own.write_text('[project]\nname = "t2ialign"\n[project.entry-points.t2ialign]\n'
                   'voc = "somewhere.else.voc"\nphrases = "t2ialign.plugins.phrases"\n')
    monkeypatch.setattr(t2ialign.plugins, "PYPROJECT", own)
    assert list(builtin_entry_points(ENTRY_POINT_GROUP).items()) == [
        ("voc", "somewhere.else.voc"), ("phrases", "t2ialign.plugins.phrases")]
    assert builtin_entry_points(COMMANDS_GROUP) == {}
