"""Latency of the command line as a person meets it: ``--help``, ``<command> --help``, usage errors.

Each row is the wall time of a fresh ``python -m t2ialign ...`` process (interpreter start
included), the median of ``--repeats`` runs; rows are measured interleaved (one run of every row,
then the next round) so that load from other jobs on a shared machine hits all rows alike. The
target of issue 19 is < 1.5 s for every row: help and usage errors must not wait for torch.

Each row also says whether torch was imported (``-X importtime`` is not needed: the child prints
``'torch' in sys.modules`` at exit through a tiny wrapper) and the exit code, so a row that is
fast because it crashed is visible.

    python benchmarks/cli_latency.py               # prints one JSON object
    python benchmarks/cli_latency.py --repeats 5 --output benchmarks/results/cli_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: runs ``python -m t2ialign ARGS`` in-process and reports on stderr whether torch got imported
_WRAPPER = (
    "import sys, runpy, atexit\n"
    "atexit.register(lambda: sys.stderr.write('\\n@@torch=%d\\n' % ('torch' in sys.modules)))\n"
    "sys.argv = ['t2ialign'] + sys.argv[1:]\n"
    "runpy.run_module('t2ialign', run_name='__main__', alter_sys=True)\n"
)

COMMANDS = ("eval", "heatmap", "demo", "edit", "generate", "train-toy", "plugins", "registry")

ROWS: dict[str, list[str]] = {
    "--help": ["--help"],
    **{f"{cmd} --help": [cmd, "--help"] for cmd in COMMANDS},
    "usage error: unknown command": ["heatmapp"],
    "usage error: missing --classes": ["heatmap", "x.png"],
    "usage error: --threshold 2": ["heatmap", "x.png", "--classes", "cat", "--threshold", "2"],
    "usage error: class word with '='": ["heatmap", "x.png", "--classes", "cat", "gamma=1/0"],
    "usage error: unknown task": ["eval", "segmentaton"],
}


def _once(args: list[str]) -> tuple[float, int, bool]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - tic
    return wall, proc.returncode, "@@torch=1" in proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median reported)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    codes: dict[str, int] = {}
    torch_loaded: dict[str, bool] = {}
    for _ in range(args.repeats):
        for name, row in ROWS.items():
            wall, code, has_torch = _once(row)
            times[name].append(wall)
            codes[name], torch_loaded[name] = code, has_torch
    rows = {name: {"median_s": round(statistics.median(t), 3), "runs_s": [round(x, 3) for x in t],
                   "exit_code": codes[name], "imports_torch": torch_loaded[name]} for name, t in times.items()}
    report = {
        "benchmark": "cli_latency",
        "python": sys.executable,
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "target_s": 1.5,
        "max_median_s": max(r["median_s"] for r in rows.values()),
        "all_under_target": all(r["median_s"] < 1.5 for r in rows.values()),
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
