"""The task ``editing`` (``t2ialign eval editing``): toy edit pairs, both blend variants, scores.

Each pair is edited twice -- blend mask from uncalibrated (``baseline``) and from ELBO-calibrated
(``calibrated``) heatmaps -- and scored: CLIP score of the edit to the target prompt, background
PSNR/SSIM outside the edited object's ground-truth region, IoU of the blend mask with that
object, and the toy oracle. Also the plugin hooks of the ``editing`` entry point.

The blend threshold of each variant is chosen as segmentation chooses its background threshold:
on edit pairs of a held-out split (``threshold.mode=heldout``, the default; dataset-level mIoU of
the argmax + threshold labels against the scenes' masks), never on the evaluated pairs;
``threshold.mode=fixed`` uses ``blend.threshold`` for both.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from t2ialign.core.config import dump_config
from t2ialign.core.errors import ConfigError
from t2ialign.core.fileio import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.pipeline import Variant, pipeline_from_config
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.stats import finite_mean, paired_difference
from t2ialign.core.thresholds import ThresholdSweep
from t2ialign.plugins.tasks.common import Procs, check_number, check_weights, claimed_output, record_weights, safe_name, versions
from t2ialign.plugins.tasks.editing.editor import Editor, resize_mask, resize_rgb
from t2ialign.plugins.tasks.editing.measurements import background_scores, colour_verdicts, iou
from t2ialign.plugins.tasks.editing.pairs import EditPair, toy_edit_pairs

if TYPE_CHECKING:
    from t2ialign.core.host import Host
    from t2ialign.core.protocols import Backbone, Metric

DEFAULTS: dict[str, Any] = {
    "backbone": "toy",
    "dataset": "toy_shapes",
    "split": "test",
    "limit": 32,
    "min_objects": 2,
    "edit_kinds": ["colour", "shape"],
    "source": "real",
    "device": "cpu",
    "dtype": "float32",
    "seed": 4307,
    "output": "runs/editing",
    "steps": 50,
    # guidance 10 and blend.mask_noise 1: chosen on 41 toy val colour pairs with true-object masks
    # (docs/editing.md, "Defaults"); 5 / 0 carried out 49% of them, 10 / 1 66%
    "guidance": 10.0,
    "inversion_guidance": 1.0,
    "inversion": "ddim",
    "null_text": {"inner_steps": 10, "lr": 0.01, "tolerance": 1e-5},
    "alignment": "auto",
    "cross_replace_steps": 0.8,
    "word_replace_steps": {},
    "self_replace_steps": 0.4,
    "self_replace_max_tokens": 1024,
    "reweight": {},
    "gamma": 1.0 / 3.0,
    # paste: the source's own pixels outside the blend mask (editor.paste_outside)
    # mask_noise: how much fresh noise replaces the inverted latent inside the mask at the start
    "blend": {"threshold": 0.3, "dilate": 1, "paste": True, "mask_noise": 1.0},
    # the blend threshold per variant: tuned on edit pairs of a held-out split, or blend.threshold
    "threshold": {"mode": "heldout", "split": "val", "limit": 64},
    # elbo.preset: null = the keys as given; "fast" / "reference" expand into scheme, timesteps and
    # antithetic when the config is resolved (core/elbo_presets.py)
    "elbo": {"prompt": "a photo of {cls}", "timesteps": [[1, 999, 50]], "scheme": "uniform", "batch_size": 8,
             "antithetic": False, "preset": None},
    "collect": {"prompt": "a photo of {classes}", "timesteps": [[20, 201, 20]], "batch_size": 10},
    "layers": {"cross_weight": None, "cross_gaussian_sigma": None, "self_weight": None},
    "prefactor_exponent": None,
    "clip_metric": "clip_score_toy",
    "oracle_metric": "toy_oracle",
    "bootstrap": 1000,
    "visuals": 12,
}

#: config keys whose change invalidates stored edits (a resumed run must match them)
RESULT_KEYS = ("backbone", "dataset", "split", "min_objects", "edit_kinds", "source", "dtype", "seed", "steps",
               "guidance", "inversion_guidance", "inversion", "null_text", "alignment", "cross_replace_steps",
               "word_replace_steps", "self_replace_steps", "self_replace_max_tokens", "reweight", "gamma", "blend",
               "threshold", "elbo", "collect", "layers", "prefactor_exponent")

#: per-item numbers compared between the variants (higher is better for all of them)
PAIRED_METRICS = ("clip_score", "bg_psnr", "bg_psnr_nopaste", "bg_ssim", "mask_iou", "oracle_edited", "oracle_others", "oracle_full",
                  "colour_edited", "colour_others")


def variants_of(config: dict[str, Any]) -> list[Variant]:
    """``baseline`` (uncalibrated heatmaps, gamma = 1) and ``calibrated`` (gamma) blend masks."""
    gamma = float(config["gamma"])
    if not 0 < gamma < 1:
        raise ConfigError(f"gamma must lie in (0, 1) for a calibrated blend, got {gamma}", where="config key gamma",
                          fix="use e.g. gamma=1/3 (the baseline always uses gamma = 1)")
    return [Variant("baseline", 1.0), Variant("calibrated", gamma)]


def build_editor(config: dict[str, Any], host: Host, backbone: Backbone) -> Editor:
    """An :class:`Editor` with its :class:`AlignmentPipeline` and the backbone's attention
    controller (asked of the plugins: :meth:`~t2ialign.core.host.Host.attention_editor`) from a task config."""
    weighting = host.weighting(backbone.prediction_type, config["elbo"]["scheme"])
    pipeline = pipeline_from_config(backbone, host.extractor(backbone), weighting, config)
    if config["source"] not in ("real", "generated"):
        raise ConfigError(f"source must be 'real' or 'generated', got {config['source']!r}", where="config key source",
                          fix="real = DDIM-invert the scene image, generated = sample the source caption first")
    return Editor(backbone, pipeline, attention=host.attention_editor(backbone), steps=int(config["steps"]),
                  guidance=float(config["guidance"]),
                  inversion_guidance=float(config["inversion_guidance"]),
                  cross_replace_steps=float(config["cross_replace_steps"]),
                  self_replace_steps=float(config["self_replace_steps"]),
                  self_replace_max_tokens=config["self_replace_max_tokens"],
                  threshold=float(config["blend"]["threshold"]), dilate=int(config["blend"]["dilate"]),
                  paste=bool(config["blend"]["paste"]), mask_noise=float(config["blend"]["mask_noise"]),
                  noise_seed=int(config["seed"]),
                  inversion=config["inversion"], null_text=config["null_text"], alignment=config["alignment"],
                  reweight=config["reweight"], word_replace_steps=config["word_replace_steps"])


def _optional_metric(host: Host, name: str) -> Metric | None:
    return host.metric(name) if name else None


class EditingTask:
    """Edit toy scenes with uncalibrated vs ELBO-calibrated local blends (package docstring)."""

    name = "editing"
    defaults = DEFAULTS

    def _item(self, editor: Editor, pair: EditPair, variants, config, clip, oracle, out: Path,
              thresholds: dict[str, float]) -> dict[str, Any]:
        tic = time.perf_counter()
        size = int(editor.backbone.image_size)
        if config["source"] == "real":
            source = editor.source_from_image(pair.image, pair.source)
            reference = source.image
        else:
            from t2ialign.core.pipeline import derive_seed

            source = editor.source_from_prompt(pair.source, derive_seed(int(config["seed"]), pair.id) % (2 ** 31))
            reference = source.image
        t_source = time.perf_counter() - tic
        tic = time.perf_counter()
        masks = editor.masks(source, pair.words, pair.edit_words, variants, key=pair.id, thresholds=thresholds)
        t_masks = time.perf_counter() - tic
        allowed = resize_mask(pair.allowed, size)
        obj = resize_mask(pair.object_mask, size)
        record: dict[str, Any] = {"id": pair.id, "source": pair.source, "target": pair.target, "kind": pair.kind,
                                  "words": pair.words, "edit_words": pair.edit_words, "variants": {}}
        arrays: dict[str, np.ndarray] = {"source": reference}
        tic = time.perf_counter()
        for v in variants:
            res = editor.edit(source, pair.target, masks[v.name])
            m = masks[v.name]
            row: dict[str, Any] = {"mask_fraction": float(m.latent.float().mean()),
                                   "mask_iou": iou(m.region, obj), "scores": m.scores}
            # in the toy world we know where the edit may act; for "generated" sources the
            # scene is only the caption's, so the reference is the sampled source itself
            outside = allowed if config["source"] == "real" else m.image_mask
            row.update(background_scores(reference, res.image, outside))
            # the latent blend alone (no paste): bounded by how well the VAE reconstructs the scene,
            # and against the source's own decode (how exactly the unmasked latents were kept)
            row["bg_psnr_nopaste"] = background_scores(reference, res.decoded, outside)["bg_psnr"]
            row["bg_psnr_decoded"] = background_scores(res.source_decoded, res.decoded, m.image_mask)["bg_psnr"]
            if clip is not None:
                row["clip_score"] = float(clip.score([res.image], [pair.target])[0])
            if oracle is not None:
                verdict = oracle.check(res.image, pair.target_objects)["objects"]
                others = [x["attribute"] for i, x in enumerate(verdict) if i != pair.edited]
                row["oracle_edited"] = float(verdict[pair.edited]["attribute"])
                row["oracle_others"] = float(all(others)) if others else float("nan")
                row["oracle_full"] = float(all(x["attribute"] for x in verdict))
            if hasattr(oracle, "region_colour") and pair.scene_mask is not None:
                # others keep their colour relative to what the unedited region shows: the source
                # image where it is pasted back, the source's decode otherwise
                row.update(colour_verdicts(oracle, pair, res.image, reference if editor.paste else res.source_decoded,
                                           size))
            record["variants"][v.name] = row
            arrays[f"edit_{v.name}"] = res.image
            arrays[f"mask_{v.name}"] = m.image_mask
            arrays[f"heat_{v.name}"] = np.round(m.heat.numpy() * 255).astype(np.uint8)
        record["timings"] = {"source": round(t_source, 4), "masks": round(t_masks, 4),
                             "edits": round(time.perf_counter() - tic, 4)}
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(out / "edits" / f"{safe_name(pair.id)}.npz", buf.getvalue())
        return record

    def run(self, config: dict[str, Any], host: Host) -> dict[str, Any]:
        procs = Procs()
        out = Path(config["output"])
        variants = variants_of(config)
        limit = config["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive number of edit pairs, got {limit!r}",
                              where="config key limit", fix="write e.g. limit=32")
        check_number(config, "blend.threshold", 0.0, 1.0, "0.3")
        check_number(config, "guidance", 0.0, None, "5.0")
        check_number(config, "inversion_guidance", 0.0, None, "1.0")
        with claimed_output(out, config, RESULT_KEYS, procs):
            t0 = time.perf_counter()
            backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
            weights = check_weights(out, backbone)
            editor = build_editor(config, host, backbone)
            dataset = host.dataset(config["dataset"], config["split"])
            if not hasattr(dataset, "__getitem__") or not len(dataset) or "objects" not in dataset[0].meta:
                raise ConfigError(f"dataset '{config['dataset']}' has no toy object records",
                                  where="config key dataset",
                                  fix="the editing benchmark builds edit pairs from a toy_shapes dataset; "
                                      "edit your own images with 't2ialign edit IMAGE --source ... --target ...'")
            pairs = toy_edit_pairs(dataset, limit, seed=int(config["seed"]), kinds=config["edit_kinds"],
                                   min_objects=int(config["min_objects"]))
            clip = _optional_metric(host, config["clip_metric"])
            oracle = _optional_metric(host, config["oracle_metric"])
            if procs.rank == 0:
                atomic_write_text(out / "config.yaml", dump_config(config))
                record_weights(out, weights)
            tuning = blend_thresholds(editor, host, config, variants, out, procs)
            thresholds = {name: t["threshold"] for name, t in tuning.items()}
            t_setup = time.perf_counter() - t0

            t0 = time.perf_counter()
            (out / "edits").mkdir(parents=True, exist_ok=True)
            done = {r["id"] for p in out.glob("records.*.jsonl") for r in read_jsonl(p)}
            path = out / f"records.rank{procs.rank}.jsonl"
            _repair(path)
            from tqdm import tqdm

            from t2ialign.core.console import progress_disabled

            mine = [p for i, p in enumerate(pairs) if i % procs.world == procs.rank and p.id not in done]
            for pair in tqdm(mine, desc="edits", unit="pair", disable=progress_disabled(), dynamic_ncols=True):
                append_jsonl(path, self._item(editor, pair, variants, config, clip, oracle, out, thresholds))
            procs.barrier()
            t_edit = time.perf_counter() - t0
            if procs.rank != 0:
                return {}
            wanted = [p.id for p in pairs]
            by_id = {r["id"]: r for p in sorted(out.glob("records.*.jsonl")) for r in read_jsonl(p)}
            records = [by_id[i] for i in wanted if i in by_id]
            results = _assemble(config, variants, records, host, len(pairs) < limit,
                                {"setup_s": t_setup, "editing_s": t_edit}, procs.world, tuning)
            atomic_write_json(out / "results.json", results)
            _write_visuals(out, config, records, results)
            return results


def blend_thresholds(editor: Editor, host: Host, config: dict[str, Any], variants: Sequence[Variant], out: Path,
                     procs: Procs) -> dict[str, dict[str, Any]]:
    """The blend threshold of each variant: ``{name: {"threshold", "tuning_miou", "how"}}``.

    ``threshold.mode=heldout``: heatmaps of the first ``threshold.limit`` edit pairs of the split
    ``threshold.split`` (built like the evaluated pairs), one :class:`ThresholdSweep` per variant
    against the scenes' label maps, the best dataset-level mIoU wins -- segmentation's protocol.
    Cached in ``thresholds.json`` of the run folder (a resumed run reuses it). ``fixed``:
    ``blend.threshold`` for every variant.
    """
    spec = config["threshold"]
    mode = spec.get("mode")
    if mode == "fixed":
        value = float(config["blend"]["threshold"])
        return {v.name: {"threshold": value, "tuning_miou": None, "how": "fixed blend.threshold"} for v in variants}
    if mode != "heldout":
        raise ConfigError(f"threshold.mode must be heldout or fixed, got {mode!r}", where="config key threshold.mode",
                          fix="heldout = tune each variant's blend threshold on threshold.split, fixed = blend.threshold")
    if spec.get("split") == config["split"]:
        raise ConfigError(f"threshold.split is the evaluated split '{config['split']}'",
                          where="config key threshold.split",
                          fix="tune on a held-out split (val), or use threshold.mode=fixed")
    limit = spec.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"threshold.limit must be a positive number of edit pairs, got {limit!r}",
                          where="config key threshold.limit", fix="write e.g. threshold.limit=64")
    cache = out / "thresholds.json"
    if cache.exists():
        import json

        return json.loads(cache.read_text(encoding="utf-8"))
    dataset = host.dataset(config["dataset"], spec["split"])
    pairs = toy_edit_pairs(dataset, limit, seed=int(config["seed"]), kinds=config["edit_kinds"],
                           min_objects=int(config["min_objects"]))
    size = int(editor.backbone.image_size)
    sweeps = {v.name: ThresholdSweep(len(dataset.class_names)) for v in variants}
    for pair in pairs:
        res = editor.pipeline.run(resize_rgb(pair.image, size), list(pair.words), variants, key=pair.id)
        ids = [next(o["class_id"] for o in pair.objects if o["shape"] == w) for w in res.words]
        target = _resize_labels(pair.scene_mask, size)
        for v in variants:
            sweeps[v.name].update(res.heatmaps[v.name], ids, target)
    how = f"tuned on {len(pairs)} edit pairs of held-out split '{spec['split']}' (scene mIoU, grid 0.01..0.99)"
    tuned = {}
    for name, sweep in sweeps.items():
        thr, miou = sweep.best()
        tuned[name] = {"threshold": round(thr, 6), "tuning_miou": miou, "how": how}
    if procs.rank == 0:
        atomic_write_json(cache, tuned)
    return tuned


def _resize_labels(labels: np.ndarray, size: int):
    """A label map at ``size x size`` (nearest), as a tensor."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if t.shape[0] == size and t.shape[1] == size:
        return t
    return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


def _repair(path: Path) -> None:
    try:
        from t2ialign.core.fileio import repair_jsonl
    except ImportError:  # older fileio: read_jsonl tolerates a torn last line
        return
    repair_jsonl(path)


def _assemble(config, variants, records, host, short: bool, timings, world, tuning) -> dict[str, Any]:
    results: dict[str, Any] = {
        "task": "editing", "backbone": config["backbone"], "dataset": config["dataset"], "split": config["split"],
        "source_mode": config["source"], "inversion": config["inversion"], "items": len(records), "seed": config["seed"],
        "edit_kinds": {k: sum(r["kind"] == k for r in records) for k in config["edit_kinds"]},
        "blend": dict(config["blend"]), "threshold_how": next(iter(tuning.values()))["how"], "variants": {}, "versions": versions(), "processes": world,
    }
    if short:
        results["note"] = f"the split had fewer qualifying scenes than limit={config['limit']}"
    for v in variants:
        rows = [r["variants"][v.name] for r in records]
        entry: dict[str, Any] = {"gamma": v.gamma, "threshold": tuning[v.name]["threshold"],
                                 "threshold_tuning_miou": tuning[v.name]["tuning_miou"]}
        for key in ("mask_iou", "mask_fraction", "bg_psnr", "bg_ssim", "bg_psnr_nopaste", "bg_psnr_decoded"):
            entry[key] = finite_mean([row.get(key, float("nan")) for row in rows])
        if config["clip_metric"] and rows:
            metric = host.metric(config["clip_metric"])
            metric.update([None] * len(rows), [r["target"] for r in records],  # type: ignore[list-item]
                          scores=[row["clip_score"] for row in rows])
            entry["clip_score"] = metric.compute()
        if config["oracle_metric"]:
            entry["oracle"] = {k: finite_mean([row.get(f"oracle_{k}", float("nan")) for row in rows])
                               for k in ("edited", "others", "full")}
            entry["colour"] = {k: finite_mean([row.get(f"colour_{k}", float("nan")) for row in rows])
                               for k in ("edited", "others")}
        results["variants"][v.name] = entry
    results["paired_differences"] = {}
    for v in variants[1:]:
        diffs = {}
        for key in PAIRED_METRICS:
            a = [r["variants"]["baseline"].get(key, float("nan")) for r in records]
            b = [r["variants"][v.name].get(key, float("nan")) for r in records]
            if any(x is not None and np.isfinite(x) for x in a):  # undefined values are stored as null
                diffs[key] = paired_difference(a, b, int(config["bootstrap"]), int(config["seed"]))
        results["paired_differences"][v.name] = diffs
    per = [r["timings"] for r in records if "timings" in r]
    results["timings"] = {**{k: round(t, 3) for k, t in timings.items()},
                          "per_item_mean_s": {k: round(sum(p[k] for p in per) / len(per), 4) for k in per[0]}
                          if per else {}}
    return results


def _write_visuals(out: Path, config, records, results) -> None:
    from t2ialign.core.report import label_to_rgb, overlay, panel, save_png, write_html_report

    images = []
    for r in records[: int(config["visuals"])]:
        path = out / "edits" / f"{safe_name(r['id'])}.npz"
        if not path.exists():
            continue
        with np.load(path) as data:
            arr = {k: data[k] for k in data.files}
        src = arr["source"]
        edit_word = r["edit_words"][0] if r["edit_words"] else None
        j = r["words"].index(edit_word) if edit_word in r["words"] else 0
        tiles: list[tuple[str, np.ndarray | None]] = [("source", src)]
        for name in ("baseline", "calibrated"):
            heat = arr[f"heat_{name}"][j].astype(np.float32) / 255.0
            mask = arr[f"mask_{name}"]
            tiles += [(f"{name} heat '{edit_word}'", overlay(src, heat)),
                      (f"{name} mask", label_to_rgb(mask.astype(np.int64))),
                      (f"{name} edit", arr[f"edit_{name}"])]
        rel = f"visuals/{safe_name(r['id'])}.png"
        save_png(out / rel, panel(tiles, columns=7, scale=3 if src.shape[0] <= 128 else 1))
        images.append((f"{r['source']} -> {r['target']}", rel))
    header = ["variant", "gamma", "blend threshold", "CLIP score", "bg PSNR", "bg PSNR without paste",
              "bg PSNR vs source decode (no paste)", "bg SSIM", "mask IoU",
              "mask fraction", "colour edited", "colour others kept", "oracle edited", "oracle others", "oracle full"]
    rows = []
    for name, v in results["variants"].items():
        clip = v.get("clip_score", {})
        orc = v.get("oracle", {})
        col = v.get("colour", {})
        rows.append([name, v["gamma"], v["threshold"], clip.get("clip_score") if clip else None, v["bg_psnr"],
                     v["bg_psnr_nopaste"], v["bg_psnr_decoded"],
                     v["bg_ssim"], v["mask_iou"], v["mask_fraction"], col.get("edited"), col.get("others"),
                     orc.get("edited"), orc.get("others"), orc.get("full")])
    tables = [("per-variant means (blend mask from uncalibrated vs ELBO-calibrated heatmaps)", header, rows)]
    for name, diffs in results["paired_differences"].items():
        tables.append((f"{name} - baseline (paired over edit pairs, bootstrap 95% CI)",
                       ["metric", "delta", "CI95 low", "CI95 high", "items"],
                       [[k, d["delta"], d["ci95_low"], d["ci95_high"], d["items"]] for k, d in diffs.items()]))
    summary = {"backbone": results["backbone"], "dataset": results["dataset"], "items": results["items"],
               "source": results["source_mode"], "steps": config["steps"], "guidance": config["guidance"],
               "cross / self replace": f"{config['cross_replace_steps']} / {config['self_replace_steps']}"}
    write_html_report(out / "report.html", title=f"t2ialign editing: {results['backbone']} on {results['dataset']}",
                      summary=summary, tables=tables, images=images,
                      notes=["Background PSNR/SSIM compare the edit with the source image outside the edited "
                             "object's ground-truth region (its pixels plus a disc 20% larger than it).",
                             "Mask IoU: blend region (before dilation) vs the edited object's visible pixels.",
                             "Oracle: edited = the target object is found in its new colour/shape; others = "
                             "every other object is still found unchanged.",
                             "Colour: edited = the edited object's pixels mostly take the target colour (colour "
                             "edits); others kept = every other object keeps the majority colour it has in the "
                             "source image (with blend.paste) or the source's own decode (without).",
                             "blend.paste puts the source's pixels back outside the blend mask; 'bg PSNR without "
                             "paste' is the decoded latent blend alone, bounded by the VAE's reconstruction."])


# --------------------------------------------------------------------------------------------
# plugin hooks
# --------------------------------------------------------------------------------------------
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"tasks": {"editing": {}}},
                      description="Prompt-to-Prompt editing with an ELBO-calibrated local blend")


@hookimpl
def t2ialign_make_task(spec: EntrySpec) -> EditingTask | None:
    return EditingTask() if spec.plugin == "editing" else None
