"""Quality ablations of ELBO calibration on the toy world, through ``t2ialign eval segmentation``.

Every number comes from the segmentation task plugin (held-out threshold tuning, dataset-level
mIoU, per-class and size-bucket IoU); this script only chooses the runs and collects them:

* run ``main``: gamma = 1/3 with the ablation variants gamma = 1/2 and 1/5 and fixed S = 1/3, ELBO
  with 20 timesteps, ``uniform`` weighting, small collect timesteps (t = 20..200). All variants of
  an image share one attention pass and one ELBO pass, so gamma = 1 (the baseline), 1/2, 1/3,
  1/5 and fixed S cost one run.
* runs that change a pass, each evaluated at gamma = 1/3: ``elbo_t1`` / ``elbo_t5`` (ELBO with 1
  and 5 timesteps), ``scheme_elbo`` (the importance-sampled continuous-time ELBO weighting),
  ``preset_fast`` (``elbo.preset=fast``: that weighting with 5 antithetic pairs),
  ``collect_large`` (attention collected at t = 500..680 instead of 20..200).

Each ablation row gets the paired bootstrap 95% CI of its mIoU difference to the gamma = 1
baseline of run ``main`` (same images, resampled together; computed from the stored heatmaps and
each variant's held-out threshold). ELBO ranking accuracy: over test images with >= 2 classes,
how often the class with the largest ground-truth area gets S = 1 (the lowest ELBO loss); the
chance level (mean of 1/K) is given next to it.

Runs are resumable task runs under ``--runs-dir``: a rerun only collects.

    python benchmarks/quality.py                          # toy model, 300 test / 200 val images
    python benchmarks/quality.py --backbone tiny-random --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, machine, tiny_registry, toy_model_ready, write_result  # noqa: E402

from t2ialign.core.cli import main as cli_main  # noqa: E402
from t2ialign.core.fileio import read_jsonl  # noqa: E402
from t2ialign.core.host import Host  # noqa: E402
from t2ialign.core.thresholds import labels_from_heatmaps  # noqa: E402
from t2ialign.plugins.tasks.common import safe_name as _safe  # noqa: E402
from t2ialign.core.stats import confusion_matrix, paired_bootstrap_miou  # noqa: E402

#: the task runs: name -> config overrides (on top of the task defaults and --set)
RUNS: dict[str, list[str]] = {
    "main": ["gamma=1/3", "ablations.gammas=[0.5, 0.2]", "ablations.fixed_s=true"],
    "elbo_t1": ["gamma=1/3", "elbo.timesteps=[[500, 501, 1]]"],
    "elbo_t5": ["gamma=1/3", "elbo.timesteps=[[100, 1000, 200]]"],
    "scheme_elbo": ["gamma=1/3", "elbo.scheme=elbo"],
    "preset_fast": ["gamma=1/3", "elbo.preset=fast"],
    "collect_large": ["gamma=1/3", "collect.timesteps=[[500, 681, 20]]"],
}
#: the table: (row label, run, variant); differences are taken to ("main", "baseline")
ROWS: list[tuple[str, str, str]] = [
    ("gamma = 1 (uncalibrated baseline)", "main", "baseline"),
    ("gamma = 1/2", "main", "gamma=0.5"),
    ("gamma = 1/3 (default; ELBO T = 20, uniform, collect t 20-200)", "main", "calibrated"),
    ("gamma = 1/5", "main", "gamma=0.2"),
    ("fixed S = 1/3 for every class", "main", "fixed_s"),
    ("ELBO T = 1", "elbo_t1", "calibrated"),
    ("ELBO T = 5", "elbo_t5", "calibrated"),
    ("weighting elbo (importance-sampled), T = 20", "scheme_elbo", "calibrated"),
    ("elbo.preset=fast (weighting elbo, 5 antithetic pairs = 10 forwards / class)", "preset_fast", "calibrated"),
    ("collect t 500-680, gamma = 1", "collect_large", "baseline"),
    ("collect t 500-680, gamma = 1/3", "collect_large", "calibrated"),
]
SMOKE_SET = ["bootstrap=50", "visuals=0", "collect.batch_size=5"]


def run_task(name: str, args: argparse.Namespace, registries: list[Path]) -> dict[str, Any]:
    """One ``t2ialign eval segmentation`` run (resumes when its folder already holds it)."""
    out = args.runs_dir / name
    argv = [a for r in registries for a in ("--registry", str(r))]
    argv += ["eval", "segmentation", "--backbone", args.backbone, "--dataset", args.dataset,
             "--split", "test", "--limit", str(args.limit), "--output", str(out),
             "threshold.split=val", f"threshold.limit={args.val_limit}", f"bootstrap={args.bootstrap}",
             *RUNS[name], *args.set]
    tic = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # our stdout carries only the JSON report
        code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"quality: run '{name}' failed (exit {code}); command: t2ialign {' '.join(argv)}")
    results = json.loads((out / "results.json").read_text())
    results["_wall_s"] = round(time.perf_counter() - tic, 1)
    return results


def per_image_confusions(out: Path, dataset: Any, limit: int, variant: str, threshold: float) -> dict[str, np.ndarray]:
    """Confusion matrix of every test image for one variant, from the run's stored heatmaps."""
    C = len(dataset.class_names)
    conf = {}
    for i in range(min(limit, len(dataset))):
        sample = dataset[i]
        target = torch.from_numpy(np.asarray(sample.mask, dtype=np.int64))
        if sample.classes:
            with np.load(out / "heatmaps" / "eval" / f"{_safe(sample.id)}.npz") as data:
                heat = torch.from_numpy(data[f"heat_{variant}"].astype(np.float32) / 255.0)
            pred = labels_from_heatmaps(heat, list(sample.classes), threshold)
        else:
            pred = torch.zeros_like(target)
        conf[sample.id] = confusion_matrix(pred, target, C)
    return conf


def ranking_accuracy(out: Path, dataset: Any, variant: str = "calibrated") -> dict[str, Any] | None:
    """How often the class with the largest GT area gets S = 1, over images with >= 2 classes."""
    hits, n, chance, ties = 0, 0, 0.0, 0
    for path in sorted(out.glob("records.eval.*.jsonl")):
        for rec in read_jsonl(path):
            classes = rec.get("classes", [])
            scores = rec.get("scores", {}).get(variant)
            if len(classes) < 2 or scores is None:
                continue
            mask = np.asarray(dataset[int(rec["index"])].mask)
            areas = np.array([(mask == c).sum() for c in classes])
            largest = np.flatnonzero(areas == areas.max())
            ties += len(largest) > 1
            s = np.asarray(scores)
            hits += bool(np.isclose(s[largest], s.max()).any())
            chance += 1.0 / len(classes)
            n += 1
    if n == 0:
        return None
    return {"accuracy": round(hits / n, 4), "images": n, "chance": round(chance / n, 4), "area_ties": ties}


def _compact(v: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one variant the report needs (per-class and size-bucket IoU included)."""
    return {
        "miou": v.get("miou"),
        "threshold": v.get("threshold"),
        "per_class_iou": {k: c.get("iou") for k, c in (v.get("per_class") or {}).items()},
        "size_buckets": [{"area_min": b["area_min"], "area_max": b["area_max"], "count": b["count"],
                          "iou": b["iou"]} for b in v.get("size_buckets") or []],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="toy", help="toy (trained in this repo) or tiny-random (smoke test)")
    parser.add_argument("--dataset", default=None, help="registry dataset (default toy_shapes; toy_small for tiny-random)")
    parser.add_argument("--limit", type=int, default=300, help="test images")
    parser.add_argument("--val-limit", type=int, default=200, help="held-out images for threshold tuning")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="subset of the runs")
    parser.add_argument("--runs-dir", type=Path, default=None, help="task outputs (default runs/bench/quality-BACKBONE)")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra task overrides for every run")
    parser.add_argument("--smoke", action="store_true", help="6 test / 3 val images, fast settings")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    registries: list[Path] = []
    if args.backbone == "tiny-random":
        registries.append(tiny_registry(n_val=max(3, args.val_limit if not args.smoke else 3),
                                        n_test=max(6, args.limit if not args.smoke else 6)))
        args.dataset = args.dataset or "toy_small"
    elif args.backbone == "toy" and not toy_model_ready():
        raise SystemExit("quality: the toy model is not trained yet (t2ialign/assets/toy has no model_index.json); "
                         "run `t2ialign train-toy` first, or use --backbone tiny-random --smoke")
    args.dataset = args.dataset or "toy_shapes"
    if args.smoke:
        args.limit, args.val_limit, args.bootstrap = 6, 3, 50
        args.set = SMOKE_SET + list(args.set)
    suffix = "_smoke" if args.smoke else ""
    args.runs_dir = args.runs_dir or ROOT / "runs" / "bench" / f"quality-{args.backbone}{suffix}"
    if "main" not in args.runs:
        args.runs = ["main", *args.runs]  # the baseline every difference is taken to

    results = {name: run_task(name, args, registries) for name in args.runs}
    host = Host(registry_files=registries)
    dataset = host.dataset(args.dataset, "test")
    base_run = args.runs_dir / "main"
    base = per_image_confusions(base_run, dataset, args.limit, "baseline",
                                results["main"]["variants"]["baseline"]["threshold"])
    rows = []
    for label, run, variant in ROWS:
        if run not in results or variant not in results[run]["variants"]:
            continue
        v = results[run]["variants"][variant]
        row = {"label": label, "run": run, "variant": variant, "gamma": v["gamma"], **_compact(v)}
        if (run, variant) != ("main", "baseline"):
            conf = per_image_confusions(args.runs_dir / run, dataset, args.limit, variant, v["threshold"])
            row["vs_baseline"] = paired_bootstrap_miou(base, conf, args.bootstrap, int(results["main"]["seed"]))
        rows.append(row)
    ranking = {run: ranking_accuracy(args.runs_dir / run, dataset) for run in args.runs}

    report = {
        "benchmark": "quality",
        "backbone": args.backbone,
        "dataset": args.dataset,
        "smoke": args.smoke,
        "command": command_line("quality.py", argv),
        "machine": machine(),
        "setup": {"test_images": results["main"]["images"], "val_images": args.val_limit,
                  "threshold": results["main"]["threshold_how"], "bootstrap": args.bootstrap,
                  "runs": {name: RUNS[name] + list(args.set) for name in args.runs},
                  "runs_dir": str(args.runs_dir.relative_to(ROOT) if args.runs_dir.is_relative_to(ROOT)
                                  else args.runs_dir)},
        "rows": rows,
        "ranking_accuracy": ranking,
        "run_seconds": {name: r["_wall_s"] for name, r in results.items()},
        "per_image_seconds": {name: r.get("timings", {}).get("per_image_mean_s") for name, r in results.items()},
    }
    write_result(args.out or RESULTS / f"quality{suffix}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
