"""Is the misalignment the paper describes visible, and does calibration repair it? (toy world)

Reads a segmentation run's ``results.json`` (default: the main run of ``benchmarks/quality.py``)
and prints, per variant, per-class IoU next to each class's share of training objects, the mean
IoU of the three most frequent and the three rarest classes, and the mean IoU of the three
smallest and three largest of the equal-count object-size buckets; then the calibrated - baseline
change of each. Writes ``benchmarks/results/toy_bias.json``.

    python benchmarks/toy_bias.py                       # after python benchmarks/quality.py
    python benchmarks/toy_bias.py --run runs/bench/quality-toy/main --out /tmp/bias.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, write_result  # noqa: E402


def summarise(results: dict, class_share: dict[str, float], k: int = 3) -> dict:
    by_share = sorted(class_share, key=class_share.get, reverse=True)
    frequent, rare = by_share[:k], by_share[-k:]
    out = {"frequent_classes": frequent, "rare_classes": rare, "variants": {}}
    for name, v in results["variants"].items():
        per = {c: v["per_class"][c]["iou"] for c in class_share if c in v["per_class"]}
        buckets = [b["iou"] for b in v["size_buckets"]]
        out["variants"][name] = {
            "per_class_iou": {c: round(per[c], 2) for c in per},
            "frequent_mean": round(sum(per[c] for c in frequent) / k, 2),
            "rare_mean": round(sum(per[c] for c in rare) / k, 2),
            "smallest_buckets_mean": round(sum(buckets[:k]) / k, 2),
            "largest_buckets_mean": round(sum(buckets[-k:]) / k, 2),
            "size_bucket_iou": [round(b, 2) for b in buckets],
            "size_bucket_area": [[b["area_min"], b["area_max"]] for b in v["size_buckets"]],
        }
    base = out["variants"].get("baseline")
    if base is not None:
        out["change_vs_baseline"] = {
            name: {key: round(v[key] - base[key], 2)
                   for key in ("frequent_mean", "rare_mean", "smallest_buckets_mean", "largest_buckets_mean")}
            for name, v in out["variants"].items() if name != "baseline"}
    return out


def main() -> None:
    from t2ialign.plugins.toy.world import CLASS_NAMES, WorldConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "quality-toy" / "main",
                    help="segmentation output folder holding results.json")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    share = dict(zip(CLASS_NAMES, (float(p) for p in WorldConfig().class_probs)))
    summary = summarise(results, share)
    summary.update({"benchmark": "toy_bias", "run": str(args.run), "images": results.get("images"),
                    "class_share_of_training_objects": {c: round(p, 4) for c, p in share.items()},
                    "command": command_line("toy_bias.py", None)})
    write_result(args.out or RESULTS / "toy_bias.json", summary)


if __name__ == "__main__":
    main()
