"""What a lower-precision denoiser costs in segmentation quality and ELBO fidelity (vs float32).

Runs ``t2ialign eval segmentation`` twice on the same val images (gamma = 1/3, threshold tuned on
those images, so both dtypes get their best threshold), once in float32 and once in ``--dtype``,
and compares: mIoU of the baseline and calibrated maps, how often the class with the lowest ELBO
loss is the same, the relative error of the per-class loss differences (what calibration uses),
the largest change of an alignment score S, and the pipeline time per image.

    python benchmarks/dtype_quality.py --dtype bfloat16 --limit 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, machine, write_result  # noqa: E402

from t2ialign.core.cli import main as cli  # noqa: E402
from t2ialign.core.fileio import read_jsonl  # noqa: E402


def _run(backbone: str, dtype: str, limit: int, out: Path) -> dict:
    rc = cli(["eval", "segmentation", "--backbone", backbone, "--split", "val", "--limit", str(limit),
              "--output", str(out), "gamma=1/3", "threshold.mode=oracle", "bootstrap=0", "visuals=0", f"dtype={dtype}"])
    if rc != 0:
        raise SystemExit(f"dtype_quality: the {dtype} run failed with exit code {rc}")
    results = json.loads((out / "results.json").read_text())
    records = {r["id"]: r for p in out.glob("records.eval.*.jsonl") for r in read_jsonl(p)}
    return {"results": results, "records": records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--limit", type=int, default=100, help="val images")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench" / "dtype-quality")
    args = parser.parse_args(argv)
    runs = {d: _run(args.backbone, d, args.limit, args.runs_dir / d) for d in ("float32", args.dtype)}
    a, b = runs["float32"]["records"], runs[args.dtype]["records"]
    same_top, rel_err, ds = [], [], []
    for key, ra in a.items():
        rb = b.get(key)
        if rb is None or "elbo" not in ra or len(ra["elbo"]["loss"]) < 2:
            continue
        la, lb = np.array(ra["elbo"]["loss"]), np.array(rb["elbo"]["loss"])
        same_top.append(bool(la.argmin() == lb.argmin()))
        da, db = la - la.mean(), lb - lb.mean()
        rel_err.append(float(np.abs(da - db).max() / (np.abs(da).max() + 1e-12)))
        ds.append(float(np.abs(np.array(ra["scores"]["calibrated"]) - np.array(rb["scores"]["calibrated"])).max()))

    def per_image_s(records: dict) -> float:
        return float(np.mean([sum(r["timings"].values()) for r in records.values() if "timings" in r]))

    report = {
        "benchmark": "dtype_quality", "backbone": args.backbone, "dtype": args.dtype, "images": args.limit,
        "command": command_line("dtype_quality.py", argv), "machine": machine(),
        "miou": {d: {v: r["results"]["variants"][v]["miou"] for v in ("baseline", "calibrated")}
                 for d, r in runs.items()},
        "multi_class_images": len(same_top),
        "same_lowest_loss_class": float(np.mean(same_top)) if same_top else None,
        "loss_difference_rel_error_median": float(np.median(rel_err)) if rel_err else None,
        "score_abs_change_median": float(np.median(ds)) if ds else None,
        "score_abs_change_p90": float(np.percentile(ds, 90)) if ds else None,
        "pipeline_s_per_image": {d: per_image_s(r["records"]) for d, r in runs.items()},
    }
    write_result(RESULTS / f"dtype_quality_{args.dtype}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
