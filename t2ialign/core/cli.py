"""The ``t2ialign`` command line.

Global options come before the subcommand: ``--registry FILE`` (repeatable) adds registry
files, ``-p no:NAME`` (repeatable) disables a plugin for this run, ``-v`` shows third-party log
messages and progress bars, ``-q`` hides ours too. Built-in subcommands are ``plugins``,
``registry`` and ``eval``; plugins add their own (``heatmap``, ``edit``, ``train-toy``...)
through the ``t2ialign_add_commands`` hook of their light command modules (entry-point group
``t2ialign.commands``).

The parser is built from those command modules only, and the :class:`~t2ialign.core.host.Host`
(which imports every plugin, hence torch, diffusers and transformers) is created when a command
first uses it: ``--help`` and every usage error answer in well under a second, a typo never
waits for a model library.

Exit codes: 0 success, 1 internal error (a bug; ``plugins --strict`` with a failed plugin),
2 usage / bad input, 3 NaN or Inf in a model output or map, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from typing import Any, Callable, Sequence

from t2ialign import __version__
from t2ialign.core.errors import T2IAlignError

#: attribute of the parsed namespace collecting ``key=value`` items a word-list option swallowed
_MOVED = "_overrides_from_word_lists"


# --------------------------------------------------------------------------------------------
# option types and helpers for command modules (checked while parsing: a bad value costs ms)
# --------------------------------------------------------------------------------------------
def number_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False, example: str | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number (``1/3`` allowed) inside the given bounds.

    NaN and Inf are refused: they would travel into the config and the results files.
    """
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else format(low, 'g')}, {'inf' if high is None else format(high, 'g')}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(Fraction(text.strip())) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number" + (f" (e.g. {example})" if example else ""))
        bad = not math.isfinite(value)
        if low is not None and (value < low or (low_open and value == low)):
            bad = True
        if high is not None and (value > high or (high_open and value == high)):
            bad = True
        if bad:
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text!r}"
                                             + (f" (e.g. {example})" if example else ""))
        return value

    parse.__name__ = "number"  # what argparse names in "invalid number value"
    return parse


def int_at_least(low: int, example: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer" + (f" (e.g. {example})" if example else ""))
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}"
                                             + (f" (e.g. {example})" if example else ""))
        return value

    parse.__name__ = "integer"
    return parse


class _WordList(argparse.Action):
    """``nargs="+"`` words where an item with ``=`` is never a word.

    argparse lets ``--classes cat dog gamma=1/0`` swallow the trailing override; this action
    hands such items back as ``key=value`` overrides (:func:`main` applies them, or refuses
    them when the command takes none).
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        values = list(values)
        words = [v for v in values if "=" not in v]
        moved = [v for v in values if "=" in v]
        if not words:
            parser.error(f"argument {option_string}: {moved[0]!r} is a key=value override, not a word; "
                         f"give the words first, e.g. {option_string} cat dog {moved[0]}")
        setattr(namespace, self.dest, words)
        if moved:
            setattr(namespace, _MOVED, [*getattr(namespace, _MOVED, []), *((option_string, m) for m in moved)])


def add_word_list(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> argparse.Action:
    """Add a ``nargs="+"`` word-list option (``--classes``, ``--words``...); see :class:`_WordList`."""
    return parser.add_argument(*flags, nargs="+", action=_WordList, **kwargs)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` after the command too (``t2ialign heatmap ... -q``); the global ones also work."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show third-party log messages, warnings and progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars at all")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every run command shares: a config file, an output folder and key=value overrides."""
    parser.add_argument("--config", metavar="FILE.yaml", help="run config; its keys override the task defaults")
    parser.add_argument("--output", metavar="DIR", help="output folder (default from the config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, type-checked against the defaults (e.g. gamma=1/3 limit=20)")
    add_output_options(parser)


def run_overrides(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """``key=value`` overrides from convenience flags (``--backbone toy``) plus positional ones."""
    out = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"{name}={value}")
    if getattr(args, "output", None):
        out.append(f"output={args.output}")
    return out + list(getattr(args, "overrides", []) or [])


# --------------------------------------------------------------------------------------------
# the host, built when a command first needs it
# --------------------------------------------------------------------------------------------
class LazyHost:
    """Stands for a :class:`~t2ialign.core.host.Host` and builds it on first attribute access.

    Command handlers get this object as their ``host``: commands that fail on their own input
    (a missing image, a bad class word) never import the plugins. ``commands`` holds the command
    plugins the parser was built from (for ``t2ialign plugins``).
    """

    def __init__(self, registry_files: Sequence[str], disable: Sequence[str], commands: Any, warned: set[str]):
        self._args = (list(registry_files), list(disable))
        self._host: Any = None
        self._warned = warned
        self.commands = commands

    def _get(self) -> Any:
        if self._host is None:
            from t2ialign.core import console
            from t2ialign.core.host import Host

            self._host = Host(registry_files=self._args[0], disable=self._args[1])
            console.quiet_loaded_libraries()  # diffusers reads no environment variable for its bars
            _warn_failures(self._host.plugins, self._warned)
        return self._host

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def _warn_failures(plugins: Any, warned: set[str]) -> None:
    for rec in plugins.failures:
        if rec.name not in warned:
            warned.add(rec.name)
            print(f"warning: plugin '{rec.name}' ({rec.source}) failed to load: {rec.error}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# built-in commands
# --------------------------------------------------------------------------------------------
def _global_parser(add_help: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2ialign",
        description="Read and repair pixel-level text-image alignment in diffusion models.",
        epilog="exit codes: 0 ok, 1 internal error (a bug), 2 usage or bad input, 3 NaN/Inf in a model "
               "output, 130 interrupted. See docs/troubleshooting.md.",
        add_help=add_help,
    )
    parser.add_argument("--version", action="version", version=f"t2ialign {__version__}")
    parser.add_argument("--registry", action="append", default=[], metavar="FILE",
                        help="extra registry YAML file; its entries add to or override the built-in ones")
    parser.add_argument("-p", dest="plugin_flags", action="append", default=[], metavar="no:NAME",
                        help="disable plugin NAME for this run (see 't2ialign plugins')")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party log messages, warnings and progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars at all")
    return parser


def _disabled(flags: Sequence[str]) -> list[str]:
    names = []
    for flag in flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise T2IAlignError(f"'-p {flag}' is not understood", where="command line",
                                fix="write -p no:NAME to disable plugin NAME")
        names.append(flag[3:])
    return names


def cmd_plugins(args: argparse.Namespace, host: Any) -> int:
    hooks = host.plugins.hooks()
    records = [r.to_dict() for r in host.plugins.records]
    commands = getattr(host, "commands", None)
    command_records = [] if commands is None else [r.to_dict() for r in commands.records]
    if commands is not None:  # the parser's hook implementations are part of the picture
        impl = commands.hooks().get("t2ialign_add_commands", [])
        hooks["t2ialign_add_commands"] = sorted(set(hooks.get("t2ialign_add_commands", [])) | set(impl))
    if args.json:
        print(json.dumps({"hooks": hooks, "plugins": records, "command_plugins": command_records}, indent=2))
        return 1 if args.strict and host.plugins.failures else 0
    print("hooks and the plugins implementing them:")
    for hook, impls in hooks.items():
        print(f"  {hook}: {', '.join(impls) if impls else '(none)'}")
    print("\nplugins:")
    for rec in host.plugins.records:
        line = f"  {rec.name:<24} {rec.status:<9} {rec.source:<20} {rec.module}"
        print(line)
        if rec.error:
            print(f"      error: {rec.error}")
        if rec.info and rec.info.provides:
            for section, names in sorted(rec.info.provides.items()):
                print(f"      {section}: {', '.join(sorted(names))}")
    if command_records:
        print("\ncommand modules (entry-point group t2ialign.commands):")
        for r in command_records:
            print(f"  {r['name']:<24} {r['status']:<9} {r['source']:<20} {r['module']}")
            if r.get("error"):
                print(f"      error: {r['error']}")
    failed = host.plugins.failures or (commands.failures if commands is not None else [])
    return 1 if args.strict and failed else 0


def cmd_registry(args: argparse.Namespace, host: Any) -> int:
    data = host.registry.to_dict(resolve=True)
    broken = [(s, n, e["_error"]) for s, entries in data.items() for n, e in entries.items() if "_error" in e]
    if args.json:
        print(json.dumps({"files": host.registry.files, "entries": data}, indent=2, default=str))
    else:
        print("registry files: " + ", ".join(host.registry.files))
        for section, entries in data.items():
            print(f"\n{section}:")
            for name, body in entries.items():
                opts = ", ".join(f"{k}={v!r}" for k, v in body.items() if not k.startswith("_"))
                print(f"  {name}: {opts}")
                if "_error" in body:
                    print(f"      unavailable: {body['_error'].splitlines()[0]}")
    if args.check and broken:
        for section, name, err in broken:
            print(f"error: {section}.{name}: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args: argparse.Namespace, host: Any) -> int:
    from t2ialign.core.config import resolve_config

    task = host.task(args.task)
    config = resolve_config(task.defaults, args.config,
                            run_overrides(args, ["backbone", "dataset", "split", "limit", "device"]))
    results = task.run(config, host)
    if results:
        print(summarise(results))
        print(f"outputs: {config['output']}")
    return 0


def summarise(results: dict[str, Any]) -> str:
    """A few lines of a results dict for the terminal."""
    lines = [f"{results.get('task', 'run')}: {results.get('backbone', '')} on {results.get('dataset', '')} "
             f"({results.get('images', '?')} images)"]
    if "summary_lines" in results:  # tasks with their own measures (generation) say them themselves
        return "\n".join(lines + list(results["summary_lines"]))
    for name, res in results.get("variants", {}).items():
        miou = res.get("miou")
        thr = res.get("threshold")
        lines.append(f"  {name:<12} mIoU {miou:6.2f}  (threshold {thr:.2f})" if isinstance(miou, (int, float))
                     else f"  {name}: {res}")
    for name, d in results.get("differences_vs_baseline", {}).items():
        if d:
            lines.append(f"  {name} - baseline: {d['delta']:+.2f} mIoU (95% CI {d['ci95_low']:+.2f} .. {d['ci95_high']:+.2f})")
    return "\n".join(lines)


def _light_task_names(registry_files: Sequence[str]) -> list[str] | None:
    """Task names of the built-in registry and the ``--registry`` files, read without any plugin.

    ``None`` (accept any name; the host checks it) when a third-party plugin is installed (it may
    contribute registry files of its own) or a file cannot be read (the host reports that).
    """
    from pathlib import Path

    from t2ialign.core.errors import RegistryError
    from t2ialign.core.plugin_manager import third_party_plugin_names
    from t2ialign.core.registry import builtin_registry_path, read_yaml

    if third_party_plugin_names():
        return None
    names: set[str] = set()
    try:
        for path in [builtin_registry_path(), *map(Path, registry_files)]:
            data = read_yaml(path, "registry file")
            tasks = data.get("tasks") if isinstance(data, dict) else None
            names |= set(map(str, tasks)) if isinstance(tasks, dict) else set()
    except RegistryError:
        return None
    return sorted(names) or None


def build_parser(commands: Any, registry_files: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser: built-in commands plus those of the command plugins in ``commands``."""
    parser = _global_parser(add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list hooks, plugins and where they come from")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 when a plugin failed to load")
    p.set_defaults(handler=cmd_plugins)
    r = sub.add_parser("registry", help="show resolved registry entries")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("--check", action="store_true", help="exit 2 when an entry cannot be resolved")
    r.set_defaults(handler=cmd_registry)
    tasks = _light_task_names(registry_files)
    e = sub.add_parser("eval", help="evaluate a task on a dataset and write results.json + report")
    e.add_argument("task", choices=tasks, help="registry task name" + (f" ({', '.join(tasks)})" if tasks else ""))
    e.add_argument("--backbone", help="registry backbone name")
    e.add_argument("--dataset", help="registry dataset name")
    e.add_argument("--split", help="split to evaluate")
    e.add_argument("--limit", "--n", dest="limit", type=int_at_least(1, "--limit 20"),
                   help="evaluate only the first N items")
    e.add_argument("--device", help="torch device (cpu, cuda, cuda:1...)")
    add_run_options(e)
    e.set_defaults(handler=cmd_eval)
    commands.pm.hook.t2ialign_add_commands(subparsers=sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` (for an error message in its own usage), else ``parser``."""
    for action in parser._actions:  # argparse offers no public lookup of sub-parsers
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` items anywhere (also inside a word list) become ``args.overrides``.

    argparse cannot interleave a ``nargs="*"`` positional with options, so leftovers of that
    form are overrides too; anything else left over is a usage error (exit 2).
    """
    args, extra = parser.parse_known_args(argv)
    sub = _subparser(parser, getattr(args, "command", None))
    moved = getattr(args, _MOVED, [])
    if extra or moved:
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            sub.error(f"unrecognized arguments: {' '.join(stray)}")
        if moved and not hasattr(args, "overrides"):
            flag, item = moved[0]
            sub.error(f"argument {flag}: {item!r} is not a word (words cannot contain '=') and this "
                      f"command takes no key=value overrides")
        args.overrides = list(args.overrides or []) + extra + [item for _, item in moved]
    if hasattr(args, _MOVED):
        delattr(args, _MOVED)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        pre, _ = _global_parser(add_help=False).parse_known_args(argv)
        from t2ialign.core import console
        from t2ialign.core.plugin_manager import load_command_plugins

        console.configure(verbose=pre.verbose, quiet=pre.quiet)
        disable = _disabled(pre.plugin_flags)
        commands = load_command_plugins(disable=disable)
        warned: set[str] = set()
        _warn_failures(commands, warned)
        parser = build_parser(commands, pre.registry)
        args = parse_command_line(parser, argv)
        if getattr(args, "verbose", False) or getattr(args, "quiet", False):  # given after the command
            console.configure(verbose=bool(getattr(args, "verbose", False)) or pre.verbose,
                              quiet=bool(getattr(args, "quiet", False)) or pre.quiet)
        if getattr(args, "handler", None) is None:
            parser.print_help()
            return 2
        host = LazyHost(pre.registry, disable, commands, warned)
        return int(args.handler(args, host) or 0)
    except T2IAlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (finished items are kept: run the same command again to resume)", file=sys.stderr)
        return 130
    except SystemExit as exc:
        # argparse exits on a bad command line (after printing its usage message); returning the
        # code keeps main() usable in-process, like every other failure
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Exception as exc:  # noqa: BLE001 - a bug: one clear line instead of a traceback wall
        report = _write_crash_report(argv)
        print(f"internal error: {type(exc).__name__}: {exc}\n"
              f"  this is a bug in t2ialign or one of its plugins, not in your input; the traceback "
              f"was written to {report}\n  please include that file when you report it", file=sys.stderr)
        return 1


def _write_crash_report(argv: Sequence[str]) -> str:
    """Write the current exception's traceback (plus command line and versions) to a temp file."""
    import platform
    import tempfile
    import traceback

    text = (f"t2ialign {__version__}, python {platform.python_version()}\n"
            f"command: t2ialign {' '.join(argv)}\n\n{traceback.format_exc()}")
    try:
        fd, path = tempfile.mkstemp(prefix="t2ialign-crash-", suffix=".txt")
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path
    except OSError:  # nowhere to write: the traceback is better on stderr than lost
        sys.stderr.write(text)
        return "stderr (above)"


def run(argv: Sequence[str] | None = None) -> Any:  # pragma: no cover - console entry
    sys.exit(main(argv))
