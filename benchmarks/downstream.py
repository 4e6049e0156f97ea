"""The two downstream evaluations on the toy world: ELBO-weighted generation and calibrated editing.

Runs the exact commands of the toy-world acceptance checks through the CLI, into
``runs/bench/`` (resumable: a killed run continues where it stopped), and copies each task's
``results.json`` summary, with the command and the machine, to
``benchmarks/results/generation_<backbone>.json`` and ``editing_<backbone>.json`` for
``report.py``:

    python benchmarks/downstream.py                       # both, toy model
    python benchmarks/downstream.py --tasks editing --n-editing 8
    python benchmarks/downstream.py --tasks editing --editing-kinds colour --editing-set inversion=null_text
    python benchmarks/downstream.py --smoke               # tiny random model, checks the script

Editing runs one evaluation per edit kind (``--editing-kinds``, default colour and shape: 32
pairs each), so colour edits -- which the toy model can render -- and shape edits -- which it
draws as blobs -- are reported apart (``editing_<backbone>-<kind>.json``). ``--editing-set``
passes ``key=value`` overrides to every editing run (e.g. ``inversion=null_text null_text.lr=0.05``);
runs with overrides go to their own folders and result files (suffix from the overrides).

Not part of ``make bench`` (its 30-minute budget goes to segmentation quality and speed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, machine, tiny_registry, write_result  # noqa: E402

#: the keys of each task's results.json worth keeping next to the README tables
KEEP = {
    "generation": ("prompts", "images", "failed_prompts", "seed", "steps", "guidance", "strength", "clip_metric",
                   "oracle", "variants", "differences_weighted_minus_baseline", "weighted_prompts", "timings"),
    "editing": ("items", "split", "source_mode", "inversion", "edit_kinds", "blend", "variants", "paired_differences",
                "timings", "note"),
}


def _eval(task: str, args: list[str], registry: Path | None) -> tuple[int, float]:
    from t2ialign.core.cli import main as cli

    pre = ["--registry", str(registry)] if registry else []
    tic = time.perf_counter()
    rc = cli([*pre, "eval", task, *args])
    return rc, time.perf_counter() - tic


def _suffix(overrides: list[str]) -> str:
    """A file-name suffix naming a run's overrides (``inversion=null_text`` -> ``inversion-null_text``)."""
    return "".join("_" + "".join(c if c.isalnum() or c in "-_" else "-" for c in o.replace("=", "-"))
                   for o in overrides)


def run_task(task: str, backbone: str, n: int, out_root: Path, registry: Path | None,
             smoke: bool, argv: list[str] | None, kind: str | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    overrides = list(overrides or [])
    name = f"{backbone}{'-' + kind if kind else ''}{_suffix(overrides)}"
    out = out_root / f"{task}-{name}"
    if out.is_absolute() and out.is_relative_to(ROOT):
        out = out.relative_to(ROOT)  # the CLI runs from the repository root; keep commands portable
    if task == "generation":
        dataset = "toy_prompts"
        args = ["--backbone", backbone, "--dataset", dataset, "--n", str(n), "--output", str(out)]
        if smoke:
            args += ["steps=4", "clip_metric=null", "oracle=null"]
    else:
        args = ["--backbone", backbone, "--n", str(n), "--output", str(out), *overrides]
        if kind:
            args.append(f"edit_kinds=[{kind}]")
        if smoke:
            args += ["--dataset", "toy_small", "steps=4", "clip_metric=null", "oracle_metric=null",
                     "elbo.timesteps=[[1,999,500]]", "collect.timesteps=[[20,41,20]]"]
    folder = ROOT / out if not out.is_absolute() else out
    # items already in the folder: a resumed run's wall time covers only the rest
    stored = sum(1 for p in folder.glob("records.*.jsonl") for line in p.read_text().splitlines() if line.strip())
    rc, wall = _eval(task, args, registry)
    out = folder
    if rc != 0:
        raise SystemExit(f"downstream: t2ialign eval {task} failed with exit code {rc}")
    res = json.loads((out / "results.json").read_text())
    report = {"benchmark": f"downstream_{task}", "backbone": backbone, "dataset": res.get("dataset"),
              "command": f"t2ialign eval {task} {' '.join(args)}", "driver": command_line("downstream.py", argv),
              "machine": machine(), "wall_s": round(wall, 1), "items_resumed": stored, "smoke": smoke, "output": args[args.index("--output") + 1],
              **{k: res[k] for k in KEEP[task] if k in res}}
    suffix = "_smoke" if smoke else ""
    write_result(RESULTS / f"{task}_{name}{suffix}.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--tasks", nargs="+", default=["generation", "editing"], choices=["generation", "editing"])
    parser.add_argument("--n-generation", type=int, default=64, help="prompts")
    parser.add_argument("--n-editing", type=int, default=32, help="edit pairs per edit kind")
    parser.add_argument("--editing-kinds", nargs="+", default=["colour", "shape"], choices=["colour", "shape"])
    parser.add_argument("--editing-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the editing runs")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 items, 4 steps")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # output folders in the recorded commands are relative to the repository root
    registry = None
    backbone = args.backbone
    if args.smoke:
        registry, backbone = tiny_registry(), "tiny-random"
    for task in args.tasks:
        if task == "generation":
            run_task(task, backbone, 2 if args.smoke else args.n_generation, args.runs_dir, registry, args.smoke, argv)
            continue
        for kind in args.editing_kinds:
            run_task(task, backbone, 2 if args.smoke else args.n_editing, args.runs_dir, registry, args.smoke, argv,
                     kind=kind, overrides=args.editing_set)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
