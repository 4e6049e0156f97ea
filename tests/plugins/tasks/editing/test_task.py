"""The task ``editing`` end to end (``t2ialign eval editing``), ``t2ialign edit`` and the paired statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from t2ialign.core.cli import main
from t2ialign.core.report import save_png
from t2ialign.plugins.tasks.editing.task import paired_difference
from tests.helpers.editing import FAST
from tests.helpers.tiny_models import IMAGE


def test_paired_difference():
    d = paired_difference([1.0, 2.0, float("nan")], [2.0, 4.0, 5.0], n=100, seed=0)
    assert d["delta"] == pytest.approx(1.5) and d["items"] == 2
    assert d["ci95_low"] <= 1.5 <= d["ci95_high"]


def test_eval_editing_writes_everything_and_resumes(clip_registry, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--registry", str(clip_registry), "eval", "editing", "--backbone", "tiny", "--dataset", "toy_small",
            "--limit", "2", "--output", str(out), *FAST, "clip_metric=clip_tiny", "oracle_metric=oracle"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 2 and results["edit_kinds"] == {"colour": 1, "shape": 1}
    for name in ("baseline", "calibrated"):
        v = results["variants"][name]
        assert 0 <= v["mask_fraction"] <= 1 and v["bg_ssim"] <= 1
        assert v["clip_score"]["prompts"] == 2 and -100 <= v["clip_score"]["clip_score"] <= 100
        assert set(v["oracle"]) == {"edited", "others", "full"}
    diffs = results["paired_differences"]["calibrated"]
    assert {"clip_score", "bg_psnr", "mask_iou", "oracle_full"} <= set(diffs)
    assert len(list((out / "edits").glob("*.npz"))) == 2 and len(list((out / "visuals").glob("*.png"))) == 2
    assert "calibrated - baseline" in (out / "report.html").read_text()
    lines = (out / "records.rank0.jsonl").read_text().splitlines()
    assert main(args) == 0  # resumes: nothing recomputed, same numbers
    assert (out / "records.rank0.jsonl").read_text().splitlines() == lines
    capsys.readouterr()
    assert main(args[:-2] + ["clip_metric=clip_tiny", "oracle_metric=oracle", "gamma=0.5"]) == 2
    assert "different gamma" in capsys.readouterr().err


def test_edit_command_writes_both_variants(host, clip_registry, tmp_path, capsys):
    image = host.dataset({"name": "toy_default", "plugin": "toy_shapes"}, "test")[0].image
    path = save_png(tmp_path / "scene.png", image)
    out = tmp_path / "edit"
    code = main(["--registry", str(clip_registry), "edit", str(path), "--source", "a photo of a red circle and a star",
                 "--target", "a photo of a blue circle and a star", "--words", "circle", "star",
                 "--backbone", "tiny", "--output", str(out), *FAST, "clip_metric=clip_tiny"])
    assert code == 0
    summary = json.loads((out / "scene_edit.json").read_text())
    assert summary["edit_words"] == ["circle"]
    assert set(summary["variants"]) == {"baseline", "calibrated"}
    assert all(np.isfinite(v["clip_score"]) for v in summary["variants"].values())
    for name in ("scene_edit_baseline.png", "scene_edit_calibrated.png", "scene_edit_panel.png"):
        assert (out / name).is_file()
    from t2ialign.core.images import load_rgb

    assert load_rgb(out / "scene_edit_calibrated.png").shape == (IMAGE, IMAGE, 3)
