"""End to end through t2ialign's own CLI: referring segmentation with the tiny FLUX.1 model on toy
scenes, and ``t2ialign plugins`` showing this distribution (read from its installed metadata)."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest

from t2ialign.core.cli import main

FAST = ["elbo.timesteps=[[1, 999, 250]]", "collect.timesteps=[[20, 101, 40]]", "collect.batch_size=2",
        "layers.cross_weight=[1]", "layers.self_weight=[[1], [1]]", "bootstrap=50", "visuals=2"]


@pytest.fixture(scope="module")
def registry(flux_folders, tmp_path_factory):
    reg = tmp_path_factory.mktemp("seg") / "reg.yaml"
    reg.write_text(
        f"backbones:\n  tinyflux: {{plugin: flux, model: '{flux_folders['dev']}', t5_max_length: 16}}\n"
        "datasets:\n  toy_small: {plugin: toy_shapes, n_val: 2, n_test: 3, image_size: 64}\n"
    )
    return reg


def test_segmentation_runs_end_to_end_and_resumes(registry, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--registry", str(registry), "eval", "segmentation", "--backbone", "tinyflux", "--dataset", "toy_small",
            "--output", str(out), *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "calibrated" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 3
    for name in ("baseline", "calibrated"):
        v = results["variants"][name]
        assert 0.0 <= v["miou"] <= 100.0 and 0.01 <= v["threshold"] <= 0.99
    assert len(list((out / "heatmaps" / "eval").glob("*.npz"))) == 3
    first = {k: v for k, v in results.items() if k != "timings"}
    # a second run over the same folder resumes from the records and gives the same numbers
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "timings"} == first


def test_plugins_command_lists_the_distribution_and_version():
    version = md.version("t2ialign-flux")
    proc = subprocess.run([sys.executable, "-m", "t2ialign", "plugins", "--json", "--strict"], capture_output=True,
                          text=True, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)["plugins"]}
    for name, section, provided in (("flux", "backbones", "flux"), ("flux_attention", "extractors", "flux_attention"),
                                    ("pixart_sigma", "backbones", "pixart_sigma")):
        assert records[name]["source"] == f"t2ialign-flux {version}"
        assert records[name]["status"] == "loaded" and provided in records[name]["provides"][section]
    assert records["flux_registry"]["source"] == f"t2ialign-flux {version}"
    # the built-ins are still there, untouched
    assert records["stable_diffusion_3"]["source"] == "builtin"
