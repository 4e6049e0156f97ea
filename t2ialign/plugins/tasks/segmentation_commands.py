"""Command-line front ends of the segmentation task: ``heatmap`` (one image) and ``demo``.

A light command module (entry-point group ``t2ialign.commands``, name ``segmentation``): at
import time only argparse and light ``t2ialign.core`` modules, so ``t2ialign --help`` never
imports torch; the task's machinery is imported when a command runs. ``-p no:segmentation``
removes these commands together with the task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from t2ialign.core.errors import ConfigError
from t2ialign.core.hookspecs import hookimpl

#: the segmentation task's config keys that the one-image heatmap uses; the others (dataset,
#: split, threshold tuning, metric, bootstrap, visuals) belong to an evaluation only
HEATMAP_KEYS = ("backbone", "device", "dtype", "seed", "gamma", "ablations", "elbo", "collect", "layers",
                "prefactor_exponent")


def heatmap_defaults() -> dict[str, Any]:
    """The ``heatmap`` command's config: what applies to one image, plus the preview threshold."""
    from t2ialign.plugins.tasks.segmentation import DEFAULTS

    return {**{k: DEFAULTS[k] for k in HEATMAP_KEYS}, "output": "runs/heatmap", "threshold": 0.4}


def cmd_heatmap(args: argparse.Namespace, host: Any) -> int:
    """Calibrated and uncalibrated heatmaps of a few words on one image."""
    from t2ialign.core.images import load_rgb

    # the image is read before anything heavy is imported: a wrong path costs milliseconds
    image = load_rgb(Path(args.image))

    import numpy as np

    from t2ialign.core.cli import run_overrides
    from t2ialign.core.config import dump_config, resolve_config
    from t2ialign.core.fileio import atomic_write_json, atomic_write_text, ensure_writable_dir, to_json
    from t2ialign.core.pipeline import check_class_words, pipeline_from_config
    from t2ialign.core.report import overlay, save_png, segmentation_panel
    from t2ialign.core.thresholds import labels_from_heatmaps
    from t2ialign.plugins.tasks.segmentation import variants_of

    # checked before the model loads: a typo should not cost a model load
    words = check_class_words(args.classes, where="--classes")
    config = resolve_config(heatmap_defaults(), args.config,
                            run_overrides(args, ["backbone", "gamma", "device", "threshold"]))
    thr = config["threshold"]
    if not 0.0 <= float(thr) <= 1.0:  # nan fails both comparisons
        raise ConfigError(f"threshold must be a finite number in [0, 1], got {thr!r}", where="config key threshold",
                          fix="e.g. threshold=0.4 (or --threshold 0.4)")
    variants = variants_of(config)
    out = ensure_writable_dir(Path(config["output"]))
    backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
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
    thr = float(thr)
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
    print(to_json({k: summary[k] for k in ("classes", "scores", "seconds")}))
    if len(res.words) == 1:
        print("note: with a single class word the calibration has nothing to change (S = 1): "
              "the baseline and calibrated heatmaps are the same; give two or more words to compare them")
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
    from t2ialign.core.config import resolve_config

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
    from t2ialign.core.cli import add_output_options, add_run_options, add_word_list, number_in

    h = subparsers.add_parser("heatmap", help="calibrated word heatmaps for one image",
                              epilog="key=value overrides may follow the class words: "
                                     "--classes cat dog gamma=1/2 (a word never contains '=')")
    h.add_argument("image", help="image file (any Pillow format; converted to RGB)")
    add_word_list(h, "--classes", required=True, metavar="WORD", help="class words, e.g. --classes cat dog")
    h.add_argument("--backbone", help="registry backbone name (default toy)")
    h.add_argument("--gamma", type=number_in(0, 1, low_open=True, example="--gamma 1/3"),
                   help="calibration strength gamma in (0, 1]; 1 = uncalibrated (1/3 is allowed)")
    h.add_argument("--device", help="torch device")
    h.add_argument("--threshold", type=number_in(0, 1, example="--threshold 0.4"),
                   help="background threshold of the mask preview, in [0, 1] (default 0.4)")
    add_run_options(h)
    h.set_defaults(handler=cmd_heatmap)
    d = subparsers.add_parser("demo", help="segment a few toy scenes with and without ELBO calibration")
    d.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    add_output_options(d)
    d.set_defaults(handler=cmd_demo)
