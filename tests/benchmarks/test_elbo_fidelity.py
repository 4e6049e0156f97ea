"""The ELBO fidelity study's pure parts: per-image measures, the paired comparison, the preset rule
and the docs table, on synthetic per-class losses whose noise levels are known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import elbo_fidelity as ef  # noqa: E402


def _records(n_img: int, noise: dict[str, float], seed: int = 0) -> list[dict]:
    """Images with 3 classes: every estimator is the true loss plus its own noise level; the
    targets carry a small noise of their own."""
    rng = np.random.default_rng(seed)
    names = [e.name for e in ef.estimators()]
    out = []
    for i in range(n_img):
        true = rng.normal(0.0, 1.0, 3)
        losses = {t.name: (true + rng.normal(0, 0.05, 3)).tolist() for t in ef.TARGETS.values()}
        for name in names:
            losses[name] = (true + rng.normal(0, noise.get(name, 2.0), 3)).tolist()
        out.append({"key": f"test:{i}", "losses": losses})
    return out


def test_image_measures_on_a_known_ordering():
    m = ef.image_measures([0.0, 1.0, 2.0], [0.0, 2.0, 1.0])
    assert m["pair_agreement"] == 2 / 3 and m["top1"] == 1.0
    assert m["score_error"] > 0
    same = ef.image_measures([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    assert same == {"pair_agreement": 1.0, "top1": 1.0, "score_error": 0.0}


def test_the_rule_picks_the_cheapest_estimator_that_is_as_good_as_the_reference():
    # the reference and elbo+anti@6 are precise, everything else below 20 forwards is very noisy
    recs = _records(300, {ef.REFERENCE: 0.3, "elbo+anti@6": 0.3, "elbo+anti@10": 0.3})
    summary = ef.summarize(recs, boots=300)
    rows = summary["vs_own_scheme_target"]["estimators"]
    assert summary["preset_choice"]["estimator"] == "elbo+anti@6"
    assert rows["elbo+anti@6"]["not_significantly_worse"]
    assert rows["elbo@2"]["pair_agreement_vs_reference"]["significantly_worse"]
    assert not rows["uniform/grid@4"]["not_significantly_worse"]
    # over two backbones a candidate must pass on both: a backbone where @6 is noisy moves it to @10
    other = ef.summarize(_records(300, {ef.REFERENCE: 0.3, "elbo+anti@10": 0.3}, seed=1), boots=300)
    decision = ef.decide({"a": summary, "b": other})
    assert decision["choice"] == "elbo+anti@10" and "elbo+anti@6" not in decision["passing_on_all"]


def test_markdown_table_lists_the_reference_first_and_every_estimator_by_cost():
    summary = ef.summarize(_records(40, {ef.REFERENCE: 0.3}), boots=100)
    table = ef.markdown_table(summary).splitlines()
    assert table[2].startswith(f"| **reference** `{ef.REFERENCE}` | 20 |")
    costs = [int(line.split("|")[2]) for line in table[3:]]
    assert costs == sorted(costs) and len(table) - 3 == len(summary["vs_own_scheme_target"]["estimators"]) - 1
