"""Prompt datasets: prompt files in the reference's one-prompt-per-line layout."""

from __future__ import annotations

import pytest
import yaml

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Dataset
from t2ialign.plugins.datasets import prompt_sets as ps


def _host(tmp_path, datasets):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"datasets": datasets}))
    return Host(registry_files=[reg])


def test_prompt_file_through_the_registry(tmp_path, monkeypatch):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "abc6k.txt").write_text(
        "# ABC-6K sample\na brown bench and a white cat\n\n  a red apple next to a green bowl  \n"
        "un café crème et une tasse bleue\n", encoding="utf-8")
    monkeypatch.setenv("T2IALIGN_DATA", str(tmp_path))
    host = _host(tmp_path, {"abc6k": {"plugin": "prompt_file", "path": "${T2IALIGN_DATA}/prompts/abc6k.txt"}})
    ds = host.dataset("abc6k", "test")
    assert isinstance(ds, Dataset) and len(ds) == 3
    assert [s.prompt for s in (ds[0], ds[1], ds[2])] == [
        "a brown bench and a white cat", "a red apple next to a green bowl", "un café crème et une tasse bleue"]
    assert ds[0].id == "abc6k_00000" and ds[0].phrases is None
    limited = host.dataset({"name": "abc_small", "plugin": "prompt_file",
                            "path": str(tmp_path / "prompts" / "abc6k.txt"), "limit": 2}, "test")
    assert len(limited) == 2


def test_missing_prompt_file_names_it_and_its_source(tmp_path):
    host = _host(tmp_path, {"dvmp": {"plugin": "prompt_file", "path": str(tmp_path / "nope.txt")}})
    with pytest.raises(InputError) as err:
        host.dataset("dvmp", "test")
    msg = str(err.value)
    assert "nope.txt" in msg and "SynGen" in msg and "Matrix53/elbo-t2ialign" in msg


def test_bad_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="no prompts"):
        ps.read_prompt_file(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        ps.read_prompt_file(latin)
    with pytest.raises(ConfigError, match="no prompt file"):
        ps.make_prompt_file({}, "test")
    with pytest.raises(ConfigError, match="limit"):
        ps.make_prompt_file({"path": str(latin), "limit": -1}, "test")
