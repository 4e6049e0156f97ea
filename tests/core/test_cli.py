"""The command line as a person meets it: fast help, word lists vs overrides, exit codes, quiet output.

``--help`` and usage errors must not import torch (checked in a fresh interpreter through
``sys.modules``; the wall times are benchmarks/cli_latency.py's business). Every subcommand's exit
codes (0 ok, 2 usage, 3 numerical, 1 internal) are asserted here and documented in
docs/troubleshooting.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from t2ialign.core import cli, console
from t2ialign.core.cli import build_parser, main, parse_command_line
from t2ialign.core.errors import NumericalError
from t2ialign.core.plugin_manager import load_command_plugins
from t2ialign.plugins import builtin_entry_points

REPO = Path(__file__).resolve().parents[2]
BUILTIN_COMMANDS = builtin_entry_points("t2ialign.commands")
DOC = REPO / "docs" / "troubleshooting.md"

#: every built-in subcommand with the smallest argv that reaches its handler
COMMANDS = {
    "plugins": ["plugins"],
    "registry": ["registry"],
    "eval": ["eval", "segmentation"],
    "heatmap": ["heatmap", "x.png", "--classes", "cat"],
    "demo": ["demo"],
    "edit": ["edit", "x.png", "--source", "a red circle", "--target", "a blue circle"],
    "generate": ["generate", "a red star"],
    "train-toy": ["train-toy", "--preset", "tiny"],
}
HANDLERS = {
    "plugins": (cli, "cmd_plugins"),
    "registry": (cli, "cmd_registry"),
    "eval": (cli, "cmd_eval"),
    "heatmap": ("t2ialign.plugins.tasks.segmentation_commands", "cmd_heatmap"),
    "demo": ("t2ialign.plugins.tasks.segmentation_commands", "cmd_demo"),
    "edit": ("t2ialign.plugins.tasks.editing.commands", "cmd_edit"),
    "generate": ("t2ialign.plugins.tasks.generation_commands", "cmd_generate"),
    "train-toy": ("t2ialign.plugins.toy.commands", "cmd_train_toy"),
}

NO_TORCH = """
import contextlib, io, json, sys
from t2ialign.core.cli import main
codes = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes[" ".join(argv)] = main(argv)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "open_clip", "torchmetrics") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def _parse(argv: list[str]):
    return parse_command_line(build_parser(load_command_plugins()), argv)


def test_help_and_usage_errors_do_not_import_torch(tmp_path):
    runs = [["--help"], *[[name, "--help"] for name in COMMANDS],
            ["heatmapp"], ["heatmap", "x.png"], ["heatmap", "x.png", "--classes", "cat", "--threshold", "2"],
            ["heatmap", "x.png", "--classes", "gamma=1"],
            ["generate", "a star", "--guidance", "nan"], ["edit", "x.png", "--source", "a"],
            ["heatmap", str(tmp_path / "missing.png"), "--classes", "cat", "dog"]]
    out = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(runs)], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["heavy"] == [], data
    codes = data["codes"]
    assert all(codes[" ".join(r)] == 0 for r in runs if r[-1] == "--help"), codes
    assert all(code == 2 for argv, code in codes.items() if not argv.endswith("--help")), codes


def test_builtin_command_table_matches_pyproject():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["t2ialign.commands"] == BUILTIN_COMMANDS
    loaded = load_command_plugins()
    assert {r.name for r in loaded.records if r.status == "loaded"} >= set(BUILTIN_COMMANDS)


def test_command_modules_import_nothing_heavy():
    """Each built-in command module, imported alone, leaves torch out (its entry point is light)."""
    code = ("import importlib, sys, json; mods = json.loads(sys.argv[1]); [importlib.import_module(m) for m in mods];"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(BUILTIN_COMMANDS.values()))], cwd=REPO,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# a word containing "=" is never a word
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, dest, words, overrides", [
    (["heatmap", "s.png", "--classes", "circle", "square", "gamma=1/0"], "classes", ["circle", "square"], ["gamma=1/0"]),
    (["heatmap", "s.png", "gamma=1/2", "--classes", "circle"], "classes", ["circle"], ["gamma=1/2"]),
    (["generate", "a red star and a blue circle", "--phrases", "a red star", "a blue circle", "steps=4"],
     "phrases", ["a red star", "a blue circle"], ["steps=4"]),
    (["edit", "s.png", "--source", "a red circle", "--target", "a blue circle", "--edit-words", "circle", "steps=4"],
     "edit_words", ["circle"], ["steps=4"]),
    (["edit", "s.png", "--source", "a red circle", "--target", "a blue circle", "--words", "circle", "gamma=0.5",
      "--edit-words", "circle"], "words", ["circle"], ["gamma=0.5"]),
])
def test_key_value_after_a_word_list_is_an_override(argv, dest, words, overrides):
    args = _parse(argv)
    assert getattr(args, dest) == words
    assert args.overrides == overrides


def test_eval_takes_key_value_anywhere_and_never_as_its_task():
    args = _parse(["eval", "segmentation", "limit=2", "--backbone", "toy", "gamma=1/2"])
    assert args.task == "segmentation" and sorted(args.overrides) == ["gamma=1/2", "limit=2"]
    assert main(["eval", "gamma=1/2", "segmentation"]) == 2  # not a task name: invalid choice


def test_word_list_of_only_overrides_is_a_usage_error(capsys):
    assert main(["heatmap", "s.png", "--classes", "gamma=1/2"]) == 2
    err = capsys.readouterr().err
    assert "'gamma=1/2' is a key=value override, not a word" in err and "--classes cat dog gamma=1/2" in err


@pytest.mark.parametrize("argv, says", [
    (["heatmap", "s.png", "--classes", "cat", "--threshold", "2"], "argument --threshold: must be a finite number in [0, 1], got '2'"),
    (["heatmap", "s.png", "--classes", "cat", "--threshold", "nan"], "argument --threshold: must be a finite number in [0, 1], got 'nan'"),
    (["heatmap", "s.png", "--classes", "cat", "--gamma", "0"], "argument --gamma: must be a finite number in (0, 1]"),
    (["heatmap", "s.png", "--classes", "cat", "--gamma", "1/0"], "argument --gamma: '1/0' is not a number"),
    (["edit", "s.png", "--source", "a", "--target", "b", "--gamma", "1"], "argument --gamma: must be a finite number in (0, 1)"),
    (["generate", "a star", "--guidance", "inf"], "argument --guidance: must be a finite number in [0, inf]"),
    (["generate", "a star", "--strength", "0.5"], "argument --strength: must be a finite number in [1, inf]"),
    (["generate", "a star", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["eval", "segmentation", "--limit", "0"], "argument --limit/--n: must be an integer >= 1, got 0"),
])
def test_options_are_range_checked_while_parsing(argv, says, capsys):
    assert main(argv) == 2
    assert says in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# exit codes of every subcommand
# --------------------------------------------------------------------------------------------
def _patch_handler(monkeypatch, command, fn):
    module, name = HANDLERS[command]
    if isinstance(module, str):
        module = __import__(module, fromlist=["x"])
    monkeypatch.setattr(module, name, fn)


def _boom(exc):
    def handler(args, host):
        raise exc
    return handler


@pytest.mark.parametrize("command", list(COMMANDS))
def test_exit_codes_of_every_subcommand(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # crash reports of the internal-error case
    argv = COMMANDS[command]
    assert main([command, "--help"]) == 0
    assert main([*argv, "--no-such-option"]) == 2
    _patch_handler(monkeypatch, command, lambda args, host: 0)
    assert main(argv) == 0
    _patch_handler(monkeypatch, command, _boom(NumericalError("NaN/Inf values in a test", where="test")))
    assert main(argv) == 3
    _patch_handler(monkeypatch, command, _boom(RuntimeError("a bug")))
    assert main(argv) == 1
    _patch_handler(monkeypatch, command, _boom(KeyboardInterrupt()))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: a bug" in err and "interrupted" in err


def test_exit_codes_are_documented_per_subcommand():
    doc = DOC.read_text(encoding="utf-8")
    section = doc[doc.index("## Exit codes of each command"):]
    for command in COMMANDS:
        assert f"| `{command}` |" in section, command


# --------------------------------------------------------------------------------------------
# third-party commands
# --------------------------------------------------------------------------------------------
def test_third_party_commands_light_and_legacy(monkeypatch, capsys):
    from t2ialign.core import plugin_manager

    commands, main_group = plugin_manager._command_entry_points, plugin_manager._entry_points
    monkeypatch.setattr(plugin_manager, "_command_entry_points", lambda: commands() + [
        ("hello_pkg", "tests.helpers.command_plugins:LIGHT", "hello-pkg 1.0")])
    monkeypatch.setattr(plugin_manager, "_entry_points", lambda: main_group() + [
        ("legacy_pkg", "tests.helpers.command_plugins:LEGACY", "legacy-pkg 1.0")])
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "hello" in out and "legacy-hello" in out
    assert main(["hello", "world"]) == 0
    assert "hello world (" in capsys.readouterr().out
    assert main(["legacy-hello", "you"]) == 0
    assert "hello you (" in capsys.readouterr().out
    assert main(["-p", "no:hello_pkg", "hello", "world"]) == 2  # disabled: the command is gone
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"hello_pkg", "legacy_pkg", "toy_training"} <= set(data["hooks"]["t2ialign_add_commands"])
    assert "segmentation" in {r["name"] for r in data["command_plugins"]}


def test_a_misspelt_task_is_a_parse_error_unless_a_third_party_plugin_may_add_tasks(monkeypatch):
    """Without third-party plugins the task names come from the registry files alone, so a typo is
    refused by the parser (no host, no torch: the subprocess test above covers the rest). With one
    installed (CI installs extensions/t2ialign-flux) any name passes the parser, because such a
    plugin may contribute tasks, and the host reports the unknown name."""
    from t2ialign.core import plugin_manager

    monkeypatch.setattr(plugin_manager, "third_party_plugin_names", lambda: [])
    with pytest.raises(SystemExit) as info:
        parse_command_line(build_parser(load_command_plugins()), ["eval", "segmentaton"])
    assert info.value.code == 2
    monkeypatch.setattr(plugin_manager, "third_party_plugin_names", lambda: ["some_extension"])
    args = parse_command_line(build_parser(load_command_plugins()), ["eval", "segmentaton"])
    assert args.task == "segmentaton"


def test_a_package_that_declares_light_commands_is_not_imported_for_help(monkeypatch, capsys):
    """A distribution with an entry in ``t2ialign.commands`` has said where its commands are: its
    main-group modules (heavy: a backbone importing torch) are not imported to build the parser."""
    from t2ialign.core import plugin_manager

    commands, main_group = plugin_manager._command_entry_points, plugin_manager._entry_points
    monkeypatch.setattr(plugin_manager, "_command_entry_points", lambda: commands() + [
        ("heavy_pkg_commands", "tests.helpers.command_plugins:LIGHT", "heavy-pkg 1.0")])
    monkeypatch.setattr(plugin_manager, "_entry_points", lambda: main_group() + [
        ("heavy_backbone", "tests.helpers.command_plugins_heavy_never_imported", "heavy-pkg 1.0")])
    loaded = plugin_manager.load_command_plugins()
    names = {r.name: r.status for r in loaded.records}
    assert "heavy_pkg_commands" in names and "heavy_backbone" not in names
    assert main(["hello", "world"]) == 0
    assert "hello world (" in capsys.readouterr().out


def test_disabling_a_task_plugin_removes_its_commands(capsys):
    assert main(["-p", "no:segmentation", "heatmap", "--help"]) == 2
    assert "invalid choice: 'heatmap'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# quiet by default, loud with -v
# --------------------------------------------------------------------------------------------
def test_third_party_output_quiet_by_default_and_back_with_verbose(monkeypatch):
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for key in console._ENV:
        monkeypatch.delenv(key, raising=False)
    try:
        console.configure(verbose=False)
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
        assert tlog.get_verbosity() == tlog.ERROR
        console.configure(verbose=True)
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
    finally:
        console.configure(verbose=True)


def test_our_progress_bars_off_when_quiet_or_not_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    try:
        monkeypatch.setattr(sys, "stdout", Tty())
        console.configure(verbose=True, quiet=False)
        assert console.progress_disabled() is False
        console.configure(verbose=True, quiet=True)
        assert console.progress_disabled() is True
        monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))
        console.configure(verbose=True, quiet=False)
        assert console.progress_disabled() is True
    finally:
        console.configure(verbose=True, quiet=False)
