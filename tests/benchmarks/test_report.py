"""The benchmark scripts' pure parts: README section rewriting and the ELBO ranking accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402
import report  # noqa: E402


def test_rewrite_appends_markers_once_then_replaces_between_them():
    text = "# Title\n\nintro\n"
    once = report.rewrite(text, "results", "table v1")
    assert once.count("<!-- results:begin -->") == 1 and "## Results" in once and "table v1" in once
    twice = report.rewrite(once, "results", "table v2")
    assert "table v1" not in twice and "table v2" in twice
    assert twice.count("<!-- results:begin -->") == 1 and twice.count("## Results") == 1
    assert twice.startswith("# Title\n\nintro\n")
    # text after the block is kept, and the other section is independent
    both = report.rewrite(twice + "\n## After\n", "performance", "speed")
    assert both.index("table v2") < both.index("## After") < both.index("speed")


class _Sample:
    def __init__(self, mask):
        self.mask = mask


class _Dataset:
    def __init__(self, masks):
        self.masks = masks

    def __getitem__(self, i):
        return _Sample(self.masks[i])


def test_ranking_accuracy_counts_largest_area_class_with_top_score(tmp_path):
    big1 = np.zeros((4, 4), dtype=np.int64)
    big1[:3] = 1
    big1[3, :1] = 2  # class 1 largest
    big2 = np.zeros((4, 4), dtype=np.int64)
    big2[:, :1] = 1
    big2[:, 1:] = 3  # class 3 largest
    records = [
        {"id": "a", "index": 0, "classes": [1, 2], "scores": {"calibrated": [1.0, 0.33]}},  # hit
        {"id": "b", "index": 1, "classes": [1, 3], "scores": {"calibrated": [1.0, 0.33]}},  # miss
        {"id": "c", "index": 0, "classes": [1], "scores": {"calibrated": [1.0]}},  # one class: not counted
    ]
    (tmp_path / "records.eval.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = quality.ranking_accuracy(tmp_path, _Dataset([big1, big2]))
    assert res == {"accuracy": 0.5, "images": 2, "chance": 0.5, "area_ties": 0}
    assert quality.ranking_accuracy(tmp_path, _Dataset([big1, big2]), variant="missing") is None


def _gpu_model(name, limits, capture=True):
    sched = [{"classes": k, "denoiser_calls": {"ours": 6, "reference": 50}, "pipeline_s": {"wall_s": 0.3},
              "bare_forwards_s": {"wall_s": 0.2}, "reference_s": {"wall_s": 2.0}, "limit_ratio": {"wall": lim},
              "reference_over_pipeline": {"wall": 6.5}} for k, lim in limits.items()]
    m = {"backbone": name, "image_size": 512, "schedules": sched}
    if capture:
        m["capture"] = {"batch": 10, "cross_layers_hooked": 16, "layers_total": 32, "self_layers_hooked": 5,
                        "cross_only_overhead": {"wall": 1.27}, "pipeline_capture_overhead": {"wall": 2.35},
                        "plain_s": {"wall_s": 0.0354}}
    return m


def test_gpu_tables_say_what_was_not_measured_and_list_the_optimisation_steps(tmp_path, monkeypatch):
    setup = {"collect_steps": 10, "collect_batch": 10, "elbo_steps": 20, "elbo_batch": 8, "repeats": 3}
    final = {"machine": {"gpu": "H200"}, "command": "python benchmarks/gpu.py", "setup": setup,
             "models": [_gpu_model("sd15-config", {2: 1.39, 8: 1.12}),
                        _gpu_model("sdxl-config", {2: 1.2}, capture=False),
                        {"backbone": "other", "stopped": "time budget reached before this model"}]}
    older = dict(final, note="before the fix", models=[_gpu_model("sd15-config", {2: 1.59, 8: 1.2})])
    (tmp_path / "gpu.json").write_text(json.dumps(final))
    (tmp_path / "gpu-run1-x.json").write_text(json.dumps(older))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = "\n\n".join(report.gpu_parts(final))
    assert "| 2 | 6 / 50 | 0.300 | 0.200 | 2.000 | 1.39 | 6.50 |" in text
    assert "**1.270x**" in text and "plain forward 35.4 ms" in text
    assert "Capture overhead and memory: not measured in this run" in text  # sdxl had no capture
    assert "Backbone `other`: not measured (time budget reached before this model)." in text
    history = text[text.index("GPU optimisation steps"):]
    assert "`gpu-run1-x.json` | before the fix | 1.59 / 1.2 |" in history
    assert "`gpu.json` | this code (the tables above) | 1.39 / 1.12 |" in history


def test_toy_bias_summary_of_a_segmentation_run_and_its_table(tmp_path, monkeypatch):
    import toy_bias

    def variant(per_class, buckets):
        return {"per_class": {c: {"iou": v} for c, v in per_class.items()},
                "size_buckets": [{"iou": v, "area_min": 0.01 * i, "area_max": 0.01 * (i + 1)}
                                 for i, v in enumerate(buckets)]}

    share = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.06, "e": 0.03, "f": 0.01}
    results = {"variants": {
        "baseline": variant({"a": 60, "b": 50, "c": 40, "d": 30, "e": 20, "f": 10}, [5, 10, 15, 40, 50, 60]),
        "calibrated": variant({"a": 60, "b": 50, "c": 40, "d": 33, "e": 23, "f": 13}, [8, 13, 18, 40, 50, 60]),
    }}
    summary = toy_bias.summarise(results, share)
    assert summary["frequent_classes"] == ["a", "b", "c"] and summary["rare_classes"] == ["d", "e", "f"]
    base = summary["variants"]["baseline"]
    assert (base["frequent_mean"], base["rare_mean"]) == (50.0, 20.0)
    assert (base["smallest_buckets_mean"], base["largest_buckets_mean"]) == (10.0, 50.0)
    assert summary["change_vs_baseline"]["calibrated"] == {
        "frequent_mean": 0.0, "rare_mean": 3.0, "smallest_buckets_mean": 3.0, "largest_buckets_mean": 0.0}

    (tmp_path / "toy_bias.json").write_text(json.dumps(summary | {"command": "python benchmarks/toy_bias.py"}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.results_section()
    assert "three rarest (d, e, f)" in text
    assert "| calibrated | 50.00 | 23.00 | 13.00 | 50.00 |" in text


def test_capture_only_speed_result_reports_each_run_and_the_deferred_propagation():
    runs = {"wall_s": 60.0, "cpu_s": 118.0, "runs": 3, "wall_runs": [59.0, 60.0, 61.0]}
    capture = {"batch": 10, "cross_layers_hooked": 16, "self_layers_hooked": 5, "layers_total": 32,
               "self_maps": "fused", "cross_only_overhead": {"wall": 1.013, "cpu": 1.014},
               "pipeline_capture_overhead": {"wall": 1.02, "cpu": 1.01},
               "by_self_maps": {"fused": {"forward": {"wall": 1.02, "cpu": 1.01}, "forward_runs": [0.99, 1.02, 1.2],
                                          "capture_s": runs, "propagation_s": {"wall_s": 13.8, "cpu_s": 27.0},
                                          "with_propagation": {"wall": 1.25, "cpu": 1.24},
                                          "propagation_layer_applications": 8}}}
    lines = report._capture_lines(capture)
    assert "**1.013x**" in lines[0] and "target <= 1.15" in lines[0]
    assert "single runs: 0.990, 1.020, 1.200" in lines[1] and "1.250x with the propagation" in lines[1]
    assert "(13.80 s: 8 attention products of one layer over the batch's rows, 1.73 s each)" in lines[1]
