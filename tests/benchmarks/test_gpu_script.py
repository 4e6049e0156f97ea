"""``benchmarks/gpu.py`` runs end to end on the CPU with a tiny model, so a change in the speed
measurements it shares with ``speed.py`` cannot break it unnoticed until a GPU is lent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu  # noqa: E402
import report  # noqa: E402


def test_gpu_script_measures_both_self_map_modes_and_the_preset_on_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    rc = gpu.main(["--device", "cpu", "--models", "tiny-random", "--classes", "2", "--collect-steps", "2",
                   "--elbo-steps", "2", "--collect-batch", "2", "--elbo-batch", "4", "--repeats", "1",
                   "--capture-repeats", "1", "--no-profile", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    model = result["models"][0]
    row = model["schedules"][0]
    assert row["classes"] == 2 and row["limit_ratio"]["wall"] > 0
    assert {"limit_ratio_explicit", "reference_over_pipeline", "reference_over_preset"} <= set(row)
    assert set(model["capture"]["by_self_maps"]) == {"fused", "explicit"}
    summary = result["summary"]["tiny-random"]
    assert summary["pipeline_capture_forward"] > 0 and summary["pipeline_capture_with_propagation"] > 0
    assert "memory" not in model  # peak GPU memory needs CUDA
    assert "partial" not in result
    assert report.gpu_parts(result)  # the README tables render from it
