"""docs/plugins.md runs as written: its example modules are written out, its snippets run, its command works.

Blocks after ``<!-- file: NAME -->`` become files of a scratch folder (the working directory and
the import path of the snippets), blocks after ``<!-- run -->`` run there in order, and the block
after ``<!-- cli -->`` runs through the CLI with the example modules declared as an installed
package's entry points.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from t2ialign.core import plugin_manager
from t2ialign.core.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
_BLOCK = re.compile(r"<!-- (file: (?P<name>\S+)|run|cli) -->\n```\w*\n(?P<body>.*?)```", re.S)


def _blocks() -> list[tuple[str, str | None, str]]:
    """(kind, file name or None, body) of every marked block, in document order."""
    out = []
    for match in _BLOCK.finditer(DOC.read_text(encoding="utf-8")):
        kind = match.group(1).split(":")[0]
        out.append((kind, match.group("name"), match.group("body")))
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The doc's files written to a scratch folder that is the cwd and on the import path."""
    for kind, name, body in _blocks():
        if kind == "file":
            (tmp_path / name).write_text(body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in ("mean_colour", "colour_stats"):
        sys.modules.pop(module, None)


def _install_example_package(monkeypatch) -> None:
    """What installing a package with both modules under ``[project.entry-points.t2ialign]`` does."""
    original = plugin_manager._entry_points
    package = [("mean_colour", "mean_colour", "my-package 0.1"), ("colour_stats", "colour_stats", "my-package 0.1")]
    monkeypatch.setattr(plugin_manager, "_entry_points", lambda: original() + package)


def test_the_doc_marks_its_examples():
    kinds = [(kind, name) for kind, name, _ in _blocks()]
    assert ("file", "mean_colour.py") in kinds and ("file", "colour_stats.py") in kinds
    assert ("file", "my_registry.yaml") in kinds
    assert [k for k, _ in kinds].count("run") == 2 and [k for k, _ in kinds].count("cli") == 1


def test_the_snippets_run_as_written(scratch):
    for kind, _, body in _blocks():
        if kind == "run":
            exec(compile(body, f"{DOC.name} snippet", "exec"), {"__name__": "__doc_snippet__"})
    assert (scratch / "runs" / "api" / "results.json").is_file()


def test_the_command_runs_as_written(scratch, monkeypatch, capsys):
    (command,) = [body for kind, _, body in _blocks() if kind == "cli"]
    argv = shlex.split(command.strip())
    assert argv[0] == "t2ialign"
    _install_example_package(monkeypatch)
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert "mean colour r" in out and "outputs: runs/cli" in out
    results = json.loads((scratch / "runs" / "cli" / "results.json").read_text())
    assert results["images"] == 3 and results["task"] == "colour_stats"


def test_the_task_config_is_checked_against_its_defaults(scratch, monkeypatch, capsys):
    _install_example_package(monkeypatch)
    assert main(["--registry", "my_registry.yaml", "eval", "colour_stats", "limit=many"]) == 2
    assert "limit" in capsys.readouterr().err
