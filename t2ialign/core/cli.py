"""The ``t2ialign`` command line.

Global options come before the subcommand: ``--registry FILE`` (repeatable) adds registry
files, ``-p no:NAME`` (repeatable) disables a plugin for this run. Built-in subcommands are
``plugins`` and ``registry``; plugins add their own (``eval``, ``heatmap``, ``train-toy``...)
through the ``t2ialign_add_commands`` hook, so a command exists only once its plugin works.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from t2ialign import __version__
from t2ialign.core.errors import T2IAlignError
from t2ialign.core.host import Host


def _global_parser(add_help: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2ialign",
        description="Read and repair pixel-level text-image alignment in diffusion models.",
        add_help=add_help,
    )
    parser.add_argument("--version", action="version", version=f"t2ialign {__version__}")
    parser.add_argument("--registry", action="append", default=[], metavar="FILE",
                        help="extra registry YAML file; its entries add to or override the built-in ones")
    parser.add_argument("-p", dest="plugin_flags", action="append", default=[], metavar="no:NAME",
                        help="disable plugin NAME for this run (see 't2ialign plugins')")
    return parser


def _disabled(flags: Sequence[str]) -> list[str]:
    names = []
    for flag in flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise T2IAlignError(f"'-p {flag}' is not understood", where="command line",
                                fix="write -p no:NAME to disable plugin NAME")
        names.append(flag[3:])
    return names


def cmd_plugins(args: argparse.Namespace, host: Host) -> int:
    hooks = host.plugins.hooks()
    records = [r.to_dict() for r in host.plugins.records]
    if args.json:
        print(json.dumps({"hooks": hooks, "plugins": records}, indent=2))
        return 0
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
    return 1 if args.strict and host.plugins.failures else 0


def cmd_registry(args: argparse.Namespace, host: Host) -> int:
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


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every run command shares: a config file, an output folder and key=value overrides."""
    parser.add_argument("--config", metavar="FILE.yaml", help="run config; its keys override the task defaults")
    parser.add_argument("--output", metavar="DIR", help="output folder (default from the config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, type-checked against the defaults (e.g. gamma=1/3 limit=20)")


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


def cmd_eval(args: argparse.Namespace, host: Host) -> int:
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


def build_parser(host: Host) -> argparse.ArgumentParser:
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
    tasks = [n for n in host.registry.names("tasks")
             if host.registry.entries["tasks"][n].plugin in host.plugins.providers("tasks")]
    if tasks:  # the command exists only once a task plugin does
        e = sub.add_parser("eval", help="evaluate a task on a dataset and write results.json + report")
        e.add_argument("task", choices=tasks)
        e.add_argument("--backbone", help="registry backbone name")
        e.add_argument("--dataset", help="registry dataset name")
        e.add_argument("--split", help="split to evaluate")
        e.add_argument("--limit", "--n", dest="limit", type=int, help="evaluate only the first N items")
        e.add_argument("--device", help="torch device (cpu, cuda, cuda:1...)")
        add_run_options(e)
        e.set_defaults(handler=cmd_eval)
    host.hook.t2ialign_add_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        pre, _ = _global_parser(add_help=False).parse_known_args(argv)
        host = Host(registry_files=pre.registry, disable=_disabled(pre.plugin_flags))
        for rec in host.plugins.failures:
            print(f"warning: plugin '{rec.name}' ({rec.source}) failed to load: {rec.error}", file=sys.stderr)
        parser = build_parser(host)
        # key=value overrides may come before or after options: argparse cannot interleave a
        # nargs="*" positional with options, so leftovers of that form are overrides too
        args, extra = parser.parse_known_args(argv)
        if extra:
            stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
            if stray:
                parser.error(f"unrecognized arguments: {' '.join(stray)}")
            args.overrides = list(args.overrides or []) + extra
        if getattr(args, "handler", None) is None:
            parser.print_help()
            return 2
        return int(args.handler(args, host) or 0)
    except T2IAlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
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
