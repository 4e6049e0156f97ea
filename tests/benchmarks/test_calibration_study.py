"""The calibration study: its statistics on known inputs, and a resumable end-to-end run on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import calibration_study as cs  # noqa: E402
from _common import tiny_registry  # noqa: E402

from t2ialign.plugins.metrics.segmentation import SegmentationMetrics
from t2ialign.core.stats import confusion_matrix, miou_from_confusion

NAMES = ["background", "a", "b", "c"]


def _random_pair(rng, k=4, size=16):
    target = torch.from_numpy(rng.integers(0, k, (size, size)))
    pred = torch.where(torch.from_numpy(rng.random((size, size)) < 0.7), target,
                       torch.from_numpy(rng.integers(0, k, (size, size))))
    return pred, target


def test_metric_from_confusions_equals_the_metric_fed_image_by_image():
    rng = np.random.default_rng(0)
    direct = SegmentationMetrics(class_names=NAMES)
    confs = []
    for _ in range(12):
        pred, target = _random_pair(rng)
        direct.update(pred, target)
        confs.append(confusion_matrix(pred, target, len(NAMES)))
    ref = direct.compute()
    got = cs.metric_of(confs, NAMES)
    assert got["miou"] == pytest.approx(ref["miou"])
    for name in NAMES:
        assert got["per_class"][name] == pytest.approx(ref["per_class"][name])
    # equal-count size buckets come from the same (area, T, P, TP, class) records
    assert len(got["size_buckets"]) == len(ref["size_buckets"]) == 10
    for mine, theirs in zip(got["size_buckets"], ref["size_buckets"]):
        assert mine == pytest.approx(theirs)


def test_sparse_confusions_round_trip():
    conf = np.array([[5, 0], [2, 9]])
    assert cs._sparse(conf) == [[0, 0, 5], [1, 0, 2], [1, 1, 9]]
    assert (cs.dense(cs._sparse(conf), 2) == conf).all()


def test_heterogeneity_of_equal_and_of_conflicting_streams():
    same = [{"delta": 1.0, "ci95_low": 0.0, "ci95_high": 2.0}] * 4
    h = cs.heterogeneity(same)
    assert h["Q"] == pytest.approx(0.0) and h["I2"] == 0.0 and h["p"] == pytest.approx(1.0)
    assert h["fixed_effect_mean"] == pytest.approx(1.0)
    # two streams at +2 and -2 with SE 0.5 each: Q = 2 * (2 / 0.5)^2 = 32 on 1 df
    se = 0.5 * 2 * 1.959964
    split = [{"delta": 2.0, "ci95_low": 2.0 - se / 2, "ci95_high": 2.0 + se / 2},
             {"delta": -2.0, "ci95_low": -2.0 - se / 2, "ci95_high": -2.0 + se / 2}]
    h = cs.heterogeneity(split)
    assert h["Q"] == pytest.approx(32.0) and h["p"] < 1e-6 and h["I2"] == pytest.approx(31 / 32)


def _image(split, i, base, cal, n_classes=2, **desc):
    k = len(NAMES)
    conf = {v: cs._sparse(cal if v != "baseline" else base) for v in ["baseline", *cs.GAMMA_CHOICES, "fixed_s"]}
    return {"split": split, "id": f"{split}_{i:06d}", "index": i, "classes": list(range(1, n_classes + 1)),
            "n_classes": n_classes, "n_objects": n_classes, "max_occluded": 0.0, "min_area": 0.01,
            "small": False, "rare": False, "conf": {"frozen": conf}, **desc}


def test_influence_is_the_leave_one_out_change_of_the_difference():
    rng = np.random.default_rng(1)
    images = []
    for i in range(6):
        (pa, t), (pb, _) = _random_pair(rng), _random_pair(rng)
        images.append(_image("stream1", i, confusion_matrix(pa, t, 4), confusion_matrix(pb, t, 4)))
    infl = cs.influence(images, "frozen", "calibrated", 4)
    a = np.stack([cs.dense(im["conf"]["frozen"]["baseline"], 4) for im in images])
    b = np.stack([cs.dense(im["conf"]["frozen"]["calibrated"], 4) for im in images])
    full = miou_from_confusion(b.sum(0)) - miou_from_confusion(a.sum(0))
    keep = np.arange(6) != 3
    assert infl[3] == pytest.approx(full - (miou_from_confusion(b[keep].sum(0)) - miou_from_confusion(a[keep].sum(0))))


def _synthetic_report():
    """Synthetic records: calibration helps on two streams, is neutral on one; gamma 1/2 has the best tuning mIoU."""
    rng = np.random.default_rng(2)
    images = []
    for s, helps in (("stream0", True), ("stream1", True), ("stream2", True), ("stream3", False)):
        for i in range(30):
            pred, t = _random_pair(rng)
            good = confusion_matrix(t, t, 4)  # a perfect prediction
            base = confusion_matrix(pred, t, 4)
            images.append(_image(s, i, base, good if helps and i % 2 == 0 else base))
    thr = {v: {"threshold": 0.3, "miou": 50.0} for v in ["baseline", *cs.GAMMA_CHOICES, "fixed_s"]}
    thr["gamma=0.5"]["miou"] = 60.0
    header = {"class_names": NAMES, "variants": ["baseline", *cs.GAMMA_CHOICES, "fixed_s"],
              "gammas": {"baseline": 1.0, "calibrated": 1 / 3, "gamma=0.5": 0.5, "gamma=0.2": 0.2,
                         "gamma=0.1": 0.1, "fixed_s": 1 / 3},
              "thresholds": {"frozen": thr}}
    return cs.analyse(images, header, 200, 0)


def test_analyse_pools_streams_and_finds_the_tuned_gamma():
    rep = _synthetic_report()
    assert rep["tuned_variant"] == "gamma=0.5" and rep["tuned_gamma"] == 0.5
    assert rep["images_per_split"] == {"stream0": 30, "stream1": 30, "stream2": 30, "stream3": 30}
    pooled = rep["pooled_streams"]  # stream0 is the tuning stream: not pooled
    assert pooled["images"] == 90
    assert pooled["vs_baseline"]["calibrated"]["delta"] > 0
    assert rep["per_split"]["stream3"]["vs_baseline"]["calibrated"]["delta"] == pytest.approx(0.0)
    h = rep["heterogeneity"]["calibrated"]
    assert h["streams"] == 3 and h["Q"] is None  # stream3 has no spread at all: Q is undefined, not infinite
    assert rep["heterogeneity"]["fixed_s"]["Q"] is None
    strata = {r["stratum"]: r for r in rep["cause"]["strata"]["pooled streams"]}
    assert strata["2 classes"]["images"] == 90 and strata["1 class"]["images"] == 0


def test_end_to_end_is_resumable_and_recomputable_from_the_image_records(tmp_path):
    """tiny-random model: infer (twice: the second run adds nothing), analyse, then analyse from the JSON alone."""
    reg = tiny_registry(tmp_path / "reg", n_val=3, n_test=3)
    runs = tmp_path / "runs"
    common = ["--registry", str(reg), "--backbone", "tiny-random", "--dataset", "toy_small", "--runs-dir", str(runs),
              "--limits", "stream0=3", "stream1=2", "val=2", "--step", "2",
              "--set", "collect.batch_size=5", "elbo.timesteps=[[100, 1000, 300]]"]
    splits = ["--splits", "stream0", "stream1", "val"]
    assert cs.main(["infer", *splits, *common]) == 0
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.npz")}
    assert len(before) > 0
    assert cs.main(["infer", *splits, *common]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.npz")} == before  # nothing recomputed
    images, out, again = tmp_path / "images.json", tmp_path / "study.json", tmp_path / "again.json"
    assert cs.main(["analyse", *common, "--bootstrap", "50", "--images", str(images), "--out", str(out)]) == 0
    assert cs.main(["analyse", "--from-images", "--bootstrap", "50", "--images", str(images),
                    "--out", str(again)]) == 0
    a, b = json.loads(out.read_text()), json.loads(again.read_text())
    for key in ("per_split", "pooled_streams", "heterogeneity", "cause", "thresholds", "tuned_variant"):
        assert a[key] == b[key], key
    data = json.loads(images.read_text())
    assert {im["split"] for im in data["images"]} == {"stream0", "stream1", "val"}
    assert a["images_per_split"] == {"stream0": 3, "stream1": 2, "val": 2}
    # the old split is also scored with the old protocol (val tuned on itself)
    assert {r["split"] for r in a["cause"]["protocol"]} == {"val"}
    assert a["pooled_streams"]["images"] == 2


def test_readme_headline_is_the_pooled_difference(tmp_path, monkeypatch):
    import report

    rep = _synthetic_report()
    rep.update({"dataset": "toy_shapes", "backbone": "toy", "command": "python benchmarks/calibration_study.py",
                "machine": {}, "setup": {"tuning": {"split": "stream0", "images": 30}, "bootstrap": 200}})
    (tmp_path / "calibration_study.json").write_text(json.dumps(rep))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = "\n\n".join(report.calibration_study_parts())
    d = rep["pooled_streams"]["vs_baseline"]["calibrated"]
    assert f"**90 scenes**" in text and f"{d['delta']:+.2f} [{d['ci95_low']:+.2f}, {d['ci95_high']:+.2f}]" in text
    assert "| stream1 | 30 |" in text and "| **pooled** | 90 |" in text
    assert "stream0 |" not in text  # the tuning stream is not an evaluated stream


def test_image_records_are_cached_and_only_new_images_are_scored(tmp_path, monkeypatch):
    calls = []

    def fake_split_images(out, ds, n, variants, thresholds, start=0):
        calls.append((start, n))
        return [{"split": "stream1", "index": i} for i in range(start, n)]

    class _Host:
        def dataset(self, name, split):
            return None

    (tmp_path / "stream1").mkdir()
    monkeypatch.setattr(cs, "split_images", fake_split_images)
    thr = {"frozen": {"baseline": {"threshold": 0.3, "miou": 1.0}}}
    for n in (4, 4, 7):
        monkeypatch.setattr(cs, "done_images", lambda out, n=n: n)
        got = cs.collect_images(tmp_path, ["stream1"], _Host(), "toy_shapes", thr, {"stream1": ["frozen"]})
        assert [im["index"] for im in got] == list(range(n))
    assert calls == [(0, 4), (4, 7)]  # the second call found everything in the cache
    # other thresholds: nothing of the cache is reused
    thr2 = {"frozen": {"baseline": {"threshold": 0.4, "miou": 1.0}}}
    cs.collect_images(tmp_path, ["stream1"], _Host(), "toy_shapes", thr2, {"stream1": ["frozen"]})
    assert calls[-1] == (0, 7)
