"""Does ELBO calibration improve the toy model's maps? A multi-stream study (issue 17).

On 300 test images calibration gained +2.20 mIoU, on the 200 val images it lost 2.44: the sign
depended on the split. This script measures the effect on many fresh scenes instead:

* **streams**: the ``toy_shapes`` extra evaluation streams ``stream0``, ``stream1``, ... (seed
  family ``[seed, 3, k, index]``, disjoint from train/val/test; never used to train the model, to
  choose its layer weights or to tune anything else). ``stream0`` is the *tuning* stream: the
  background threshold of every variant and the calibrated gamma are chosen on it and then frozen;
  the other streams are evaluated with those frozen choices. The old ``val`` and ``test`` splits
  are evaluated the same way, so that the old disagreement can be recomputed with the same tools.
* **inference** is the segmentation task itself (``t2ialign eval segmentation``), one resumable
  run per split under ``--runs-dir``, with threshold mode ``fixed`` (its own scores are not
  used): the variants gamma = 1 (baseline), 1/3, 1/2, 1/5, 1/10 and fixed S = 1/3 share one
  attention pass and one ELBO pass per image. Runs grow in rounds of ``--step`` images, split by
  split, so a run stopped at any time has covered every split about equally.
* **analysis** reads only the stored heatmaps and per-image records: thresholds per variant by
  the task's threshold sweep on the tuning stream, gamma = the calibrated variant with the best
  tuning-stream mIoU; then per-image confusion matrices (``benchmarks/quality.py``'s helper),
  dataset-level mIoU, per-class and size-bucket IoU (the ``miou`` metric plugin, fed the summed
  confusion matrices and size records), paired bootstrap CIs (``t2ialign.core.stats.paired_bootstrap_miou``), ELBO
  ranking accuracy, heterogeneity across streams (Cochran's Q, I^2) and the cause analysis of
  the old val/test disagreement. The per-image confusion matrices and image descriptors are
  written to ``benchmarks/results/calibration_study_images.json`` so that every number can be
  recomputed without the heatmaps (``--from-images``).

    python benchmarks/calibration_study.py infer --splits stream0 stream1 val    # worker 1
    python benchmarks/calibration_study.py infer --splits stream3 stream4 test   # worker 2
    python benchmarks/calibration_study.py infer --splits stream2 stream5        # worker 3
    python benchmarks/calibration_study.py analyse
    python benchmarks/calibration_study.py --markdown              # the tables of docs/toy.md
    python benchmarks/calibration_study.py analyse --from-images   # recompute from the JSON alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, machine, write_result  # noqa: E402

# this checkout's package, not whichever t2ialign the interpreter has installed
sys.path.insert(0, str(ROOT))

#: the tuning stream and the evaluation streams (disjoint seed streams of toy_shapes)
TUNE = "stream0"
EVAL_STREAMS = ["stream1", "stream2", "stream3", "stream4", "stream5"]
#: the old splits whose disagreement the study explains (evaluated with the same frozen choices)
OLD_SPLITS = ["val", "test"]
#: images per split (the old splits: all of val, the 300 test images of the old headline)
LIMITS = {TUNE: 200, **{s: 400 for s in EVAL_STREAMS}, "val": 200, "test": 300}
#: the task settings of every run: all variants from one attention + one ELBO pass per image
TASK_SET = ["gamma=1/3", "ablations.gammas=[0.5, 0.2, 0.1]", "ablations.fixed_s=true",
            "threshold.mode=fixed", "threshold.value=0.5", "bootstrap=0", "visuals=0"]
#: variants whose gamma the tuning stream may choose (task variant names)
GAMMA_CHOICES = ["calibrated", "gamma=0.5", "gamma=0.2", "gamma=0.1"]


# --------------------------------------------------------------------------------------------
# inference: the segmentation task, one run per split, grown in rounds
# --------------------------------------------------------------------------------------------
def run_split(split: str, limit: int, runs_dir: Path, extra: list[str], registries: list[Path],
              dataset: str = "toy_shapes", backbone: str = "toy") -> None:
    """One (resumed) ``t2ialign eval segmentation`` run over the first ``limit`` images of ``split``."""
    from t2ialign.core.cli import main as cli_main

    argv = [a for r in registries for a in ("--registry", str(r))]
    argv += ["eval", "segmentation", "--backbone", backbone, "--dataset", dataset, "--split", split,
             "--limit", str(limit), "--output", str(runs_dir / split), *TASK_SET, *extra]
    with contextlib.redirect_stdout(sys.stderr):
        code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"calibration_study: run of split '{split}' failed (exit {code}); "
                         f"command: t2ialign {' '.join(argv)}")


def infer(splits: list[str], limits: dict[str, int], step: int, runs_dir: Path, extra: list[str],
          registries: list[Path], dataset: str = "toy_shapes", backbone: str = "toy") -> None:
    """Round-robin over ``splits`` in steps of ``step`` images until each reaches its limit."""
    top = max(limits[s] for s in splits)
    for upto in range(step, top + step, step):
        for split in splits:
            n = min(upto, limits[split])
            if n > upto - step:  # this round adds images to this split
                tic = time.perf_counter()
                run_split(split, n, runs_dir, extra, registries, dataset, backbone)
                print(json.dumps({"split": split, "images": n, "round_s": round(time.perf_counter() - tic, 1),
                                  "utc": time.strftime("%H:%M:%S", time.gmtime())}), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# per-image records: confusion matrices at frozen thresholds + what describes each scene
# --------------------------------------------------------------------------------------------
#: the three most frequent and the three rarest training classes (toy_shapes' Zipf order)
FREQUENT, RARE = ["circle", "square", "triangle"], ["diamond", "ring", "crescent"]


def study_variants() -> list:
    """The task variants of :data:`TASK_SET` (the names under which the heatmaps are stored)."""
    from t2ialign.plugins.tasks.segmentation import variants_of

    return variants_of({"gamma": 1.0 / 3.0, "ablations": {"gammas": [0.5, 0.2, 0.1], "fixed_s": True}})


def done_images(out: Path) -> int:
    """How many images ``0..n-1`` of a run are complete (its records hold every index below n)."""
    from t2ialign.core.fileio import read_jsonl

    seen = {int(r["index"]) for p in out.glob("records.eval.*.jsonl") for r in read_jsonl(p)}
    n = 0
    while n in seen:
        n += 1
    return n


def tune(out: Path, dataset: Any, n: int, variants: list) -> dict[str, dict[str, float]]:
    """Per variant, the threshold with the best mIoU on the first ``n`` images of a run (the task's sweep)."""
    from t2ialign.plugins.tasks.common import Procs
    from t2ialign.plugins.tasks.segmentation import SegmentationTask

    return SegmentationTask()._sweep(out, dataset, "eval", n, variants, Procs())


def describe(sample: Any, record: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """The scene facts the cause analysis stratifies by, and the ELBO ranking outcome of the image."""
    import numpy as np

    objects = sample.meta.get("objects", [])
    mask = np.asarray(sample.mask)
    classes = list(sample.classes)
    areas = [int((mask == c).sum()) for c in classes]
    desc: dict[str, Any] = {
        "classes": classes,
        "n_classes": len(classes),
        "n_objects": len(objects),
        "max_occluded": round(max((o["occluded_fraction"] for o in objects), default=0.0), 4),
        "min_area": round(min(areas) / mask.size, 5) if areas else None,
        "small": any(o["size"] == "small" for o in objects),
        "rare": any(class_names[c] in RARE for c in classes),
    }
    scores = record.get("scores", {}).get("calibrated")
    if len(classes) >= 2 and scores is not None:
        s = np.asarray(scores)
        largest = np.flatnonzero(np.asarray(areas) == max(areas))
        desc["rank_hit"] = bool(np.isclose(s[largest], s.max()).any())  # as quality.ranking_accuracy
        desc["scores"] = [round(float(x), 4) for x in s]
    return desc


def _sparse(conf: Any) -> list[list[int]]:
    import numpy as np

    r, c = np.nonzero(conf)
    return [[int(i), int(j), int(conf[i, j])] for i, j in zip(r, c)]


def dense(triples: list[list[int]], k: int) -> Any:
    """A ``(k, k)`` confusion matrix from its ``[row, col, count]`` triples."""
    import numpy as np

    conf = np.zeros((k, k), dtype=np.int64)
    for i, j, n in triples:
        conf[i, j] = n
    return conf


def split_images(out: Path, ds: Any, n: int, variants: list[str],
                 thresholds: dict[str, dict[str, dict[str, float]]], start: int = 0) -> list[dict]:
    """Per-image records of images ``start..n-1`` of one run: descriptors + confusion per protocol/variant.

    The same steps as the task's scoring (its stored 8-bit heatmaps, ``labels_from_heatmaps``,
    ``confusion_matrix``), done once per image for every threshold set in ``thresholds``.
    """
    import numpy as np
    import torch

    from t2ialign.core.fileio import read_jsonl
    from t2ialign.core.thresholds import labels_from_heatmaps
    from t2ialign.plugins.tasks.common import safe_name
    from t2ialign.core.stats import confusion_matrix

    k = len(ds.class_names)
    recs = {r["id"]: r for p in out.glob("records.eval.*.jsonl") for r in read_jsonl(p)}
    images = []
    for i in range(start, n):
        sample = ds[i]
        target = torch.from_numpy(np.asarray(sample.mask, dtype=np.int64))
        heats = {}
        if sample.classes:
            with np.load(out / "heatmaps" / "eval" / f"{safe_name(sample.id)}.npz") as data:
                heats = {v: torch.from_numpy(data[f"heat_{v}"].astype(np.float32) / 255.0) for v in variants}
        conf = {}
        for proto, thr in thresholds.items():
            conf[proto] = {}
            for v in variants:
                pred = (labels_from_heatmaps(heats[v], list(sample.classes), thr[v]["threshold"])
                        if sample.classes else torch.zeros_like(target))
                conf[proto][v] = _sparse(confusion_matrix(pred, target, k))
        images.append({"split": ds.split, "id": sample.id, "index": i,
                       **describe(sample, recs[sample.id], ds.class_names), "conf": conf})
    return images


def collect_images(runs_dir: Path, splits: list[str], host: Any, dataset_name: str,
                   thresholds: dict[str, dict[str, dict[str, float]]], protocols: dict[str, list[str]]) -> list[dict]:
    """Per-image records of every split (:func:`split_images`), cached per run folder.

    ``protocols`` maps a split to the threshold sets (``thresholds`` keys) it is scored with: every
    split gets ``frozen`` (tuned on the tuning stream), the old splits also ``old``. The cache file
    ``study_images.json`` of a run keeps the records made with the same variants and thresholds,
    so a rerun after more inference only scores the new images.
    """
    from t2ialign.core.fileio import atomic_write_text

    variants = [v.name for v in study_variants()]
    images = []
    for split in splits:
        out = runs_dir / split
        n = done_images(out)
        if n == 0:
            continue
        thr = {p: thresholds[p] for p in protocols[split]}
        key = json.loads(json.dumps({"variants": variants, "thresholds": thr}))
        cache = out / "study_images.json"
        part = []
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                part = cached["images"][:n]
        if len(part) < n:
            part += split_images(out, host.dataset(dataset_name, split), n, variants, thr, start=len(part))
            atomic_write_text(cache, json.dumps({"key": key, "images": part}, separators=(",", ":")))
        images += part
    return images


# --------------------------------------------------------------------------------------------
# statistics (all from the per-image confusion matrices)
# --------------------------------------------------------------------------------------------
def metric_of(confs: list[Any], class_names: list[str]) -> dict[str, Any]:
    """The ``miou`` metric plugin's results for a set of images, fed their summed confusion and size records."""
    import numpy as np
    import torch

    from t2ialign.plugins.metrics.segmentation import SegmentationMetrics

    metric = SegmentationMetrics(class_names=class_names)
    rows = []
    for conf in confs:  # one size record per foreground class present in the GT (the metric's definition)
        t, p, tp = conf.sum(1), conf.sum(0), np.diag(conf)
        for c in np.flatnonzero(t > 0):
            if c > 0:
                rows.append([t[c] / conf.sum(), t[c], p[c], tp[c], c])
    metric.merge({"confmat": torch.as_tensor(np.sum(confs, axis=0)),
                  "records": torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)})
    return metric.compute()


def _class_mean(result: dict[str, Any], names: list[str]) -> float | None:
    per = result["per_class"]
    vals = [per[c]["iou"] for c in names if c in per and per[c]["iou"] is not None]
    return sum(vals) / len(vals) if vals else None


def _bootstrap_mean(values: Any, n: int, seed: int) -> dict[str, float]:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if n <= 0:
        return {"mean": float(values.mean())}
    rng = np.random.default_rng(seed)
    means = np.array([values[rng.integers(0, len(values), len(values))].mean() for _ in range(n)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "ci95_low": float(lo), "ci95_high": float(hi)}


def ranking(images: list[dict], n: int, seed: int) -> dict[str, Any] | None:
    """ELBO ranking accuracy (largest-area class gets S = 1) vs chance (mean 1/K), over images with K >= 2."""
    rows = [im for im in images if "rank_hit" in im]
    if not rows:
        return None
    excess = [float(im["rank_hit"]) - 1.0 / im["n_classes"] for im in rows]
    ci = _bootstrap_mean(excess, n, seed)
    return {"images": len(rows), "accuracy": sum(im["rank_hit"] for im in rows) / len(rows),
            "chance": sum(1.0 / im["n_classes"] for im in rows) / len(rows),
            "excess_over_chance": ci}


def summary(images: list[dict], proto: str, variants: list[str], class_names: list[str], n: int, seed: int,
            detail: bool = True) -> dict[str, Any]:
    """mIoU per variant, paired bootstrap differences to the baseline, rare/frequent and size summaries."""
    from t2ialign.core.stats import paired_bootstrap_miou

    k = len(class_names)
    confs = {v: {im["id"]: dense(im["conf"][proto][v], k) for im in images} for v in variants}
    out: dict[str, Any] = {"images": len(images), "variants": {}, "vs_baseline": {}}
    for v in variants:
        res = metric_of(list(confs[v].values()), class_names)
        row = {"miou": res["miou"]}
        if detail:
            buckets = [b["iou"] for b in res["size_buckets"]]
            row.update({"frequent3": _class_mean(res, FREQUENT), "rare3": _class_mean(res, RARE),
                        "smallest3_buckets": sum(buckets[:3]) / 3 if len(buckets) >= 6 else None,
                        "largest3_buckets": sum(buckets[-3:]) / 3 if len(buckets) >= 6 else None,
                        "per_class_iou": {c: res["per_class"][c]["iou"] for c in class_names},
                        "size_bucket_area": [[b["area_min"], b["area_max"]] for b in res["size_buckets"]]})
        out["variants"][v] = row
        if v != "baseline":
            out["vs_baseline"][v] = paired_bootstrap_miou(confs["baseline"], confs[v], n, seed)
    if detail:
        base = out["variants"]["baseline"]
        out["change_vs_baseline"] = {
            v: {key: (r[key] - base[key]) if r[key] is not None and base[key] is not None else None
                for key in ("frequent3", "rare3", "smallest3_buckets", "largest3_buckets")}
            for v, r in out["variants"].items() if v != "baseline"}
        if "fixed_s" in confs and "calibrated" in confs:
            out["calibrated_vs_fixed_s"] = paired_bootstrap_miou(confs["fixed_s"], confs["calibrated"], n, seed)
        out["ranking"] = ranking(images, n, seed)
    return out


def heterogeneity(deltas: list[dict[str, float]]) -> dict[str, Any]:
    """Cochran's Q and I^2 of per-stream differences; each stream's SE = its bootstrap CI width / (2 x 1.96)."""
    import numpy as np
    from scipy.stats import chi2

    d = np.array([x["delta"] for x in deltas])
    se = np.array([(x["ci95_high"] - x["ci95_low"]) / (2 * 1.959964) for x in deltas])
    if len(d) < 2 or (se <= 0).any():
        return {"streams": len(d), "Q": None, "note": "needs >= 2 streams, each with a non-zero bootstrap spread"}
    w = 1.0 / se ** 2
    mean = float((w * d).sum() / w.sum())
    q = float((w * (d - mean) ** 2).sum())
    df = len(d) - 1
    return {"streams": len(d), "fixed_effect_mean": mean, "fixed_effect_se": float(w.sum() ** -0.5),
            "Q": q, "df": df, "p": float(chi2.sf(q, df)) if df > 0 else None,
            "I2": max(0.0, (q - df) / q) if q > 0 else 0.0}


def influence(images: list[dict], proto: str, variant: str, k_classes: int) -> list[float]:
    """Leave-one-out influence of each image on the mIoU difference: delta(all) - delta(all but it)."""
    import numpy as np

    from t2ialign.core.stats import miou_from_confusion

    a = np.stack([dense(im["conf"][proto]["baseline"], k_classes) for im in images])
    b = np.stack([dense(im["conf"][proto][variant], k_classes) for im in images])
    sa, sb = a.sum(0), b.sum(0)
    full = miou_from_confusion(sb) - miou_from_confusion(sa)
    return [full - (miou_from_confusion(sb - b[i]) - miou_from_confusion(sa - a[i])) for i in range(len(images))]


def subset_spread(images: list[dict], proto: str, variant: str, k_classes: int, size: int, n: int,
                  seed: int) -> dict[str, Any]:
    """The difference on random ``size``-image subsets (without replacement) of a pool of images."""
    import numpy as np

    from t2ialign.core.stats import miou_from_confusion

    a = np.stack([dense(im["conf"][proto]["baseline"], k_classes) for im in images])
    b = np.stack([dense(im["conf"][proto][variant], k_classes) for im in images])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        pick = rng.choice(len(images), size=size, replace=False)
        vals.append(miou_from_confusion(b[pick].sum(0)) - miou_from_confusion(a[pick].sum(0)))
    vals = np.array(vals)
    return {"subset_images": size, "subsets": n, "mean": float(vals.mean()), "sd": float(vals.std(ddof=1)),
            "p2.5": float(np.percentile(vals, 2.5)), "p97.5": float(np.percentile(vals, 97.5)),
            "share_negative": float((vals < 0).mean()), "_values": vals}


def strata(images: list[dict]) -> dict[str, Any]:
    """Named predicates over the image descriptors for the stratified differences."""
    return {
        "1 class": lambda im: im["n_classes"] == 1,
        "2 classes": lambda im: im["n_classes"] == 2,
        "3 classes": lambda im: im["n_classes"] == 3,
        "4 classes": lambda im: im["n_classes"] == 4,
        "no object occluded > 10%": lambda im: im["max_occluded"] <= 0.1,
        "an object occluded > 10%": lambda im: im["max_occluded"] > 0.1,
        "no small object": lambda im: not im["small"],
        "a small object": lambda im: im["small"],
        "no rare class": lambda im: not im["rare"],
        "a rare class": lambda im: im["rare"],
    }


def _stratified(images: list[dict], proto: str, variant: str, class_names: list[str], n: int,
                seed: int) -> list[dict[str, Any]]:
    from t2ialign.core.stats import paired_bootstrap_miou

    k = len(class_names)
    rows = []
    for name, keep in strata(images).items():
        sub = [im for im in images if keep(im)]
        if len(sub) < 5:
            rows.append({"stratum": name, "images": len(sub)})
            continue
        a = {im["id"]: dense(im["conf"][proto]["baseline"], k) for im in sub}
        b = {im["id"]: dense(im["conf"][proto][variant], k) for im in sub}
        rows.append({"stratum": name, "images": len(sub), "share": len(sub) / len(images),
                     **paired_bootstrap_miou(a, b, n, seed)})
    return rows


def _per_class_change(result: dict[str, Any], variant: str, class_names: list[str]) -> dict[str, float | None]:
    base, var = result["variants"]["baseline"]["per_class_iou"], result["variants"][variant]["per_class_iou"]
    return {c: (var[c] - base[c]) if var[c] is not None and base[c] is not None else None for c in class_names}


def _influence_table(images: list[dict], proto: str, variant: str, k: int) -> dict[str, Any]:
    """How much of a split's difference its most influential images carry (leave-one-out influence)."""
    import numpy as np

    from t2ialign.core.stats import miou_from_confusion

    infl = np.array(influence(images, proto, variant, k))
    a = np.stack([dense(im["conf"][proto]["baseline"], k) for im in images])
    b = np.stack([dense(im["conf"][proto][variant], k) for im in images])
    full = miou_from_confusion(b.sum(0)) - miou_from_confusion(a.sum(0))
    order = np.argsort(infl) if full < 0 else np.argsort(-infl)  # the images pushing the sign first
    out: dict[str, Any] = {"delta": full, "images": len(images), "without_top": {}}
    for top in (1, 5, 10, 20):
        if top >= len(images):
            continue
        keep = np.ones(len(images), dtype=bool)
        keep[order[:top]] = False
        out["without_top"][str(top)] = miou_from_confusion(b[keep].sum(0)) - miou_from_confusion(a[keep].sum(0))
    out["top_images"] = [{"id": images[i]["id"], "influence": float(infl[i]), "classes": images[i]["classes"],
                          "n_classes": images[i]["n_classes"]} for i in order[:10]]
    return out


def analyse(images: list[dict], header: dict[str, Any], n_boot: int, seed: int) -> dict[str, Any]:
    """Every number of the study, from the per-image records alone."""
    import numpy as np

    class_names = header["class_names"]
    variants = header["variants"]
    k = len(class_names)
    frozen = header["thresholds"]["frozen"]
    tuned = max(GAMMA_CHOICES, key=lambda v: frozen[v]["miou"])  # gamma chosen on the tuning stream
    by_split: dict[str, list[dict]] = {}
    for im in images:
        by_split.setdefault(im["split"], []).append(im)
    streams = [s for s in EVAL_STREAMS if s in by_split]
    pool = [im for s in streams for im in by_split[s]]
    report: dict[str, Any] = {
        "tuned_variant": tuned, "tuned_gamma": header["gammas"][tuned],
        "thresholds": header["thresholds"],
        "images_per_split": {s: len(v) for s, v in by_split.items()},
    }
    report["per_split"] = {s: summary(v, "frozen", variants, class_names, n_boot, seed) for s, v in by_split.items()}
    report["pooled_streams"] = summary(pool, "frozen", variants, class_names, n_boot, seed)
    report["heterogeneity"] = {
        v: heterogeneity([report["per_split"][s]["vs_baseline"][v] for s in streams])
        for v in variants if v != "baseline"} if len(streams) >= 2 else {}
    if len(streams) >= 2:
        report["heterogeneity"]["calibrated_vs_fixed_s"] = heterogeneity(
            [report["per_split"][s]["calibrated_vs_fixed_s"] for s in streams])
        old_too = streams + [s for s in OLD_SPLITS if s in by_split]
        report["heterogeneity_with_old_splits"] = {
            v: heterogeneity([report["per_split"][s]["vs_baseline"][v] for s in old_too]) for v in ("calibrated", tuned)}

    # ---- why did val and test disagree?
    cause: dict[str, Any] = {}
    old = [s for s in OLD_SPLITS if s in by_split and "old" in by_split[s][0]["conf"]]
    cause["protocol"] = []
    for s in old:
        for proto in ("old", "frozen"):
            r = summary(by_split[s], proto, ["baseline", "calibrated", "fixed_s"], class_names, n_boot, seed,
                        detail=False)
            cause["protocol"].append({"split": s, "thresholds": proto,
                                      "threshold_baseline": header["thresholds"][proto]["baseline"]["threshold"],
                                      "threshold_calibrated": header["thresholds"][proto]["calibrated"]["threshold"],
                                      "miou_baseline": r["variants"]["baseline"]["miou"],
                                      "miou_calibrated": r["variants"]["calibrated"]["miou"],
                                      "vs_baseline": r["vs_baseline"]["calibrated"]})
    groups = {"pooled streams": (pool, "frozen")}
    for s in old:
        groups[f"{s} (old thresholds)"] = (by_split[s], "old")
        groups[f"{s} (frozen thresholds)"] = (by_split[s], "frozen")
    per_class = {}
    for g, (ims, proto) in groups.items():
        r = summary(ims, proto, ["baseline", "calibrated"], class_names, 0, seed)
        per_class[g] = {"change": _per_class_change(r, "calibrated", class_names),
                        "classes_counted": sum(x is not None for x in r["variants"]["baseline"]["per_class_iou"].values()),
                        "objects_per_class": {c: sum(class_names.index(c) in im["classes"] for im in ims)
                                              for c in class_names[1:]}}
    cause["per_class_change"] = per_class
    cause["composition"] = {g: {"images": len(ims),
                                "n_classes_share": {str(j): float(np.mean([im["n_classes"] == j for im in ims]))
                                                    for j in range(0, 5)},
                                "occluded_share": float(np.mean([im["max_occluded"] > 0.1 for im in ims])),
                                "small_share": float(np.mean([im["small"] for im in ims])),
                                "rare_share": float(np.mean([im["rare"] for im in ims]))}
                            for g, (ims, _) in groups.items() if "frozen" in g or g == "pooled streams"}
    cause["strata"] = {g: _stratified(ims, proto, "calibrated", class_names, min(n_boot, 1000), seed)
                       for g, (ims, proto) in groups.items()}
    # the same for every fresh stream: is the old splits' dependence on a few scenes unusual?
    cause["influence"] = {**{g: _influence_table(ims, proto, "calibrated", k) for g, (ims, proto) in groups.items()
                             if g != "pooled streams"},
                          **{s: _influence_table(by_split[s], "frozen", "calibrated", k) for s in streams}}
    spread = {}
    if pool:
        for s in old:
            size = len(by_split[s])
            if size < len(pool):
                sp = subset_spread(pool, "frozen", "calibrated", k, size, 2000, seed)
                vals = sp.pop("_values")
                d_frozen = report["per_split"][s]["vs_baseline"]["calibrated"]["delta"]
                sp[f"share_at_or_beyond_{s}_frozen"] = float((vals <= d_frozen).mean() if d_frozen < 0
                                                             else (vals >= d_frozen).mean())
                spread[s] = sp
    cause["subset_spread"] = spread
    report["cause"] = cause
    return report


def analyse_main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Build (or read) the per-image records, compute the study, write both JSON files."""
    from t2ialign.core.fileio import atomic_write_text

    if args.from_images:
        data = json.loads(args.images.read_text())
        header, images = data["header"], data["images"]
    else:
        from t2ialign.core.host import Host

        host = Host(registry_files=args.registry)
        variants = study_variants()
        tune_out = args.runs_dir / TUNE
        n_tune = done_images(tune_out)
        if n_tune == 0:
            raise SystemExit(f"calibration_study: no finished images in {tune_out}; run the infer phase first")
        thresholds = {"frozen": tune(tune_out, host.dataset(args.dataset, TUNE), n_tune, variants)}
        splits = [s for s in [TUNE, *EVAL_STREAMS, *OLD_SPLITS] if (args.runs_dir / s).is_dir()]
        protocols = {s: ["frozen"] for s in splits}
        n_val = done_images(args.runs_dir / "val") if "val" in splits else 0
        if n_val:  # the old protocol: val tuned on itself (oracle), test tuned on val
            thresholds["old"] = tune(args.runs_dir / "val", host.dataset(args.dataset, "val"), n_val, variants)
            for s in OLD_SPLITS:
                if s in protocols:
                    protocols[s] = ["frozen", "old"]
        images = collect_images(args.runs_dir, splits, host, args.dataset, thresholds, protocols)
        class_names = host.dataset(args.dataset, TUNE).class_names
        header = {"class_names": list(class_names), "variants": [v.name for v in variants],
                  "gammas": {v.name: v.gamma for v in variants}, "fixed_s": {v.name: v.fixed for v in variants},
                  "thresholds": thresholds, "tuning": {"split": TUNE, "images": n_tune},
                  "old_protocol": "val: thresholds tuned on val itself (oracle); test: tuned on val",
                  "task_settings": TASK_SET + list(args.set), "backbone": args.backbone, "dataset": args.dataset,
                  "runs_dir": str(args.runs_dir)}
        args.images.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.images, json.dumps({"header": header, "images": images}, separators=(",", ":")))
    report = {"benchmark": "calibration_study", "backbone": header["backbone"], "dataset": header["dataset"],
              "command": command_line("calibration_study.py", argv), "machine": machine(),
              "setup": {"tuning": header["tuning"], "task_settings": header["task_settings"],
                        "bootstrap": args.bootstrap, "old_protocol": header["old_protocol"],
                        "images_file": str(args.images.relative_to(ROOT) if args.images.is_relative_to(ROOT)
                                           else args.images)},
              **analyse(images, header, args.bootstrap, 4307)}
    write_result(args.out, report)
    return report


# --------------------------------------------------------------------------------------------
# markdown tables of a report (what docs/toy.md shows)
# --------------------------------------------------------------------------------------------
def _d(x: dict[str, Any] | None) -> str:
    if not x or x.get("delta") is None:
        return "–"
    return f"{x['delta']:+.2f} ({x['ci95_low']:+.2f} .. {x['ci95_high']:+.2f})"


def _f(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _tbl(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *["| " + " | ".join(r) + " |" for r in rows]])


def markdown(rep: dict[str, Any]) -> str:
    """The study's tables as markdown, rendered from a report (no number typed by hand)."""
    out = []
    variants = [v for v in rep["pooled_streams"]["variants"] if v != "baseline"]
    rows = []
    tuning = rep.get("setup", {}).get("tuning", {}).get("split", TUNE)
    for s, r in [*rep["per_split"].items(), ("pooled streams", rep["pooled_streams"])]:
        rows.append([f"{s} (tuning)" if s == tuning else s, str(r["images"]), _f(r["variants"]["baseline"]["miou"]),
                     *[_d(r["vs_baseline"].get(v)) for v in variants], _d(r.get("calibrated_vs_fixed_s"))])
    out.append(_tbl(["split", "scenes", "mIoU gamma = 1", *[f"{v} - gamma 1" for v in variants],
                     "calibrated - fixed_s"], rows))
    rows = [[v, str(h.get("streams")), _f(h.get("Q")), _f(h.get("p")), _f(100 * h["I2"], 0) if h.get("I2") is not None
             else "–", _f(h.get("fixed_effect_mean"))] for v, h in rep.get("heterogeneity", {}).items()]
    rows += [[f"{v}, streams + val + test", str(h.get("streams")), _f(h.get("Q")), _f(h.get("p")),
              _f(100 * h["I2"], 0) if h.get("I2") is not None else "–", _f(h.get("fixed_effect_mean"))]
             for v, h in rep.get("heterogeneity_with_old_splits", {}).items()]
    out.append(_tbl(["difference", "streams", "Cochran's Q", "p", "I² %", "inverse-variance mean"], rows))
    p = rep["pooled_streams"]
    rows = [[k, _f(p["variants"]["baseline"][k]), _f(p["variants"]["calibrated"][k]),
             f"{p['change_vs_baseline']['calibrated'][k]:+.2f}"]
            for k in ("frequent3", "rare3", "smallest3_buckets", "largest3_buckets")
            if p["change_vs_baseline"]["calibrated"][k] is not None]
    out.append(_tbl(["pooled streams", "gamma = 1", "gamma = 1/3", "change"], rows))
    rows = []
    for s, r in [*rep["per_split"].items(), ("pooled streams", p)]:
        rk = r.get("ranking")
        if rk:
            ex = rk["excess_over_chance"]
            rows.append([s, str(rk["images"]), _f(100 * rk["accuracy"], 1), _f(100 * rk["chance"], 1),
                         f"{100 * ex['mean']:+.1f} ({100 * ex['ci95_low']:+.1f} .. {100 * ex['ci95_high']:+.1f})"])
    out.append(_tbl(["split", "scenes with >= 2 classes", "ranking accuracy %", "chance %", "excess, 95% CI"], rows))
    c = rep["cause"]
    rows = [[r["split"], r["thresholds"], f"{r['threshold_baseline']:.2f} / {r['threshold_calibrated']:.2f}",
             _f(r["miou_baseline"]), _f(r["miou_calibrated"]), _d(r["vs_baseline"])] for r in c["protocol"]]
    out.append(_tbl(["split", "thresholds", "threshold gamma 1 / 1/3", "mIoU gamma 1", "mIoU gamma 1/3",
                     "difference"], rows))
    groups = list(c["strata"])
    names = [r["stratum"] for r in c["strata"][groups[0]]]
    rows = []
    for j, name in enumerate(names):
        row = [name]
        for g in groups:
            r = c["strata"][g][j]
            row.append(f"{r['images']}: {_d(r)}" if "delta" in r else f"{r['images']}: –")
        rows.append(row)
    out.append(_tbl(["stratum (scenes: difference)", *groups], rows))
    classes = list(next(iter(c["per_class_change"].values()))["change"])
    rows = []
    for cl in classes:
        row = [cl]
        for g, t in c["per_class_change"].items():
            ch = t["change"][cl]
            n = t["objects_per_class"].get(cl)
            row.append(("–" if ch is None else f"{ch:+.1f}") + (f" ({n})" if n is not None else ""))
        rows.append(row)
    out.append(_tbl(["class: IoU change (scenes holding it)", *c["per_class_change"]], rows))
    rows = [[g, str(t["images"]), f"{t['delta']:+.2f}", *[f"{t['without_top'].get(k, float('nan')):+.2f}"
                                                            for k in ("1", "5", "10", "20")]]
            for g, t in c["influence"].items()]
    out.append(_tbl(["split", "scenes", "difference", "without the top 1", "top 5", "top 10", "top 20"], rows))
    rows = [[s, str(v["subset_images"]), f"{v['mean']:+.2f}", _f(v["sd"]), f"{v['p2.5']:+.2f} .. {v['p97.5']:+.2f}",
             _f(100 * v["share_negative"], 1), _f(100 * v[f"share_at_or_beyond_{s}_frozen"], 1)]
            for s, v in c["subset_spread"].items()]
    out.append(_tbl(["split", "subset size", "mean difference", "sd", "2.5 .. 97.5 %", "% of subsets < 0",
                     "% at or beyond the split's"], rows))
    return "\n\n".join(out)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _parse_limits(pairs: list[str]) -> dict[str, int]:
    out = dict(LIMITS)
    for p in pairs:
        split, _, n = p.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"calibration_study: --limits takes split=N with N >= 1, got {p!r}")
        out[split] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["infer", "analyse", "all"], nargs="?", default="all",
                        help="infer = run the task on --splits; analyse = numbers from stored runs; all = both")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to infer (default: all of the study)")
    parser.add_argument("--limits", nargs="*", default=[], metavar="split=N", help="override images per split")
    parser.add_argument("--step", type=int, default=100, help="images added per split and round")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "calibration_study")
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--dataset", default="toy_shapes")
    parser.add_argument("--registry", type=Path, action="append", default=[], help="extra registry file")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra task overrides")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--from-images", action="store_true",
                        help="analyse from the per-image JSON (--images) instead of the stored heatmaps")
    parser.add_argument("--images", type=Path, default=RESULTS / "calibration_study_images.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_study.json")
    parser.add_argument("--markdown", action="store_true", help="print the tables of --out as markdown and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    limits = _parse_limits(args.limits)
    splits = args.splits or [TUNE, *EVAL_STREAMS, *OLD_SPLITS]
    if args.phase in ("infer", "all"):
        infer(splits, limits, args.step, args.runs_dir, args.set, args.registry, args.dataset, args.backbone)
    if args.phase in ("analyse", "all"):
        analyse_main(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
