"""End-to-end referring segmentation through the CLI on a tiny random SD model and toy scenes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2ialign.core.cli import main
from tests.helpers.tiny_models import make_tiny_sd

REPO = Path(__file__).resolve().parents[3]
FAST = ["elbo.timesteps=[[1, 999, 250]]", "collect.timesteps=[[20, 101, 40]]", "collect.batch_size=2",
        "layers.cross_weight=[1, 1, 1, 1, 1]", "layers.self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]]",
        "bootstrap=50", "visuals=2"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    folder = make_tiny_sd(root / "tiny")
    reg = root / "reg.yaml"
    reg.write_text(
        f"backbones:\n  tiny: {{plugin: stable_diffusion, model: '{folder}'}}\n"
        "datasets:\n  toy_small: {plugin: toy_shapes, n_val: 3, n_test: 4, image_size: 64}\n"
    )
    return reg


def _eval(registry, out, *extra):
    return main(["--registry", str(registry), "eval", "segmentation", "--backbone", "tiny",
                 "--dataset", "toy_small", "--output", str(out), *FAST, *extra])


def _strip(results):
    return {k: v for k, v in results.items() if k != "timings"}


def test_eval_writes_everything_and_resumes(registry, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(registry, out) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "calibrated" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 4 and results["threshold_mode"] == "heldout"
    assert "held-out split 'val' (3 images)" in results["threshold_how"]
    for name in ("baseline", "calibrated"):
        v = results["variants"][name]
        assert 0.0 <= v["miou"] <= 100.0
        assert 0.01 <= v["threshold"] <= 0.99
        assert "per_class" in v and "size_buckets" in v
    assert set(results["differences_vs_baseline"]["calibrated"]) >= {"delta", "ci95_low", "ci95_high"}
    assert results["versions"]["t2ialign"]
    for name in ("config.yaml", "report.html", "records.eval.rank0.jsonl", "records.tune.rank0.jsonl"):
        assert (out / name).is_file(), name
    assert len(list((out / "heatmaps" / "eval").glob("*.npz"))) == 4
    assert len(list((out / "visuals").glob("*.png"))) == 2
    html = (out / "report.html").read_text()
    assert "per-class IoU" in html and "visuals/" in html
    lines = (out / "records.eval.rank0.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert {"id", "classes", "words", "scores"} <= set(rec)
    # a rerun with the same config resumes: nothing is recomputed, the numbers are identical
    assert _eval(registry, out) == 0
    assert (out / "records.eval.rank0.jsonl").read_text().splitlines() == lines
    assert _strip(json.loads((out / "results.json").read_text())) == _strip(results)


def test_other_config_into_same_folder_is_refused(registry, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(registry, out, "limit=2") == 0
    assert _eval(registry, out, "limit=2", "gamma=0.5") == 2
    err = capsys.readouterr().err
    assert "holds a run made with different gamma" in err and "use another --output" in err


def test_other_weights_behind_the_same_backbone_name_are_refused(registry, tmp_path, capsys):
    """The registry name stays ``tiny`` but the folder now holds other weights (an update, an
    override): resuming would mix two models' records, so the run stops and says why."""
    out = tmp_path / "run"
    assert _eval(registry, out, "limit=2") == 0
    stored = json.loads((out / "weights.json").read_text())
    assert stored["backbone"] == "tiny" and len(stored["denoiser"]) == 16
    other = make_tiny_sd(tmp_path / "retrained", seed=1)
    reg = tmp_path / "reg.yaml"
    reg.write_text(registry.read_text().replace(str(Path(registry).parent / "tiny"), str(other)))
    assert str(other) in reg.read_text()
    assert _eval(reg, out, "limit=2") == 2
    err = capsys.readouterr().err
    assert "holds results of other weights for backbone 'tiny'" in err and "use another --output" in err
    # the same weights again resume as before
    assert _eval(registry, out, "limit=2") == 0


def test_weights_fingerprint_tells_weights_apart_and_ignores_the_copy():
    import torch

    from t2ialign.plugins.tasks.common import weights_fingerprint

    torch.manual_seed(0)
    a = torch.nn.Linear(300, 200)
    b = torch.nn.Linear(300, 200)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1.0  # the first sampled value
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(a.to(torch.float64))


def test_oracle_threshold_is_labelled(registry, tmp_path):
    out = tmp_path / "oracle"
    assert _eval(registry, out, "threshold.mode=oracle", "limit=2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["threshold_mode"] == "oracle"
    assert results["threshold_how"].startswith("ORACLE")


def test_two_processes_give_the_numbers_of_one(registry, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # same thread count in both runs: float results of a matmul depend on how it is split
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["-m", "t2ialign", "--registry", str(registry), "eval", "segmentation", "--backbone", "tiny",
            "--dataset", "toy_small", *FAST]
    single = subprocess.run([sys.executable, *args, "--output", str(one)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    # accelerate's --multi_gpu starts torch.distributed workers; without a GPU they use gloo on CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*launch, *args, "--output", str(two)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert len(list(two.glob("records.eval.rank*.jsonl"))) == 2
    for name in ("baseline", "calibrated"):
        assert r2["variants"][name] == r1["variants"][name]
    assert r2["differences_vs_baseline"] == r1["differences_vs_baseline"]


def test_elbo_preset_is_written_out_as_the_values_it_stands_for(registry, tmp_path):
    import yaml

    from t2ialign.core.elbo_presets import ELBO_PRESETS
    from t2ialign.core.timesteps import parse_timesteps

    out = tmp_path / "fast"
    rest = [o for o in FAST if not o.startswith("elbo.")]
    assert main(["--registry", str(registry), "eval", "segmentation", "--backbone", "tiny", "--dataset", "toy_small",
                 "--output", str(out), "limit=2", "threshold.limit=1", "elbo.preset=fast", *rest]) == 0
    fast = ELBO_PRESETS["fast"]
    written = yaml.safe_load((out / "config.yaml").read_text())["elbo"]
    assert written["preset"] == "fast" and {k: written[k] for k in fast} == fast
    samples = len(parse_timesteps(fast["timesteps"])) * (2 if fast["antithetic"] else 1)
    recs = [json.loads(line) for line in (out / "records.eval.rank0.jsonl").read_text().splitlines()]
    assert any("elbo" in r for r in recs)
    assert all(r["elbo"]["timesteps"] == samples for r in recs if "elbo" in r)
