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
