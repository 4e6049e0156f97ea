"""Choose the toy backbone's layer-aggregation weights on the held-out (val) split.

The reference weights ([1, 1, 10, 15, 10, 1, 1] over SD1.5's 7 resolution groups) do not transfer
to other UNets: a small model trained here attends differently per depth. This script evaluates
uncalibrated attention (gamma = 1) on toy *val* images for a few cross-attention group weightings
and self-attention propagation rows, each with its threshold tuned on the same val images, and
writes ``benchmarks/results/toy_layer_sweep.json``. The test split is never touched; the winner
goes into the ``toy`` registry entry.

    python benchmarks/toy_layer_sweep.py --limit 100
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from t2ialign.core.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]

# toy UNet cross layers fall in 3 resolution groups: down 16x16 | down/mid/up 8x8 | up 16x16
CROSS = {
    "up16": [0, 0, 1],
    "down16+up16": [1, 0, 1],
    "8x8+up16": [0, 1, 1],
    "uniform": [1, 1, 1],
    "ref-like": [1, 10, 1],
}
SELF = {
    "none": [],
    "all16,up16": [[1, 0, 1], [0, 0, 1]],
    "up16": [[0, 0, 1]],
    "all16": [[1, 0, 1]],
}


def run(name: str, cross, rows, limit: int, out_root: Path, backbone: str, registry: list[str]) -> dict:
    out = out_root / name
    overrides = [f"layers.cross_weight={json.dumps(cross)}", "layers.cross_gaussian_sigma=0.0",
                 f"layers.self_weight={json.dumps(rows)}", "gamma=1", "threshold.mode=oracle",
                 "bootstrap=0", "visuals=0"]
    tic = time.perf_counter()
    rc = cli([*(a for r in registry for a in ("--registry", r)), "eval", "segmentation", "--backbone", backbone, "--dataset", "toy_shapes", "--split", "val",
              "--limit", str(limit), "--output", str(out), *overrides])
    if rc != 0:
        raise SystemExit(f"run {name} failed with exit code {rc}")
    res = json.loads((out / "results.json").read_text())["variants"]["baseline"]
    return {"cross_weight": cross, "self_weight": rows, "miou": res["miou"], "threshold": res["threshold"],
            "seconds": round(time.perf_counter() - tic, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="val images per setting")
    ap.add_argument("--backbone", default="toy")
    ap.add_argument("--output", default="runs/toy_layer_sweep")
    ap.add_argument("--registry", action="append", default=[], metavar="FILE",
                    help="extra registry YAML (e.g. pointing `toy` at an unexported training run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_layer_sweep.json")
    args = ap.parse_args()
    out_root = Path(args.output)
    results = {}
    # first the cross weighting with the default propagation, then propagation rows for the best one
    for name, cross in CROSS.items():
        results[f"cross={name}|self=all16,up16"] = run(f"cross-{name}", cross, SELF["all16,up16"], args.limit,
                                                        out_root, args.backbone, args.registry)
        print(json.dumps({name: results[f"cross={name}|self=all16,up16"]}))
    best_cross = max(CROSS, key=lambda n: results[f"cross={n}|self=all16,up16"]["miou"])
    for name, rows in SELF.items():
        key = f"cross={best_cross}|self={name}"
        if key not in results:
            results[key] = run(f"cross-{best_cross}-self-{name}", CROSS[best_cross], rows, args.limit, out_root,
                               args.backbone, args.registry)
            print(json.dumps({key: results[key]}))
    best = max(results, key=lambda k: results[k]["miou"])
    report = {"benchmark": "toy_layer_sweep", "split": "val", "images": args.limit, "backbone": args.backbone,
              "command": " ".join(["python benchmarks/toy_layer_sweep.py", f"--limit {args.limit}",
                                  *(f"--registry {r}" for r in args.registry)]),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "settings": results, "best": {"setting": best, **results[best]}}
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["best"]))


if __name__ == "__main__":
    main()
