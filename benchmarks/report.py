"""Write the README's "Results" and "Performance" sections from ``benchmarks/results/*.json``.

Numbers are never typed by hand: this script renders the JSON the benchmarks wrote, with the
machine (CPU model, cores, torch version) and the command of every table, and replaces the text
between ``<!-- results:begin -->`` / ``<!-- results:end -->`` and ``<!-- performance:begin -->`` /
``<!-- performance:end -->`` in README.md (the markers are appended when missing). Smoke-test
files (``*_smoke.json``, tiny random models) are shown only when no full result exists, and say so.

    python benchmarks/report.py            # rewrites README.md
    python benchmarks/report.py --print    # prints the sections instead
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT  # noqa: E402

MARKERS = {"results": ("<!-- results:begin -->", "<!-- results:end -->"),
           "performance": ("<!-- performance:begin -->", "<!-- performance:end -->")}


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('torch_threads', '?')} torch threads)"
            f"{gpu}; torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}")


def _load(pattern: str) -> list[dict[str, Any]]:
    """Full results of a pattern, or the smoke ones when there is no full result."""
    files = sorted(RESULTS.glob(pattern))
    full = [f for f in files if not f.stem.endswith("_smoke")]
    return [json.loads(f.read_text()) | {"_file": f.name} for f in (full or files)]


def _provenance(r: dict[str, Any]) -> str:
    smoke = " **Smoke test on a tiny random model: checks the script, the numbers mean nothing.**" \
        if r.get("smoke") else ""
    return f"Machine: {_machine(r.get('machine', {}))}. Command: `{r.get('command', '?')}`.{smoke}"


# --------------------------------------------------------------------------------------------
def _delta(d: dict[str, Any] | None) -> str:
    """``+1.23 [+0.10, +2.40]`` from a paired-bootstrap difference."""
    if not d or d.get("delta") is None:
        return "–"
    return f"{d['delta']:+.2f} {_ci(d)}"


def calibration_study_parts() -> list[str]:
    """The headline: ELBO calibration pooled over fresh seed streams (``benchmarks/calibration_study.py``)."""
    parts = []
    for c in _load("calibration_study.json"):
        pooled, tuned = c["pooled_streams"], c["tuned_variant"]
        streams = [s for s in c["per_split"] if s.startswith("stream") and s != c["setup"]["tuning"]["split"]]
        head = pooled["vs_baseline"].get(tuned)
        het = c.get("heterogeneity", {}).get(tuned) or {}
        text = (f"#### Headline: ELBO calibration on fresh scenes (`{c['dataset']}`, backbone `{c['backbone']}`)\n\n"
                f"Pooled over **{pooled['images']} scenes** of {len(streams)} seed streams never used for training, "
                f"layer choice or thresholds, ELBO calibration (gamma = {c['tuned_gamma']:.3g}, chosen on the "
                f"tuning stream) against the uncalibrated maps: **{_delta(head)} mIoU** "
                f"({_fmt(pooled['variants']['baseline']['miou'])} -> {_fmt(pooled['variants'][tuned]['miou'])}; "
                f"paired bootstrap over scenes, {c['setup']['bootstrap']} resamples). Gamma and the threshold of "
                f"every variant were chosen on the {c['setup']['tuning']['images']} scenes of "
                f"`{c['setup']['tuning']['split']}` and frozen.")
        if het.get("Q") is not None:
            text += (f" Across the streams: Cochran's Q = {het['Q']:.2f} on {het['df']} df (p = {het['p']:.2f}), "
                     f"I² = {100 * het['I2']:.0f}%.")
        fixed = pooled.get("calibrated_vs_fixed_s")
        if fixed:
            text += f" Gamma = 1/3 against the same sharpening with a fixed S = 1/3: {_delta(fixed)}."
        parts.append(text + f" {_provenance(c)}")
        names = [v for v in pooled["variants"] if v != "baseline"]
        rows = []
        for s in [*streams, "pooled"]:
            r = pooled if s == "pooled" else c["per_split"][s]
            rows.append([f"**{s}**" if s == "pooled" else s, r["images"], r["variants"]["baseline"]["miou"],
                         *[_delta(r["vs_baseline"].get(v)) for v in names], _delta(r.get("calibrated_vs_fixed_s"))])
        parts.append("mIoU difference to gamma = 1 per stream, 95% CI (last column: gamma = 1/3 minus fixed S = 1/3):"
                     "\n\n" + _table(["stream", "scenes", "mIoU gamma = 1", *names, "1/3 vs fixed S"], rows))
        base, cal = pooled["variants"]["baseline"], pooled["variants"][tuned]
        rank = pooled.get("ranking") or {}
        ex = rank.get("excess_over_chance", {})
        parts.append(_table(["pooled", "gamma = 1", f"gamma = {c['tuned_gamma']:.3g}", "change"],
                            [[k, base[k], cal[k], cal[k] - base[k]] for k in
                             ("frequent3", "rare3", "smallest3_buckets", "largest3_buckets")
                             if base.get(k) is not None and cal.get(k) is not None])
                     + (f"\n\nELBO ranking accuracy (largest class gets S = 1), {rank['images']} scenes with >= 2 "
                        f"classes: {_pct(rank['accuracy'])}% against {_pct(rank['chance'])}% by chance "
                        f"(excess {_pct(ex.get('mean'))} points, 95% CI {_pct(ex.get('ci95_low'))} .. "
                        f"{_pct(ex.get('ci95_high'))})." if rank else ""))
    return parts


def results_section() -> str:
    parts = calibration_study_parts()
    for q in _load("quality*.json"):
        s = q["setup"]
        parts.append(f"#### Referring segmentation on `{q['dataset']}` with backbone `{q['backbone']}`\n\n"
                     f"{s['test_images']} test images; background threshold {s['threshold']}. "
                     f"Differences: paired bootstrap over images ({s['bootstrap']} resamples) against the "
                     f"uncalibrated gamma = 1 baseline. {_provenance(q)}")
        rows = []
        for r in q["rows"]:
            d = r.get("vs_baseline") or {}
            ci = f"[{_fmt(d.get('ci95_low'))}, {_fmt(d.get('ci95_high'))}]" if d else "–"
            rows.append([r["label"], r["miou"], _fmt(d.get("delta")) if d else "–", ci, r["threshold"]])
        parts.append(_table(["variant", "mIoU", "Δ vs gamma = 1", "95% CI", "threshold"], rows))
        rank = [[run, v["accuracy"] * 100, v["chance"] * 100, v["images"]]
                for run, v in q.get("ranking_accuracy", {}).items() if v]
        if rank:
            parts.append("ELBO ranking accuracy: how often the class with the largest ground-truth area gets "
                         "S = 1 (lowest ELBO loss), over test images with at least two classes.\n\n"
                         + _table(["run", "accuracy %", "chance %", "images"], rank))
        by = {(r["run"], r["variant"]): r for r in q["rows"]}
        base, cal = by.get(("main", "baseline")), by.get(("main", "calibrated"))
        if base and cal and base.get("per_class_iou"):
            rows = [[c, base["per_class_iou"].get(c), cal["per_class_iou"].get(c)]
                    for c in base["per_class_iou"]]
            parts.append("Per-class IoU (classes in the dataset's frequency order):\n\n"
                         + _table(["class", "IoU gamma = 1", "IoU gamma = 1/3"], rows))
        if base and cal and base.get("size_buckets"):
            rows = [[f"{b['area_min']:.4f}–{b['area_max']:.4f}", b["count"], b["iou"], c["iou"]]
                    for b, c in zip(base["size_buckets"], cal["size_buckets"])]
            parts.append("IoU by object size (fraction of the image, equal-count buckets):\n\n"
                         + _table(["object area", "objects", "IoU gamma = 1", "IoU gamma = 1/3"], rows))
    for b in _load("toy_bias.json"):
        rows = [[name, v["frequent_mean"], v["rare_mean"], v["smallest_buckets_mean"], v["largest_buckets_mean"]]
                for name, v in b["variants"].items()]
        parts.append(f"Misalignment summary (`{b['command']}`): mean IoU of the three most frequent training "
                     f"classes ({', '.join(b['frequent_classes'])}) and the three rarest "
                     f"({', '.join(b['rare_classes'])}), and of the three smallest and three largest size "
                     "buckets above.\n\n"
                     + _table(["variant", "frequent 3", "rare 3", "smallest 3 buckets", "largest 3 buckets"], rows))
    for e in _load("elbo_accuracy.json"):
        rows = [[r["prediction_type"], r["timesteps"], r["proposal_scale"], r["mean_abs_error"], r["rmse"],
                 r["mean_reported_diff_se"], r["within_3se"]] for r in e["elbo"] if r["proposal_scale"] == 2.0]
        parts.append("#### ELBO engine against exact Gaussian log-likelihoods\n\n"
                     f"Error of the estimated log-likelihood differences between classes (analytic backbone, "
                     f"d = {e['setup']['d']}, {e['setup']['repeats']} seeds per cell; mean |exact difference| "
                     f"{_fmt(e['elbo'][0]['mean_abs_exact_diff'])} nats). Command: `{e['command']}`.\n\n"
                     + _table(["objective", "timesteps", "proposal scale", "mean abs error", "RMSE",
                               "reported SE", "within 3 SE"], rows))
    parts += downstream_parts()
    if not parts:
        return "No results yet: run `make bench`."
    return "\n\n".join(parts)


def _pct(x: Any) -> str:
    """A fraction as a percentage; "–" for a missing or NaN value."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x:
        return "–"
    return f"{100 * x:.1f}"


def _ci(d: dict[str, Any] | None, digits: int = 2, scale: float = 1.0, signed: bool = True) -> str:
    if not d:
        return "–"
    low, high = d.get("ci95_low"), d.get("ci95_high")
    if low is None or high is None:
        return "–"
    sign = "+" if signed else ""
    return f"[{low * scale:{sign}.{digits}f}, {high * scale:{sign}.{digits}f}]"


def _wall(r: dict) -> str:
    """The wall time of a downstream run, or what it means when the run resumed stored items."""
    if r.get("items_resumed"):
        per = (r.get("timings") or {}).get("per_image_mean_s") or (r.get("timings") or {}).get("per_item_mean_s") or {}
        times = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in per.items())
        return (f"Resumed: {r['items_resumed']} items came from an earlier run of the same command "
                f"(per item: {times}; measured on a machine shared with other jobs).")
    return f"Wall time {r['wall_s']:.0f} s."


def downstream_parts() -> list[str]:
    """Generation (CLIP score + oracle) and editing tables from ``benchmarks/downstream.py``."""
    parts = []
    for g in _load("generation_*.json"):
        head = (f"#### Compositional generation on `{g['dataset']}` with backbone `{g['backbone']}`\n\n"
                f"{g['prompts']} prompts, {g['steps']} DDIM steps, CFG {g['guidance']}, phrase-weighting strength "
                f"{g['strength']}; baseline and ELBO-weighted images share every seed. CLIP score = 100 cos with "
                f"`{g['clip_metric']}`; oracle = colour/shape detection in the generated image against the prompt's "
                f"objects ({g.get('oracle')}). {_wall(g)} {_provenance(g)}")
        rows = []
        for v, res in g["variants"].items():
            c, o = res.get("clip_score", {}), res.get("oracle", {})
            rows.append([v, c.get("mean"), _ci(c, signed=False) if c else "–", _pct(o.get("object_accuracy")),
                         _pct(o.get("attribute_accuracy")), _pct(o.get("full_accuracy"))])
        d = g.get("differences_weighted_minus_baseline", {})
        dc = d.get("clip_score")
        paired_pct = [(f"{x['delta'] * 100:+.1f} {_ci(x, 1, 100)}" if x else "–")
                      for x in (d.get(f"oracle_{k}_accuracy") for k in ("object", "attribute", "full"))]
        rows.append(["weighted − baseline (paired)", _fmt(dc and dc["delta"]), _ci(dc), *paired_pct])
        parts.append(head + "\n\n" + _table(["variant", "CLIP score", "95% CI", "objects found %",
                                              "attributes right %", "whole prompt right %"], rows))
    for e in _load("editing_*.json"):
        head = (f"#### Attention-guided editing (Prompt-to-Prompt with a local blend) with backbone "
                f"`{e['backbone']}`\n\n{e['items']} edit pairs from `{e['dataset']}` ({e['split']} split, "
                f"{e['source_mode']} images through {'Null-text' if e.get('inversion') == 'null_text' else 'DDIM'} inversion; kinds {e.get('edit_kinds')}); the blend mask "
                f"comes from uncalibrated (baseline) or ELBO-calibrated heatmaps. Background PSNR/SSIM outside the "
                f"edited object's true mask; oracle: the edited object changed / the others did not. "
                f"{_wall(e)} {_provenance(e)}")
        rows = []
        for v, res in e["variants"].items():
            o = res.get("oracle") or {}
            col = res.get("colour") or {}
            clip = res.get("clip_score") or {}
            rows.append([v, _fmt(res.get("mask_iou")), _fmt(clip.get("clip_score", clip.get("mean")) if isinstance(clip, dict) else clip),
                         _fmt(res.get("bg_psnr")), _fmt(res.get("bg_psnr_decoded")), _fmt(res.get("bg_ssim"), 3),
                         _pct(col.get("edited")), _pct(col.get("others")),
                         _pct(o.get("edited")), _pct(o.get("others")), _pct(o.get("full"))])
        table = _table(["blend mask", "mask IoU vs object", "CLIP score to target", "background PSNR dB",
                        "bg PSNR vs source decode dB", "background SSIM", "colour edit done %",
                        "other objects' colour kept %", "oracle: edited object found changed %",
                        "oracle: others found kept %", "oracle: both %"], rows)
        diffs = []
        for v, ds in e.get("paired_differences", {}).items():
            for key, d in ds.items():
                diffs.append([f"{v} − baseline: {key}", _fmt(d.get("delta"), 3), _ci(d, 3)])
        if diffs:
            table += "\n\n" + _table(["paired difference", "mean", "95% CI"], diffs)
        parts.append(head + "\n\n" + table)
    return parts


def _memory_table(results: list[dict]) -> str:
    """One table of the memory-only runs (``speed.py --memory-only``), one row per probe."""
    rows, notes = [], []
    for r in results:
        st = r["setup"]
        # runs since the fused self maps probe every --self-maps mode (by_self_maps)
        modes = r["memory"].get("by_self_maps") or {st["self_maps"][0]: r["memory"]}
        budget = st.get("factor_max_mib") or r.get("budget_label") or "auto (default)"
        for mode, m in modes.items():
            label = (f"fused, max_mib {budget}" + (f", {st['factor_dtype']}" if st.get("factor_dtype") else "")
                     if mode == "fused" else mode)
            seen = set()
            for x in m["by_collect_steps"] + m["by_classes"]:
                if (x["collect_steps"], x["classes"]) in seen:
                    continue
                seen.add((x["collect_steps"], x["classes"]))
                rows.append([f"`{r['backbone']}`", label, x["collect_steps"], x["classes"], x["rss_after_load_mib"],
                             x["peak_rss_mib"], x["pipeline_increment_mib"]])
            growth = m.get("increment_growth_mib_per_collect_step", m.get("peak_growth_mib_per_collect_step"))
            notes.append(f"{label}: {_fmt(growth, 2) if growth is not None else 'n/a'} MiB per collect step, spread "
                         f"{_fmt(m['peak_spread_over_classes_mib'], 1)} MiB over class counts ({_provenance(r)}"
                         + (f" Note: {r['note']}" if r.get("note") else "") + ")")
    head = (f"Peak RSS in fresh processes, memory-only runs (collect batch {results[0]['memory']['collect_batch']}, "
            f"ELBO {results[0]['setup']['elbo_steps']} timestep per class; the ELBO pass's memory does not grow "
            "with its timesteps). " + "; ".join(notes) + ".")
    return head + "\n\n" + _table(["backbone", "self maps", "collect steps", "classes", "RSS after load MiB",
                                    "peak RSS MiB", "pipeline increment MiB"], rows)


def performance_section() -> str:
    parts = []
    speed = _load("speed_*.json")
    memory_only = [r for r in speed if r.get("memory_only")]
    for r in speed:
        if r.get("memory_only"):
            continue
        if r.get("capture_only"):
            st = r["setup"]
            note = f" Note: {r['note']}." if r.get("note") else ""
            parts.append(f"#### Capture overhead alone, backbone `{r['backbone']}` ({st['image_size']} px images)\n\n"
                         f"{st['capture_repeats']} interleaved runs of each forward. {_provenance(r)}{note}\n\n"
                         + "\n".join(_capture_lines(r["capture"])))
            continue
        st, sm = r["setup"], r["summary"]
        note = f" Note: {r['note']}." if r.get("note") else ""
        parts.append(f"#### Backbone `{r['backbone']}` ({st['image_size']} px images)\n\n"
                     f"Collect {st['collect_steps']} timesteps (batch {st['collect_batch']}), ELBO "
                     f"{st['elbo_steps']} timesteps per class (batch {st['elbo_batch']}), variants "
                     f"{', '.join(st['variants'])}; median of {st['repeats']} interleaved runs. {_provenance(r)}{note}")
        rows = []
        # results from before the fused self maps have one pipeline (explicit maps) and no mode
        main_mode = st.get("self_maps", ["explicit"])[0]
        others = st.get("self_maps", ["explicit"])[1:]
        # ours with an ELBO preset next to the default schedule (results since elbo.preset)
        preset = (sm.get("elbo_preset") or {}).get("name")
        with_preset = bool(preset) and any("reference_over_preset" in s for s in r["schedules"])
        for s in r["schedules"]:
            ref = s.get("reference_over_pipeline", {})
            rows.append([str(s["classes"]), f"{s['pairs']['collect']} + {s['pairs']['elbo']}",
                         f"{s['denoiser_calls']['ours']} / {s['denoiser_calls']['reference']}",
                         _fmt(s["pipeline_s"]["wall_s"], 3), _fmt(s["bare_forwards_s"]["wall_s"], 3),
                         _fmt(s.get("reference_s", {}).get("wall_s"), 3), s["limit_ratio"]["wall"],
                         s["limit_ratio"]["cpu"]]
                        + [s[f"limit_ratio_{o}"]["wall"] for o in others] + [ref.get("wall"), ref.get("cpu")]
                        + ([s.get("reference_over_preset", {}).get("wall")] if with_preset else []))
        parts.append(_table(["classes", "forwards (collect + ELBO)", "denoiser calls ours / reference",
                             f"pipeline s ({main_mode} self maps)", "bare forwards s", "reference s",
                             "limit ratio (target <= 1.10 at K = 2)", "limit ratio, CPU time"]
                            + [f"limit ratio, {o} self maps" for o in others]
                            + ["reference / ours (target >= 3)", "reference / ours, CPU time"]
                            + ([f"reference / ours with elbo.preset={preset}"] if with_preset else []), rows))
        c = r.get("capture")
        if not c:
            parts.append("Capture overhead: not measured in this run (see the note above).")
            continue
        lines = _capture_lines(c)
        fb = c.get("fused_factor_bytes_per_collect_step")
        if fb and fb.get("per_layer"):
            sizes = sorted(set(fb["per_layer"].values()))
            lines.append(f"Fused q/k kept per collect timestep: {_fmt(fb['all_layers_mib'], 2)} MiB for "
                         f"{len(fb['per_layer'])} layers ({', '.join(_fmt(x / 2**20, 2) for x in sizes)} MiB per layer); "
                         f"{fb['note']}.")
        p = r.get("propagation")
        if p:
            lines.append(f"Self-attention propagation on the {p['grid'][0]}x{p['grid'][1]} grid: applying the "
                         f"{p['steps']} steps to the maps instead of forming their product: "
                         f"{_fmt(p['product_s']['wall_s'], 3)} s -> {_fmt(p['steps_s']['wall_s'], 3)} s.")
        parts.append("\n".join(lines))
        m = r.get("memory")
        if m:
            modes = m.get("by_self_maps") or {main_mode: m}
            rows = [[f"{mode} self maps" if "by_self_maps" in m else "", f"collect {x['collect_steps']}, "
                     f"classes {x['classes']}", x["rss_after_load_mib"], x["peak_rss_mib"], x["pipeline_increment_mib"]]
                    for mode, mm in modes.items() for x in mm["by_collect_steps"] + mm["by_classes"]]
            summary = "; ".join(
                f"{mode}: spread {_fmt(mm['peak_spread_over_collect_steps_mib'], 1)} MiB over collect-step counts"
                + (f" ({_fmt(mm['peak_growth_mib_per_collect_step'], 2)} MiB per collect step)"
                   if mm.get("peak_growth_mib_per_collect_step") is not None else "")
                + f", {_fmt(mm['peak_spread_over_classes_mib'], 1)} MiB over class counts"
                for mode, mm in modes.items())
            parts.append(f"Peak RSS in fresh processes (collect batch {m['collect_batch']}): {summary}.\n\n"
                         + _table(["self maps", "run", "RSS after load MiB", "peak RSS MiB", "pipeline increment MiB"],
                                  rows))
    if memory_only:
        parts.append(_memory_table(memory_only))
    for c in _load("cpu_precision.json"):
        rows = []
        for m in c["results"]:
            for label, v in m["variants"].items():
                rows.append([f"{m['model']} (batch {m['batch']}, {m['latent'][0]}x{m['latent'][1]} latents)", label,
                             _fmt(v["median_s"], 4), _fmt(v["speedup_vs_float32"], 2), f"{v['rel_l2_vs_float32']:.1e}",
                             _fmt(v["first_call_s"], 1)])
        parts.append("#### One denoiser forward on CPU: bfloat16, channels-last, torch.compile\n\n"
                     f"Median of interleaved runs. {_provenance(c)}\n\n"
                     + _table(["model", "variant", "median s", "speed-up vs float32", "relative L2 vs float32",
                               "first call s (incl. compile)"], rows))
    for q in _load("dtype_quality_*.json"):
        m = q["miou"]
        t = q["pipeline_s_per_image"]
        parts.append(f"Quality cost of `dtype={q['dtype']}` on backbone `{q['backbone']}` ({q['images']} val images, "
                     f"gamma = 1/3, threshold tuned per dtype on the same images): mIoU baseline "
                     f"{_fmt(m['float32']['baseline'])} -> {_fmt(m[q['dtype']]['baseline'])}, calibrated "
                     f"{_fmt(m['float32']['calibrated'])} -> {_fmt(m[q['dtype']]['calibrated'])}; the lowest-loss "
                     f"class is the same in {_pct(q['same_lowest_loss_class'])}% of {q['multi_class_images']} "
                     f"multi-class images; per-class loss differences move by a median "
                     f"{_pct(q['loss_difference_rel_error_median'])}% (relative); alignment scores S change by at "
                     f"most {_fmt(q['score_abs_change_p90'], 3)} in 90% of images; pipeline "
                     f"{_fmt(t['float32'], 3)} -> {_fmt(t[q['dtype']], 3)} s per image. {_provenance(q)}")
    for g in _load("gpu.json"):
        if not g.get("skipped"):
            parts.extend(gpu_parts(g))
    if not parts:
        return "No measurements yet: run `make bench`."
    return "\n\n".join(parts)


def _capture_lines(c: dict[str, Any]) -> list[str]:
    """Sentences of one capture measurement of ``benchmarks/speed.py`` (part c)."""
    lines = [f"Capture overhead, one forward at batch {c['batch']}: cross-only ({c['cross_layers_hooked']} of "
             f"{c['layers_total']} layers, class columns only) **{_fmt(c['cross_only_overhead']['wall'], 3)}x** "
             f"(target <= 1.10; CPU time {_fmt(c['cross_only_overhead']['cpu'], 3)}x); the pipeline's capture "
             f"(+ {c['self_layers_hooked']} self layers, target <= 1.15) "
             f"{_fmt(c['pipeline_capture_overhead']['wall'], 3)}x."]
    for mode, b in (c.get("by_self_maps") or {}).items():
        prop = b.get("with_propagation")
        runs = b.get("forward_runs")
        lines.append(f"Self maps `{mode}`: the capture forward {_fmt(b['forward']['wall'], 3)}x a plain forward"
                     + (f" (single runs: {', '.join(_fmt(x, 3) for x in runs)})" if runs and len(runs) > 1 else "")
                     + (f", {_fmt(prop['wall'], 3)}x with the propagation of the maps of that batch "
                        f"({_fmt(b['propagation_s']['wall_s'], 2)} s"
                        + (f": {b['propagation_layer_applications']} attention products of one layer over the "
                           f"batch's rows, {_fmt(b['propagation_s']['wall_s'] / b['propagation_layer_applications'], 2)}"
                           f" s each" if b.get("propagation_layer_applications") else "") + ")" if prop else "") + ".")
    return lines


def gpu_parts(g: dict[str, Any]) -> list[str]:
    """Tables of ``benchmarks/gpu.py``: per model the schedules, capture overhead and GPU memory."""
    st = g["setup"]
    parts = [f"#### GPU: {g.get('machine', {}).get('gpu') or 'none (a check of the script)'}, random-weight models\n\n"
             f"Collect {st['collect_steps']} timesteps (batch {st['collect_batch']}), ELBO {st['elbo_steps']} "
             f"timesteps per class (batch {st['elbo_batch']}); median of {st['repeats']} runs (SDXL: one fewer); "
             f"every timing ends with `torch.cuda.synchronize()`. {_provenance(g)}"
             + (f" Note: {g['note']}." if g.get("note") else "")]
    for m in g["models"]:
        if m.get("stopped") and not m.get("schedules"):
            parts.append(f"Backbone `{m['backbone']}`: not measured ({m['stopped']}).")
            continue
        scheds = m.get("schedules", [])
        # runs since the fused self maps also time the explicit mode and ours with the ELBO preset
        explicit = any("limit_ratio_explicit" in s for s in scheds)
        preset = any("reference_over_preset" in s for s in scheds)
        rows = [[str(s["classes"]), f"{s['denoiser_calls']['ours']} / {s['denoiser_calls']['reference']}",
                 _fmt(s["pipeline_s"]["wall_s"], 3), _fmt(s["bare_forwards_s"]["wall_s"], 3),
                 _fmt(s["reference_s"]["wall_s"], 3), s["limit_ratio"]["wall"]]
                + ([s.get("limit_ratio_explicit", {}).get("wall")] if explicit else [])
                + [s["reference_over_pipeline"]["wall"]]
                + ([s.get("reference_over_preset", {}).get("wall")] if preset else [])
                for s in scheds]
        text = (f"Backbone `{m['backbone']}` ({m['image_size']} px{', ' + m['dtype'] if m.get('dtype') else ''}"
                f"{', self maps ' + m['self_maps'][0] if m.get('self_maps') else ''}):\n\n"
                + _table(["classes", "denoiser calls ours / reference", "pipeline s", "bare forwards s",
                          "reference s", "limit ratio (target <= 1.10 at K = 2)"]
                         + (["limit ratio, explicit self maps"] if explicit else [])
                         + ["reference / ours (target >= 3)"]
                         + (["reference / ours with elbo.preset=fast"] if preset else []), rows))
        c = m.get("capture")
        if c:
            text += (f"\n\nCapture overhead at batch {c['batch']}: cross-only ({c['cross_layers_hooked']} of "
                     f"{c['layers_total']} layers) **{_fmt(c['cross_only_overhead']['wall'], 3)}x** (target <= 1.10), "
                     f"the pipeline's capture (+ {c['self_layers_hooked']} self layers) "
                     f"{_fmt(c['pipeline_capture_overhead']['wall'], 3)}x; plain forward "
                     f"{_fmt(c['plain_s']['wall_s'] * 1000, 1)} ms.")
            if c.get("by_self_maps"):
                text += " " + " ".join(_capture_lines(c)[1:])
        elif m.get("schedules"):
            text += "\n\nCapture overhead and memory: not measured in this run (its `--budget-s` was reached)."
        mem = m.get("memory")
        for mode, mm in ((mem or {}).get("by_self_maps") or ({"": mem} if mem else {})).items():
            text += (f" Peak allocated GPU memory{f' ({mode} self maps)' if mode else ''} (weights "
                     f"{_fmt(mm['by_collect_steps'][0]['weights_mib'], 0)} MiB): "
                     + ", ".join(f"collect {x['collect_steps']} -> {_fmt(x['peak_mib'], 0)} MiB"
                                 for x in mm["by_collect_steps"])
                     + "; " + ", ".join(f"{x['classes']} classes -> {_fmt(x['peak_mib'], 0)} MiB"
                                        for x in mm["by_classes"])
                     + f" (spread {_fmt(mm['peak_spread_over_collect_steps_mib'], 1)} / "
                       f"{_fmt(mm['peak_spread_over_classes_mib'], 1)} MiB).")
        parts.append(text)
    history = sorted(RESULTS.glob("gpu-run*.json")) + [RESULTS / "gpu.json"]
    if len(history) > 1:
        rows = []
        for f in history:
            h = json.loads(f.read_text())
            by = {m["backbone"]: m for m in h["models"]}
            cells = [f"`{f.name}`", h.get("note", "this code (the tables above)")]
            for name in ("sd15-config", "sdxl-config"):
                m = by.get(name, {})
                cells.append(" / ".join(str(x["limit_ratio"]["wall"]) for x in m.get("schedules", [])) or "-")
                cells.append(" / ".join(str(x["reference_over_pipeline"]["wall"]) for x in m.get("schedules", [])) or "-")
                c = m.get("capture")
                cells.append(f"{_fmt(c['cross_only_overhead']['wall'], 2)} / {_fmt(c['pipeline_capture_overhead']['wall'], 2)}"
                             if c else "-")
            rows.append(cells)
        parts.append("GPU optimisation steps (same script and settings; runs on fresh H200 machines, so a few "
                     "percent is noise):\n\n" + _table(
                         ["result", "code", "SD1.5 limit K=2/4/8", "SD1.5 reference/ours", "SD1.5 capture cross / pipeline",
                          "SDXL limit K=2/4/8", "SDXL reference/ours", "SDXL capture cross / pipeline"], rows))
    return parts


def rewrite(text: str, key: str, body: str) -> str:
    """Replace the text between the markers of ``key`` (append the marked block when absent)."""
    begin, end = MARKERS[key]
    block = f"{begin}\n<!-- generated by benchmarks/report.py from benchmarks/results/; do not edit -->\n{body}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    title = {"results": "## Results", "performance": "## Performance"}[key]
    return text.rstrip("\n") + f"\n\n{title}\n\n{block}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--print", action="store_true", help="print the sections, leave README.md alone")
    args = parser.parse_args(argv)
    sections = {"results": results_section(), "performance": performance_section()}
    if args.print:
        for key, body in sections.items():
            print(f"## {key}\n\n{body}\n")
        return 0
    text = args.readme.read_text(encoding="utf-8")
    for key, body in sections.items():
        text = rewrite(text, key, body)
    from t2ialign.core.fileio import atomic_write_text

    atomic_write_text(args.readme, text)
    print(f"rewrote the results and performance sections of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
