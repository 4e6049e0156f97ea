"""Command-line front ends of the segmentation task: ``heatmap`` (one image) and ``demo``.

They are added by the segmentation plugin through ``t2ialign_add_commands``, so they exist
exactly when that plugin loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from t2ialign.core.config import dump_config, resolve_config
from t2ialign.core.fileio import atomic_write_json, atomic_write_text, ensure_writable_dir
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.images import load_rgb


def cmd_heatmap(args: argparse.Namespace, host: Any) -> int:
    """Calibrated and uncalibrated heatmaps of a few words on one image."""
    from t2ialign.core.cli import run_overrides
    from t2ialign.core.pipeline import check_class_words, pipeline_from_config
    from t2ialign.core.report import overlay, save_png, segmentation_panel
    from t2ialign.core.thresholds import labels_from_heatmaps
    from t2ialign.plugins.tasks.segmentation import DEFAULTS, variants_of

    image = load_rgb(Path(args.image))
    # checked before the model loads: a typo should cost milliseconds, not a model load
    words = check_class_words(args.classes, where="--classes")
    defaults = {**DEFAULTS, "output": "runs/heatmap"}
    config = resolve_config(defaults, args.config, run_overrides(args, ["backbone", "gamma", "device"]))
    out = ensure_writable_dir(Path(config["output"]))
    backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
    variants = variants_of(config)
    weighting = host.weighting(backbone.prediction_type, config["elbo"]["scheme"]) if len(variants) > 1 else None
    pipe = pipeline_from_config(backbone, host.extractor(backbone), weighting, config)
    tic = time.perf_counter()
    res = pipe.run(image, words, variants, key=Path(args.image).name)
    elapsed = time.perf_counter() - tic
    stem = Path(args.image).stem
    files = []
    safe_names = _file_names(res.words)
    for v, heat in res.heatmaps.items():
        for j, word in enumerate(res.words):
            h = heat[j].numpy()
            safe = safe_names[j]
            files.append(save_png(out / f"{stem}_{safe}_{v}.png", np.round(h * 255).astype(np.uint8)))
            save_png(out / f"{stem}_{safe}_{v}_overlay.png", overlay(image, h))
    cal = "calibrated" if "calibrated" in res.heatmaps else "baseline"
    thr = float(args.threshold)
    ids = list(range(1, len(res.words) + 1))
    labels = {k: labels_from_heatmaps(res.heatmaps[k], ids, thr).numpy() for k in ("baseline", cal)}
    fig = segmentation_panel(
        image, None, labels["baseline"], labels[cal],
        {w: res.heatmaps["baseline"][j].numpy() for j, w in enumerate(res.words)},
        {w: res.heatmaps[cal][j].numpy() for j, w in enumerate(res.words)},
        {w: float(res.scores[cal][j]) for j, w in enumerate(res.words)},
        legend={i: w for i, w in zip(ids, res.words)},
    )
    save_png(out / f"{stem}_panel.png", fig)
    summary = {
        "image": str(args.image), "classes": res.words, "backbone": config["backbone"],
        "scores": {k: v.tolist() for k, v in res.scores.items()},
        "elbo": None if res.elbo is None else {"loss": res.elbo.loss.tolist(), "se": res.elbo.se.tolist(),
                                               "scheme": res.elbo.scheme},
        "threshold": thr, "seconds": round(elapsed, 3), "timings": res.timings,
    }
    atomic_write_json(out / f"{stem}_heatmaps.json", summary)
    atomic_write_text(out / "config.yaml", dump_config(config))
    print(json.dumps({k: summary[k] for k in ("classes", "scores", "seconds")}))
    print(f"wrote {out / (stem + '_panel.png')} and {len(files)} heatmaps to {out}")
    return 0


def _file_names(words: list[str]) -> list[str]:
    """A file-name-safe stem per word; words that clash after cleaning ("a-b", "a_b") get a suffix."""
    out: list[str] = []
    for word in words:
        stem = "".join(c if c.isalnum() else "_" for c in word)
        name, k = stem, 2
        while name in out:
            name, k = f"{stem}_{k}", k + 1
        out.append(name)
    return out


DEMO_OVERRIDES = [
    "backbone=toy", "dataset=toy_shapes", "split=test", "limit=8",
    "threshold.split=val", "threshold.limit=8", "visuals=8", "bootstrap=200",
]


def cmd_demo(args: argparse.Namespace, host: Any) -> int:
    """The main job on the embedded default: segment a handful of toy test scenes."""
    from t2ialign.core.cli import summarise

    task = host.task("segmentation")
    config = resolve_config(task.defaults, None,
                            DEMO_OVERRIDES + [f"output={args.output}"] + list(args.overrides or []))
    print("t2ialign demo: ELBO-calibrated vs uncalibrated cross-attention segmentation of toy scenes "
          f"(backbone 'toy', trained in this repo; {config['limit']} test images, threshold tuned on "
          f"{config['threshold']['limit']} held-out images)")
    tic = time.perf_counter()
    results = task.run(config, host)
    print(summarise(results))
    out = Path(config["output"]).resolve()
    print(f"done in {time.perf_counter() - tic:.0f} s")
    print(f"  results:  {out / 'results.json'}")
    print(f"  report:   {out / 'report.html'}")
    print(f"  overlays: {out / 'visuals'}")
    return 0


@hookimpl
def t2ialign_add_commands(subparsers: Any) -> None:
    from t2ialign.core.cli import add_run_options

    h = subparsers.add_parser("heatmap", help="calibrated word heatmaps for one image")
    h.add_argument("image", help="image file (any Pillow format; converted to RGB)")
    h.add_argument("--classes", nargs="+", required=True, help="class words, e.g. --classes cat dog")
    h.add_argument("--backbone", help="registry backbone name (default toy)")
    h.add_argument("--gamma", help="calibration strength gamma in (0, 1]; 1 = uncalibrated")
    h.add_argument("--device", help="torch device")
    h.add_argument("--threshold", default=0.4, type=float, help="background threshold of the mask preview")
    add_run_options(h)
    h.set_defaults(handler=cmd_heatmap)
    d = subparsers.add_parser("demo", help="segment a few toy scenes with and without ELBO calibration")
    d.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.set_defaults(handler=cmd_demo)
