"""Zero-shot referring segmentation: the main job of t2ialign (method-spec §6-8).

Two stages, like the reference, so that a run is resumable and its numbers are reproducible:

1. *inference*: for every image of the held-out split (threshold tuning) and of the evaluated
   split, run :class:`~t2ialign.core.pipeline.AlignmentPipeline` once and store all variants'
   heatmaps (8-bit, as the reference writes them) in ``heatmaps/<split>/<id>.npz`` plus one JSON
   line per image (scores, ELBO losses and their standard errors, timings). Files are written
   atomically; a rerun skips finished images. With ``accelerate launch`` images are sharded
   over processes.
2. *scoring*: per variant, the background threshold is chosen on the held-out split (grid
   0.01..0.99) and applied to the evaluated split; dataset-level confusion-matrix metrics are
   accumulated per process and merged. Tuning on the evaluated split exists only as the named
   oracle mode, and results say so.

Variants: ``baseline`` (gamma = 1, the uncalibrated attention), ``calibrated`` (gamma), and the
ablations asked for (other gammas, fixed S) -- all from the same passes.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from t2ialign.core.config import dump_config
from t2ialign.core.errors import ConfigError
from t2ialign.core.fileio import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    repair_jsonl,
)
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.pipeline import Variant, pipeline_from_config
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.stats import confusion_matrix, paired_bootstrap_miou
from t2ialign.core.thresholds import ThresholdSweep, labels_from_heatmaps
from t2ialign.plugins.tasks.common import Procs, check_number, check_weights, claimed_output, record_weights, safe_name, versions

if TYPE_CHECKING:
    from t2ialign.core.host import Host

DEFAULTS: dict[str, Any] = {
    "backbone": "toy",
    "dataset": "toy_shapes",
    "split": "test",
    "limit": None,
    "device": "cpu",
    "dtype": "float32",
    "seed": 4307,
    "output": "runs/segmentation",
    "gamma": 1.0 / 3.0,
    "ablations": {"gammas": [], "fixed_s": False},
    "threshold": {"mode": "heldout", "split": "val", "limit": None, "value": 0.5},
    # elbo.preset: null = the keys as given; "fast" / "reference" expand into scheme, timesteps and
    # antithetic when the config is resolved (core/elbo_presets.py)
    "elbo": {"prompt": "a photo of {cls}", "timesteps": [[1, 999, 50]], "scheme": "uniform", "batch_size": 8,
             "antithetic": False, "preset": None},
    "collect": {"prompt": "a photo of {classes}", "timesteps": [[20, 201, 20]], "batch_size": 10},
    "layers": {"cross_weight": None, "cross_gaussian_sigma": None, "self_weight": None},
    # propagation without Q x Q maps (docs/backbones.md "What the fused path stores"); explicit = parity/debug
    "self_maps": "fused",
    "self_factors": {"dtype": None, "device": None, "max_mib": None},
    "prefactor_exponent": None,
    "metric": "miou",
    "bootstrap": 1000,
    "visuals": 12,
}

#: config keys whose change invalidates stored heatmaps (a resumed run must match them)
RESULT_KEYS = ("backbone", "dataset", "dtype", "seed", "gamma", "ablations", "elbo", "collect", "layers",
               "prefactor_exponent")


def variants_of(config: dict[str, Any]) -> list[Variant]:
    """The variants a config asks for: baseline, calibrated, then ablations."""
    gamma = float(config["gamma"])
    if not 0 < gamma <= 1:
        raise ConfigError(f"gamma must lie in (0, 1], got {gamma}", where="config key gamma",
                          fix="use e.g. gamma=1/3 (reference default); gamma=1 is the uncalibrated baseline")
    out = [Variant("baseline", 1.0)]
    if gamma < 1:
        out.append(Variant("calibrated", gamma))
    for g in config["ablations"]["gammas"]:
        g = float(g)
        if not 0 < g <= 1:
            raise ConfigError(f"ablation gamma must lie in (0, 1], got {g}", where="config key ablations.gammas")
        if g < 1 and not math.isclose(g, gamma):
            out.append(Variant(f"gamma={g:.4g}", g))
    if config["ablations"]["fixed_s"] and gamma < 1:
        out.append(Variant("fixed_s", gamma, fixed=True))
    return out


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
class SegmentationTask:
    """Referring segmentation with and without ELBO calibration (see module docstring)."""

    name = "segmentation"
    defaults = DEFAULTS

    # ------------------------------------------------------------------ inference
    def _infer_split(self, host, pipeline, dataset, split: str, limit: int | None, variants, out: Path,
                     procs: Procs) -> None:
        from tqdm import tqdm

        from t2ialign.core.console import progress_disabled

        heat_dir = out / "heatmaps" / split
        heat_dir.mkdir(parents=True, exist_ok=True)
        done = {r["id"] for path in out.glob(f"records.{split}.*.jsonl") for r in read_jsonl(path)}
        n = len(dataset) if limit is None else min(limit, len(dataset))
        mine = [i for i in range(n) if i % procs.world == procs.rank]
        records_path = out / f"records.{split}.rank{procs.rank}.jsonl"
        repair_jsonl(records_path)  # a killed run may have left half a line
        todo = [i for i in mine if dataset[i].id not in done] if done else mine
        bar = tqdm(todo, desc=f"{split} [rank {procs.rank}]" if procs.world > 1 else split,
                   unit="img", disable=progress_disabled(), dynamic_ncols=True)
        tic = time.perf_counter()
        for count, i in enumerate(bar, 1):
            sample = dataset[i]
            words = [dataset.class_names[c] for c in sample.classes]
            record: dict[str, Any] = {"id": sample.id, "index": i, "classes": list(sample.classes), "words": words}
            if sample.classes:
                res = pipeline.run(sample.image, words, variants, key=f"{dataset.name}/{split}/{sample.id}")
                arrays = {f"heat_{v}": np.round(h.numpy() * 255).astype(np.uint8) for v, h in res.heatmaps.items()}
                buf = io.BytesIO()
                np.savez_compressed(buf, classes=np.asarray(sample.classes, dtype=np.int64), **arrays)
                atomic_write_bytes(heat_dir / f"{safe_name(sample.id)}.npz", buf.getvalue())
                record["scores"] = {v: [round(float(s), 6) for s in res.scores[v]] for v in res.scores}
                if res.elbo is not None:
                    record["elbo"] = {"loss": res.elbo.loss.tolist(), "se": res.elbo.se.tolist(),
                                      "scheme": res.elbo.scheme, "timesteps": len(res.elbo.t)}
                record["timings"] = {k: round(v, 4) for k, v in res.timings.items()}
                record["forwards"] = res.forwards
            append_jsonl(records_path, record)
            bar.set_postfix(img_s=f"{count / max(time.perf_counter() - tic, 1e-9):.2f}")

    # ------------------------------------------------------------------ scoring
    def _stored(self, out: Path, dataset, split: str, limit: int | None, rank: int, world: int) -> Iterable:
        """(sample, {variant: heat (C,H,W) float}) of this process's shard, from stored heatmaps."""
        n = len(dataset) if limit is None else min(limit, len(dataset))
        for i in range(rank, n, world):
            sample = dataset[i]
            if not sample.classes:
                yield sample, None
                continue
            path = out / "heatmaps" / split / f"{safe_name(sample.id)}.npz"
            with np.load(path) as data:
                heats = {k[5:]: torch.from_numpy(data[k].astype(np.float32) / 255.0)
                         for k in data.files if k.startswith("heat_")}
            yield sample, heats

    def _sweep(self, out, dataset, split, limit, variants, procs) -> dict[str, dict[str, Any]]:
        sweeps = {v.name: ThresholdSweep(len(dataset.class_names)) for v in variants}
        for sample, heats in self._stored(out, dataset, split, limit, procs.rank, procs.world):
            target = torch.from_numpy(np.asarray(sample.mask, dtype=np.int64))
            for v in variants:
                if heats is None:
                    sweeps[v.name].update(torch.zeros((0, *target.shape)), [], target)
                else:
                    sweeps[v.name].update(heats[v.name], list(sample.classes), target)
        states = procs.gather({k: s.state() for k, s in sweeps.items()})
        result = {}
        for name, sweep in sweeps.items():
            merged = ThresholdSweep(len(dataset.class_names))
            for st in states:
                merged.merge(st[name])
            thr, miou = merged.best()
            result[name] = {"threshold": float(thr), "miou": float(miou)}
        return result

    def _score(self, host, config, out, dataset, split, limit, variants, thresholds, procs):
        metrics, per_image = {}, {}
        for v in variants:
            metric = host.metric(config["metric"])
            if hasattr(metric, "set_class_names"):
                metric.set_class_names(list(getattr(dataset, "canonical_names", dataset.class_names)))
            metrics[v.name] = metric
            per_image[v.name] = {}
        C = len(dataset.class_names)
        for sample, heats in self._stored(out, dataset, split, limit, procs.rank, procs.world):
            target = torch.from_numpy(np.asarray(sample.mask, dtype=np.int64))
            for v in variants:
                if heats is None:
                    pred = torch.zeros_like(target)
                else:
                    pred = labels_from_heatmaps(heats[v.name], list(sample.classes), thresholds[v.name])
                metrics[v.name].update(pred, target)
                per_image[v.name][sample.id] = confusion_matrix(pred, target, C)
        gathered = procs.gather({k: (m.state(), per_image[k]) for k, m in metrics.items()})
        if procs.rank != 0:
            return None
        results, confusions = {}, {}
        for v in variants:
            merged = host.metric(config["metric"])
            if hasattr(merged, "set_class_names"):
                merged.set_class_names(list(getattr(dataset, "canonical_names", dataset.class_names)))
            conf: dict[str, np.ndarray] = {}
            for payload in gathered:  # one dict per process
                state, imgs = payload[v.name]
                merged.merge(state)
                conf.update(imgs)
            results[v.name] = merged.compute()
            confusions[v.name] = conf
        return results, confusions

    # ------------------------------------------------------------------ run
    def run(self, config: dict[str, Any], host: Host) -> dict[str, Any]:
        procs = Procs()
        out = Path(config["output"])
        variants = variants_of(config)
        _check_limit(config["limit"], "limit")
        _check_limit(config["threshold"]["limit"], "threshold.limit")
        check_number(config, "threshold.value", 0.0, 1.0, "0.5")
        with claimed_output(out, config, RESULT_KEYS, procs):
            t0 = time.perf_counter()
            backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
            weights = check_weights(out, backbone)
            extractor = host.extractor(backbone)
            weighting = None
            if any(v.needs_elbo for v in variants):
                weighting = host.weighting(backbone.prediction_type, config["elbo"]["scheme"])
            pipeline = pipeline_from_config(backbone, extractor, weighting, config)
            eval_ds = host.dataset(config["dataset"], config["split"])
            mode = config["threshold"]["mode"]
            if mode not in ("heldout", "fixed", "oracle"):
                raise ConfigError(f"threshold.mode must be heldout, fixed or oracle, got {mode!r}",
                                  where="config key threshold.mode",
                                  fix="heldout = tune on threshold.split (honest), fixed = use threshold.value, "
                                      "oracle = tune on the evaluated split (reference behaviour, optimistic)")
            tune_ds = host.dataset(config["dataset"], config["threshold"]["split"]) if mode == "heldout" else None
            t_setup = time.perf_counter() - t0
            # written once everything could be built: a failed setup (a typo in --backbone, a
            # missing dataset) leaves no config behind that would then refuse the corrected rerun
            if procs.rank == 0:
                atomic_write_text(out / "config.yaml", dump_config(config))
                record_weights(out, weights)

            t0 = time.perf_counter()
            if tune_ds is not None:
                self._infer_split(host, pipeline, tune_ds, "tune", config["threshold"]["limit"], variants, out, procs)
            self._infer_split(host, pipeline, eval_ds, "eval", config["limit"], variants, out, procs)
            procs.barrier()
            t_infer = time.perf_counter() - t0

            t0 = time.perf_counter()
            if mode == "fixed":
                thresholds = {v.name: {"threshold": float(config["threshold"]["value"]), "miou": None}
                              for v in variants}
                how = f"fixed value {config['threshold']['value']}"
            elif mode == "heldout":
                thresholds = self._sweep(out, tune_ds, "tune", config["threshold"]["limit"], variants, procs)
                how = (f"tuned on held-out split '{config['threshold']['split']}' "
                       f"({_count(tune_ds, config['threshold']['limit'])} images), grid 0.01..0.99")
            else:
                thresholds = self._sweep(out, eval_ds, "eval", config["limit"], variants, procs)
                how = "ORACLE: tuned on the evaluated split itself (optimistic; reference-code behaviour)"
            scored = self._score(host, config, out, eval_ds, "eval", config["limit"], variants,
                                 {k: v["threshold"] for k, v in thresholds.items()}, procs)
            t_score = time.perf_counter() - t0
            if procs.rank != 0:
                return {}
            metrics, confusions = scored
            results = _assemble(config, variants, metrics, confusions, thresholds, how, eval_ds, out,
                                {"setup_s": t_setup, "inference_s": t_infer, "scoring_s": t_score}, procs.world)
            atomic_write_json(out / "results.json", results)
            _write_visuals(out, eval_ds, config, variants, thresholds, results)
            return results


def _check_limit(value: Any, key: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key} must be a positive number of images or null (all), got {value!r}",
                          where=f"config key {key}", fix=f"write e.g. {key}=20, or {key}=null for every image")


def _count(dataset, limit) -> int:
    return len(dataset) if limit is None else min(limit, len(dataset))


def _assemble(config, variants, metrics, confusions, thresholds, how, eval_ds, out, timings, world):
    records = [r for p in sorted(out.glob("records.eval.*.jsonl")) for r in read_jsonl(p)]
    n_img = len({r["id"] for r in records})
    per_img = [r for r in records if "timings" in r]
    mean_t = {}
    if per_img:
        for key in per_img[0]["timings"]:
            mean_t[key] = sum(r["timings"].get(key, 0.0) for r in per_img) / len(per_img)
    results: dict[str, Any] = {
        "task": "segmentation",
        "backbone": config["backbone"],
        "dataset": config["dataset"],
        "split": config["split"],
        "images": n_img,
        "seed": config["seed"],
        "threshold_mode": config["threshold"]["mode"],
        "threshold_how": how,
        "variants": {},
        "versions": versions(),
        "processes": world,
    }
    for v in variants:
        results["variants"][v.name] = {
            "gamma": v.gamma, "fixed_s": v.fixed,
            "threshold": thresholds[v.name]["threshold"],
            "threshold_tuning_miou": thresholds[v.name]["miou"],
            **metrics[v.name],
        }
    base = confusions["baseline"]
    results["differences_vs_baseline"] = {
        v.name: paired_bootstrap_miou(base, confusions[v.name], int(config["bootstrap"]), int(config["seed"]))
        for v in variants if v.name != "baseline"
    }
    results["timings"] = {**{k: round(v, 3) for k, v in timings.items()},
                          "per_image_mean_s": {k: round(v, 4) for k, v in mean_t.items()}}
    return results


def _write_visuals(out: Path, dataset, config, variants, thresholds, results) -> None:
    from t2ialign.core.report import save_png, segmentation_panel, write_html_report

    images = []
    scores_of = {r["id"]: r.get("scores", {}) for p in sorted(out.glob("records.eval.*.jsonl")) for r in read_jsonl(p)}
    n = _count(dataset, config["limit"])
    shown = 0
    names = {v.name for v in variants}
    for i in range(n):
        if shown >= int(config["visuals"]):
            break
        sample = dataset[i]
        path = out / "heatmaps" / "eval" / f"{safe_name(sample.id)}.npz"
        if not sample.classes or not path.exists():
            continue
        with np.load(path) as data:
            heats = {k[5:]: data[k].astype(np.float32) / 255.0 for k in data.files if k.startswith("heat_")}
        cal_name = "calibrated" if "calibrated" in names else "baseline"
        labels = {k: labels_from_heatmaps(torch.from_numpy(heats[k]), list(sample.classes),
                                          thresholds[k]["threshold"]).numpy() for k in ("baseline", cal_name)}
        words = [dataset.class_names[c] for c in sample.classes]
        rec_scores = dict(zip(words, scores_of.get(sample.id, {}).get(cal_name, []))) or None
        fig = segmentation_panel(
            sample.image, sample.mask, labels["baseline"], labels[cal_name],
            {w: heats["baseline"][j] for j, w in enumerate(words)},
            {w: heats[cal_name][j] for j, w in enumerate(words)},
            rec_scores,
            legend={c: dataset.class_names[c] for c in sorted(set(np.unique(sample.mask).tolist()) - {255})},
        )
        rel = f"visuals/{safe_name(sample.id)}.png"
        save_png(out / rel, fig)
        images.append((f"{sample.id}: {', '.join(words)}", rel))
        shown += 1
    variants_tbl = [[name, r["gamma"], r["threshold"], r.get("miou")]
                    for name, r in results["variants"].items()]
    tables = [("mIoU per variant (threshold chosen as: " + results["threshold_how"] + ")",
               ["variant", "gamma", "threshold", "mIoU"], variants_tbl)]
    diffs = [[k, d.get("delta"), d.get("ci95_low"), d.get("ci95_high")]
             for k, d in results["differences_vs_baseline"].items() if d]
    if diffs:
        tables.append(("difference to the uncalibrated baseline (paired bootstrap over images)",
                       ["variant", "delta mIoU", "CI95 low", "CI95 high"], diffs))
    base = results["variants"]["baseline"]
    if isinstance(base.get("per_class"), dict):
        header = ["class"] + [f"IoU {k}" for k in results["variants"]]
        rows = []
        for cls in base["per_class"]:
            rows.append([cls] + [results["variants"][k]["per_class"].get(cls, {}).get("iou")
                                 for k in results["variants"]])
        tables.append(("per-class IoU", header, rows))
    if isinstance(base.get("size_buckets"), list) and base["size_buckets"]:
        header = ["bucket", "area ratio range"] + [f"IoU {k}" for k in results["variants"]]
        rows = []
        for j, b in enumerate(base["size_buckets"]):
            rng_txt = f"{b.get('area_min', float('nan')):.4f}-{b.get('area_max', float('nan')):.4f}"
            rows.append([j, rng_txt] + [results["variants"][k]["size_buckets"][j].get("iou")
                                        for k in results["variants"]])
        tables.append(("IoU by object size (10 equal-count buckets)", header, rows))
    summary = {"backbone": results["backbone"], "dataset": results["dataset"], "split": results["split"],
               "images": results["images"], "threshold": results["threshold_how"]}
    write_html_report(out / "report.html", title=f"t2ialign segmentation: {results['backbone']} on {results['dataset']}",
                      summary=summary, tables=tables, images=images,
                      notes=["Heatmaps: image, ground truth, baseline mask, calibrated mask, then per-class "
                             "heatmaps before and after ELBO calibration."])


# --------------------------------------------------------------------------------------------
# plugin hooks
# --------------------------------------------------------------------------------------------
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"tasks": {"segmentation": {}}},
                      description="zero-shot referring segmentation with ELBO-calibrated attention")


@hookimpl
def t2ialign_make_task(spec: EntrySpec) -> SegmentationTask | None:
    return SegmentationTask() if spec.plugin == "segmentation" else None
