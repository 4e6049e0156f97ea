"""Fixtures of the editing tests: a tiny random SD model, its editor, one toy edit pair and its source."""

from __future__ import annotations

import pytest

from t2ialign.core.host import Host
from t2ialign.plugins.tasks.editing.pairs import toy_edit_pairs
from t2ialign.plugins.tasks.editing.task import build_editor
from tests.helpers.editing import edit_config, write_base_registry, write_clip_registry


@pytest.fixture(scope="package")
def registry(tmp_path_factory):
    return write_base_registry(tmp_path_factory.mktemp("edit") / "reg.yaml")


@pytest.fixture(scope="package")
def clip_registry(tmp_path_factory):
    return write_clip_registry(tmp_path_factory.mktemp("edit-clip"))


@pytest.fixture(scope="package")
def host(registry):
    return Host(registry_files=[registry])


@pytest.fixture(scope="package")
def backbone(host):
    return host.backbone("tiny")


@pytest.fixture(scope="package")
def editor(host, backbone):
    return build_editor(edit_config(), host, backbone)


@pytest.fixture(scope="package")
def pair(host):
    return toy_edit_pairs(host.dataset("toy_small", "test"), 1, seed=0)[0]


@pytest.fixture(scope="package")
def source(editor, pair):
    return editor.source_from_image(pair.image, pair.source)
